"""Distil a CIFAR-100 student with any method (reference train_student.py,
scripts/run_cifar100_distill.sh and the baselines of the seed README's Table 1).

    python launch.py --config configs/cifar100_distill.py --config.method.name=attention \
        --config.teacher.model=resnet32x4 --config.teacher.checkpoint=TEACHER_DIR \
        --config.student.model=resnet8x4 --workdir runs/cifar100/at_r32x4_r8x4

`--config.method.name` is the reference's `--distill` (kd, hint, attention,
similarity, correlation, vid, rkd, pkt, abound, factor, fsp, nst, kdsvd, crd,
crdst); gamma/alpha/beta default to the reference scripts' values for that
method (override with `--config.weights.beta=...`). TEACHER_DIR is a
WORKDIR/best_model of configs/cifar100_teacher.py or the OUT_DIR of
`python -m cktf_jax.models.convert`.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.mode = "distill"
  config.dataset.name = "cifar100"
  config.dataset.num_classes = 100
  config.teacher.model = "resnet32x4"
  config.student.model = "resnet8x4"
  config.method.name = "kd"
  return config
