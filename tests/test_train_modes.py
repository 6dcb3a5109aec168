"""The transfer, fine-tune and init-from-teacher modes, and a run's side outputs
(TensorBoard events, profiler trace, skipped non-finite steps)."""

import glob
import json
import struct

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cktf_jax import models
from cktf_jax.config import ConfigError
from cktf_jax.models import convert
from cktf_jax.train import initialize, loop, transfer
from cktf_jax.train.run import run
from configs import stl10_transfer
from tests.test_data_sources import write_stl10
from tests.test_train import _synthetic_config


def _flat(variables):
  return flax.traverse_util.flatten_dict(jax.device_get(variables))


def _random_model_dir(path, name, num_classes, image_size):
  model = models.create_model(name, num_classes)
  variables = model.init(jax.random.PRNGKey(7), jnp.zeros((1, image_size, image_size, 3)))
  convert.save_model_dir(str(path), name, num_classes, jax.device_get(variables), {})
  return str(path)


def test_transfer_runs_both_steps_and_fine_tunes_only_the_classifier(tmp_path):
  rng = np.random.default_rng(0)
  images = lambda n: rng.integers(0, 256, (n, 96, 96, 3), dtype=np.uint8)
  write_stl10(tmp_path, "unlabeled", images(24))
  write_stl10(tmp_path, "train", images(16), rng.integers(0, 10, 16))
  write_stl10(tmp_path, "test", images(8), rng.integers(0, 10, 8))
  config = stl10_transfer.get_config()
  config.progress = False
  config.dataset.source, config.dataset.data_dir = "raw", str(tmp_path)
  config.teacher.model = config.student.model = "vgg8"
  config.teacher.checkpoint = _random_model_dir(tmp_path / "teacher", "vgg8", 200, 64)
  # KD (the figure's first row): the fewest compiles; CKTF's stl10 negatives
  # are covered by test_sampling, its loss by test_crdst.
  config.method.name = "kd"
  config.weights.alpha, config.weights.beta = 1.0, 0.0
  config.train.batch_size, config.train.epochs = 8, 1
  workdir = tmp_path / "run"

  result = run(config, str(workdir))

  # Step 1: a 200-class student distilled on the 24 unlabeled images (3 steps).
  step1_meta, step1 = convert.restore_converted(str(workdir / "distill" / "best_model"))
  assert step1_meta["num_classes"] == 200
  log1 = [json.loads(line) for line in open(workdir / "distill" / "log.jsonl")]
  assert len(log1) == 1 and log1[0]["train_ce"] > 0 and np.isfinite(log1[0]["train_loss"])
  # Step 2: a 10-class copy; every feature parameter frozen at step 1's values,
  # the classifier trained, BatchNorm statistics updated (train mode, as the
  # reference's model.train() does).
  step2_meta, step2 = convert.restore_converted(str(workdir / "fine_tune" / "last_model"))
  assert step2_meta["num_classes"] == 10
  before, after = _flat(step1), _flat(step2)
  head = {"classifier"}
  for path, value in after.items():
    if path[1] in head:
      continue
    if path[0] == "params":
      np.testing.assert_array_equal(value, before[path], err_msg="/".join(path))
  assert any(not np.array_equal(v, before[p]) for p, v in after.items()
             if p[0] == "batch_stats")
  assert after[("params", "classifier", "kernel")].shape[-1] == 10
  saved = json.load(open(workdir / "transfer.json"))
  assert saved == result and 0.0 <= result["test_top1"] <= 100.0
  assert result["method"] == "kd" and result["fine_tune_dir"].endswith("fine_tune")

  # A second call finds both steps finished and trains nothing.
  assert run(config, str(workdir)) == result


def test_transfer_steps_are_the_reference_commands():
  config = stl10_transfer.get_config()
  distill, fine_tune = transfer.step_configs(config, "/w")
  assert (distill.mode, distill.dataset.train_split) == ("distill", "unlabeled")
  assert (fine_tune.mode, fine_tune.dataset.train_split) == ("fine_tune", "train")
  assert fine_tune.fine_tune.checkpoint == "/w/distill/best_model"
  assert loop.distill_classes(distill) == 200
  assert (config.weights.gamma, config.method.theta, config.method.nce_t) == (0.0, 0.04, 0.07)


def _variables(name, num_classes=100):
  model = models.create_model(name, num_classes)
  return model, jax.jit(model.init)(jax.random.PRNGKey(1), jnp.zeros((1, 32, 32, 3)))


def test_init_from_teacher_copies_the_same_named_convs():
  _, student = _variables("resnet8")
  _, teacher = _variables("resnet14")
  params, copied = initialize.copy_teacher_convs(student["params"], teacher["params"])
  flat_s, flat_t, flat_new = (flax.traverse_util.flatten_dict(t)
                              for t in (student["params"], teacher["params"], params))
  assert copied and all("conv" in name for name in copied)
  for path, value in flat_new.items():
    name = "/".join(path)
    expected = flat_t[path] if name in copied else flat_s[path]
    np.testing.assert_array_equal(value, expected, err_msg=name)
  # every conv the two share is copied; nothing else is (e.g. BatchNorm, fc)
  shared = {"/".join(p) for p in flat_s if p in flat_t and "conv" in "/".join(p)}
  assert set(copied) == shared and "fc/kernel" not in copied


def test_init_from_teacher_refuses_mismatched_shapes():
  _, student = _variables("resnet8x4")
  _, teacher = _variables("resnet8")
  with pytest.raises(ConfigError, match=r"conv1/kernel has shape .* teacher's has"):
    initialize.copy_teacher_convs(student["params"], teacher["params"])


def test_fine_tune_needs_a_model_directory_of_the_student(tmp_path):
  config = _synthetic_config("fine_tune")
  model, _ = _variables("resnet5", 10)
  with pytest.raises(ConfigError, match="config.fine_tune.checkpoint=''"):
    loop.initial_student(config, model, (32, 32, 3), None)
  config.fine_tune.checkpoint = _random_model_dir(tmp_path / "m", "resnet8", 10, 32)
  with pytest.raises(ConfigError, match="holds a resnet8, but config.student.model is resnet5"):
    loop.initial_student(config, model, (32, 32, 3), None)


def test_skip_nonfinite_tensorboard_and_profile_trace(tmp_path):
  config = _synthetic_config(epochs=1)
  config.train.learning_rate = 1e30  # every step after the first is non-finite
  config.train.skip_nonfinite = True
  config.profile.start_step, config.profile.num_steps = 2, 2
  workdir = tmp_path / "w"
  loop.train_and_evaluate(config, str(workdir))

  record = json.loads(open(workdir / "log.jsonl").readline())
  assert record["train_skipped"] >= 1  # counted, and the run went on to the end
  _, variables = convert.restore_converted(str(workdir / "last_model"))
  assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(variables))
  assert glob.glob(str(workdir / "profile" / "plugins" / "profile" / "*" / "*.xplane.pb"))
  events = glob.glob(str(workdir / "tensorboard" / "events.out.tfevents.*"))
  assert len(events) == 1
  tags = _scalar_tags(events[0])
  assert {"train/loss", "train/skipped", "test/top1", "test/top5", "lr"} <= tags


def _scalar_tags(path):
  """The scalar tags in a TensorBoard event file (TFRecord framing: u64 length,
  u32 crc, the Event proto, u32 crc)."""
  from tensorboardX.proto import event_pb2
  tags = set()
  with open(path, "rb") as f:
    while header := f.read(12):
      (length,) = struct.unpack("<Q", header[:8])
      event = event_pb2.Event.FromString(f.read(length))
      f.read(4)
      tags |= {value.tag for value in event.summary.value}
  return tags


def test_several_steps_per_call_train_as_one_step_per_call(tmp_path):
  """Same batches, same updates; only XLA's float32 rounding differs (the
  unrolled scan compiles to other kernels). lr 0.01: at the default 0.05 this
  tiny set (batch 16, resnet5) is chaotic, one-step runs on 1 and on 4 devices
  already end 6e-3 apart in test loss. At 0.01 the two runs ended 2.3e-8
  apart in train loss, 9.5e-7 in test loss and 3.6e-5 in the parameters (the
  first conv's kernel, |w| <= 0.36), measured: the tolerances are ~5-10x that."""
  config = _synthetic_config(epochs=2)  # 5 steps an epoch: two calls of 2, then one step
  config.train.learning_rate = 0.01
  one = loop.train_and_evaluate(config, str(tmp_path / "one"))
  config.train.steps_per_call = 2
  scanned = loop.train_and_evaluate(config, str(tmp_path / "scanned"))
  logs = [[json.loads(line) for line in open(tmp_path / d / "log.jsonl")]
          for d in ("one", "scanned")]
  assert [r["epoch"] for r in logs[1]] == [1, 2]
  for a, b in zip(*logs):
    for key in ("train_loss", "train_top1", "test_top1", "test_loss"):
      np.testing.assert_allclose(b[key], a[key], rtol=1e-5, err_msg=key)
  for a, b in zip(*(jax.tree_util.tree_leaves(convert.restore_converted(s["last_model"])[1])
                    for s in (one, scanned))):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=2e-4)
