"""config.validate: one bad field at a time, each refused with a message naming
the field and what is allowed; the good configs pass. Nothing is compiled."""

import re

import ml_collections
import pytest

from cktf_jax import config as config_lib, data
from cktf_jax.contrast import memory
from cktf_jax.train.run import MODES
from configs import cifar100_cktf, default, quickstart, stl10_transfer

# Every mode config.py knows, so that mode-specific rules can be tried here
# whichever runners train.run has today.
ALL_MODES = tuple(config_lib.MODE_NEEDS)
DELETE = "<delete the field>"


def _config(base=cifar100_cktf, **changes):
  """``base``'s config, its teacher directory set as the command line would,
  rebuilt from a dict with ``changes`` ('train.batch_size' = value; ``DELETE``
  removes a field), as a config file could write it (no ConfigDict type locks)."""
  tree = base.get_config().to_dict()
  tree["teacher"]["checkpoint"] = tree["teacher"]["checkpoint"] or "TEACHER_DIR"
  for path, value in changes.items():
    *sections, field = path.split(".")
    node = tree
    for section in sections:
      node = node.setdefault(section, {})
    if value is DELETE:
      del node[field]
    else:
      node[field] = value
  return ml_collections.ConfigDict(tree)


BAD = [
    # schema
    ({"train.epoch": 3}, r"config\.train\.epoch: unknown field .*config\.train has: batch_size, "
     r"epochs,"),
    ({"optimizer.name": "adam"}, r"config\.optimizer\.name: unknown field .*config has: mode, "
     r"seed,"),
    ({"train.epochs": DELETE}, r"config\.train\.epochs is missing"),
    # names
    ({"mode": "fly"}, r"config\.mode: unknown mode 'fly'; valid modes are: summary, "),
    ({"student.model": "resnet9"}, r"config\.student\.model: unknown model 'resnet9'; valid "
     r"models are: resnet8,"),
    ({"method.name": "cktf"}, r"config\.method\.name: unknown method 'cktf'; valid methods are"),
    ({"method2.name": "crd2"}, r"config\.method2\.name: unknown method 'crd2'.*\(or '' for none\)"),
    ({"dataset.name": "cifar10"}, r"config\.dataset\.name: unknown dataset 'cifar10'; valid "
     r"datasets are: cifar100, stl10, tiny_imagenet, digits, synthetic"),
    ({"dataset.source": "web"}, r"config\.dataset\.source: unknown source 'web'; valid sources "
     r"are: auto, raw, tfds"),
    ({"dataset.train_split": "test"}, r"config\.dataset\.train_split: unknown train split "
     r"'test'; valid train splits are: train, unlabeled"),
    ({"method.head": "conv"}, r"config\.method\.head: unknown CRD head 'conv'; valid CRD heads "
     r"are: linear, mlp, pad"),
    ({"method.mode": "loose"}, r"config\.method\.mode: unknown CRD mode 'loose'; valid CRD "
     r"modes are: exact, relax"),
    ({"method.st_method": "last"}, r"config\.method\.st_method: unknown st_method 'last'; "
     r"valid st_methods are: Last, Smallest, Largest, First, Random"),
    ({"method.bank_dtype": "float16"}, r"config\.method\.bank_dtype: unknown bank dtype "
     r"'float16'; valid bank dtypes are: float32, bfloat16"),
    # types and ranges
    ({"seed": -1}, r"config\.seed: must be an int >= 0; got -1"),
    ({"progress": 1}, r"config\.progress: must be True or False; got 1"),
    ({"train.nesterov": "yes"}, r"config\.train\.nesterov: must be True or False; got 'yes'"),
    ({"train.tensorboard": None}, r"config\.train\.tensorboard: must be True or False"),
    ({"train.batch_size": 64.5}, r"config\.train\.batch_size: must be an int >= 1; got 64\.5"),
    ({"train.batch_size": 0}, r"config\.train\.batch_size: must be an int >= 1; got 0"),
    ({"train.epochs": True}, r"config\.train\.epochs: must be an int >= 1; got True"),
    ({"train.learning_rate": 0.0}, r"config\.train\.learning_rate: must be None or a number "
     r"> 0; got 0\.0"),
    ({"train.lr_decay_epochs": (180, 150)}, r"config\.train\.lr_decay_epochs: must be a "
     r"strictly increasing tuple of ints >= 1"),
    ({"train.lr_decay_epochs": (150.5,)}, r"config\.train\.lr_decay_epochs: must be"),
    ({"train.lr_decay_rate": 1.5}, r"config\.train\.lr_decay_rate: must be a number > 0 and "
     r"<= 1; got 1\.5"),
    ({"train.momentum": 1.0}, r"config\.train\.momentum: must be a number >= 0 and < 1"),
    ({"train.weight_decay": float("nan")}, r"config\.train\.weight_decay: must be a number >= 0"),
    ({"train.checkpoint_every_epochs": 0}, r"config\.train\.checkpoint_every_epochs: must be an "
     r"int >= 1"),
    ({"train.steps_per_call": 0}, r"config\.train\.steps_per_call: must be an int >= 1"),
    ({"profile.start_step": -2}, r"config\.profile\.start_step: must be an int >= 0"),
    ({"profile.num_steps": 0}, r"config\.profile\.num_steps: must be an int >= 1"),
    ({"dataset.num_classes": "100"}, r"config\.dataset\.num_classes: must be an int >= 1"),
    ({"dataset.num_train_categories": -1}, r"config\.dataset\.num_train_categories: must be an "
     r"int >= 0"),
    ({"dataset.data_dir": None}, r"config\.dataset\.data_dir: must be a string"),
    ({"teacher.num_classes": 0}, r"config\.teacher\.num_classes: must be None or an int >= 1"),
    ({"method.kd_T": 0}, r"config\.method\.kd_T: must be a number > 0; got 0"),
    ({"method.nce_k": 0}, r"config\.method\.nce_k: must be an int >= 1"),
    ({"method.nce_t": -0.1}, r"config\.method\.nce_t: must be a number > 0"),
    ({"method.nce_m": 1.0}, r"config\.method\.nce_m: must be a number >= 0 and < 1; got 1\.0"),
    ({"method.feat_dim": 12.0}, r"config\.method\.feat_dim: must be an int >= 1; got 12\.0"),
    ({"method.hint_layer": -1}, r"config\.method\.hint_layer: must be an int >= 0"),
    ({"method.at_p": 0}, r"config\.method\.at_p: must be a number > 0"),
    ({"method.theta": -1.0}, r"config\.method\.theta: must be a number >= 0"),
    ({"method.init_epochs": 2.5}, r"config\.method\.init_epochs: must be an int >= 0"),
    ({"method.kdsvd_k": 0}, r"config\.method\.kdsvd_k: must be an int >= 1"),
    ({"method.st_scale": -1.0}, r"config\.method\.st_scale: must be None or a number >= 0"),
    ({"method2.name": "crdst", "method2.nce_t": 0}, r"config\.method2\.nce_t: must be a "
     r"number > 0"),
    ({"weights.beta": -0.8}, r"config\.weights\.beta: must be None or a number >= 0"),
    ({"weights.kd2weights": None}, r"config\.weights\.kd2weights: must be a number >= 0; got "
     r"None"),
    # fields together
    ({"dataset.num_classes": 10}, r"config\.dataset\.num_classes=10, but cifar100 has 100 "
     r"classes; set --config\.dataset\.num_classes=100"),
    ({"dataset.image_size": 64}, r"config\.dataset\.image_size=64, but the models see 32x32 "
     r"images of cifar100"),
    ({"dataset.train_split": "unlabeled"}, r"config\.dataset\.train_split='unlabeled': cifar100 "
     r"has no such split; valid train splits of cifar100 are: train"),
    ({"dataset.num_train_categories": 101}, r"config\.dataset\.num_train_categories must be in "
     r"\[0, 100\]"),
    ({"dataset.name": "digits", "dataset.num_classes": 10, "dataset.num_train_categories": 5},
     r"config\.dataset\.num_train_categories=5 applies to cifar100 only"),
    ({"dataset.name": "synthetic", "dataset.num_classes": 100}, r"config\.dataset\.num_classes="
     r"100, but synthetic \(config\.dataset\.synthetic\.num_classes\) has 10 classes"),
    ({"dataset.name": "tiny_imagenet", "dataset.num_classes": 200, "dataset.image_size": 64},
     r"config\.teacher\.model='resnet32x4' cannot take the 64x64 images of tiny_imagenet: "
     r"resnet32x4 supports 32"),
    ({"train.batch_size": 6}, r"config\.train\.batch_size=6 is not a multiple of the 4 devices "
     r"\(jax\.device_count\(\)\).*a multiple of 4, e\.g\. 4 or 8"),
    ({"train.batch_size": 2}, r"config\.train\.batch_size=2 .*e\.g\. 4$"),
    ({"teacher.checkpoint": ""}, r"config\.teacher\.checkpoint is not set: mode 'distill' "
     r"needs the teacher's model directory"),
    ({"mode": "evaluate"}, r"config\.eval\.checkpoint is not set: mode 'evaluate' needs"),
    ({"mode": "fine_tune"}, r"config\.fine_tune\.checkpoint is not set: mode 'fine_tune'"),
    ({"mode": "quickstart"}, r"config\.quickstart is not set: mode 'quickstart' needs its "
     r"section"),
    ({"quickstart.teacher_epochs": 0, "quickstart.student_epochs": 1},
     r"config\.quickstart\.teacher_epochs: must be an int >= 1"),
    ({"weights.beta": 0.0}, r"config\.weights\.beta=0 with config\.method\.st_scale=None: CKTF "
     r"returns crd_final \+ \(theta / beta\)"),
    ({"method2.name": "crdst", "method2.st_scale": None, "weights.kd2weights": 0.0},
     r"config\.weights\.kd2weights=0 with config\.method2\.st_scale=None"),
    ({"student.model": "MobileNetV2"}, r"config\.student\.model='MobileNetV2' cannot be used "
     r"with config\.method\.name='crdst': CKTF layer pairing has no pooling rule"),
    ({"method.nce_k": 50001}, r"config\.method\.nce_k=50001 exceeds the 50000 training "
     r"examples of cifar100 \(train\); set it to at most 50000"),
    ({"dataset.num_train_categories": 10}, r"config\.method\.nce_k=16384 exceeds the 5000 "
     r"training examples"),
    ({"method.vid_init_pred_var": 1e-6}, r"config\.method\.vid_init_pred_var=1e-06 must exceed "
     r"config\.method\.vid_eps=1e-05"),
    ({"train.nesterov": True, "train.momentum": 0.0}, r"config\.train\.nesterov=True needs "
     r"config\.train\.momentum > 0"),
    ({"mode": "train_teacher", "dataset.name": "stl10", "dataset.num_classes": 10,
      "dataset.image_size": 64, "dataset.train_split": "unlabeled", "teacher.model": "vgg8"},
     r"config\.dataset\.train_split='unlabeled': mode 'train_teacher' trains on labels"),
]

STL10_TRANSFER_BAD = [
    ({"method.mode": "relax"}, r"config\.method\.mode='relax' is impossible on stl10"),
    ({"weights.gamma": None}, r"config\.weights\.gamma=None \(None: the method's default, > 0\): "
     r"mode 'transfer' distils on the unlabeled split"),
    ({"mode": "distill", "dataset.train_split": "unlabeled", "weights.gamma": 1.0},
     r"config\.weights\.gamma=1\.0 .*mode 'distill' distils on the unlabeled split"),
    ({"mode": "distill", "teacher.num_classes": 5}, r"config\.teacher\.num_classes=5 is fewer "
     r"than the 10 classes of the stl10 labels"),
    ({"method.nce_k": 100001}, r"config\.method\.nce_k=100001 exceeds the 100000 training "
     r"examples of stl10 \(unlabeled\)"),
    ({"student.model": "wrn_16_2"}, r"config\.student\.model='wrn_16_2' cannot take the 64x64 "
     r"images of stl10"),
]


def _cases(base, rows):
  name = base.__name__.rpartition(".")[2]
  return [pytest.param(base, changes, message,
                       id=f"{name}:" + ",".join(f"{k}={v!r}" for k, v in changes.items()))
          for changes, message in rows]


CASES = _cases(cifar100_cktf, BAD) + _cases(stl10_transfer, STL10_TRANSFER_BAD)


@pytest.mark.parametrize("base, changes, message", CASES)
def test_a_bad_field_is_refused_with_its_name_and_the_allowed_values(base, changes, message):
  config = _config(base, **changes)
  with pytest.raises(config_lib.ConfigError) as error:
    config_lib.validate(config, ALL_MODES)
  assert re.search(message, str(error.value), re.MULTILINE), str(error.value)


@pytest.mark.parametrize("base, changes", [
    (default, {}),
    (quickstart, {}),
    (quickstart, {"mode": "summary"}),
    (cifar100_cktf, {}),
    (cifar100_cktf, {"method2.name": "crdst", "method.name": "kd"}),  # 'KD + CKTF'
    (cifar100_cktf, {"method2.nce_t": -1.0}),  # unused: no second method
    (cifar100_cktf, {"dataset.num_train_categories": 50, "method.nce_k": 4096}),
    (cifar100_cktf, {"weights.beta": 0.0, "method.st_scale": 0.5}),
    (cifar100_cktf, {"train.learning_rate": 1, "train.lr_decay_epochs": ()}),
    (cifar100_cktf, {"train.batch_size": 8, "seed": 3, "teacher.num_classes": 100}),
    (cifar100_cktf, {"mode": "evaluate", "eval.checkpoint": "DIR", "student.model": "ShuffleV1"}),
    (cifar100_cktf, {"dataset.name": "synthetic", "dataset.num_classes": 10,
                     "method.nce_k": 256}),
    (stl10_transfer, {}),
    (stl10_transfer, {"mode": "distill", "dataset.train_split": "unlabeled"}),
    (stl10_transfer, {"mode": "fine_tune", "fine_tune.checkpoint": "DIR"}),
])
def test_good_configs_pass(base, changes):
  config_lib.validate(_config(base, **changes), ALL_MODES)


def test_several_problems_are_reported_together():
  config = _config(**{"seed": -1, "train.epochs": 0})
  with pytest.raises(config_lib.ConfigError, match=r"config\.seed: .*\nconfig\.train\.epochs: "):
    config_lib.validate(config, ALL_MODES)


def test_the_modes_are_the_runners():
  with pytest.raises(config_lib.ConfigError, match="unknown mode 'distill'; valid modes are: "
                     "summary$"):
    config_lib.validate(_config(), ("summary",))
  assert set(MODES) <= set(config_lib.MODE_NEEDS)


def test_the_rules_cover_exactly_the_default_fields():
  default_fields = set(config_lib._leaf_paths(default.get_config().to_dict()))
  quickstart_fields = {f"quickstart.{k}" for k in quickstart.get_config().quickstart}
  assert set(config_lib.FIELD_RULES) | {"mode"} == default_fields | quickstart_fields


def test_the_tables_agree_with_the_data_and_bank_modules():
  assert set(config_lib.DATASET_FACTS) | {"synthetic"} == set(data.DATASETS)
  for dtype in ("float32", "bfloat16"):
    memory.bank_dtype(dtype)
