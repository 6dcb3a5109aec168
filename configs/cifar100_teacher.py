"""Train a CIFAR-100 teacher from scratch (reference train_teacher.py, scripts/run_vanilla_models.sh).

    python launch.py --config configs/cifar100_teacher.py --config.teacher.model=resnet32x4 \
        --workdir runs/cifar100/resnet32x4_vanilla

240 epochs, batch 64, SGD lr 0.05 (0.01 for MobileNetV2/ShuffleV1/ShuffleV2),
decayed 10x after epochs 150, 180, 210. WORKDIR/best_model then serves as
`--config.teacher.checkpoint` of a distillation run. Needs CIFAR-100 under
config.dataset.data_dir (see the README's "Data").
"""

from configs import default


def get_config():
  config = default.get_config()
  config.mode = "train_teacher"
  config.dataset.name = "cifar100"
  config.dataset.num_classes = 100
  config.teacher.model = "resnet32x4"
  return config
