"""Distil on Tiny-ImageNet (scripts/run_tiny-imagenet_distill.sh; the seed README's
Tiny-ImageNet table): vgg19 -> vgg8 by default, any method.

    python launch.py --config configs/tiny_imagenet_distill.py --config.method.name=crdst \
        --config.teacher.checkpoint=TEACHER_DIR --workdir runs/tiny_imagenet/cktf_vgg19_vgg8

Other pairs of the table: vgg16 -> vgg11, ResNet34 -> ResNet10, ResNet50 ->
ResNet10 (`--config.teacher.model=... --config.student.model=...`). The
scripts use nce_t 0.07 for CRD and CKTF here (0.1 on CIFAR-100).
"""

from configs import default


def get_config():
  config = default.get_config()
  config.mode = "distill"
  config.dataset.name = "tiny_imagenet"
  config.dataset.num_classes = 200
  config.dataset.image_size = 64
  config.teacher.model = "vgg19"
  config.student.model = "vgg8"
  config.method.name = "kd"
  config.method.nce_t = 0.07
  return config
