"""The init stage of AB/FT/FSP, a second method ("X + CKTF") and data
parallelism (4 simulated devices vs 1) on tiny synthetic runs."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from cktf_jax import data, methods, models
from cktf_jax.data import pipeline
from cktf_jax.models import convert
from cktf_jax.train import loop, optim, step as step_lib
from configs import default


def _save_teacher(tmp_path_factory, name):
  """A randomly initialised teacher saved as a model directory (no training needed)."""
  path = tmp_path_factory.mktemp("teacher") / name
  teacher = models.create_model(name, 10)
  variables = teacher.init(jax.random.PRNGKey(1), jnp.zeros((1, 32, 32, 3)))
  convert.save_model_dir(str(path), name, 10, jax.device_get(variables), {"epoch": 0})
  return str(path)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  return _save_teacher(tmp_path_factory, "resnet8")


@pytest.fixture(scope="module")
def wide_teacher_dir(tmp_path_factory):
  # resnet8x4 -> resnet5: other channels, so AB's connector is a real conv (not identity).
  return _save_teacher(tmp_path_factory, "resnet8x4")


def _config(teacher_dir, method, epochs=1, teacher="resnet8"):
  config = default.get_config()
  config.mode = "distill"
  config.progress = False
  config.dataset.name = "synthetic"
  config.dataset.num_classes = 10
  config.dataset.synthetic.num_examples = 48  # 3 steps of 16
  config.teacher.model, config.teacher.checkpoint = teacher, teacher_dir
  config.student.model = "resnet5"
  config.train.batch_size = 16
  config.train.epochs = epochs
  config.train.checkpoint_every_epochs = 1
  config.method.name = method
  config.method.init_epochs = 1
  return config


def _host(tree):
  return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


def _changed(before, after):
  return any(not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(before),
                                                     jax.tree_util.tree_leaves(after)))


def _run_capturing_pretrain(config, workdir, monkeypatch):
  """Run the config; return (summary, state before the stage, state after it, args)."""
  real, seen = loop.run_pretrain, {}

  def spy(*args):
    seen["before"], seen["args"] = _host(args[7]), args
    out = real(*args)
    seen["after"] = _host(out)
    return out

  monkeypatch.setattr(loop, "run_pretrain", spy)
  summary = loop.train_and_evaluate(config, workdir)
  monkeypatch.setattr(loop, "run_pretrain", real)
  return summary, seen


def test_abound_init_stage_trains_connector_and_feature_layers_once(wide_teacher_dir,
                                                                    tmp_path, monkeypatch):
  workdir = str(tmp_path / "ab")
  # epochs=0: only the init stage (the main stage runs in the fsp test).
  config = _config(wide_teacher_dir, "abound", epochs=0, teacher="resnet8x4")
  _, seen = _run_capturing_pretrain(config, workdir, monkeypatch)
  before, after = seen["before"], seen["after"]
  assert _changed(before.params["aux"]["connector"], after.params["aux"]["connector"])
  student_b, student_a = before.params["student"], after.params["student"]
  assert optim.classifier_names(student_b) == ("fc",)
  assert _changed(student_b["layer1.0"], student_a["layer1.0"])
  assert not _changed(student_b["fc"], student_a["fc"])  # classifier not in the stage
  assert _changed(before.batch_stats, after.batch_stats)  # feature layers in train mode
  assert int(after.step) == 0  # the main stage's step count and optimiser untouched

  log = [json.loads(line) for line in open(tmp_path / "ab" / loop.PRETRAIN_LOG_FILE)]
  assert [r["epoch"] for r in log] == [1] and log[0]["stage"] == "init"
  assert np.isfinite(log[0]["init_loss"]) and "init_abound/abound_0" in log[0]
  assert log[0]["lr"] == 0.05
  # The stage's result is recorded: running it again restores it, trains nothing.
  again = _host(loop.run_pretrain(*seen["args"][:7], jax.device_put(before), *seen["args"][8:]))
  for a, b in zip(jax.tree_util.tree_leaves(again.params),
                  jax.tree_util.tree_leaves(after.params)):
    np.testing.assert_array_equal(a, b)
  assert len(open(tmp_path / "ab" / loop.PRETRAIN_LOG_FILE).readlines()) == 1


def test_fsp_init_stage_trains_student_features_not_classifier(teacher_dir, tmp_path,
                                                              monkeypatch):
  _, seen = _run_capturing_pretrain(_config(teacher_dir, "fsp"), str(tmp_path / "fsp"),
                                    monkeypatch)
  s_b, s_a = seen["before"].params["student"], seen["after"].params["student"]
  assert all(_changed(s_b[k], s_a[k]) for k in ("conv1", "bn1", "layer1.0", "layer3.0"))
  assert not _changed(s_b["fc"], s_a["fc"])
  log = [json.loads(line) for line in open(tmp_path / "fsp" / loop.PRETRAIN_LOG_FILE)]
  assert "init_fsp/fsp" in log[0] and np.isfinite(log[0]["init_loss"])


def test_factor_init_stage_learning_rate_rule():
  rule = methods.create_method("factor").pretrain.learning_rate_for
  assert rule("resnet8x4") == 0.01 and rule("wrn_16_2") == 0.01
  assert rule("ResNet18") is None and rule("MobileNetV2") is None
  assert methods.create_method("abound").pretrain.learning_rate_for is None


def test_attention_plus_cktf_trains_both_terms(teacher_dir, tmp_path):
  config = _config(teacher_dir, "attention")
  config.method2.name = "crdst"
  config.method2.nce_k = 16
  config.weights.kd2weights = 0.8
  loop.train_and_evaluate(config, str(tmp_path / "at_cktf"))
  log = [json.loads(line) for line in open(tmp_path / "at_cktf" / "log.jsonl")]
  r = log[0]
  assert "train_attention/at_0" in r and "train_crdst/crd_final" in r
  assert np.isfinite(r["train_method"]) and r["train_method2"] > 0
  # crdst as the second method adds all its heads unweighted (st_scale=1) ...
  assert r["train_method2"] == pytest.approx(r["train_crdst/crd_final"]
                                             + r["train_crdst/crd_st_sum"], rel=1e-5)
  # ... and the total is CE + beta * AT + kd2weights * CKTF (attention: -r 1 -a 0 -b 1000).
  gamma, alpha, beta = methods.create_method("attention").default_weights
  assert r["train_loss"] == pytest.approx(gamma * r["train_ce"] + alpha * r["train_kd"]
                                          + beta * r["train_method"]
                                          + 0.8 * r["train_method2"], rel=1e-4)


def _three_steps(config, devices):
  mesh = pipeline.data_mesh(devices)
  train_set = data.load_dataset("synthetic", "train", **dict(config.dataset.synthetic))
  loader = loop._loader(config, train_set, mesh, train=True)
  method, weights = loop.create_method(config, train_set, mesh)
  student, teacher = models.create_model("resnet5", 10), models.create_model("resnet8", 10)
  t_vars = teacher.init(jax.random.PRNGKey(1), jnp.zeros((1, 32, 32, 3)))
  state, tx = loop.create_state(config, "resnet5", student, teacher, t_vars, method,
                                (32, 32, 3), loader.steps_per_epoch)
  state = loop.place_state(state, mesh)
  t_vars = jax.device_put(t_vars, NamedSharding(mesh, P()))
  train_step = jax.jit(step_lib.make_train_step(student, tx, weights, teacher, method))
  metrics, images = [], []
  for _, batch in zip(range(3), loader.epoch(0)):
    images.append(np.asarray(batch["image"]))
    state, m = train_step(state, batch, t_vars)
    metrics.append(m)
  return _host(metrics), _host(state.params), _host(state.batch_stats), images


def test_four_devices_and_one_device_agree(teacher_dir):
  """Same global batches on a 4-device and a 1-device mesh: after 3 steps of
  KD (CE + KD, alpha 0.9) losses agree to rtol 1e-5 and every parameter and
  BN statistic to atol 1e-5 (only the order of float32 reductions differs)."""
  assert jax.device_count() == 4
  config = _config(teacher_dir, "kd")
  config.weights.gamma, config.weights.alpha = 0.1, 0.9
  m4, p4, bs4, x4 = _three_steps(config, jax.devices())
  m1, p1, bs1, x1 = _three_steps(config, jax.devices()[:1])
  for a, b in zip(x4, x1):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(m4, m1):
    for key in ("loss", "ce", "kd"):
      np.testing.assert_allclose(a[key], b[key], rtol=1e-5)
    assert a["top1"] == b["top1"] and a["count"] == b["count"]
  for a, b in zip(jax.tree_util.tree_leaves((p4, bs4)), jax.tree_util.tree_leaves((p1, bs1))):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
