"""Model zoo: every architecture of the reference's ``models/__init__.py``.

``create_model(name, num_classes)`` returns a Flax Linen module whose
``__call__(x, train=False, mask=None)`` maps NHWC images to a ``Features``.
"""

from cktf_jax.models.features import Features
from cktf_jax.models.registry import (abstract_variables, check_model_name, create_model,
                                      model_names, parameter_count, register_model)

# Architecture modules register themselves on import, in the reference's order.
from cktf_jax.models import resnet  # noqa: F401  resnet8..resnet110, resnet8x4, resnet32x4, resnet5, resnet5x4, resnet17x4
from cktf_jax.models import wrn  # noqa: F401  wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2
from cktf_jax.models import vgg  # noqa: F401  vgg8, vgg11, vgg13, vgg16, vgg19
from cktf_jax.models import mobilenetv2  # noqa: F401  MobileNetV2
from cktf_jax.models import shufflenetv1  # noqa: F401  ShuffleV1
from cktf_jax.models import shufflenetv2  # noqa: F401  ShuffleV2
from cktf_jax.models import resnetv2  # noqa: F401  ResNet10..ResNet152

from cktf_jax.models.torch_checkpoint import load_torch_checkpoint
from cktf_jax.models.torch_import import state_dict_to_variables

__all__ = [
    "Features", "abstract_variables", "check_model_name", "create_model", "model_names",
    "parameter_count", "register_model",
    "load_torch_checkpoint", "state_dict_to_variables",
]
