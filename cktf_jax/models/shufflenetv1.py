"""ShuffleNet (v1) for CIFAR (reference ``models/ShuffleNetv1.py``): ShuffleV1.

Zhang et al., "ShuffleNet: An Extremely Efficient Convolutional Neural Network
for Mobile Devices", CVPR 2018. The CIFAR variant: a 1x1 stem without
down-sampling, three stages of grouped-conv bottlenecks (each stage opens with
a stride-2 unit whose shortcut is a 3x3 average pool concatenated to the
branch), and a fixed 4x4 average pool before the classifier, so inputs are
32x32.
"""

from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cktf_jax.models.features import Features
from cktf_jax.models.layers import BatchNorm, avg_pool, check_input_size, conv2d, linear
from cktf_jax.models.registry import register_model

Array = jax.Array


def channel_shuffle(x: Array, groups: int) -> Array:
  """Channel shuffle on NHWC, in PyTorch's NCHW channel order.

  The reference views the ``C`` channels as ``[groups, C // groups]``, swaps the
  two axes and flattens again, so output channel ``j * groups + i`` is input
  channel ``i * (C // groups) + j``. The same reshape/transpose on the last
  axis of an NHWC array gives the same permutation.
  """
  if groups == 1:
    return x
  *lead, channels = x.shape
  if channels % groups:
    raise ValueError(f"channel_shuffle: {channels} channels do not split into {groups} groups")
  x = x.reshape(*lead, groups, channels // groups)
  return jnp.swapaxes(x, -1, -2).reshape(*lead, channels)


class Bottleneck(nn.Module):
  """ShuffleNet unit; returns ``(out, preact)``.

  ``gconv1x1-BN-ReLU-shuffle-dwconv3x3(stride)-BN-gconv1x1-BN``, joined to the
  shortcut by addition (stride 1, identity) or channel concatenation
  ``[branch, shortcut]`` (stride 2, shortcut = 3x3/2 average pool with zero
  padding counted in the mean), then ReLU. ``preact`` is the join before the
  ReLU. The first 1x1 conv (and its shuffle) is ungrouped when the unit's
  input is the 24-channel stem, as in the reference.
  """

  in_planes: int
  out_planes: int
  stride: int
  groups: int

  @nn.compact
  def __call__(self, x: Array, train: bool, mask: Optional[Array]):
    mid_planes = int(self.out_planes / 4)
    g1 = 1 if self.in_planes == 24 else self.groups
    out = conv2d(self.in_planes, mid_planes, 1, groups=g1, name="conv1")(x)
    out = nn.relu(BatchNorm(name="bn1")(out, train, mask))
    out = channel_shuffle(out, g1)
    out = conv2d(mid_planes, mid_planes, 3, self.stride, 1, groups=mid_planes, name="conv2")(out)
    out = nn.relu(BatchNorm(name="bn2")(out, train, mask))
    out = conv2d(mid_planes, self.out_planes, 1, groups=self.groups, name="conv3")(out)
    out = BatchNorm(name="bn3")(out, train, mask)
    if self.stride == 2:
      # nn.AvgPool2d(3, stride=2, padding=1): count_include_pad=True, i.e. /9 everywhere.
      shortcut = nn.avg_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)),
                             count_include_pad=True)
      preact = jnp.concatenate([out, shortcut], axis=-1)
    else:
      preact = out + x
    return nn.relu(preact), preact


class ShuffleNet(nn.Module):
  """Reference ``ShuffleNet(cfg)``.

  Features: ``stem`` = ReLU(BN(conv1x1(x))) (f0); ``stages`` = the three layer
  outputs (f1..f3); ``stages_preact`` = each stage's last unit before its ReLU
  (the reference's ``preact=True``); ``blocks`` = every unit's output (not
  returned by the reference; given for consistency); ``pooled`` =
  AvgPool2d(4) flattened (f4).
  """

  arch: str
  out_planes: Sequence[int]
  num_blocks: Sequence[int]
  groups: int
  num_classes: int

  @nn.compact
  def __call__(self, x: Array, train: bool = False, mask: Optional[Array] = None) -> Features:
    check_input_size(self.arch, x, (32,))
    out = conv2d(3, 24, 1, name="conv1")(x)
    stem = nn.relu(BatchNorm(name="bn1")(out, train, mask))

    out, in_planes = stem, 24
    stages, stages_preact, blocks = [], [], []
    for layer, (planes, n) in enumerate(zip(self.out_planes, self.num_blocks), start=1):
      block_outs = []
      for i in range(n):
        stride = 2 if i == 0 else 1
        # The stride-2 unit's branch only makes the channels the pooled shortcut lacks.
        branch_planes = planes - in_planes if i == 0 else planes
        out, preact = Bottleneck(in_planes, branch_planes, stride, self.groups,
                                 name=f"layer{layer}.{i}")(out, train, mask)
        in_planes = planes
        block_outs.append(out)
      stages.append(out)
      stages_preact.append(preact)
      blocks.append(tuple(block_outs))

    pooled = avg_pool(out, 4).reshape(out.shape[0], -1)
    logits = linear(in_planes, self.num_classes, name="linear")(pooled)
    return Features(stem=stem, stages=tuple(stages), stages_preact=tuple(stages_preact),
                    blocks=tuple(blocks), pooled=pooled, logits=logits)


@register_model("ShuffleV1")
def shufflev1(num_classes: int) -> ShuffleNet:
  """Reference ``ShuffleV1()``: out_planes (240, 480, 960), blocks (4, 8, 4), groups 3."""
  return ShuffleNet(arch="ShuffleV1", out_planes=(240, 480, 960), num_blocks=(4, 8, 4),
                    groups=3, num_classes=num_classes)
