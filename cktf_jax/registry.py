"""A name -> factory registry, the one mechanism behind models and methods."""

from typing import Callable, Dict, Generic, List, TypeVar

Factory = TypeVar("Factory", bound=Callable)


class Registry(Generic[Factory]):
  """Factories by name, in registration order; ``kind`` names them in errors."""

  def __init__(self, kind: str):
    self.kind = kind
    self._factories: Dict[str, Factory] = {}

  def register(self, name: str) -> Callable[[Factory], Factory]:
    """Decorator: ``@registry.register('name')`` on a factory."""

    def wrap(factory: Factory) -> Factory:
      if name in self._factories:
        raise ValueError(f"{self.kind} {name!r} is registered twice")
      self._factories[name] = factory
      return factory

    return wrap

  def names(self) -> List[str]:
    return list(self._factories)

  def check(self, name: str) -> None:
    """Raise ``ValueError`` listing the valid names when ``name`` is unknown."""
    if name not in self._factories:
      raise ValueError(f"unknown {self.kind} {name!r}; valid {self.kind}s are: "
                       f"{', '.join(self._factories)}")

  def get(self, name: str) -> Factory:
    self.check(name)
    return self._factories[name]
