"""CKTF on CIFAR-100: resnet32x4 -> resnet8x4 (the seed README's Table 1, 75.74% top-1).

    python launch.py --config configs/cifar100_cktf.py \
        --config.teacher.checkpoint=TEACHER_DIR --workdir runs/cifar100/cktf_r32x4_r8x4

The reference's command (scripts/run_cifar100_distill.sh):
`--distill crdst --st_method Last -r 1.0 -a 0 -b 0.8 --theta 0.1`, nce_k 16384,
nce_t 0.1, feat_dim 128, 240 epochs at batch 64. CKTF+KD: add
`--config.weights.alpha=1`. Other pairs: override `--config.teacher.model` and
`--config.student.model` (e.g. wrn_40_2 -> wrn_16_2, vgg13 -> vgg8).
TEACHER_DIR: a WORKDIR/best_model of configs/cifar100_teacher.py, or a
converted reference teacher (`python -m cktf_jax.models.convert --model
resnet32x4 --num_classes 100 resnet32x4_vanilla/ckpt_epoch_240.pth TEACHER_DIR`).
"""

from configs import cifar100_distill


def get_config():
  config = cifar100_distill.get_config()
  config.method.name = "crdst"
  config.method.st_method = "Last"
  config.method.theta = 0.1
  config.method.nce_t = 0.1
  return config
