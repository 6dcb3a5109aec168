"""Train a Tiny-ImageNet teacher from scratch (scripts/run_vanilla_models.sh, Tiny-ImageNet part).

    python launch.py --config configs/tiny_imagenet_teacher.py --config.teacher.model=vgg19 \
        --workdir runs/tiny_imagenet/vgg19_vanilla

200 classes, 64x64 crops (RandomResizedCrop + flip), the reference's SGD and
schedule. The scripts lower the batch for the deepest teachers:
`--config.train.batch_size=32` for ResNet101, 16 for ResNet152. Needs
Tiny-ImageNet under config.dataset.data_dir (README, "Data").
"""

from configs import default


def get_config():
  config = default.get_config()
  config.mode = "train_teacher"
  config.dataset.name = "tiny_imagenet"
  config.dataset.num_classes = 200
  config.dataset.image_size = 64
  config.teacher.model = "vgg19"
  return config
