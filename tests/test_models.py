"""Model zoo parity with the PyTorch reference (``kaiqi123/CKTF`` ``models/``).

* parameter counts and feature shapes of all 30 ``model_dict`` entries against
  ``model_zoo.json`` (via ``jax.eval_shape``: no compute);
* forward outputs against the ``model_*.npz`` fixtures in eval and train mode,
  including BatchNorm running statistics after one train-mode call.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cktf_jax import models
from parity_utils import (FIXTURES, assert_close, load_fixture, nchw_to_nhwc,
                          variables_from_state, with_prefix)

ZOO = json.loads((FIXTURES / "model_zoo.json").read_text())
MODEL_NAMES = [k for k in ZOO if not k.startswith("_")]
MODEL_FIXTURES = sorted(p.name for p in FIXTURES.glob("model_*.npz"))
# MANIFEST: model outputs rtol 1e-4 / atol 1e-4.
RTOL, ATOL = 1e-4, 1e-4


def _abstract_apply(name: str, num_classes: int, hw: int):
  model = models.create_model(name, num_classes)
  x = jax.ShapeDtypeStruct((2, hw, hw, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), x)
  feats = jax.eval_shape(lambda v, x: model.apply(v, x), variables, x)
  return variables, feats


def _nchw(shape):
  shape = list(shape)
  return [shape[0], shape[3], shape[1], shape[2]] if len(shape) == 4 else shape


def test_registry_has_every_reference_model_in_order():
  assert models.model_names() == MODEL_NAMES


def test_unknown_model_lists_valid_names():
  with pytest.raises(ValueError, match="unknown model 'resnet9'.*resnet8, resnet14"):
    models.create_model("resnet9", 100)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_parameter_counts_and_shapes(name):
  entry = ZOO[name]
  for num_classes in (100, 200):
    assert models.parameter_count(name, num_classes) == entry[f"params_num_classes_{num_classes}"], (
        f"{name} with {num_classes} classes")
  for hw in (32, 64):
    reference = entry[f"input_{hw}x{hw}"]["is_feat"]
    if isinstance(reference, str) or name.startswith("wrn") and hw == 64:
      # The reference raises (CIFAR heads at 64x64), or, for WRN at 64x64, folds
      # the 2x2 pooled map into the batch and returns 4N logits: we refuse both.
      with pytest.raises(ValueError, match=f"{name} supports"):
        _abstract_apply(name, 100, hw)
      continue
    _, feats = _abstract_apply(name, 100, hw)
    feat_shapes = reference[0]
    ours = [feats.stem.shape, *[s.shape for s in feats.stages], feats.pooled.shape]
    assert [_nchw(s) for s in ours] == feat_shapes, f"{name} at {hw}x{hw}: feature shapes"
    assert list(feats.logits.shape) == reference[-1]
    assert [s.shape for s in feats.stages_preact] == [s.shape for s in feats.stages]
    if len(reference) == 3:  # the models whose reference also returns block outputs
      assert [[_nchw(b.shape) for b in stage] for stage in feats.blocks] == reference[1], (
          f"{name} at {hw}x{hw}: block output shapes")


@pytest.fixture(scope="module", params=MODEL_FIXTURES)
def model_case(request):
  f = load_fixture(request.param)
  arch, num_classes = str(f["hp.arch"]), int(f["hp.num_classes"])
  model = models.create_model(arch, num_classes)
  x = jnp.asarray(nchw_to_nhwc(f["in.x"]))
  variables = variables_from_state(arch, num_classes, with_prefix(f, "w."))
  apply = jax.jit(model.apply, static_argnames=("train", "mutable"))
  return request.param, f, model, x, variables, apply


def _feature_list(feats):
  return [feats.stem, *feats.stages, feats.pooled]


def test_forward_eval_matches_reference(model_case):
  name, f, _, x, variables, apply = model_case
  n = int(f["hp.n_eval"])
  feats = apply(variables, x[:n], train=False)
  assert_close(feats.logits, f["out.eval.logits"], RTOL, ATOL, f"{name} eval logits")
  ours = _feature_list(feats)
  assert len(ours) == len(with_prefix(f, "out.eval.feat."))
  for i, ours_i in enumerate(ours):
    assert_close(ours_i, nchw_to_nhwc(f[f"out.eval.feat.{i}"]), RTOL, ATOL, f"{name} eval feat[{i}]")
  # Block outputs: the last block of each stage is stored only as the stage itself.
  if "out.eval.block_out_counts" in f:
    counts = list(f["out.eval.block_out_counts"])
    assert [len(b) for b in feats.blocks] == counts
    for s, stage in enumerate(feats.blocks):
      for b, block in enumerate(stage):
        key = f"out.eval.block_out.{s}.{b}"
        expected = f[key] if key in f else f[f"out.eval.feat.{s + 1}"]
        assert_close(block, nchw_to_nhwc(expected), RTOL, ATOL, f"{name} {key}")
  # preact=True: only the entries that differ are stored.
  n_pre = int(f["hp.n_preact"])
  pre = apply(variables, x[:n_pre], train=False)
  for i, stage in enumerate(pre.stages_preact, start=1):
    key = f"out.eval_preact.feat.{i}"
    expected = f[key] if key in f else f[f"out.eval.feat.{i}"][:n_pre]
    assert_close(stage, nchw_to_nhwc(expected), RTOL, ATOL, f"{name} {key}")


def test_forward_train_matches_reference(model_case):
  name, f, model, x, variables, apply = model_case
  feats, updated = apply(variables, x, train=True, mutable=("batch_stats",))
  assert_close(feats.logits, f["out.train.logits"], RTOL, ATOL, f"{name} train logits")
  # Some fixtures store only the last train-mode features (size budget).
  stored = [i for i in range(len(_feature_list(feats))) if f"out.train.feat.{i}" in f]
  assert stored, f"{name}: fixture has no train-mode features"
  for i in stored:
    assert_close(_feature_list(feats)[i], nchw_to_nhwc(f[f"out.train.feat.{i}"]), RTOL, ATOL,
                 f"{name} train feat[{i}]")
  # Running statistics after one train-mode call: the reference's buffers,
  # mapped through the same importer as the weights.
  after = dict(with_prefix(f, "w."))
  after.update(with_prefix(f, "after.train."))
  expected = variables_from_state(str(f["hp.arch"]), int(f["hp.num_classes"]), after)["batch_stats"]
  flat_ours = jax.tree_util.tree_leaves_with_path(updated["batch_stats"])
  flat_expected = dict(jax.tree_util.tree_leaves_with_path(expected))
  assert len(flat_ours) == len(flat_expected)
  for path, value in flat_ours:
    assert_close(value, flat_expected[path], RTOL, 1e-5, f"{name} batch_stats {jax.tree_util.keystr(path)}")


@pytest.mark.parametrize("teacher, student, num_classes, ratio", [
    # Seed README Table 1 (CIFAR-100) and Table 2 (Tiny-ImageNet, 200 classes).
    ("wrn_40_2", "wrn_16_2", 100, 3.21), ("wrn_40_2", "wrn_40_1", 100, 3.96),
    ("resnet56", "resnet20", 100, 3.1), ("resnet110", "resnet20", 100, 6.24),
    ("resnet110", "resnet32", 100, 3.67), ("resnet32x4", "resnet8x4", 100, 6.03),
    ("vgg13", "vgg8", 100, 2.39), ("vgg19", "vgg8", 200, 5.01), ("vgg16", "vgg11", 200, 1.59),
    ("ResNet34", "ResNet10", 200, 4.28), ("ResNet50", "ResNet10", 200, 4.78),
])
def test_compression_ratios_of_the_papers_tables(teacher, student, num_classes, ratio):
  ours = models.parameter_count(teacher, num_classes) / models.parameter_count(student, num_classes)
  assert round(ours, 2) == pytest.approx(ratio, abs=0.006)
