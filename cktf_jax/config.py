"""Checks on a loaded config, run before anything is built or compiled.

``validate(config, modes)`` checks, in this order, and reports every problem
of a stage at once (one line each, naming the field and what is allowed):

1. the schema: no field that ``configs/default.py`` lacks (``FIELD_RULES``
   is that schema, one rule per field) and none missing;
2. each field on its own: its type and range, or its name among the valid
   ones (``FIELD_RULES``; ``config.mode`` among ``modes``);
3. fields together (``COMBINATION_RULES``): the dataset's class count, image
   size and splits, the models' input sizes, what the mode needs
   (``MODE_NEEDS``), the distillation method's constraints, and the batch
   split over ``jax.device_count()`` devices.

What only the built run knows (the teacher directory's contents, feature
shapes, the data on disk) is checked later, still before compiling.
"""

import dataclasses
import functools
import math
import numbers
import operator
from typing import Any, Callable, Collection, Dict, Iterator, List, Optional, Tuple

import jax
import ml_collections

from cktf_jax import data, methods, models
from cktf_jax.contrast import crd as crd_heads, pairing, sampling
from cktf_jax.data.load import SOURCES
from cktf_jax.methods import crd as crd_method, crdst as crdst_method


class ConfigError(ValueError):
  """A config field is invalid; the message names the field and what would work."""


# A field's check: the problem with a value (a phrase), or None when it is fine.
Check = Callable[[Any], Optional[str]]


@dataclasses.dataclass(frozen=True)
class Rule:
  """A ``Check`` from a test and the words for what it allows."""

  accepts: Callable[[Any], bool]
  allowed: str

  def __call__(self, value) -> Optional[str]:
    return None if self.accepts(value) else f"must be {self.allowed}; got {value!r}"


def _is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
  return (isinstance(value, numbers.Real) and not isinstance(value, bool)
          and math.isfinite(value))


_BOUNDS = (("above", operator.gt, ">"), ("at_least", operator.ge, ">="),
           ("below", operator.lt, "<"), ("at_most", operator.le, "<="))


def _bounded(kind: str, is_kind: Callable[[Any], bool], **bounds) -> Rule:
  tests = [(op, bounds[name], symbol) for name, op, symbol in _BOUNDS if name in bounds]
  allowed = f"{kind} " + " and ".join(f"{symbol} {bound}" for _, bound, symbol in tests)
  return Rule(lambda v: is_kind(v) and all(op(v, bound) for op, bound, _ in tests), allowed)


def integer(**bounds) -> Rule:
  """An int (not a bool, not a float) within ``above``/``at_least``/``below``/``at_most``."""
  return _bounded("an int", _is_int, **bounds)


def number(**bounds) -> Rule:
  """A finite int or float (not a bool) within the bounds."""
  return _bounded("a number", _is_number, **bounds)


def optional(rule: Rule) -> Rule:
  """None, or a value ``rule`` accepts."""
  return Rule(lambda v: v is None or rule.accepts(v), f"None or {rule.allowed}")


def choice(kind: str, names: Collection[str]) -> Check:
  """One of ``names``; the message lists them."""
  return lambda value: None if value in names else (
      f"unknown {kind} {value!r}; valid {kind}s are: {', '.join(names)}")


def registered(check_name: Callable[[str], None]) -> Check:
  """A registry name (``check_name`` raises ``ValueError`` listing the valid ones)."""

  def check(value):
    try:
      check_name(value)
    except ValueError as e:
      return str(e)
    return None

  return check


boolean = Rule(lambda v: isinstance(v, bool), "True or False")
text = Rule(lambda v: isinstance(v, str), "a string")
increasing_epochs = Rule(
    lambda v: (isinstance(v, (tuple, list)) and all(_is_int(e) and e >= 1 for e in v)
               and all(a < b for a, b in zip(v, v[1:]))),
    "a strictly increasing tuple of ints >= 1, e.g. (150, 180, 210), or ()")


def _method_name(value) -> Optional[str]:
  """config.method2.name: '' (no second method) or a method name."""
  problem = None if value == "" else registered(methods.check_method_name)(value)
  return problem and f"{problem} (or '' for none)"


# config.method and config.method2 hold the same hyper-parameters.
METHOD_RULES: Dict[str, Check] = {
    "kd_T": number(above=0),
    "hint_layer": integer(at_least=0),  # its upper end depends on the model: hint's init checks it
    "feat_dim": integer(at_least=1),
    "nce_k": integer(at_least=1),
    "nce_t": number(above=0),
    "nce_m": number(at_least=0, below=1),
    "head": choice("CRD head", crd_heads.HEADS),
    "mode": choice("CRD mode", sampling.MODES),
    "st_method": choice("st_method", pairing.ST_METHODS),
    "theta": number(at_least=0),
    "init_epochs": integer(at_least=0),
    "at_p": number(above=0),
    "rkd_w_d": number(at_least=0),
    "rkd_w_a": number(at_least=0),
    "kdsvd_k": integer(at_least=1),
    "ab_margin": number(at_least=0),
    "ft_k": number(above=0),
    "ft_p1": integer(at_least=1),
    "ft_p2": integer(at_least=1),
    "vid_init_pred_var": number(above=0),
    "vid_eps": number(above=0),
    "bank_dtype": choice("bank dtype", ("float32", "bfloat16")),
    "st_scale": optional(number(at_least=0)),
}

# Every field of configs/default.py and its check ('mode' is added by validate:
# its valid names are the runners'), plus OPTIONAL_SECTIONS.
FIELD_RULES: Dict[str, Check] = {
    "seed": integer(at_least=0),
    "progress": boolean,
    "dataset.name": choice("dataset", tuple(data.DATASETS)),
    "dataset.num_classes": integer(at_least=1),
    "dataset.image_size": integer(at_least=1),
    "dataset.source": choice("source", SOURCES),
    "dataset.data_dir": text,
    "dataset.num_train_categories": integer(at_least=0),
    "dataset.train_split": choice("train split", ("train", "unlabeled")),
    "dataset.synthetic.num_examples": integer(at_least=1),
    "dataset.synthetic.num_classes": integer(at_least=1),
    "dataset.synthetic.image_size": integer(at_least=1),
    "dataset.synthetic.seed": integer(at_least=0),
    "teacher.model": registered(models.check_model_name),
    "teacher.checkpoint": text,
    "teacher.num_classes": optional(integer(at_least=1)),
    "student.model": registered(models.check_model_name),
    "student.init_from_teacher": boolean,
    "method.name": registered(methods.check_method_name),
    **{f"method.{name}": check for name, check in METHOD_RULES.items()},
    "method2.name": _method_name,
    **{f"method2.{name}": check for name, check in METHOD_RULES.items()},
    "weights.gamma": optional(number(at_least=0)),
    "weights.alpha": optional(number(at_least=0)),
    "weights.beta": optional(number(at_least=0)),
    "weights.kd2weights": number(at_least=0),
    "train.batch_size": integer(at_least=1),
    "train.epochs": integer(at_least=1),
    "train.learning_rate": optional(number(above=0)),
    "train.lr_decay_epochs": increasing_epochs,
    "train.lr_decay_rate": number(above=0, at_most=1),
    "train.momentum": number(at_least=0, below=1),
    "train.weight_decay": number(at_least=0),
    "train.nesterov": boolean,
    "train.checkpoint_every_epochs": integer(at_least=1),
    "train.steps_per_call": integer(at_least=1),
    "train.skip_nonfinite": boolean,
    "train.tensorboard": boolean,
    "profile.start_step": integer(at_least=0),
    "profile.num_steps": integer(at_least=1),
    "fine_tune.checkpoint": text,
    "eval.checkpoint": text,
    "quickstart.teacher_epochs": integer(at_least=1),
    "quickstart.student_epochs": integer(at_least=1),
}
# Sections a config may leave out (configs/quickstart.py adds its own).
OPTIONAL_SECTIONS = ("quickstart",)


@dataclasses.dataclass(frozen=True)
class DatasetFacts:
  """What a dataset's loader and transform give: classes, the models' input
  size, and the examples of each split one can train on."""

  num_classes: int
  image_size: int
  train_examples: Dict[str, int]


# The image size is what the transform hands the models (data.transform_for):
# the stored size for CIFAR-style data, a 64x64 crop for tiny_imagenet and stl10.
DATASET_FACTS = {
    "cifar100": DatasetFacts(100, 32, {"train": 50000}),
    "tiny_imagenet": DatasetFacts(200, 64, {"train": 100000}),
    "stl10": DatasetFacts(10, 64, {"train": 5000, "unlabeled": 100000}),
    "digits": DatasetFacts(10, 32, {"train": 1437}),
}

TEACHER_DIR = ("the teacher's model directory (WORKDIR/best_model of a --config.mode=train_teacher "
               "run, or the OUT_DIR of `python -m cktf_jax.models.convert`)")


@dataclasses.dataclass(frozen=True)
class ModeNeeds:
  """What a mode builds and reads, so that only those parts are checked together."""

  models: Tuple[str, ...] = ()           # the sections whose model it builds
  required: Dict[str, str] = dataclasses.field(default_factory=dict)  # field -> what it is
  distills: bool = False                 # runs config.method (and config.method2)
  distill_split: Optional[str] = None    # the split it distils on (None: dataset.train_split)
  trains_on_labels: bool = False         # CE on the train split's labels
  batches: bool = True                   # iterates batches, split over the devices


MODE_NEEDS = {
    "summary": ModeNeeds(models=("teacher", "student"), batches=False),
    "train_teacher": ModeNeeds(models=("teacher",), trains_on_labels=True),
    "distill": ModeNeeds(models=("teacher", "student"),
                         required={"teacher.checkpoint": TEACHER_DIR}, distills=True),
    "transfer": ModeNeeds(models=("teacher", "student"),  # distils, then fine-tunes on train
                          required={"teacher.checkpoint": TEACHER_DIR}, distills=True,
                          distill_split="unlabeled"),
    "fine_tune": ModeNeeds(models=("student",), trains_on_labels=True,
                           required={"fine_tune.checkpoint": "the model directory whose "
                                     "features are fine-tuned"}),
    "evaluate": ModeNeeds(required={"eval.checkpoint": "the model directory to evaluate"}),
    "quickstart": ModeNeeds(models=("teacher", "student"),
                            required={"quickstart": "its section (configs/quickstart.py)"}),
}
# The methods with a memory bank (config.method.nce_k, .mode).
CONTRASTIVE_METHODS = (crd_method.NAME, crdst_method.NAME)


def _dataset_facts(config) -> DatasetFacts:
  d = config.dataset
  if d.name == "synthetic":
    s = d.synthetic
    return DatasetFacts(s.num_classes, s.image_size, {"train": s.num_examples})
  return DATASET_FACTS[d.name]


def _distill_split(config) -> str:
  return _needs(config).distill_split or config.dataset.train_split


def _distill_examples(config) -> Optional[int]:
  """The size of the split the run distils on, where known."""
  d = config.dataset
  facts = _dataset_facts(config)
  examples = facts.train_examples.get(_distill_split(config))
  if examples is not None and d.num_train_categories:
    return examples * d.num_train_categories // facts.num_classes
  return examples


def _num_classes(config) -> List[str]:
  d, facts = config.dataset, _dataset_facts(config)
  if d.num_classes != facts.num_classes:
    source = " (config.dataset.synthetic.num_classes)" if d.name == "synthetic" else ""
    return [f"config.dataset.num_classes={d.num_classes}, but {d.name}{source} has "
            f"{facts.num_classes} classes; set --config.dataset.num_classes={facts.num_classes}"]
  return []


def _image_size(config) -> List[str]:
  d, facts = config.dataset, _dataset_facts(config)
  if d.image_size != facts.image_size:
    return [f"config.dataset.image_size={d.image_size}, but the models see {facts.image_size}x"
            f"{facts.image_size} images of {d.name}; set "
            f"--config.dataset.image_size={facts.image_size}"]
  return []


def _train_split(config) -> List[str]:
  d = config.dataset
  splits = [s for s in data.DATASETS[d.name][1] if s != "test"]
  if d.train_split not in splits:
    return [f"config.dataset.train_split={d.train_split!r}: {d.name} has no such split; "
            f"valid train splits of {d.name} are: {', '.join(splits)}"]
  return []


def _train_categories(config) -> List[str]:
  d = config.dataset
  if d.num_train_categories and d.name != "cifar100":
    return [f"config.dataset.num_train_categories={d.num_train_categories} applies to cifar100 "
            f"only; set it to 0 (every class) for {d.name}"]
  if d.num_train_categories > d.num_classes:
    return [f"config.dataset.num_train_categories must be in [0, {d.num_classes}] (0 = every "
            f"class); got {d.num_train_categories}"]
  return []


# The reference's CIFAR input, which every model takes (tests/test_models.py
# counts each one's parameters at 32x32); other sizes are tried.
EVERY_MODEL_INPUT_SIZE = 32


@functools.lru_cache(maxsize=None)
def _input_size_problem(model_name: str, image_size: int) -> Optional[str]:
  """Why ``model_name`` cannot take square ``image_size`` inputs (traced
  abstractly, nothing compiled), or None."""
  if image_size == EVERY_MODEL_INPUT_SIZE:
    return None
  try:
    models.abstract_variables(model_name, 10, image_size)
  except ValueError as e:
    return str(e)
  return None


def _models_take_image_size(config) -> List[str]:
  size, problems = config.dataset.image_size, []
  for role in _needs(config).models:
    problem = _input_size_problem(config[role].model, size)
    if problem:
      problems.append(f"config.{role}.model={config[role].model!r} cannot take the {size}x{size} "
                      f"images of {config.dataset.name}: {problem}")
  return problems


def _required_fields(config) -> List[str]:
  return [f"config.{path} is not set: mode {config.mode!r} needs {what}"
          for path, what in _needs(config).required.items() if not _lookup(config, path)]


def _unlabeled_split(config) -> List[str]:
  """The unlabeled split has every label 0: only label-free losses make sense."""
  needs = _needs(config)
  if needs.trains_on_labels and config.dataset.train_split == "unlabeled":
    return [f"config.dataset.train_split='unlabeled': mode {config.mode!r} trains on labels; "
            f"use 'train'"]
  if needs.distills and _distill_split(config) == "unlabeled" and config.weights.gamma != 0:
    return [f"config.weights.gamma={config.weights.gamma} (None: the method's default, > 0): "
            f"mode {config.mode!r} distils on the unlabeled split, where every label is 0, so "
            f"the CE term would teach class 0; set --config.weights.gamma=0 (the reference's "
            f"transfer scripts use -r 0)"]
  return []


def _teacher_classes(config) -> List[str]:
  t, d = config.teacher, config.dataset
  if (_needs(config).distills and _distill_split(config) == "train" and t.num_classes is not None
      and t.num_classes < d.num_classes):
    return [f"config.teacher.num_classes={t.num_classes} is fewer than the {d.num_classes} "
            f"classes of the {d.name} labels the student trains on; set it to None (= "
            f"config.dataset.num_classes) or at least {d.num_classes}"]
  return []


def _method_sections(config) -> Iterator[Tuple[str, ml_collections.ConfigDict]]:
  """The method sections the run uses: ``method``, and ``method2`` when named."""
  yield "method", config.method
  if config.method2.name:
    yield "method2", config.method2


def _contrast(config) -> List[str]:
  """CRD / CKTF: relax positives need labels; no more negatives than examples."""
  if not _needs(config).distills:
    return []
  problems = []
  examples, split = _distill_examples(config), _distill_split(config)
  for field, m in _method_sections(config):
    if m.name not in CONTRASTIVE_METHODS:
      continue
    if m.mode == "relax" and config.dataset.name == "stl10":
      problems.append(f"config.{field}.mode='relax' is impossible on stl10 (its unlabeled "
                      f"examples have no class to draw a positive from); use 'exact'")
    if examples is not None and m.nce_k > examples:
      problems.append(f"config.{field}.nce_k={m.nce_k} exceeds the {examples} training "
                      f"examples of {config.dataset.name} ({split}); set "
                      f"it to at most {examples}")
  return problems


def _cktf(config) -> List[str]:
  """CKTF: a weight to fold theta into, and models with a layer-pairing rule."""
  if not _needs(config).distills:
    return []
  problems = []
  for field, m in _method_sections(config):
    if m.name != crdst_method.NAME:
      continue
    if field == "method":
      weight, beta = "config.weights.beta", config.weights.beta
      beta = crdst_method.DEFAULT_WEIGHTS[2] if beta is None else beta
    else:
      weight, beta = "config.weights.kd2weights", config.weights.kd2weights
    if m.st_scale is None and beta == 0:
      problems.append(
          f"{weight}=0 with config.{field}.st_scale=None: CKTF returns crd_final + (theta / "
          f"beta) * sum(intermediate heads), so it needs {weight} > 0, or "
          f"config.{field}.st_scale set (the factor of the intermediate heads)")
    for role in ("teacher", "student"):
      try:
        pairing.pool_kind_for_model(config[role].model)
      except ValueError as e:
        problems.append(f"config.{role}.model={config[role].model!r} cannot be used with "
                        f"config.{field}.name='crdst': {e}")
  return problems


def _vid_variance(config) -> List[str]:
  """VID's initial variance is softplus^-1(init_pred_var - eps): it must exceed eps."""
  return [f"config.{field}.vid_init_pred_var={m.vid_init_pred_var} must exceed "
          f"config.{field}.vid_eps={m.vid_eps}"
          for field, m in _method_sections(config) if m.vid_init_pred_var <= m.vid_eps]


def _nesterov(config) -> List[str]:
  t = config.train
  if t.nesterov and t.momentum == 0:
    return ["config.train.nesterov=True needs config.train.momentum > 0 (as torch.optim.SGD)"]
  return []


def _batch_over_devices(config) -> List[str]:
  batch, devices = config.train.batch_size, jax.device_count()
  if _needs(config).batches and batch % devices:
    below = batch // devices * devices
    examples = " or ".join(str(b) for b in (below, below + devices) if b)
    return [f"config.train.batch_size={batch} is not a multiple of the {devices} devices "
            f"(jax.device_count()), which each take an equal share; set "
            f"--config.train.batch_size to a multiple of {devices}, e.g. {examples}"]
  return []


# Each rule: config -> its problems (messages). They run once every field has
# passed its own check.
COMBINATION_RULES = (_num_classes, _image_size, _train_split, _train_categories,
                     _models_take_image_size, _required_fields, _unlabeled_split,
                     _teacher_classes, _contrast, _cktf, _vid_variance, _nesterov,
                     _batch_over_devices)


def _needs(config) -> ModeNeeds:
  return MODE_NEEDS.get(config.mode, ModeNeeds())


def _lookup(tree, path: str):
  for key in path.split("."):
    if key not in tree:
      return None
    tree = tree[key]
  return tree


def _leaf_paths(tree: Dict[str, Any], prefix: str = "") -> Iterator[str]:
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _leaf_paths(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}"


def _expected(path: str, tree: Dict[str, Any]) -> bool:
  """Whether the config must have the field: all but those of an absent optional section."""
  section = path.split(".")[0]
  return section not in OPTIONAL_SECTIONS or section in tree


def _children(rules: Dict[str, Check], section: str) -> List[str]:
  """The names directly under ``section`` ('' = the top), in the table's order."""
  prefix = f"{section}." if section else ""
  return list(dict.fromkeys(p[len(prefix):].split(".")[0] for p in rules if p.startswith(prefix)))


def _unknown_field(path: str, rules: Dict[str, Check]) -> str:
  parts = path.split(".")
  section = next(s for s in (".".join(parts[:i]) for i in range(len(parts) - 1, -1, -1))
                 if _children(rules, s))
  where = f"config.{section}" if section else "config"
  return (f"config.{path}: unknown field (not in configs/default.py); {where} has: "
          f"{', '.join(_children(rules, section))}")


def _schema_problems(tree: Dict[str, Any], rules: Dict[str, Check]) -> List[str]:
  present = set(_leaf_paths(tree))
  problems = [_unknown_field(path, rules) for path in sorted(present - set(rules))]
  for path in rules:
    if path not in present and _expected(path, tree):
      problems.append(f"config.{path} is missing; start a config from configs/default.py's "
                      f"get_config(), which sets every field")
  return problems


def _field_problems(tree: Dict[str, Any], rules: Dict[str, Check]) -> List[str]:
  problems = []
  for path, check in rules.items():
    if path.startswith("method2.") and path != "method2.name" and not tree["method2"]["name"]:
      continue  # no second method: its hyper-parameters are unused
    if _expected(path, tree):
      problem = check(_lookup(tree, path))
      if problem:
        problems.append(f"config.{path}: {problem}")
  return problems


def _combination_problems(config: ml_collections.ConfigDict) -> List[str]:
  return [problem for rule in COMBINATION_RULES for problem in rule(config)]


def validate(config: ml_collections.ConfigDict, modes: Collection[str]) -> None:
  """Raise ``ConfigError`` listing every problem of the first stage that has
  any (schema, then fields, then combinations); ``modes``: the valid
  ``config.mode`` names (``train.run.MODES``)."""
  tree = config.to_dict()
  rules = {"mode": choice("mode", tuple(modes)), **FIELD_RULES}
  for stage in (lambda: _schema_problems(tree, rules), lambda: _field_problems(tree, rules),
                lambda: _combination_problems(config)):
    problems = stage()
    if problems:
      raise ConfigError("\n".join(problems))
