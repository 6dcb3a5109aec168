"""``mode='summary'``: the teacher/student pair, their sizes and compression ratio."""

from typing import Optional

import ml_collections

from cktf_jax import models


def summarize(config: ml_collections.ConfigDict, workdir: Optional[str] = None) -> str:
  """A table of both models' parameter counts (no compute: ``jax.eval_shape``).

  The ratio is teacher / student parameters, as in the seed README's tables.
  """
  del workdir  # nothing is written
  num_classes = config.dataset.num_classes
  size = config.dataset.image_size
  counts = {role: models.parameter_count(config[role].model, num_classes, size)
            for role in ("teacher", "student")}
  lines = [f"{'role':<8} {'model':<12} {'parameters':>12}"]
  for role, count in counts.items():
    lines.append(f"{role:<8} {config[role].model:<12} {count:>12,}")
  lines.append(f"compression ratio (teacher / student): "
               f"{counts['teacher'] / counts['student']:.2f}  "
               f"[{num_classes} classes, {size}x{size} inputs]")
  table = "\n".join(lines)
  print(table)
  return table
