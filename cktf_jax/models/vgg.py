"""CIFAR VGGs with BatchNorm (reference ``models/vgg.py``, the ``vgg*_bn``
constructors): vgg8, vgg11, vgg13, vgg16, vgg19.

Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image
Recognition", ICLR 2015, in the CIFAR form of the reference: five groups of
``conv3x3(bias)-BN-ReLU`` blocks, no fully-connected layers but a single
linear classifier on a global average pool. The head adapts to the input
size; the 2x2 max-pool after group 3 runs only for 64-pixel-high inputs.
"""

import functools
from typing import Optional, Sequence, Tuple

import flax.linen as nn
import jax

from cktf_jax.models.features import Features
from cktf_jax.models.layers import (BatchNorm, adaptive_avg_pool, conv2d,
                                    kaiming_normal_fan_out, linear)
from cktf_jax.models.registry import register_model

Array = jax.Array
# Reference _initialize_weights: conv N(0, 2/(k*k*out)) with zero bias;
# linear N(0, 0.01^2) with zero bias; BN weight 1, bias 0 (BatchNorm's default).
_conv = functools.partial(conv2d, bias=True, kernel_init=kaiming_normal_fan_out,
                          bias_init=nn.initializers.zeros)

# Widths of the five groups (block0..block4), per reference configuration.
_CONFIGS = {
    "S": ((64,), (128,), (256,), (512,), (512,)),  # vgg8
    "A": ((64,), (128,), (256, 256), (512, 512), (512, 512)),  # vgg11
    "B": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),  # vgg13
    "D": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512),
          (512, 512, 512)),  # vgg16
    "E": ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512),
          (512, 512, 512, 512)),  # vgg19
}


def _max_pool2(x: Array) -> Array:
  """``nn.MaxPool2d(2, 2)`` (floor mode) on NHWC."""
  return nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")


class VGGBlock(nn.Module):
  """Reference ``VGGBlock`` with ``batch_norm=True``: ``conv3x3(bias)-BN-ReLU``."""

  in_channels: int
  out_channels: int

  @nn.compact
  def __call__(self, x: Array, train: bool, mask: Optional[Array]) -> Array:
    out = _conv(self.in_channels, self.out_channels, 3, 1, 1, name="conv2d")(x)
    return nn.relu(BatchNorm(name="bn")(out, train, mask))


class VGG(nn.Module):
  """Reference ``VGG(cfg, batch_norm=True, num_classes)``.

  Forward: ``block0, pool0, block1, pool1, block2, pool2, block3,
  [pool3 only if the input height is 64], block4``, global average pool,
  ``classifier``. So at 32x32 block4 runs at 4x4 like block3, and at 64x64
  the extra pool brings block4 to 4x4 as well; any other height skips pool3.

  Features: ``stem`` = block0's output (f0, before pool0); ``stages`` = the
  outputs of block1..block4 (f1..f4, before their pools); ``stages_preact`` =
  ``stages`` (the ReLU sits inside each block, so the reference's
  ``preact=True`` returns the same tensors); ``blocks`` = every block output
  of block1..block4 (block0's are not listed, as in the reference);
  ``pooled`` = the flattened global average pool (f5).
  """

  arch: str
  config: Tuple[Tuple[int, ...], ...]
  num_classes: int

  @nn.compact
  def __call__(self, x: Array, train: bool = False, mask: Optional[Array] = None) -> Features:
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(
          f"{self.arch} expects NHWC RGB images [N, H, W, 3]; got shape {x.shape}.")
    height = x.shape[1]
    if min(x.shape[1:3]) < 8:
      raise ValueError(
          f"{self.arch} needs inputs of at least 8x8 (three 2x2 max-pools); "
          f"got {x.shape[1]}x{x.shape[2]}.")

    out, in_channels = x, 3
    group_outs, blocks = [], []
    for g, widths in enumerate(self.config):
      if g in (1, 2, 3) or (g == 4 and height == 64):
        out = _max_pool2(out)
      block_outs = []
      for i, width in enumerate(widths):
        out = VGGBlock(in_channels, width, name=f"block{g}.{i}")(out, train, mask)
        in_channels = width
        block_outs.append(out)
      group_outs.append(out)
      blocks.append(tuple(block_outs))

    pooled = adaptive_avg_pool(out, 1).reshape(out.shape[0], -1)
    logits = linear(in_channels, self.num_classes,
                    kernel_init=nn.initializers.normal(stddev=0.01),
                    bias_init=nn.initializers.zeros, name="classifier")(pooled)
    stages = tuple(group_outs[1:])
    return Features(stem=group_outs[0], stages=stages, stages_preact=stages,
                    blocks=tuple(blocks[1:]), pooled=pooled, logits=logits)


def _register(name: str, config: Sequence[Sequence[int]]) -> None:
  register_model(name)(lambda num_classes: VGG(
      arch=name, config=tuple(tuple(c) for c in config), num_classes=num_classes))


_register("vgg8", _CONFIGS["S"])
_register("vgg11", _CONFIGS["A"])
_register("vgg13", _CONFIGS["B"])
_register("vgg16", _CONFIGS["D"])
_register("vgg19", _CONFIGS["E"])
