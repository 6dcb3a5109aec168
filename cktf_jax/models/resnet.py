"""CIFAR ResNets (reference ``models/resnet.py``): resnet8 ... resnet110,
resnet8x4, resnet32x4, and CKTF's one-conv variants resnet5, resnet5x4, resnet17x4.

He et al., "Deep Residual Learning for Image Recognition", CVPR 2016 (the
CIFAR variant: three stages, ``6n+2`` layers with BasicBlock, ``3n+2`` with
the one-conv block). Heads use a fixed 8x8 average pool, so inputs are 32x32.
"""

import functools
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cktf_jax.models.features import Features
from cktf_jax.models.layers import (BatchNorm, avg_pool, check_input_size, conv2d,
                                    kaiming_normal_fan_out, linear)
from cktf_jax.models.registry import register_model

Array = jax.Array
_conv = functools.partial(conv2d, kernel_init=kaiming_normal_fan_out)


class BasicBlock(nn.Module):
  """``conv3x3-BN-ReLU-conv3x3-BN (+ shortcut) -> ReLU``; returns (out, preact)."""

  in_planes: int
  planes: int
  stride: int = 1
  expansion = 1

  @nn.compact
  def __call__(self, x: Array, train: bool, mask: Optional[Array]):
    out = _conv(self.in_planes, self.planes, 3, self.stride, 1, name="conv1")(x)
    out = nn.relu(BatchNorm(name="bn1")(out, train, mask))
    out = _conv(self.planes, self.planes, 3, 1, 1, name="conv2")(out)
    out = BatchNorm(name="bn2")(out, train, mask)
    preact = out + _shortcut(self, x, train, mask)
    return nn.relu(preact), preact


class BasicBlockOneConv(nn.Module):
  """CKTF's ``BasicBlock_OneConv``: ``conv3x3-BN (+ shortcut) -> ReLU``."""

  in_planes: int
  planes: int
  stride: int = 1
  expansion = 1

  @nn.compact
  def __call__(self, x: Array, train: bool, mask: Optional[Array]):
    out = _conv(self.in_planes, self.planes, 3, self.stride, 1, name="conv1")(x)
    out = BatchNorm(name="bn1")(out, train, mask)
    preact = out + _shortcut(self, x, train, mask)
    return nn.relu(preact), preact


def _shortcut(block: nn.Module, x: Array, train: bool, mask: Optional[Array]) -> Array:
  """Identity, or the reference's ``downsample`` = conv1x1(stride) + BN when shapes change."""
  out_planes = block.planes * block.expansion
  if block.stride == 1 and block.in_planes == out_planes:
    return x
  x = _conv(block.in_planes, out_planes, 1, block.stride, 0, name="downsample.0")(x)
  return BatchNorm(name="downsample.1")(x, train, mask)


class CifarResNet(nn.Module):
  """Reference ``ResNet(depth, num_filters, block_name)``.

  Features: ``stem`` = ReLU(BN(conv1(x))) (f0); ``stages`` = the three layer
  outputs (f1..f3); ``stages_preact`` = the last block's sum before its ReLU;
  ``blocks`` = every block's output; ``pooled`` = AvgPool2d(8) flattened (f4).
  """

  arch: str
  depth: int
  num_filters: Sequence[int]
  block: type
  num_classes: int

  @nn.compact
  def __call__(self, x: Array, train: bool = False, mask: Optional[Array] = None) -> Features:
    check_input_size(self.arch, x, (32,))
    per_layer = (self.depth - 2) // (6 if self.block is BasicBlock else 3)
    f = self.num_filters
    out = _conv(3, f[0], 3, 1, 1, name="conv1")(x)
    stem = nn.relu(BatchNorm(name="bn1")(out, train, mask))

    out, in_planes = stem, f[0]
    stages, stages_preact, blocks = [], [], []
    for layer, (planes, stride) in enumerate(zip(f[1:], (1, 2, 2)), start=1):
      block_outs = []
      for i in range(per_layer):
        out, preact = self.block(in_planes, planes, stride if i == 0 else 1,
                                 name=f"layer{layer}.{i}")(out, train, mask)
        in_planes = planes * self.block.expansion
        block_outs.append(out)
      stages.append(out)
      stages_preact.append(preact)
      blocks.append(tuple(block_outs))

    pooled = avg_pool(out, 8).reshape(out.shape[0], -1)
    logits = linear(in_planes, self.num_classes, name="fc")(pooled)
    return Features(stem=stem, stages=tuple(stages), stages_preact=tuple(stages_preact),
                    blocks=tuple(blocks), pooled=pooled, logits=logits)


def _register(name: str, depth: int, num_filters: Sequence[int], block: type) -> None:
  register_model(name)(lambda num_classes: CifarResNet(
      arch=name, depth=depth, num_filters=tuple(num_filters), block=block,
      num_classes=num_classes))


for _name, _depth in (("resnet8", 8), ("resnet14", 14), ("resnet20", 20), ("resnet32", 32),
                      ("resnet44", 44), ("resnet56", 56), ("resnet110", 110)):
  _register(_name, _depth, (16, 16, 32, 64), BasicBlock)
_register("resnet8x4", 8, (32, 64, 128, 256), BasicBlock)
_register("resnet32x4", 32, (32, 64, 128, 256), BasicBlock)
_register("resnet5", 5, (16, 16, 32, 64), BasicBlockOneConv)
_register("resnet5x4", 5, (32, 64, 128, 256), BasicBlockOneConv)
_register("resnet17x4", 17, (32, 64, 128, 256), BasicBlockOneConv)
