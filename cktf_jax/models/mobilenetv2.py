"""MobileNetV2 for CIFAR (reference ``models/mobilenetv2.py``): ``MobileNetV2``
= the reference's ``mobile_half`` (expansion T=6, width multiplier 0.5).

Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks",
CVPR 2018, in the CIFAR form used by Jin et al., "Knowledge Distillation via
Route Constrained Optimization", ICCV 2019 (stride-2 stem, plain ReLU rather
than ReLU6, a pointwise expansion conv even when the expansion ratio is 1).
The head's average pool is built for 32x32 inputs, so only those are accepted.
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
# The reference's _initialize_weights: every conv N(0, 2 / (kh * kw * out_channels))
# (depthwise included), Linear N(0, 0.01) with a zero bias, BN weight 1 / bias 0.
_conv = functools.partial(conv2d, kernel_init=kaiming_normal_fan_out)
_linear = functools.partial(linear, kernel_init=nn.initializers.normal(0.01),
                            bias_init=nn.initializers.zeros)

# Per group of blocks: (expansion, output channels before width_mult, blocks, first stride);
# the expansion None stands for the model's T.
_SETTING = ((1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2), (None, 64, 4, 2),
            (None, 96, 3, 1), (None, 160, 3, 2), (None, 320, 1, 1))
# The reference's feature maps f1..f4 are taken after these block groups, so a
# stage here is the run of groups ending at each of them: (0, 1), (2,), (3, 4), (5, 6).
_STAGE_ENDS = (1, 2, 4, 6)


class InvertedResidual(nn.Module):
  """1x1 expand-BN-ReLU, 3x3 depthwise(stride)-BN-ReLU, 1x1 project-BN (no ReLU).

  The input is added back when the stride is 1 and the width is unchanged.
  Parameter names follow the reference's ``conv`` Sequential (``conv.0`` .. ``conv.7``).
  """

  inp: int
  oup: int
  stride: int
  expand_ratio: int

  @nn.compact
  def __call__(self, x: Array, train: bool, mask: Optional[Array]) -> Array:
    hidden = self.inp * self.expand_ratio
    out = _conv(self.inp, hidden, 1, 1, 0, name="conv.0")(x)
    out = nn.relu(BatchNorm(name="conv.1")(out, train, mask))
    out = _conv(hidden, hidden, 3, self.stride, 1, groups=hidden, name="conv.3")(out)
    out = nn.relu(BatchNorm(name="conv.4")(out, train, mask))
    out = _conv(hidden, self.oup, 1, 1, 0, name="conv.6")(out)
    out = BatchNorm(name="conv.7")(out, train, mask)
    if self.stride == 1 and self.inp == self.oup:
      out = x + out
    return out


class MobileNetV2(nn.Module):
  """Reference ``MobileNetV2(T, feature_dim=num_classes, width_mult)`` at input_size 32.

  Features: ``stem`` = ReLU(BN(conv3x3 stride 2)) (f0); ``stages`` = the
  outputs of block groups 1, 2, 4 and 6 (f1..f4); ``stages_preact`` = ``stages``
  (the reference ignores ``preact``); ``blocks`` = every InvertedResidual's
  output, per stage (groups 0-1, 2, 3-4, 5-6); ``pooled`` = ReLU(BN(conv1x1 to
  1280)) average-pooled with window 2 (ceil mode) and flattened (f5).
  """

  arch: str
  num_classes: int
  expansion: int = 6
  width_mult: float = 0.5
  input_size: int = 32

  @nn.compact
  def __call__(self, x: Array, train: bool = False, mask: Optional[Array] = None) -> Features:
    check_input_size(self.arch, x, (self.input_size,))
    in_ch = int(32 * self.width_mult)
    out = _conv(3, in_ch, 3, 2, 1, name="conv1.0")(x)
    stem = nn.relu(BatchNorm(name="conv1.1")(out, train, mask))

    out = stem
    stages, blocks, block_outs = [], [], []
    for g, (t, c, n, s) in enumerate(_SETTING):
      out_ch = int(c * self.width_mult)
      for i in range(n):
        out = InvertedResidual(in_ch, out_ch, s if i == 0 else 1,
                               self.expansion if t is None else t,
                               name=f"blocks.{g}.{i}")(out, train, mask)
        in_ch = out_ch
        block_outs.append(out)
      if g in _STAGE_ENDS:
        stages.append(out)
        blocks.append(tuple(block_outs))
        block_outs = []

    last_ch = int(1280 * self.width_mult) if self.width_mult > 1.0 else 1280
    out = _conv(in_ch, last_ch, 1, 1, 0, name="conv2.0")(out)
    out = nn.relu(BatchNorm(name="conv2.1")(out, train, mask))
    out = avg_pool(out, self.input_size // 16, ceil_mode=True)
    pooled = out.reshape(out.shape[0], -1)
    logits = _linear(last_ch, self.num_classes, name="classifier.0")(pooled)
    stages = tuple(stages)
    return Features(stem=stem, stages=stages, stages_preact=stages,
                    blocks=tuple(blocks), pooled=pooled, logits=logits)


register_model("MobileNetV2")(
    lambda num_classes: MobileNetV2(arch="MobileNetV2", num_classes=num_classes))
