"""Wide ResNets (reference ``models/wrn.py``): wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2.

Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016 (the CIFAR
variant: a 3x3 stem conv, three stages of ``(depth - 4) / 6`` pre-activation
blocks with widths ``16k, 32k, 64k``, then BN-ReLU, an 8x8 average pool and a
linear classifier). The head's fixed 8x8 pool makes the model 32x32-only.
Dropout is left out: the reference's ``dropRate`` defaults to 0 and none of
the registered factories sets it.
"""

import functools
from typing import Optional

import flax.linen as nn
import jax

from cktf_jax.models.features import Features
from cktf_jax.models.layers import (BatchNorm, avg_pool, check_input_size, conv2d,
                                    kaiming_normal_fan_out, linear)
from cktf_jax.models.registry import register_model

Array = jax.Array
_conv = functools.partial(conv2d, kernel_init=kaiming_normal_fan_out)


class BasicBlock(nn.Module):
  """Pre-activation block ``BN-ReLU-conv3x3-BN-ReLU-conv3x3 (+ shortcut)``.

  The shortcut is the block's raw input when the width is unchanged, else a
  strided 1x1 ``convShortcut`` applied to the *activated* input (as in the
  reference). Returns ``(out, bn1(x))``: the second value is the input after
  this block's first BatchNorm, which is the reference's ``preact`` feature of
  the previous stage when this is a stage's first block.
  """

  in_planes: int
  out_planes: int
  stride: int = 1

  @nn.compact
  def __call__(self, x: Array, train: bool, mask: Optional[Array]):
    normed = BatchNorm(name="bn1")(x, train, mask)
    act = nn.relu(normed)
    out = _conv(self.in_planes, self.out_planes, 3, self.stride, 1, name="conv1")(act)
    out = nn.relu(BatchNorm(name="bn2")(out, train, mask))
    out = _conv(self.out_planes, self.out_planes, 3, 1, 1, name="conv2")(out)
    if self.in_planes == self.out_planes:
      shortcut = x
    else:
      shortcut = _conv(self.in_planes, self.out_planes, 1, self.stride, 0,
                       name="convShortcut")(act)
    return out + shortcut, normed


class WideResNet(nn.Module):
  """Reference ``WideResNet(depth, num_classes, widen_factor)``.

  Features: ``stem`` = ``conv1(x)`` with no BN/ReLU (f0); ``stages`` = the
  three stage outputs (f1..f3, sums of the last block, not activated);
  ``blocks`` = every block's output; ``pooled`` = AvgPool(8) of
  ``ReLU(bn1(f3))`` (f4).

  ``stages_preact`` follows the reference's ``preact=True``: f1 and f2 through
  the first BatchNorm of the next stage's first block (``block2.layer.0.bn1``,
  ``block3.layer.0.bn1``) and f3 through the head's ``bn1``, without ReLU. The
  reference gets them by calling those three BN layers a second time after the
  forward pass, so in train mode PyTorch updates their running statistics
  twice. We deliberately do not reproduce that double update: each value is
  taken from the single BN call the forward pass already makes (same input,
  so the same value in eval and in train mode), and ``preact`` has no effect
  on the running statistics.
  """

  arch: str
  depth: int
  widen_factor: int
  num_classes: int

  @nn.compact
  def __call__(self, x: Array, train: bool = False, mask: Optional[Array] = None) -> Features:
    # The reference flattens with view(-1, C): at 64x64 the 2x2 pooled map is
    # silently folded into the batch (4N logits). We refuse instead.
    check_input_size(self.arch, x, (32,))
    if (self.depth - 4) % 6 != 0:
      raise ValueError(f"{self.arch}: WRN depth must be 6n+4; got {self.depth}")
    per_stage = (self.depth - 4) // 6
    k = self.widen_factor
    widths = (16, 16 * k, 32 * k, 64 * k)

    stem = _conv(3, widths[0], 3, 1, 1, name="conv1")(x)
    out, in_planes = stem, widths[0]
    stages, blocks, first_bn_inputs = [], [], []
    for stage, (planes, stride) in enumerate(zip(widths[1:], (1, 2, 2)), start=1):
      block_outs = []
      for i in range(per_stage):
        out, normed = BasicBlock(in_planes if i == 0 else planes, planes,
                                 stride if i == 0 else 1,
                                 name=f"block{stage}.layer.{i}")(out, train, mask)
        if i == 0:
          first_bn_inputs.append(normed)
        block_outs.append(out)
      in_planes = planes
      stages.append(out)
      blocks.append(tuple(block_outs))

    head_normed = BatchNorm(name="bn1")(out, train, mask)
    pooled = avg_pool(nn.relu(head_normed), 8).reshape(out.shape[0], -1)
    logits = linear(in_planes, self.num_classes, bias_init=nn.initializers.zeros,
                    name="fc")(pooled)
    stages_preact = (first_bn_inputs[1], first_bn_inputs[2], head_normed)
    return Features(stem=stem, stages=tuple(stages), stages_preact=stages_preact,
                    blocks=tuple(blocks), pooled=pooled, logits=logits)


def _register(name: str, depth: int, widen_factor: int) -> None:
  register_model(name)(lambda num_classes: WideResNet(
      arch=name, depth=depth, widen_factor=widen_factor, num_classes=num_classes))


_register("wrn_16_1", 16, 1)
_register("wrn_16_2", 16, 2)
_register("wrn_40_1", 40, 1)
_register("wrn_40_2", 40, 2)
