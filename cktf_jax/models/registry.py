"""One registry from the reference's ``model_dict`` names to Flax modules."""

import math
from typing import Callable, Dict

import flax.linen as nn
import jax
import jax.numpy as jnp

ModelFactory = Callable[[int], nn.Module]
_MODELS: Dict[str, ModelFactory] = {}


def register_model(name: str):
  """Decorator: ``@register_model('resnet8')`` on a ``num_classes -> Module`` factory."""

  def wrap(factory: ModelFactory) -> ModelFactory:
    if name in _MODELS:
      raise ValueError(f"model {name!r} is registered twice")
    _MODELS[name] = factory
    return factory

  return wrap


def model_names():
  """Every registered model name, in registration order (the reference's order)."""
  return list(_MODELS)


def check_model_name(name: str) -> None:
  """Raise ``ValueError`` listing the valid names when ``name`` is unknown."""
  if name not in _MODELS:
    raise ValueError(
        f"unknown model {name!r}; valid models are: {', '.join(_MODELS)}")


def create_model(name: str, num_classes: int) -> nn.Module:
  """The Flax module for the reference's ``model_dict[name](num_classes=...)``."""
  check_model_name(name)
  if not isinstance(num_classes, int) or num_classes < 1:
    raise ValueError(f"num_classes must be a positive int; got {num_classes!r}")
  return _MODELS[name](num_classes)


def abstract_variables(name: str, num_classes: int, image_size: int = 32):
  """The model's variables as ``jax.ShapeDtypeStruct``s (``jax.eval_shape``: no compute)."""
  model = create_model(name, num_classes)
  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), x)


def parameter_count(name: str, num_classes: int, image_size: int = 32) -> int:
  """Trainable parameters, as the reference prints them (``sum(p.numel())``)."""
  params = abstract_variables(name, num_classes, image_size)["params"]
  return sum(math.prod(p.shape) for p in jax.tree_util.tree_leaves(params))
