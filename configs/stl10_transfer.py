"""Transfer from Tiny-ImageNet to STL-10 (the seed README's Figure 2;
scripts/run_transfer_from_tinyimagenet_to_stl10.sh): CKTF, vgg19 -> vgg19.

    python launch.py --config configs/stl10_transfer.py \
        --config.teacher.checkpoint=TEACHER_DIR --workdir runs/stl10/cktf_vgg19_vgg19

runs both steps (see cktf_jax/train/transfer.py): WORKDIR/distill trains a
200-class student on the 100,000 unlabeled STL-10 images (labels all 0,
gamma 0), WORKDIR/fine_tune trains a 10-class classifier on its frozen
features on STL-10 train and reports STL-10 test top-1 (WORKDIR/transfer.json).
TEACHER_DIR: the WORKDIR/best_model of configs/tiny_imagenet_teacher.py with
`--config.teacher.model=vgg19` (or a converted reference teacher:
`python -m cktf_jax.models.convert --model vgg19 --num_classes 200 vgg19_best.pth TEACHER_DIR`).

The script's three methods (the figure's rows):
  CKTF: this config (`--distill crdst --st_method Last -r 0 -a 0 -b 1 --theta 0.04 --nce_t 0.07`)
  CRD:  --config.method.name=crd
  KD:   --config.method.name=kd --config.weights.alpha=1 --config.weights.beta=0
The figure's other pairs: --config.student.model=vgg8, and
--config.teacher.model=ResNet18 --config.student.model=ResNet18.
Each step alone: --config.mode=distill --config.dataset.train_split=unlabeled
(step 1), then --config.mode=fine_tune --config.fine_tune.checkpoint=STEP1_WORKDIR/best_model
(step 2).
"""

from configs import default


def get_config():
  config = default.get_config()
  config.mode = "transfer"
  config.dataset.name = "stl10"
  config.dataset.num_classes = 10
  config.dataset.image_size = 64
  config.teacher.model = "vgg19"
  config.teacher.num_classes = 200  # a Tiny-ImageNet teacher
  config.student.model = "vgg19"
  config.method.name = "crdst"
  config.method.st_method = "Last"
  config.method.theta = 0.04
  config.method.nce_t = 0.07
  config.weights.gamma = 0.0
  config.weights.alpha = 0.0
  config.weights.beta = 1.0
  return config
