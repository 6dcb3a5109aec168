"""One registry from the reference's ``model_dict`` names to Flax modules."""

import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from cktf_jax.registry import Registry

ModelFactory = Callable[[int], nn.Module]
_MODELS: Registry[ModelFactory] = Registry("model")
# Decorator: ``@register_model('resnet8')`` on a ``num_classes -> Module`` factory.
register_model = _MODELS.register
# Every registered model name, in registration order (the reference's order).
model_names = _MODELS.names
# Raise ``ValueError`` listing the valid names when a name is unknown.
check_model_name = _MODELS.check


def create_model(name: str, num_classes: int) -> nn.Module:
  """The Flax module for the reference's ``model_dict[name](num_classes=...)``."""
  factory = _MODELS.get(name)
  if not isinstance(num_classes, int) or num_classes < 1:
    raise ValueError(f"num_classes must be a positive int; got {num_classes!r}")
  return factory(num_classes)


def abstract_variables(name: str, num_classes: int, image_size: int = 32):
  """The model's variables as ``jax.ShapeDtypeStruct``s (``jax.eval_shape``: no compute)."""
  model = create_model(name, num_classes)
  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), x)


def parameter_count(name: str, num_classes: int, image_size: int = 32) -> int:
  """Trainable parameters, as the reference prints them (``sum(p.numel())``)."""
  params = abstract_variables(name, num_classes, image_size)["params"]
  return sum(math.prod(p.shape) for p in jax.tree_util.tree_leaves(params))
