"""``mode='quickstart'``: the seed README's table, end to end, on bundled data.

Trains a teacher from scratch, then the student four ways (without KD, with
KD, CRD and CKTF) on scikit-learn's handwritten digits, and prints one table
laid out like the seed README's (teacher, student w/o KD, KD, CRD, CKTF
top-1), plus where every checkpoint is. Each run is an ordinary
``train_and_evaluate`` run in its own sub-directory of the workdir, so a
second call resumes or reuses what is already trained.
"""

import os
from typing import Any, Dict, Optional

import ml_collections

from cktf_jax import models
from cktf_jax.train import loop

# (row of the table, sub-directory, mode, method)
RUNS = (
    ("Student (w/o KD)", "student", "train_teacher", None),
    ("KD", "kd", "distill", "kd"),
    ("CRD", "crd", "distill", "crd"),
    ("CKTF", "cktf", "distill", "crdst"),
)


def _decay_epochs(epochs: int):
  """The reference's 150/180/210-of-240 steps, scaled to a short run (0.1x at 62%, 75%, 88%)."""
  return tuple(sorted({max(1, round(epochs * f)) for f in (0.625, 0.75, 0.875)}))


def _sub_config(config: ml_collections.ConfigDict, **fields) -> ml_collections.ConfigDict:
  sub = ml_collections.ConfigDict(config.to_dict())
  for key, value in fields.items():
    node = sub
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return sub


def run_quickstart(config: ml_collections.ConfigDict, workdir: Optional[str]) -> Dict[str, Any]:
  """Run the teacher and the four student runs; print and return the table."""
  workdir = os.path.abspath(workdir or os.path.join("runs", "quickstart"))
  q = config.quickstart
  teacher_name, student_name = config.teacher.model, config.student.model
  total = 1 + len(RUNS)
  print(f"Quick start: {config.dataset.name}, teacher {teacher_name} -> student {student_name}; "
        f"{total} training runs in {workdir}")

  print(f"\n[1/{total}] training the teacher {teacher_name} from scratch ({q.teacher_epochs} epochs)")
  teacher_dir = os.path.join(workdir, "teacher")
  teacher = loop.train_and_evaluate(
      _sub_config(config, mode="train_teacher", **{
          "train.epochs": q.teacher_epochs,
          "train.lr_decay_epochs": _decay_epochs(q.teacher_epochs)}), teacher_dir)
  results = {"Teacher": teacher}
  for i, (row, subdir, mode, method) in enumerate(RUNS, start=2):
    what = "without a teacher" if method is None else f"distilling with --distill {method}"
    print(f"\n[{i}/{total}] training the student {student_name} {what} ({q.student_epochs} epochs)")
    fields = {"mode": mode, "train.epochs": q.student_epochs,
              "train.lr_decay_epochs": _decay_epochs(q.student_epochs),
              "teacher.checkpoint": teacher["best_model"]}
    if method is None:  # the baseline: the student trained like a teacher, on CE alone
      fields["teacher.model"] = student_name
    else:
      fields["method.name"] = method
    results[row] = loop.train_and_evaluate(_sub_config(config, **fields),
                                           os.path.join(workdir, subdir))

  ratio = (models.parameter_count(teacher_name, config.dataset.num_classes)
           / models.parameter_count(student_name, config.dataset.num_classes))
  header = f"{teacher_name} / {student_name}"
  width = max(len(header), 12)
  lines = [f"Top-1 test accuracy (%) on {config.dataset.name} "
           f"({q.teacher_epochs} teacher / {q.student_epochs} student epochs; best epoch)", "",
           f"| {'Teacher / Student':<17} | {header:>{width}} |",
           f"|:{'-' * 17}:|:{'-' * width}:|",
           f"| {'Compression Ratio':<17} | {ratio:>{width}.2f} |"]
  for row, result in results.items():
    lines.append(f"| {row:<17} | {result['best_top1']:>{width}.2f} |")
  lines.append("")
  lines.append("Checkpoints (model directories; evaluate one with "
               "`python launch.py --config configs/quickstart.py --config.mode=evaluate "
               "--config.eval.checkpoint=DIR`):")
  for row, result in results.items():
    lines.append(f"  {row:<17} {result['best_model']}")
  table = "\n".join(lines)
  print("\n" + table)
  return {"table": table, "results": results}
