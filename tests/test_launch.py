"""launch.py end to end, as a user runs it (subprocess, real config files)."""

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parent.parent


def _launch(*args):
  return subprocess.run([sys.executable, "launch.py", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)


def test_summary_prints_models_and_compression_ratio():
  result = _launch("--config", "configs/cifar100_cktf.py", "--config.mode=summary")
  assert result.returncode == 0, result.stderr
  # model_zoo.json: resnet32x4 7,433,860 and resnet8x4 1,233,540 parameters (100 classes).
  assert "resnet32x4      7,433,860" in result.stdout
  assert "resnet8x4       1,233,540" in result.stdout
  assert "compression ratio (teacher / student): 6.03" in result.stdout


@pytest.mark.parametrize("override, message", [
    ("--config.student.model=resnet9", "config.student.model: unknown model 'resnet9'; valid models are: resnet8,"),
    ("--config.teacher.model=vgg7", "config.teacher.model: unknown model 'vgg7'; valid models are: resnet8,"),
    ("--config.method.name=crd2", "config.method.name: unknown method 'crd2'; valid methods are: kd,"),
    ("--config.method2.name=cktf", "config.method2.name: unknown method 'cktf'; valid methods are: kd,"),
    ("--config.mode=fly", "config.mode: unknown mode 'fly'; valid modes are: summary, "
     "train_teacher, distill,"),
])
def test_bad_names_fail_before_anything_runs(override, message):
  result = _launch("--config", "configs/quickstart.py", override)
  assert result.returncode == 2
  assert message in result.stderr
  assert "Traceback" not in result.stderr


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "configs").glob("*.py")
                                        if p.stem not in ("__init__",)))
def test_every_config_loads_and_validates(name):
  import importlib

  from cktf_jax import config as config_lib
  from cktf_jax.train.run import MODES

  config = importlib.import_module(f"configs.{name}").get_config()
  for section in ("teacher", "fine_tune", "eval"):  # directories given on the command line
    config[section].checkpoint = config[section].checkpoint or "DIR"
  config_lib.validate(config, MODES)
  assert config.mode in MODES
