"""The launch.py commands of a grid of runs: methods x teacher/student pairs x trials.

    python -m cktf_jax.sweep --config configs/cifar100_distill.py --methods vanilla,kd,crd,crdst \\
        --pairs resnet32x4:resnet8x4,wrn_40_2:wrn_16_2 --trials 3 [--workdir-root runs] \\
        [--teacher-dir-pattern PATTERN] [--run] [--config.FIELD=VALUE ...]

prints one command per (method, pair, trial), trial N with ``--config.seed=N``.
A ``--methods`` entry is a ``config.method.name`` (the reference's
``--distill``), ``X+Y`` for ``method.name=X`` with ``method2.name=Y`` ("X +
CKTF" is ``X+crdst``), or ``vanilla``: ``train_teacher`` runs of every
teacher and student architecture of the pairs (the tables' Teacher and Student
(w/o KD) rows), listed first. Workdirs are
``ROOT/DATASET/TEACHER_STUDENT/ENTRY/trialN`` and
``ROOT/DATASET/vanilla/MODEL/trialN``; ``python -m cktf_jax.report ROOT``
tables them. The distillations' ``teacher.checkpoint`` is PATTERN with
``{root}``, ``{dataset}``, ``{teacher}``, ``{student}`` and ``{trial}``
filled in; by default trial 0 of the vanilla runs. ``--config.FIELD=VALUE``
overrides go to every command (CKTF+KD: ``--methods crdst
--config.weights.alpha=1`` with its own ``--workdir-root``).

``--run`` runs the commands one after another (with this Python), skips those
whose workdir holds a finished run and stops at the first that fails.
"""

import argparse
import dataclasses
import os
import shlex
import subprocess
import sys
from typing import List, Optional, Sequence, Tuple

from absl import flags
from ml_collections import config_flags

from cktf_jax import methods, models
from cktf_jax.train import loop, transfer

VANILLA = "vanilla"
DEFAULT_TEACHER_DIR = os.path.join("{root}", "{dataset}", VANILLA, "{teacher}", "trial0",
                                   loop.BEST_MODEL)
# Fields every command sets from --methods, --pairs and the trial.
SWEPT_FIELDS = ("mode", "seed", "method.name", "method2.name", "teacher.model", "student.model",
                "teacher.checkpoint")
LAUNCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch.py")


class SweepError(Exception):
  """A user mistake in the sweep's arguments; printed without a traceback."""


@dataclasses.dataclass(frozen=True)
class Command:
  """One launch.py run: ``argv`` starts with 'python'; ``done_file`` marks it finished."""

  argv: Tuple[str, ...]
  workdir: str
  done_file: str

  def __str__(self) -> str:
    return shlex.join(self.argv)


def _parse_config(path: str, overrides: Sequence[str]):
  """ml_collections' config_flags on ``--config=path`` and the overrides, as launch.py."""
  argv = ["sweep", f"--config={path}", *overrides]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, flag_values=flag_values, lock_config=True,
                                  sys_argv=argv)
  what = " ".join([f"--config {path}", *overrides])
  try:
    flag_values(argv)
    config = flag_values.config
    config.mode  # a config that failed to load raises on first use
  except Exception as e:  # config files and overrides fail in many ways; all are user input
    raise SweepError(f"{what}: {' '.join(str(e).split())}") from None
  return config


def _has_field(config, field: str) -> bool:
  """Whether the dotted ``field`` ('train.epochs') exists in ``config``."""
  node = config
  for name in field.split("."):
    if not hasattr(node, "keys") or name not in node:
      return False
    node = node[name]
  return True


def load_config(path: str, overrides: Sequence[str]):
  """The config launch.py builds from ``--config=path`` and the overrides."""
  if not os.path.isfile(path):
    raise SweepError(f"--config {path}: no such file")
  base = _parse_config(path, [])
  for arg in overrides:
    field = arg[len("--config."):].split("=", 1)[0]
    if not _has_field(base, field):
      raise SweepError(f"{arg}: {path} has no field config.{field}")
  return _parse_config(path, overrides)


def check_overrides(extra: Sequence[str]) -> List[str]:
  """The pass-through ``--config.FIELD=VALUE`` arguments; anything else is an error."""
  for arg in extra:
    if not arg.startswith("--config.") or "=" not in arg:
      raise SweepError(f"unexpected argument {arg!r}: besides the sweep's options, only "
                       f"--config.FIELD=VALUE overrides are passed on")
    field = arg[len("--config."):].split("=", 1)[0]
    if field in SWEPT_FIELDS:
      raise SweepError(f"{arg}: config.{field} is set by the sweep (--methods, --pairs, "
                       f"--trials, --teacher-dir-pattern)")
  return list(extra)


def parse_methods(text: str) -> List[Tuple[str, str]]:
  """``'kd,attention+crdst,vanilla'`` -> [('kd', ''), ('attention', 'crdst'), ('vanilla', '')]."""
  entries = []
  for entry in _items(text, "--methods"):
    if entry == VANILLA:
      entries.append((VANILLA, ""))
      continue
    names = entry.split("+")
    if len(names) > 2 or not all(names):
      raise SweepError(f"--methods: {entry!r} is not METHOD, METHOD+METHOD2 or {VANILLA}")
    for name in names:
      try:
        methods.check_method_name(name)
      except ValueError as e:
        raise SweepError(f"--methods: {e} (or {VANILLA}, or X+Y for a second method)") from None
    entries.append((names[0], names[1] if len(names) == 2 else ""))
  return list(dict.fromkeys(entries))


def parse_pairs(text: str) -> List[Tuple[str, str]]:
  """``'resnet32x4:resnet8x4,vgg13:vgg8'`` -> [(teacher, student), ...]."""
  pairs = []
  for entry in _items(text, "--pairs"):
    names = entry.split(":")
    if len(names) != 2 or not all(names):
      raise SweepError(f"--pairs: {entry!r} is not TEACHER:STUDENT")
    for name in names:
      try:
        models.check_model_name(name)
      except ValueError as e:
        raise SweepError(f"--pairs: {e}") from None
    pairs.append((names[0], names[1]))
  return list(dict.fromkeys(pairs))


def _items(text: str, option: str) -> List[str]:
  items = [item.strip() for item in text.split(",") if item.strip()]
  if not items:
    raise SweepError(f"{option}: empty list")
  return items


def teacher_dir(pattern: str, **fields) -> str:
  """``pattern`` with its placeholders filled in."""
  try:
    return pattern.format(**fields)
  except (KeyError, IndexError, ValueError) as e:
    problem = f"unknown placeholder {{{e.args[0]}}}" if isinstance(e, KeyError) else str(e)
    raise SweepError(f"--teacher-dir-pattern {pattern!r}: {problem}; the placeholders are "
                     f"{', '.join('{' + k + '}' for k in fields)}") from None


def build_commands(config_path: str, config, entries, pairs, trials: int, root: str,
                   pattern: str, overrides: Sequence[str]) -> List[Command]:
  """Every command: the vanilla runs first (the distillations' teachers), then
  per method entry, pair and trial."""
  dataset = config.dataset.name
  distills = [e for e in entries if e[0] != VANILLA]
  if distills and config.mode not in ("distill", "transfer"):
    raise SweepError(f"--config {config_path} has mode {config.mode!r}; distillation "
                     f"entries need a 'distill' or 'transfer' config")
  if len(distills) < len(entries) and config.mode == "transfer":
    raise SweepError(f"{VANILLA} trains on the config's dataset; a 'transfer' config's "
                     f"teachers come from another (train them with their own config)")
  launch = os.path.relpath(LAUNCH)
  done_file = transfer.TRANSFER_FILE if config.mode == "transfer" else loop.SUMMARY_FILE
  head = ("python", launch, "--config", config_path)
  commands = []

  def add(workdir, fields, done=loop.SUMMARY_FILE):
    argv = head + ("--workdir", workdir) + tuple(f"--config.{k}={v}" for k, v in fields)
    commands.append(Command(argv + tuple(overrides), workdir, os.path.join(workdir, done)))

  if len(distills) < len(entries):
    for model in dict.fromkeys(name for pair in pairs for name in pair):
      for trial in range(trials):
        add(os.path.join(root, dataset, VANILLA, model, f"trial{trial}"),
            [("mode", "train_teacher"), ("teacher.model", model), ("seed", trial)])
  for name, name2 in distills:
    entry = f"{name}+{name2}" if name2 else name
    for t, s in pairs:
      for trial in range(trials):
        fields = [("method.name", name)] + ([("method2.name", name2)] if name2 else [])
        fields += [("teacher.model", t), ("student.model", s),
                   ("teacher.checkpoint", teacher_dir(pattern, root=root, dataset=dataset,
                                                      teacher=t, student=s, trial=trial)),
                   ("seed", trial)]
        add(os.path.join(root, dataset, f"{t}_{s}", entry, f"trial{trial}"), fields, done_file)
  return commands


def run_commands(commands: Sequence[Command]) -> int:
  """Run each unfinished command in turn; 0, or 1 after the first failure."""
  for i, command in enumerate(commands, start=1):
    if os.path.exists(command.done_file):
      print(f"[{i}/{len(commands)}] finished already: {command.workdir}", flush=True)
      continue
    print(f"[{i}/{len(commands)}] {command}", flush=True)
    try:
      result = subprocess.run([sys.executable, *command.argv[1:]])
    except KeyboardInterrupt:
      print(f"interrupted during command {i}/{len(commands)}: {command}", file=sys.stderr)
      return 130
    if result.returncode != 0:
      print(f"error: command {i}/{len(commands)} failed (exit status {result.returncode}): "
            f"{command}", file=sys.stderr)
      return 1
  return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m cktf_jax.sweep",
                                   description=__doc__.split("\n\n")[0],
                                   epilog="Other arguments: --config.FIELD=VALUE overrides, "
                                          "passed on to every command.")
  parser.add_argument("--config", required=True, help="an experiment config (configs/*.py)")
  parser.add_argument("--methods", required=True,
                      help=f"comma-separated: METHOD, METHOD+METHOD2 or {VANILLA}")
  parser.add_argument("--pairs", help="comma-separated TEACHER:STUDENT (default: the config's)")
  parser.add_argument("--trials", type=int, default=1, help="runs per cell, seeds 0..N-1")
  parser.add_argument("--workdir-root", default="runs")
  parser.add_argument("--teacher-dir-pattern", default=DEFAULT_TEACHER_DIR,
                      help="teacher.checkpoint of the distillations (default: %(default)s)")
  parser.add_argument("--run", action="store_true", help="run the commands one after another")
  args, extra = parser.parse_known_args(argv)
  try:
    if args.trials < 1:
      raise SweepError(f"--trials must be at least 1; got {args.trials}")
    overrides = check_overrides(extra)
    entries = parse_methods(args.methods)
    config = load_config(args.config, overrides)
    pairs = parse_pairs(args.pairs or f"{config.teacher.model}:{config.student.model}")
    commands = build_commands(args.config, config, entries, pairs, args.trials,
                              args.workdir_root, args.teacher_dir_pattern, overrides)
  except SweepError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.run:
    return run_commands(commands)
  for command in commands:
    print(command)
  return 0


if __name__ == "__main__":
  sys.exit(main())
