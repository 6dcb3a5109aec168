"""ImageNet-style ResNets at CIFAR/Tiny-ImageNet scale (reference
``models/resnetv2.py``): ResNet10, ResNet18, ResNet34 (BasicBlock) and
ResNet50, ResNet101, ResNet152 (Bottleneck).

He et al., "Deep Residual Learning for Image Recognition", CVPR 2016
(arXiv:1512.03385), in the "kuangliu" CIFAR form the reference uses: a 3x3
stride-1 stem without max-pool, four stages of 64/128/256/512 planes (strides
1, 2, 2, 2) and an adaptive 1x1 average pool, so any input size works (the
fixtures use 32x32 and 64x64).
"""

import functools
from typing import Optional, Sequence

import flax.linen as nn
import jax

from cktf_jax.models.features import Features
from cktf_jax.models.layers import BatchNorm, adaptive_avg_pool, conv2d, kaiming_normal_fan_out, linear
from cktf_jax.models.registry import register_model

Array = jax.Array
_conv = functools.partial(conv2d, kernel_init=kaiming_normal_fan_out)


class _ResidualBlock(nn.Module):
  """A residual branch of ``len(kernels)`` conv-BN pairs with ReLU between
  them, plus the shortcut, then ReLU; returns ``(out, preact)``.

  Subclasses fix the branch: ``kernels`` (conv sizes, named conv1.. / bn1..),
  ``stride_at`` (which conv carries the stride) and ``expansion`` (the last
  conv's width is ``planes * expansion``). The shortcut is the identity, or
  ``shortcut.0`` = conv1x1(stride) + ``shortcut.1`` = BN when shapes change.
  """

  in_planes: int
  planes: int
  stride: int = 1
  zero_init_residual: bool = False
  kernels = ()
  stride_at = 0
  expansion = 1

  @nn.compact
  def __call__(self, x: Array, train: bool, mask: Optional[Array]):
    out_planes = self.planes * self.expansion
    out, width = x, self.in_planes
    last = len(self.kernels) - 1
    for i, k in enumerate(self.kernels):
      planes = out_planes if i == last else self.planes
      stride = self.stride if i == self.stride_at else 1
      out = _conv(width, planes, k, stride, k // 2, name=f"conv{i + 1}")(out)
      zero_scale = i == last and self.zero_init_residual
      out = BatchNorm(scale_init=nn.initializers.zeros if zero_scale else nn.initializers.ones,
                      name=f"bn{i + 1}")(out, train, mask)
      if i != last:
        out = nn.relu(out)
      width = planes

    shortcut = x
    if self.stride != 1 or self.in_planes != out_planes:
      shortcut = _conv(self.in_planes, out_planes, 1, self.stride, 0, name="shortcut.0")(x)
      shortcut = BatchNorm(name="shortcut.1")(shortcut, train, mask)
    preact = out + shortcut
    return nn.relu(preact), preact


class BasicBlock(_ResidualBlock):
  """``conv3x3(stride)-BN-ReLU-conv3x3-BN (+ shortcut) -> ReLU``."""

  kernels = (3, 3)
  stride_at = 0
  expansion = 1


class Bottleneck(_ResidualBlock):
  """``conv1x1-BN-ReLU-conv3x3(stride)-BN-ReLU-conv1x1(4x)-BN (+ shortcut) -> ReLU``."""

  kernels = (1, 3, 1)
  stride_at = 1
  expansion = 4


class ResNet(nn.Module):
  """Reference ``ResNet(block, num_blocks, num_classes, zero_init_residual=False)``.

  Features: ``stem`` = ReLU(BN(conv1(x))) (f0); ``stages`` = layer1..layer4
  outputs (f1..f4); ``stages_preact`` = each stage's last block sum before
  its ReLU; ``blocks`` = every block's output (the reference's ``block_out``
  lists); ``pooled`` = AdaptiveAvgPool2d(1) flattened (f5); ``logits`` from
  ``linear``. Convs use kaiming-normal (fan_out), BN weight 1 / bias 0, the
  classifier PyTorch's default init; ``zero_init_residual`` zeroes the last BN
  scale of every residual branch (off by default, as in the reference).
  """

  stage_sizes: Sequence[int]
  block_cls: type
  num_classes: int
  zero_init_residual: bool = False
  arch: str = "ResNet"

  @nn.compact
  def __call__(self, x: Array, train: bool = False, mask: Optional[Array] = None) -> Features:
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"{self.arch} expects NHWC RGB images [N, H, W, 3]; got shape {x.shape}.")
    out = _conv(3, 64, 3, 1, 1, name="conv1")(x)
    stem = nn.relu(BatchNorm(name="bn1")(out, train, mask))

    out, in_planes = stem, 64
    stages, stages_preact, blocks = [], [], []
    for layer, (num_blocks, planes, stride) in enumerate(
        zip(self.stage_sizes, (64, 128, 256, 512), (1, 2, 2, 2)), start=1):
      block_outs = []
      for i in range(num_blocks):
        out, preact = self.block_cls(
            in_planes, planes, stride if i == 0 else 1, self.zero_init_residual,
            name=f"layer{layer}.{i}")(out, train, mask)
        in_planes = planes * self.block_cls.expansion
        block_outs.append(out)
      stages.append(out)
      stages_preact.append(preact)
      blocks.append(tuple(block_outs))

    pooled = adaptive_avg_pool(out, 1).reshape(out.shape[0], -1)
    logits = linear(in_planes, self.num_classes, name="linear")(pooled)
    return Features(stem=stem, stages=tuple(stages), stages_preact=tuple(stages_preact),
                    blocks=tuple(blocks), pooled=pooled, logits=logits)


ResNet10 = functools.partial(ResNet, stage_sizes=(1, 1, 1, 1), block_cls=BasicBlock, arch="ResNet10")
ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock, arch="ResNet18")
ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BasicBlock, arch="ResNet34")
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=Bottleneck, arch="ResNet50")
ResNet101 = functools.partial(ResNet, stage_sizes=(3, 4, 23, 3), block_cls=Bottleneck, arch="ResNet101")
ResNet152 = functools.partial(ResNet, stage_sizes=(3, 8, 36, 3), block_cls=Bottleneck, arch="ResNet152")

for _variant in (ResNet10, ResNet18, ResNet34, ResNet50, ResNet101, ResNet152):
  register_model(_variant.keywords["arch"])(
      lambda num_classes, variant=_variant: variant(num_classes=num_classes))
