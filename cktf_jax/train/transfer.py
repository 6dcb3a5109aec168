"""``mode='transfer'``: the paper's transfer from Tiny-ImageNet to STL-10
(scripts/run_transfer_from_tinyimagenet_to_stl10.sh), both steps in one run.

1. ``WORKDIR/distill``: distill a student with the teacher's class count
   (``config.teacher.num_classes``, 200) from a Tiny-ImageNet teacher on the
   STL-10 ``unlabeled`` split, every label set to 0 (train_student.py
   --dataset stl10; only label-free losses make sense: gamma 0).
2. ``WORKDIR/fine_tune``: a copy of that student with a fresh
   ``config.dataset.num_classes``-way (10) classifier, the features copied
   from step 1's best model and frozen, trained on the STL-10 train split
   (train_teacher.py --fine_tune); its STL-10 test accuracy is the result.

``WORKDIR/transfer.json`` holds the result. Each step is an ordinary run
directory (resumable); a finished step is not run again.
"""

import json
import os
from typing import Any, Dict, Optional

import ml_collections

from cktf_jax import distributed
from cktf_jax.config import ConfigError
from cktf_jax.train import loop

DISTILL, FINE_TUNE = "distill", "fine_tune"
TRANSFER_FILE = "transfer.json"


def step_configs(config: ml_collections.ConfigDict, workdir: str):
  """The configs of the two steps (``mode`` 'distill' on the unlabeled split,
  then 'fine_tune' from step 1's best model)."""
  distill = ml_collections.ConfigDict(config.to_dict())
  distill.mode, distill.dataset.train_split = "distill", "unlabeled"
  fine_tune = ml_collections.ConfigDict(config.to_dict())
  fine_tune.mode, fine_tune.dataset.train_split = "fine_tune", "train"
  fine_tune.fine_tune.checkpoint = os.path.join(workdir, DISTILL, loop.BEST_MODEL)
  return distill, fine_tune


def _finished(run_dir: str) -> Optional[Dict[str, Any]]:
  path = os.path.join(run_dir, loop.SUMMARY_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def run_transfer(config: ml_collections.ConfigDict, workdir: Optional[str]) -> Dict[str, Any]:
  """Both steps (each skipped when its run directory says it finished)."""
  if not workdir:
    raise ConfigError("--workdir is required to train (checkpoints and logs go there)")
  loop.check_workdir_config(workdir, config)
  results = {}
  for name, step_config in zip((DISTILL, FINE_TUNE), step_configs(config, workdir)):
    run_dir = os.path.join(workdir, name)
    done = _finished(run_dir)
    if done is None:
      print(f"transfer step {name}: {run_dir}")
      done = loop.train_and_evaluate(step_config, run_dir)
    else:
      print(f"transfer step {name}: already finished in {run_dir}")
    results[name] = done
  result = {"method": config.method.name, "method2": config.method2.name,
            "teacher": config.teacher.model, "student": config.student.model,
            "dataset": config.dataset.name, "test_top1": results[FINE_TUNE]["best_top1"],
            "last_top1": results[FINE_TUNE]["last_top1"],
            "best_epoch": results[FINE_TUNE]["best_epoch"],
            "distill_dir": os.path.join(workdir, DISTILL),
            "fine_tune_dir": os.path.join(workdir, FINE_TUNE)}
  if distributed.is_writer():
    with open(os.path.join(workdir, TRANSFER_FILE), "w") as f:
      json.dump(result, f, indent=1)
  print(f"transfer {config.teacher.model} -> {config.student.model} ({config.method.name}): "
        f"{config.dataset.name} test top-1 {result['test_top1']:.2f}% (best epoch "
        f"{result['best_epoch']}), last {result['last_top1']:.2f}%")
  return result
