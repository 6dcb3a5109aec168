"""The training system end to end on tiny real runs (4 simulated CPU devices).

Small data (synthetic 32x32, digits) and the smallest reference models keep
compiles few; everything else is the code users run.
"""

import json
import os
import re

import jax
import numpy as np
import pytest

from cktf_jax import config as config_lib
from cktf_jax.models import convert
from cktf_jax.train import loop, quickstart, run
from configs import default
from configs import quickstart as quickstart_config


def _synthetic_config(mode="train_teacher", epochs=2):
  config = default.get_config()
  config.mode = mode
  config.progress = False
  config.dataset.name = "synthetic"
  config.dataset.num_classes = 10
  config.dataset.synthetic.num_examples = 72  # 5 steps of 16: the last one padded
  config.teacher.model = "resnet8"
  config.student.model = "resnet5"
  config.train.batch_size = 16
  config.train.epochs = epochs
  config.train.checkpoint_every_epochs = 1
  return config


def _leaves(model_dir):
  _, variables = convert.restore_converted(model_dir)
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(variables)]


def test_resume_after_a_crash_ends_in_the_uninterrupted_state(tmp_path, monkeypatch):
  config = _synthetic_config(epochs=2)
  straight = loop.train_and_evaluate(config, str(tmp_path / "straight"))

  # Crash during epoch 2 (after epoch 1's checkpoint), then run again.
  real_evaluate, calls = loop.evaluate, []

  def crash_on_second_epoch(*args):
    calls.append(1)
    if len(calls) == 2:
      raise KeyboardInterrupt("simulated preemption")
    return real_evaluate(*args)

  monkeypatch.setattr(loop, "evaluate", crash_on_second_epoch)
  with pytest.raises(KeyboardInterrupt):
    loop.train_and_evaluate(config, str(tmp_path / "resumed"))
  monkeypatch.setattr(loop, "evaluate", real_evaluate)
  resumed = loop.train_and_evaluate(config, str(tmp_path / "resumed"))

  assert resumed["last_top1"] == straight["last_top1"]
  for a, b in zip(_leaves(tmp_path / "straight" / "last_model"),
                  _leaves(tmp_path / "resumed" / "last_model")):
    np.testing.assert_array_equal(a, b)  # bitwise on CPU
  logs = [[json.loads(line) for line in open(tmp_path / d / "log.jsonl")]
          for d in ("straight", "resumed")]
  assert [r["epoch"] for r in logs[1]] == [1, 2]  # no duplicated or missing epoch
  for a, b in zip(*logs):
    assert {k: v for k, v in a.items() if k != "time_s"} == {
        k: v for k, v in b.items() if k != "time_s"}


def test_distill_from_a_trained_teacher_and_evaluate_it(tmp_path):
  teacher = loop.train_and_evaluate(_synthetic_config(epochs=1), str(tmp_path / "teacher"))
  config = _synthetic_config("distill", epochs=1)
  config.teacher.checkpoint = teacher["best_model"]
  config.method.name = "attention"
  student = loop.train_and_evaluate(config, str(tmp_path / "student"))
  log = [json.loads(line) for line in open(tmp_path / "student" / "log.jsonl")]
  assert "train_attention/at_0" in log[0] and np.isfinite(log[0]["train_loss"])

  evaluation = _synthetic_config("evaluate")
  evaluation.eval.checkpoint = student["best_model"]
  result = run(evaluation, str(tmp_path / "eval"))
  assert result["num_examples"] == 72 and result["model"] == "resnet5"
  assert result["test_top1"] == pytest.approx(log[0]["test_top1"])
  assert json.load(open(tmp_path / "eval" / "eval.json"))["test_top1"] == result["test_top1"]


@pytest.mark.parametrize("change, message", [
    (lambda c: setattr(c.teacher, "checkpoint", ""),
     "config.teacher.checkpoint is empty: distillation needs a teacher; train one with this "
     "same config and `--config.mode=train_teacher --workdir WORKDIR` (it trains resnet8 on "
     "synthetic"),
    (lambda c: setattr(c.teacher, "checkpoint", "/nonexistent"),
     "is not a model directory"),
    (lambda c: setattr(c.train, "batch_size", 6),
     "config.train.batch_size=6 must be a multiple of the 4 devices"),
])
def test_bad_distillation_setups_fail_before_compiling(tmp_path, change, message):
  config = _synthetic_config("distill")
  change(config)
  with pytest.raises(config_lib.ConfigError, match=re.escape(message)):
    loop.train_and_evaluate(config, str(tmp_path / "w"))


def test_teacher_of_another_architecture_or_class_count_is_refused(tmp_path):
  teacher = loop.train_and_evaluate(_synthetic_config(epochs=1), str(tmp_path / "teacher"))
  config = _synthetic_config("distill")
  config.teacher.checkpoint = teacher["best_model"]
  config.teacher.model = "resnet14"
  with pytest.raises(config_lib.ConfigError, match="holds a resnet8 with 10 classes, but the "
                     "config asks for teacher resnet14"):
    loop.train_and_evaluate(config, str(tmp_path / "student"))


def test_a_workdir_of_another_config_is_refused(tmp_path):
  loop.train_and_evaluate(_synthetic_config(epochs=1), str(tmp_path / "w"))
  config = _synthetic_config(epochs=1)
  config.train.weight_decay = 1e-4
  with pytest.raises(config_lib.ConfigError, match="holds a run of a different config "
                     r"\(fields train.weight_decay differ\)"):
    loop.train_and_evaluate(config, str(tmp_path / "w"))


def test_quickstart_prints_the_table_with_every_method(tmp_path, capsys):
  config = quickstart_config.get_config()
  config.progress = False
  config.teacher.model, config.student.model = "resnet8", "resnet5"
  config.quickstart.teacher_epochs = config.quickstart.student_epochs = 1
  config.method.nce_k = 64
  out = quickstart.run_quickstart(config, str(tmp_path))
  rows = ["Compression Ratio", "Teacher", "Student (w/o KD)", "KD", "CRD", "CKTF"]
  table = out["table"]
  for row in rows:
    assert f"| {row:<17} |" in table
  for name in ("teacher", "student", "kd", "crd", "cktf"):
    assert os.path.exists(tmp_path / name / "best_model" / convert.META_FILE)
  assert table in capsys.readouterr().out


def test_a_non_finite_loss_stops_the_run_naming_step_and_term(tmp_path):
  config = _synthetic_config(epochs=1)
  config.train.learning_rate = 1e30  # parameters overflow after the first update
  with pytest.raises(loop.NonFiniteLossError,
                     match=r"loss term '\w+' is (nan|inf|-inf) at epoch 1, step \d+"):
    loop.train_and_evaluate(config, str(tmp_path / "w"))
  # Nothing of the diverged run was saved as a checkpoint or a model.
  assert not os.path.exists(tmp_path / "w" / "best_model")
  assert not os.listdir(tmp_path / "w" / "checkpoints")
