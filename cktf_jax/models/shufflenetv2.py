"""ShuffleNet V2 for CIFAR (reference ``models/ShuffleNetv2.py``): ShuffleV2.

Ma et al., "ShuffleNet V2: Practical Guidelines for Efficient CNN Architecture
Design", ECCV 2018. The CIFAR variant (``net_size=1``): a 1x1 stem without
down-sampling, three stages that each open with a stride-2 two-branch unit
followed by channel-split units, a 1x1 conv to 1024 channels and a fixed 4x4
average pool before the classifier, so inputs are 32x32.
"""

from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cktf_jax.models.features import Features
from cktf_jax.models.layers import BatchNorm, avg_pool, check_input_size, conv2d, linear
from cktf_jax.models.registry import register_model
from cktf_jax.models.shufflenetv1 import channel_shuffle

Array = jax.Array


class BasicBlock(nn.Module):
  """Channel-split unit; returns ``(out, preact)``.

  The input splits into its first and second channel halves ``(x1, x2)``; ``x2``
  goes through ``conv1x1-BN-ReLU-dwconv3x3-BN-conv1x1-BN`` (= ``b``), and
  ``out = shuffle([x1, ReLU(b)], 2)``. ``preact`` is ``[x1, b]`` *without*
  the shuffle, as in the reference.
  """

  channels: int

  @nn.compact
  def __call__(self, x: Array, train: bool, mask: Optional[Array]):
    c = int(self.channels * 0.5)
    x1, x2 = x[..., :c], x[..., c:]
    out = conv2d(c, c, 1, name="conv1")(x2)
    out = nn.relu(BatchNorm(name="bn1")(out, train, mask))
    out = conv2d(c, c, 3, 1, 1, groups=c, name="conv2")(out)
    out = BatchNorm(name="bn2")(out, train, mask)
    out = conv2d(c, c, 1, name="conv3")(out)
    branch = BatchNorm(name="bn3")(out, train, mask)
    preact = jnp.concatenate([x1, branch], axis=-1)
    out = channel_shuffle(jnp.concatenate([x1, nn.relu(branch)], axis=-1), 2)
    return out, preact


class DownBlock(nn.Module):
  """Stride-2 unit: two branches of ``out_channels // 2`` each, concatenated and shuffled.

  Left: ``dwconv3x3/2-BN-conv1x1-BN-ReLU``; right:
  ``conv1x1-BN-ReLU-dwconv3x3/2-BN-conv1x1-BN-ReLU``.
  """

  in_channels: int
  out_channels: int

  @nn.compact
  def __call__(self, x: Array, train: bool, mask: Optional[Array]) -> Array:
    cin, mid = self.in_channels, self.out_channels // 2
    left = conv2d(cin, cin, 3, 2, 1, groups=cin, name="conv1")(x)
    left = BatchNorm(name="bn1")(left, train, mask)
    left = conv2d(cin, mid, 1, name="conv2")(left)
    left = nn.relu(BatchNorm(name="bn2")(left, train, mask))
    right = conv2d(cin, mid, 1, name="conv3")(x)
    right = nn.relu(BatchNorm(name="bn3")(right, train, mask))
    right = conv2d(mid, mid, 3, 2, 1, groups=mid, name="conv4")(right)
    right = BatchNorm(name="bn4")(right, train, mask)
    right = conv2d(mid, mid, 1, name="conv5")(right)
    right = nn.relu(BatchNorm(name="bn5")(right, train, mask))
    return channel_shuffle(jnp.concatenate([left, right], axis=-1), 2)


class ShuffleNetV2(nn.Module):
  """Reference ``ShuffleNetV2(net_size)``.

  Features: ``stem`` = ReLU(BN(conv1x1(x))) (f0); ``stages`` = the three layer
  outputs (f1..f3, before the head's conv2); ``stages_preact`` = the last
  unit's ``[x1, b]`` (unshuffled, the reference's ``preact=True``);
  ``blocks`` = every unit's output, the DownBlock first (not returned by the
  reference; given for consistency); ``pooled`` = AvgPool2d(4) of
  ReLU(BN(conv2(f3))) flattened (f4).
  """

  arch: str
  out_channels: Sequence[int]
  num_blocks: Sequence[int]
  num_classes: int

  @nn.compact
  def __call__(self, x: Array, train: bool = False, mask: Optional[Array] = None) -> Features:
    check_input_size(self.arch, x, (32,))
    out = conv2d(3, 24, 1, name="conv1")(x)
    stem = nn.relu(BatchNorm(name="bn1")(out, train, mask))

    out, in_channels = stem, 24
    stages, stages_preact, blocks = [], [], []
    for layer, (channels, n) in enumerate(zip(self.out_channels[:3], self.num_blocks), start=1):
      out = DownBlock(in_channels, channels, name=f"layer{layer}.0")(out, train, mask)
      block_outs = [out]
      preact = out  # replaced below; every configuration has n >= 1
      for i in range(1, n + 1):
        out, preact = BasicBlock(channels, name=f"layer{layer}.{i}")(out, train, mask)
        block_outs.append(out)
      in_channels = channels
      stages.append(out)
      stages_preact.append(preact)
      blocks.append(tuple(block_outs))

    head = self.out_channels[3]
    out = conv2d(in_channels, head, 1, name="conv2")(out)
    out = nn.relu(BatchNorm(name="bn2")(out, train, mask))
    pooled = avg_pool(out, 4).reshape(out.shape[0], -1)
    logits = linear(head, self.num_classes, name="linear")(pooled)
    return Features(stem=stem, stages=tuple(stages), stages_preact=tuple(stages_preact),
                    blocks=tuple(blocks), pooled=pooled, logits=logits)


@register_model("ShuffleV2")
def shufflev2(num_classes: int) -> ShuffleNetV2:
  """Reference ``ShuffleV2()`` = ``ShuffleNetV2(net_size=1)``: channels (116, 232, 464, 1024), blocks (3, 7, 3)."""
  return ShuffleNetV2(arch="ShuffleV2", out_channels=(116, 232, 464, 1024), num_blocks=(3, 7, 3),
                      num_classes=num_classes)
