"""Defaults shared by every experiment: the reference's train_student.py arguments.

Experiment configs import this and override a few fields. Any field can be
overridden on the command line: ``--config.student.model=resnet8``.
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # 'summary' (model sizes), 'train_teacher' (train_teacher.py: CE only, trains
  # config.teacher.model), 'distill' (train_student.py), 'fine_tune'
  # (train_teacher.py --fine_tune: the classifier of config.student.model on
  # the frozen features of config.fine_tune.checkpoint), 'transfer' (distill
  # on the unlabeled split, then fine_tune: the STL-10 transfer of the paper),
  # 'evaluate', 'quickstart'.
  config.mode = "summary"
  config.seed = 0
  config.progress = True  # a progress line per epoch with images/s and ETA

  config.dataset = ml_collections.ConfigDict()
  config.dataset.name = "cifar100"
  config.dataset.num_classes = 100
  config.dataset.image_size = 32
  config.dataset.source = "auto"  # 'raw' (original archives in data_dir), 'tfds', 'auto'
  config.dataset.data_dir = "./data"
  config.dataset.num_train_categories = 0  # >0: CIFAR-100 train on labels < K only
  # The split trained on: 'train', or 'unlabeled' (STL-10; every label set to 0,
  # as the reference's dataset/stl10.py does, so only label-free losses make sense).
  config.dataset.train_split = "train"
  # Only for name='synthetic': load_synthetic's options.
  config.dataset.synthetic = ml_collections.ConfigDict(
      {"num_examples": 256, "num_classes": 10, "image_size": 32, "seed": 0})

  config.teacher = ml_collections.ConfigDict()
  config.teacher.model = "resnet32x4"
  # A model directory: WORKDIR/best_model of a 'train_teacher' run, or the
  # OUT_DIR of `python -m cktf_jax.models.convert` from a PyTorch .pth.
  config.teacher.checkpoint = ""
  # The teacher's (and so the distilled student's) class count when it differs
  # from the dataset's: 200 for a Tiny-ImageNet teacher distilled on STL-10.
  # None = config.dataset.num_classes.
  config.teacher.num_classes = config_dict.placeholder(int)

  config.student = ml_collections.ConfigDict()
  config.student.model = "resnet8x4"
  # The reference's --init_flag: start the student's conv weights from the
  # teacher's where the parameter names (and shapes) match.
  config.student.init_from_teacher = False

  # The reference's --distill and its hyper-parameters (train_student.py flags
  # where it has them); the whole section is passed to the method.
  config.method = ml_collections.ConfigDict()
  config.method.name = "kd"
  config.method.kd_T = 4.0           # KD temperature (every method's alpha term)
  config.method.hint_layer = 2       # FitNet: index into [f0, f1, ..., fk, pooled]
  config.method.feat_dim = 128       # CC / CRD / CKTF embedding size
  config.method.nce_k = 16384        # CRD / CKTF negatives per example
  config.method.nce_t = 0.1          # CRD / CKTF temperature (0.1 CIFAR-100; scripts: 0.07 Tiny-ImageNet)
  config.method.nce_m = 0.5          # memory-bank momentum
  config.method.head = "linear"      # CRD embed head: 'linear', 'mlp', 'pad'
  config.method.mode = "exact"       # CRD positives: 'exact' or 'relax'
  config.method.st_method = "Last"   # CKTF layer choice (scripts: Last; flag default Smallest)
  config.method.theta = 0.1          # CKTF weight of the intermediate-layer CRD terms
  config.method.init_epochs = 30     # AB / FT / FSP pre-training stage
  config.method.at_p = 2             # AT power
  config.method.rkd_w_d = 25.0       # RKD distance weight
  config.method.rkd_w_a = 50.0       # RKD angle weight
  config.method.kdsvd_k = 1          # KDSVD singular vectors
  config.method.ab_margin = 1.0      # AB margin
  config.method.ft_k = 0.5           # FT factor rate
  config.method.ft_p1 = 2
  config.method.ft_p2 = 1
  config.method.vid_init_pred_var = 5.0
  config.method.vid_eps = 1e-5
  config.method.bank_dtype = "float32"  # CRD / CKTF memory banks: 'float32' or 'bfloat16'
  # CKTF: factor of the intermediate heads' sum; None = theta / beta (see methods/crdst.py).
  config.method.st_scale = config_dict.placeholder(float)

  # The reference's --distill2 ("X + CKTF", scripts/run_2kds.sh): a second
  # method adding weights.kd2weights * its loss; '' = none. Its own copy of
  # the method hyper-parameters; st_scale=1: the reference adds all CKTF heads
  # unweighted (loss_kd_crdSt + loss_kd_crd).
  config.method2 = ml_collections.ConfigDict(config.method.to_dict())
  config.method2.name = ""
  config.method2.st_scale = 1.0

  # gamma * CE + alpha * KD + beta * method; None = the method's script defaults.
  config.weights = ml_collections.ConfigDict()
  config.weights.gamma = config_dict.placeholder(float)
  config.weights.alpha = config_dict.placeholder(float)
  config.weights.beta = config_dict.placeholder(float)
  config.weights.kd2weights = 0.8  # weight of config.method2's loss (reference default)

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 64
  config.train.epochs = 240
  # None: 0.05, or 0.01 for MobileNetV2/ShuffleV1/ShuffleV2 (the reference's rule).
  config.train.learning_rate = config_dict.placeholder(float)
  config.train.lr_decay_epochs = (150, 180, 210)
  config.train.lr_decay_rate = 0.1
  config.train.momentum = 0.9
  config.train.weight_decay = 5e-4
  config.train.nesterov = False
  config.train.checkpoint_every_epochs = 10
  # Train steps per host call: k > 1 runs k steps (batch assembly and
  # augmentation included) in one jitted lax.scan, keeping the host out of the
  # loop on fast accelerators; the same result as k = 1 up to float rounding.
  config.train.steps_per_call = 1
  # A NaN/inf loss or gradient stops the run (False) or leaves the state as it
  # was before that step and goes on (True; the skipped steps are counted).
  config.train.skip_nonfinite = False
  config.train.tensorboard = True  # TensorBoard event files in WORKDIR/tensorboard

  # A jax.profiler trace of global steps [start_step, start_step + num_steps)
  # into WORKDIR/profile (TensorBoard's profile plugin or Perfetto); 0 = off.
  config.profile = ml_collections.ConfigDict()
  config.profile.start_step = 0
  config.profile.num_steps = 5

  # mode='fine_tune': the model directory whose features are copied and frozen.
  config.fine_tune = ml_collections.ConfigDict()
  config.fine_tune.checkpoint = ""

  # mode='evaluate': the model directory to evaluate on the test split.
  config.eval = ml_collections.ConfigDict()
  config.eval.checkpoint = ""
  return config
