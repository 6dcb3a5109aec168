"""cktf_jax.sweep: the printed launch.py commands, bad input, and --run (subprocess faked)."""

import pathlib
import shlex
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parent.parent
sys.path.insert(0, str(ROOT))

from cktf_jax import sweep  # noqa: E402

CONFIG = "configs/cifar100_distill.py"
# ml_collections loads config files with importlib's deprecated load_module().
pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")


@pytest.fixture(autouse=True)
def in_repo_root(monkeypatch):
  monkeypatch.chdir(ROOT)  # config paths and launch.py are relative to it, as for a user


def _sweep(capsys, *args):
  code = sweep.main([str(a) for a in args])
  out, err = capsys.readouterr()
  return code, out, err


def _commands(out):
  """Each printed line as (workdir, {field: value}, argv)."""
  commands = []
  for line in out.splitlines():
    argv = shlex.split(line)
    assert argv[:4] == ["python", "launch.py", "--config", CONFIG] and argv[4] == "--workdir"
    fields = dict(arg[len("--config."):].split("=", 1) for arg in argv[6:])
    commands.append((argv[5], fields, argv))
  return commands


def test_one_command_per_method_pair_and_trial(capsys):
  code, out, err = _sweep(capsys, "--config", CONFIG, "--methods", "kd,crd,crdst",
                          "--pairs", "resnet32x4:resnet8x4,wrn_40_2:wrn_16_2", "--trials", 3)
  assert code == 0, err
  commands = _commands(out)
  assert len(commands) == 3 * 2 * 3
  assert len({workdir for workdir, _, _ in commands}) == len(commands)
  workdir, fields, _ = commands[-1]
  assert workdir == "runs/cifar100/wrn_40_2_wrn_16_2/crdst/trial2"
  assert fields == {"method.name": "crdst", "teacher.model": "wrn_40_2",
                    "student.model": "wrn_16_2", "seed": "2",
                    "teacher.checkpoint": "runs/cifar100/vanilla/wrn_40_2/trial0/best_model"}
  assert [(f["method.name"], f["teacher.model"], f["seed"]) for _, f, _ in commands[:4]] == [
      ("kd", "resnet32x4", "0"), ("kd", "resnet32x4", "1"), ("kd", "resnet32x4", "2"),
      ("kd", "wrn_40_2", "0")]


def test_vanilla_runs_come_first_and_combinations_set_method2(capsys):
  code, out, _ = _sweep(capsys, "--config", CONFIG, "--methods", "attention+crdst,vanilla",
                        "--pairs", "resnet32x4:resnet8x4,resnet32x4:resnet8", "--trials", 2)
  assert code == 0
  commands = _commands(out)
  vanilla, distill = commands[:6], commands[6:]
  assert [(w, f) for w, f, _ in vanilla[:2]] == [
      ("runs/cifar100/vanilla/resnet32x4/trial0",
       {"mode": "train_teacher", "teacher.model": "resnet32x4", "seed": "0"}),
      ("runs/cifar100/vanilla/resnet32x4/trial1",
       {"mode": "train_teacher", "teacher.model": "resnet32x4", "seed": "1"})]
  assert [f["teacher.model"] for _, f, _ in vanilla] == ["resnet32x4"] * 2 + ["resnet8x4"] * 2 + [
      "resnet8"] * 2
  assert len(distill) == 4
  workdir, fields, _ = distill[0]
  assert workdir == "runs/cifar100/resnet32x4_resnet8x4/attention+crdst/trial0"
  assert (fields["method.name"], fields["method2.name"]) == ("attention", "crdst")


def test_overrides_and_teacher_pattern_reach_every_command(capsys):
  code, out, _ = _sweep(capsys, "--config", CONFIG, "--methods", "kd,vanilla", "--trials", 2,
                        "--workdir-root", "/tmp/sw", "--teacher-dir-pattern",
                        "teachers/{dataset}/{teacher}_{trial}/best_model",
                        "--config.train.epochs=2", "--config.weights.alpha=1")
  assert code == 0
  commands = _commands(out)
  assert len(commands) == 2 * 2 + 2  # vanilla: the config's own pair, 2 trials each
  for _, _, argv in commands:
    assert argv[-2:] == ["--config.train.epochs=2", "--config.weights.alpha=1"]
  _, fields, argv = commands[-1]
  assert fields["teacher.checkpoint"] == "teachers/cifar100/resnet32x4_1/best_model"
  # launch.py's flag parsing (ml_collections config_flags) accepts the command's overrides.
  config = sweep.load_config(CONFIG, argv[6:])
  assert (config.seed, config.train.epochs, config.weights.alpha) == (1, 2, 1.0)


@pytest.mark.parametrize("args, message", [
    (["--methods", "kd,cktf"], "--methods: unknown method 'cktf'; valid methods are: kd,"),
    (["--methods", "hint+ckt"], "--methods: unknown method 'ckt'"),
    (["--methods", "kd+crd+crdst"], "'kd+crd+crdst' is not METHOD, METHOD+METHOD2 or vanilla"),
    (["--methods", ","], "--methods: empty list"),
    (["--methods", "kd", "--pairs", "resnet32x4-resnet8x4"], "is not TEACHER:STUDENT"),
    (["--methods", "kd", "--pairs", "resnet32x4:resnet9"], "--pairs: unknown model 'resnet9'"),
    (["--methods", "kd", "--trials", "0"], "--trials must be at least 1"),
    (["--methods", "kd", "--config.seed=3"], "config.seed is set by the sweep"),
    (["--methods", "kd", "--config.train.epoch=3"], "has no field config.train.epoch"),
    (["--methods", "kd", "--config.train.epochs=abc"], "invalid literal for int()"),
    (["--methods", "kd", "--epochs=3"], "unexpected argument '--epochs=3'"),
    (["--methods", "kd", "--teacher-dir-pattern", "{model}"], "unknown placeholder {model}"),
])
def test_bad_input_fails_with_a_message(capsys, args, message):
  code, out, err = _sweep(capsys, "--config", CONFIG, *args)
  assert (code, out) == (2, "")
  assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_bad_config_files_fail_with_a_message(capsys):
  code, _, err = _sweep(capsys, "--config", "configs/nope.py", "--methods", "kd")
  assert code == 2 and "configs/nope.py: no such file" in err
  code, _, err = _sweep(capsys, "--config", "configs/cifar100_teacher.py", "--methods", "kd")
  assert code == 2 and "has mode 'train_teacher'; distillation entries need" in err


class FakeRun:
  """subprocess.run stand-in: records argv, fails the ``fail_at``-th call."""

  def __init__(self, fail_at=None):
    self.calls, self.fail_at = [], fail_at

  def __call__(self, argv, **kwargs):
    self.calls.append(list(argv))
    code = 3 if len(self.calls) == self.fail_at else 0
    return subprocess.CompletedProcess(argv, code)


def test_run_launches_the_printed_commands_and_stops_at_the_first_failure(
    capsys, monkeypatch, tmp_path):
  args = ["--config", CONFIG, "--methods", "kd", "--trials", 3, "--workdir-root", tmp_path]
  _, out, _ = _sweep(capsys, *args)
  printed = [shlex.split(line) for line in out.splitlines()]
  fake = FakeRun(fail_at=2)
  monkeypatch.setattr(sweep.subprocess, "run", fake)
  code, out, err = _sweep(capsys, *args, "--run")
  assert code == 1
  assert fake.calls == [[sys.executable] + argv[1:] for argv in printed[:2]]
  assert "error: command 2/3 failed (exit status 3)" in err and "kd/trial1" in err


def test_run_skips_finished_runs(capsys, monkeypatch, tmp_path):
  done = tmp_path / "cifar100/resnet32x4_resnet8x4/kd/trial0"
  done.mkdir(parents=True)
  (done / "summary.json").write_text("{}")
  fake = FakeRun()
  monkeypatch.setattr(sweep.subprocess, "run", fake)
  code, out, _ = _sweep(capsys, "--config", CONFIG, "--methods", "kd", "--trials", 2,
                        "--workdir-root", tmp_path, "--run")
  assert code == 0
  assert f"[1/2] finished already: {done}" in out
  assert [argv[argv.index("--workdir") + 1] for argv in fake.calls] == [
      str(tmp_path / "cifar100/resnet32x4_resnet8x4/kd/trial1")]
