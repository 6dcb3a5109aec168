"""Quick start: the seed README's table in miniature, on bundled real data.

    python launch.py --config configs/quickstart.py [--workdir runs/quickstart]

On scikit-learn's handwritten digits (1437 train / 360 test images, shipped
with scikit-learn, no download) it trains a resnet8 teacher, then a resnet5
student without KD, with KD, CRD and CKTF, and prints their top-1 accuracies
in one table with the checkpoint locations. About 3-4 minutes on a 2-core CPU;
a second call reuses the finished runs.

`--config.mode=summary` only prints the two models' sizes (no training).
"""

from configs import default


def get_config():
  config = default.get_config()
  config.mode = "quickstart"
  config.dataset.name = "digits"
  config.dataset.num_classes = 10
  config.teacher.model = "resnet8"
  config.student.model = "resnet5"
  config.method.nce_k = 512      # digits has ~1290 other-class examples per anchor
  config.train.checkpoint_every_epochs = 5
  config.quickstart = default.ml_collections.ConfigDict()
  config.quickstart.teacher_epochs = 10
  config.quickstart.student_epochs = 8
  return config
