"""Hand-checkable properties of ShuffleV2 (the reference ``models/ShuffleNetv2.py``
has no forward fixture, only the ``model_zoo.json`` counts and shapes).

* the channel shuffle on NHWC is PyTorch's ``view(N, g, C/g, H, W).permute(0, 2, 1, 3, 4)``
  on NCHW, computed here in numpy;
* the last unit of each stage: ``out = shuffle([x1, ReLU(b)], 2)`` and the
  (unshuffled) ``preact = [x1, b]``, with ``x1`` the first half of the unit's input;
* the variables carry exactly the reference's ``state_dict`` names (338 entries).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from cktf_jax import models
from cktf_jax.models.shufflenetv1 import channel_shuffle


def _torch_shuffle_nchw(x, g):
  n, c, h, w = x.shape
  return x.reshape(n, g, c // g, h, w).transpose(0, 2, 1, 3, 4).reshape(n, c, h, w)


@pytest.mark.parametrize("groups,channels", [(2, 6), (2, 8), (3, 12), (1, 5)])
def test_channel_shuffle_matches_torch_view_permute(groups, channels):
  x_nchw = np.arange(2 * channels * 3 * 2, dtype=np.float32).reshape(2, channels, 3, 2)
  expected = _torch_shuffle_nchw(x_nchw, groups).transpose(0, 2, 3, 1)
  ours = channel_shuffle(jnp.asarray(x_nchw.transpose(0, 2, 3, 1)), groups)
  np.testing.assert_array_equal(np.asarray(ours), expected)


def test_channel_shuffle_g2_interleaves_halves():
  # [a0 a1 a2 | b0 b1 b2] -> [a0 b0 a1 b1 a2 b2]
  x = jnp.asarray([[10., 11., 12., 20., 21., 22.]])
  np.testing.assert_array_equal(np.asarray(channel_shuffle(x, 2)), [[10, 20, 11, 21, 12, 22]])


@pytest.fixture(scope="module")
def v2():
  model = models.create_model("ShuffleV2", 10)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
  variables = model.init(jax.random.PRNGKey(0), x)
  return variables, model.apply(variables, x)


def test_last_unit_output_is_shuffled_preact(v2):
  _, feats = v2
  assert [len(b) for b in feats.blocks] == [4, 8, 4]  # DownBlock + (3, 7, 3) units
  for s, (out, pre, blocks) in enumerate(zip(feats.stages, feats.stages_preact, feats.blocks)):
    out, pre, unit_in = np.asarray(out), np.asarray(pre), np.asarray(blocks[-2])
    half = out.shape[-1] // 2
    assert out.shape == pre.shape
    np.testing.assert_array_equal(blocks[-1], out, err_msg=f"stage {s}")
    np.testing.assert_array_equal(pre[..., :half], unit_in[..., :half], err_msg=f"stage {s} x1")
    np.testing.assert_array_equal(out[..., 0::2], pre[..., :half], err_msg=f"stage {s} even")
    np.testing.assert_array_equal(out[..., 1::2], np.maximum(pre[..., half:], 0),
                                  err_msg=f"stage {s} odd")
    assert (pre[..., half:] < 0).any(), "preact must be taken before the ReLU"


def _abstract_variables():
  model = models.create_model("ShuffleV2", 100)
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), x)


def test_variable_names_are_the_reference_state_dict():
  variables = _abstract_variables()
  names = {".".join(p[:-1]) for p in traverse_util.flatten_dict(variables["params"])}
  expected = {"conv1", "bn1", "conv2", "bn2", "linear"}
  for layer, n in zip((1, 2, 3), (3, 7, 3)):
    expected |= {f"layer{layer}.0.{m}{k}" for m in ("conv", "bn") for k in range(1, 6)}
    expected |= {f"layer{layer}.{i}.{m}{k}" for i in range(1, n + 1)
                 for m in ("conv", "bn") for k in range(1, 4)}
  assert names == expected
  n_bn = sum(1 for n in names if n.rsplit(".", 1)[-1].startswith("bn"))
  leaves = len(jax.tree_util.tree_leaves(variables))
  assert n_bn == 56
  assert leaves + n_bn == 338  # + num_batches_tracked per BatchNorm2d
