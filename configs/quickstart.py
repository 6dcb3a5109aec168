"""Quick start: build the teacher/student pair of the paper's headline result.

    python launch.py --config configs/quickstart.py

Runs in seconds on a CPU: no data, no training, no compile (``jax.eval_shape``);
prints each model's parameter count and the compression ratio the seed README's
tables report (resnet32x4 -> resnet8x4: 6.03).
"""

from configs import default


def get_config():
  config = default.get_config()
  config.mode = "summary"
  config.teacher.model = "resnet32x4"
  config.student.model = "resnet8x4"
  return config
