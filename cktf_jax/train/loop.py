"""Training and evaluation loops: teacher training and distillation.

``train_and_evaluate(config, workdir)`` is the reference's ``train_teacher.py``
(``config.mode='train_teacher'``: CE only, no teacher) and
``train_student.py`` (``'distill'``): SGD with the reference's schedule, a
test-set evaluation after every epoch (every test example counted once), and
in ``workdir``:

* ``checkpoints/``: the full train state (orbax), every
  ``config.train.checkpoint_every_epochs`` epochs and at the end, for resuming;
* ``best_model/`` and ``last_model/``: the trained model's variables in the
  layout a teacher is read from (``models.convert.restore_converted``);
* ``log.jsonl``: one JSON line per epoch (the reference's ``log.txt``);
* ``config.json``: the config of the run, checked when a workdir is reused;
* for AB/FT/FSP (a method with a ``pretrain`` stage and
  ``config.method.init_epochs > 0``): ``pretrain/``, the parts the init stage
  trained (a checkpoint that is also its completion marker) and
  ``pretrain_log.jsonl``, one line per init epoch.

The init stage (``run_pretrain``) runs before the main stage, like the
reference's ``helper/pretrain.py: init``; a resumed run that finds its
checkpoint (or a main-stage checkpoint) does not run it again; one
interrupted inside the stage reruns the stage from its start.

Given an existing workdir, it resumes from the latest checkpoint.
"""

import functools
import json
import math
import os
import sys
import time
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P

from cktf_jax import data, distributed, methods, models, xla_options
from cktf_jax.config import ConfigError
from cktf_jax.data import augment, pipeline
from cktf_jax.models import convert
from cktf_jax.train import checkpoints as checkpoints_lib, initialize, optim, profiling
from cktf_jax.train import step as step_lib

BEST_MODEL = "best_model"
LAST_MODEL = "last_model"
LOG_FILE = "log.jsonl"
CONFIG_FILE = "config.json"
PRETRAIN = "pretrain"
PRETRAIN_LOG_FILE = "pretrain_log.jsonl"
SUMMARY_FILE = "summary.json"
TENSORBOARD = "tensorboard"
# The init stage's epoch e shuffles and augments as data epoch OFFSET + e - 1,
# so its batches differ from the main stage's epoch e (the reference draws new
# ones: it iterates its train loader again).
PRETRAIN_EPOCH_OFFSET = 1_000_000


class NonFiniteLossError(RuntimeError):
  """A loss became NaN or inf; the message names the epoch, step and term."""


def restore_model_dir(field: str, path: str, what: str):
  """``(meta, variables)`` of the model directory named by ``config.<field>``,
  or a ``ConfigError`` saying it is not one and ``what`` would be."""
  if not path or not os.path.exists(os.path.join(path, convert.META_FILE)):
    raise ConfigError(f"config.{field}={path!r} is not a model directory (no "
                      f"{convert.META_FILE}); {what}")
  return convert.restore_converted(path)


def distill_classes(config: ml_collections.ConfigDict) -> int:
  """The teacher's and the distilled student's class count:
  ``config.teacher.num_classes``, else the dataset's."""
  t = config.teacher.num_classes
  return int(t) if t is not None else int(config.dataset.num_classes)


def load_teacher(config: ml_collections.ConfigDict):
  """``(module, variables, meta)`` of ``config.teacher``, checked against the config."""
  path = config.teacher.checkpoint
  name, num_classes = config.teacher.model, distill_classes(config)
  how = (f"train one with this same config and `--config.mode=train_teacher --workdir WORKDIR` "
         f"(it trains {name} on {config.dataset.name}; then set "
         f"--config.teacher.checkpoint=WORKDIR/{BEST_MODEL}), or "
         f"convert a PyTorch checkpoint with `python -m cktf_jax.models.convert --model {name} "
         f"--num_classes {num_classes} IN.pth OUT_DIR`")
  if not path:
    raise ConfigError(f"config.teacher.checkpoint is empty: distillation needs a teacher; {how}")
  meta, variables = restore_model_dir("teacher.checkpoint", path, how)
  if meta["model"] != name or int(meta["num_classes"]) != num_classes:
    raise ConfigError(
        f"config.teacher.checkpoint={path!r} holds a {meta['model']} with "
        f"{meta['num_classes']} classes, but the config asks for teacher {name} with "
        f"{num_classes} classes: set --config.teacher.model={meta['model']} (and "
        f"--config.teacher.num_classes={meta['num_classes']} if it was trained on another "
        f"data set) or point config.teacher.checkpoint at a {name} trained on "
        f"{config.dataset.name}")
  return models.create_model(name, num_classes), variables, meta


def _learning_rate(config: ml_collections.ConfigDict, model_name: str) -> float:
  """``config.train.learning_rate``, or the reference's default for the model:
  0.01 for MobileNetV2/ShuffleV1/ShuffleV2 students, else 0.05."""
  if config.train.learning_rate is not None:
    return float(config.train.learning_rate)
  return 0.01 if model_name in ("MobileNetV2", "ShuffleV1", "ShuffleV2") else 0.05


def _datasets(config: ml_collections.ConfigDict):
  """The train and test splits of ``config.dataset``, validated."""
  d = config.dataset
  options = {"source": d.source, "data_dir": d.data_dir}
  if d.name == "synthetic":
    options = dict(d.synthetic)
  train_options = dict(options)
  if d.num_train_categories:
    train_options["num_train_categories"] = d.num_train_categories
  train = data.load_dataset(d.name, d.train_split, **train_options)
  if d.train_split == "unlabeled":
    train = train.relabel_unlabeled(0)  # dataset/stl10.py: every label 0
  splits = (train, data.load_dataset(d.name, "test", **options))
  for split in splits:
    if split.num_classes != d.num_classes:
      raise ConfigError(f"config.dataset.num_classes={d.num_classes}, but {d.name} has "
                        f"{split.num_classes} classes")
  return splits


def _loader(config: ml_collections.ConfigDict, dataset, mesh, train: bool):
  return pipeline.DeviceLoader(dataset, augment.transform_for(config.dataset.name, train=train),
                               mesh, config.train.batch_size, shuffle=train, seed=config.seed)


def _zeros_like(tree):
  return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), tree)


def method_context(config, train_set, mesh):
  """What every method factory gets besides ``config.method`` (see ``create_method``)."""
  return dict(labels=train_set.labels, n_data=len(train_set), dataset=config.dataset.name,
              mesh=mesh, model_s=config.student.model, model_t=config.teacher.model)


def create_method(config: ml_collections.ConfigDict, train_set, mesh):
  """The config's Method and its loss weights (``kd2``: ``weights.kd2weights``
  when ``config.method2.name`` is set, else 0).

  Besides ``config.method``'s fields, every method factory gets the run's
  context (methods ignore what they do not use): the training labels and
  size (CRD's memory rows and class-aware sampling), the dataset name, the
  mesh, the model names (CKTF's pooling rule) and the effective ``beta``.
  """
  hparams = config.method.to_dict()
  hparams.update(method_context(config, train_set, mesh))
  defaults = methods.create_method(config.method.name, hparams).default_weights
  w = config.weights
  pick = lambda value, default: float(default if value is None else value)
  weights = step_lib.LossWeights(pick(w.gamma, defaults[0]), pick(w.alpha, defaults[1]),
                                 pick(w.beta, defaults[2]), float(config.method.kd_T),
                                 float(w.kd2weights) if config.method2.name else 0.0)
  return methods.create_method(config.method.name, dict(hparams, beta=weights.beta)), weights


def create_method2(config: ml_collections.ConfigDict, train_set, mesh):
  """``config.method2``'s Method (the reference's ``--distill2``), or None when
  its name is ''. It gets the same run context as the first method, and
  ``beta = weights.kd2weights`` (the weight the step gives its loss)."""
  if not config.method2.name:
    return None
  hparams = dict(config.method2.to_dict(), beta=float(config.weights.kd2weights),
                 **method_context(config, train_set, mesh))
  return methods.create_method(config.method2.name, hparams)


def _frozen_aux(method, method2):
  """The main stage's frozen aux entries (paths when two methods are nested)."""
  if method2 is None:
    return method.frozen_aux if method is not None else ()
  k1, k2 = step_lib.METHOD_KEYS
  return (tuple(f"{k1}/{n}" for n in method.frozen_aux)
          + tuple(f"{k2}/{n}" for n in method2.frozen_aux))


def _state_rngs(config: ml_collections.ConfigDict):
  """``(student_init, aux_init, state)`` keys of the run."""
  return jax.random.split(jax.random.PRNGKey(config.seed), 3)


def init_student(config: ml_collections.ConfigDict, student, image_shape):
  """The student's variables as ``create_state`` initialises them by default."""
  x = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
  return jax.jit(lambda r: student.init(r, x))(_state_rngs(config)[0])


def create_state(config: ml_collections.ConfigDict, model_name: str, student, teacher,
                 teacher_variables, method, image_shape, steps_per_epoch: int, method2=None,
                 student_variables=None, frozen_student=()):
  """``(state, tx)``: the student initialised as the reference does (or
  ``student_variables`` when given), the methods' aux parts created from the
  real feature shapes (nested under ``step.METHOD_KEYS`` when there are two),
  and the reference's SGD, which leaves the student's top-level entries in
  ``frozen_student`` alone."""
  _, aux_rng, state_rng = _state_rngs(config)
  x = jnp.zeros((config.train.batch_size,) + tuple(image_shape), jnp.float32)
  if student_variables is None:
    student_variables = init_student(config, student, image_shape)
  aux_variables = {}
  if method is not None:
    feats_s = jax.eval_shape(lambda v: student.apply(v, x), student_variables)
    feats_t = jax.eval_shape(lambda v: teacher.apply(v, x), teacher_variables)
    # Eager: a method may place its state itself (CRD's row-sharded banks).
    aux_variables = method.init(aux_rng, _zeros_like(feats_s), _zeros_like(feats_t))
    if method2 is not None:
      aux_variables = step_lib.nest_aux_variables(
          aux_variables, method2.init(jax.random.fold_in(aux_rng, 2), _zeros_like(feats_s),
                                      _zeros_like(feats_t)))
  t = config.train
  schedule = optim.step_learning_rate_fn(_learning_rate(config, model_name),
                                         t.lr_decay_epochs, t.lr_decay_rate, steps_per_epoch)
  params = {"student": student_variables["params"], "aux": aux_variables.get("params", {})}
  tx = optim.distillation_optimizer(schedule, params, _frozen_aux(method, method2),
                                    t.momentum, t.weight_decay, t.nesterov,
                                    frozen_student=frozen_student)
  state = step_lib.create_train_state(state_rng, student_variables, aux_variables, tx)
  return state, tx


def place_state(state, mesh):
  """Everything replicated except what a method placed itself (row-sharded banks)."""
  replicated = NamedSharding(mesh, P())
  return jax.tree_util.tree_map(
      lambda x: x if isinstance(x, jax.Array) and not x.sharding.is_fully_replicated
      else distributed.global_array(x, replicated), state)


def pretrain_optimizer(config: ml_collections.ConfigDict, method, method2, params,
                       learning_rate: float):
  """The init stage's SGD (the run's momentum and weight decay, constant lr)
  over the first method's aux entries in ``pretrain.trainable`` and, with
  ``pretrain.train_student``, the student's params but its classifier
  (``optim.classifier_names``); everything else frozen (no update, no decay)."""
  stage = method.pretrain
  key1, key2 = step_lib.method_keys(method2)
  prefix = "" if key1 is None else key1 + "/"
  frozen = [prefix + name for name in step_lib.aux_part(params["aux"], key1)
            if name not in stage.trainable]
  if key2 is not None:
    frozen.append(key2)
  student = params["student"]
  frozen_student = optim.classifier_names(student) if stage.train_student else tuple(student)
  t = config.train
  return optim.distillation_optimizer(learning_rate, params, frozen, t.momentum,
                                      t.weight_decay, t.nesterov, frozen_student=frozen_student)


def run_pretrain(config: ml_collections.ConfigDict, workdir: str, student, teacher,
                 teacher_variables, method, method2, state, mesh, train_loader):
  """``method.pretrain`` for ``pretrain.epochs`` epochs from ``state``; returns
  ``state`` with the trained params, the student's BN statistics and the aux
  state carried over (step, optimiser state and rng untouched). Restores the
  stage's result instead when ``workdir/pretrain`` holds it."""
  stage = method.pretrain
  carried = lambda s: {"params": s.params, "batch_stats": s.batch_stats,
                       "aux_state": s.aux_state}
  manager = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, PRETRAIN)),
                                  options=ocp.CheckpointManagerOptions(max_to_keep=1,
                                                                       create=True))
  if manager.latest_step() is not None:
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, carried(state))
    done = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore(abstract))
    print(f"init stage of {method.name}: restored from {os.path.join(workdir, PRETRAIN)}")
    return state.replace(**done)
  # An interrupted stage reruns from its start: its earlier records go.
  checkpoints_lib.truncate_log(os.path.join(workdir, PRETRAIN_LOG_FILE), 1)
  lr = stage.learning_rate_for(config.student.model) if stage.learning_rate_for else None
  lr = float(lr if lr is not None else _learning_rate(config, config.student.model))
  tx = pretrain_optimizer(config, method, method2, state.params, lr)
  pre_state = place_state(state.replace(step=jnp.zeros((), jnp.int32),
                                   opt_state=tx.init(state.params)), mesh)
  shardings = jax.tree_util.tree_map(lambda x: x.sharding, pre_state)
  pretrain_step = xla_options.jit(
      step_lib.make_pretrain_step(student, tx, teacher, method, method2=method2),
      out_shardings=(shardings, NamedSharding(mesh, P())))
  steps = train_loader.steps_per_epoch
  for epoch in range(1, stage.epochs + 1):
    start, step_metrics = time.time(), []
    for batch in train_loader.epoch(PRETRAIN_EPOCH_OFFSET + epoch - 1):
      pre_state, metrics = pretrain_step(pre_state, batch, teacher_variables)
      step_metrics.append(metrics)
    _check_finite(step_metrics, epoch, (epoch - 1) * steps)
    means = _epoch_means(step_metrics)
    record = {"stage": "init", "epoch": epoch, "lr": lr, "time_s": round(time.time() - start, 3),
              **{f"init_{k}": v for k, v in means.items()}}
    if distributed.is_writer():
      with open(os.path.join(workdir, PRETRAIN_LOG_FILE), "a") as f:
        f.write(json.dumps(record) + "\n")
    print(f"init epoch {epoch}/{stage.epochs} ({method.name}) lr {lr:g} loss "
          f"{means['loss']:.4f} ({record['time_s']:.1f}s)")
  manager.save(stage.epochs, args=ocp.args.StandardSave(carried(pre_state)))
  manager.wait_until_finished()
  return state.replace(**carried(pre_state))


def check_workdir_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Write ``config.json`` into a new workdir (process 0), or refuse a workdir
  of another config; every process checks, after process 0 has written."""
  path = os.path.join(workdir, CONFIG_FILE)
  current = json.loads(config.to_json_best_effort(sort_keys=True))
  if distributed.is_writer() and not os.path.exists(path):
    os.makedirs(workdir, exist_ok=True)
    with open(path, "w") as f:
      json.dump(current, f, indent=1, sort_keys=True)
  distributed.barrier("workdir config written")
  with open(path) as f:
    previous = json.load(f)
  if previous != current:
    diff = sorted(_diff_keys(previous, current))
    raise ConfigError(f"workdir {workdir!r} holds a run of a different config (fields "
                      f"{', '.join(diff)} differ); use a new --workdir, or the same config "
                      f"to resume")


def _diff_keys(a, b, prefix=""):
  if isinstance(a, dict) and isinstance(b, dict):
    for k in set(a) | set(b):
      yield from _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
  elif a != b:
    yield prefix.rstrip(".")


def _progress(epoch: int, epochs: int, done: int, total: int, start: float, images: int) -> None:
  elapsed = max(time.time() - start, 1e-9)
  eta = elapsed / max(done, 1) * (total - done)
  bar = "#" * int(20 * done / total)
  sys.stdout.write(f"\repoch {epoch}/{epochs} [{bar:<20}] {done}/{total} steps "
                   f"{images / elapsed:7.1f} img/s  ETA {eta:5.1f}s")
  sys.stdout.flush()


def _host_calls(train_step, multi_step, loader, epoch: int, steps_per_call: int):
  """``(first step, number of steps, call)`` for each host call of ``epoch``,
  ``call(state, teacher_variables) -> (state, metrics)``: ``steps_per_call``
  steps per ``multi_step`` call, then the rest of the epoch one step per
  ``train_step`` call (every step when ``multi_step`` is None)."""
  singles_from = 0
  if multi_step is not None:
    data = loader.step_data(epoch)
    singles_from = loader.steps_per_epoch - loader.steps_per_epoch % steps_per_call
    for first in range(0, singles_from, steps_per_call):
      yield first, steps_per_call, functools.partial(_call_multi, multi_step, data, first, epoch)
  for i, batch in enumerate(loader.epoch(epoch, start_step=singles_from)):
    yield singles_from + i, 1, functools.partial(_call_single, train_step, batch)


def _call_multi(multi_step, data, first, epoch, state, teacher_variables):
  return multi_step(state, teacher_variables, data, first, epoch)


def _call_single(train_step, batch, state, teacher_variables):
  return train_step(state, batch, teacher_variables)


def _per_step(call_metrics):
  """One metrics dict per step (host values), from each call's metrics (a
  multi-step call's have a leading step axis): one transfer per epoch."""
  steps = []
  for m in jax.device_get(call_metrics):
    first = next(iter(m.values()))
    if np.ndim(first) == 0:
      steps.append(m)
    else:
      steps.extend({k: v[i] for k, v in m.items()} for i in range(len(first)))
  return steps


def _epoch_means(metric_list) -> Dict[str, float]:
  """Example-weighted means of the per-step metrics (one host transfer per epoch)."""
  host = jax.device_get(metric_list)
  count = max(sum(float(m["count"]) for m in host), 1.0)  # 0 when every step was skipped
  means = {}
  for key in host[0]:
    if key in ("top1", "top5", "count", "skipped"):
      continue
    means[key] = sum(float(m[key]) * float(m["count"]) for m in host) / count
  means["top1"] = 100.0 * sum(float(m["top1"]) for m in host) / count
  means["top5"] = 100.0 * sum(float(m["top5"]) for m in host) / count
  if "skipped" in host[0]:
    means["skipped"] = int(sum(float(m["skipped"]) for m in host))
  return means


def _check_finite(metric_list, epoch: int, steps_before: int) -> None:
  for i, m in enumerate(jax.device_get(metric_list)):
    for key, value in m.items():
      if not math.isfinite(float(value)):
        raise NonFiniteLossError(
            f"loss term {key!r} is {float(value)} at epoch {epoch}, step {steps_before + i + 1} "
            f"(global step); the run stopped and the last good checkpoint was kept")


def evaluate(eval_step, variables, loader) -> Dict[str, float]:
  """Top-1/top-5 accuracy (%) and mean CE over every test example, once each."""
  sums = None
  for batch in loader.epoch(0):
    out = eval_step(variables, batch)
    sums = out if sums is None else jax.tree_util.tree_map(jnp.add, sums, out)
  sums = jax.device_get(sums)
  count = float(sums["count"])
  return {"test_loss": float(sums["ce_sum"]) / count, "test_top1": 100.0 * float(sums["top1"]) / count,
          "test_top5": 100.0 * float(sums["top5"]) / count}


def _tensorboard_writer(workdir: str, start_epoch: int):
  """Event files in ``workdir/tensorboard``; events of epochs >= ``start_epoch``
  from an interrupted earlier attempt are dropped (the epochs rerun)."""
  # Imported here: benchmarks and the GPU check use the loop without it.
  import tensorboardX
  return tensorboardX.SummaryWriter(os.path.join(workdir, TENSORBOARD), purge_step=start_epoch)


def _trained_model(config: ml_collections.ConfigDict):
  """``(model name, class count)`` of the model a training mode trains."""
  if config.mode == "train_teacher":
    return config.teacher.model, int(config.dataset.num_classes)
  if config.mode == "distill":
    return config.student.model, distill_classes(config)
  return config.student.model, int(config.dataset.num_classes)  # fine_tune


def initial_student(config: ml_collections.ConfigDict, student, image_shape, teacher_variables):
  """``(student_variables, frozen_student)`` for ``create_state``: ``(None, ())``
  (the default init, everything trained) unless the config starts the student
  from other weights: ``mode='fine_tune'`` (train_teacher.py --fine_tune: the
  features of ``config.fine_tune.checkpoint``, frozen; a new classifier) or
  ``student.init_from_teacher`` (--init_flag: the teacher's same-named convs)."""
  if config.mode == "fine_tune":
    path = config.fine_tune.checkpoint
    meta, trained = restore_model_dir("fine_tune.checkpoint", path,
                                      f"use the WORKDIR/{BEST_MODEL} of a distill or "
                                      f"train_teacher run")
    if meta["model"] != config.student.model:
      raise ConfigError(f"config.fine_tune.checkpoint={path!r} holds a {meta['model']}, but "
                        f"config.student.model is {config.student.model}")
    variables = initialize.fine_tune_start(init_student(config, student, image_shape), trained,
                                           path)
    head = optim.classifier_names(variables["params"])
    print(f"fine-tuning {', '.join(head)} of {meta['model']} on the frozen features of {path}")
    return variables, tuple(n for n in variables["params"] if n not in head)
  if config.mode == "distill" and config.student.init_from_teacher:
    variables = init_student(config, student, image_shape)
    params, copied = initialize.copy_teacher_convs(variables["params"],
                                                   teacher_variables["params"])
    print(f"student initialised from the teacher: {len(copied)} conv parameters copied")
    return {**variables, "params": params}, ()
  return None, ()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: Optional[str]) -> Dict[str, Any]:
  """Run ``config.mode`` 'train_teacher', 'distill' or 'fine_tune' to the end;
  returns the final summary (best/last test accuracy and where the models are)."""
  if not workdir:
    raise ConfigError("--workdir is required to train (checkpoints and logs go there)")
  distill = config.mode == "distill"
  d = config.dataset
  model_name, num_classes = _trained_model(config)
  model = models.create_model(model_name, num_classes)
  mesh = pipeline.data_mesh()
  if config.train.batch_size % mesh.size:
    raise ConfigError(f"config.train.batch_size={config.train.batch_size} must be a multiple of "
                      f"the {mesh.size} devices")
  teacher = teacher_variables = method = method2 = None
  weights = step_lib.LossWeights(1.0, 0.0, 0.0, float(config.method.kd_T))
  if distill:
    teacher, teacher_variables, _ = load_teacher(config)
  train_set, test_set = _datasets(config)
  if distill:
    method, weights = create_method(config, train_set, mesh)
    method2 = create_method2(config, train_set, mesh)
  check_workdir_config(workdir, config)
  if num_classes != d.num_classes:
    print(f"note: the {model_name} has {num_classes} outputs and {d.name} {d.num_classes} "
          f"classes; its test accuracy is over all {num_classes} outputs (as the reference "
          f"reports step 1 of the STL-10 transfer)")

  train_loader = _loader(config, train_set, mesh, train=True)
  test_loader = _loader(config, test_set, mesh, train=False)
  image_shape = next(test_loader.epoch(0))["image"].shape[1:]
  student_variables, frozen_student = initial_student(config, model, image_shape,
                                                      teacher_variables)
  state, tx = create_state(config, model_name, model, teacher, teacher_variables, method,
                           image_shape, train_loader.steps_per_epoch, method2,
                           student_variables=student_variables, frozen_student=frozen_student)
  replicated = NamedSharding(mesh, P())
  state = place_state(state, mesh)
  state_shardings = jax.tree_util.tree_map(lambda x: x.sharding, state)
  if teacher_variables is not None:
    teacher_variables = distributed.global_tree(teacher_variables, replicated)

  step_fn = step_lib.make_train_step(model, tx, weights, teacher, method, method2=method2,
                                     skip_nonfinite=config.train.skip_nonfinite)
  train_step = xla_options.jit(step_fn, donate_argnums=(0,),
                               out_shardings=(state_shardings, replicated))
  k = config.train.steps_per_call
  multi_step = None if k == 1 else xla_options.jit(
      step_lib.make_multi_step(step_fn, train_loader.batch_at, k), donate_argnums=(0,),
      out_shardings=(state_shardings, replicated))
  eval_step = xla_options.jit(step_lib.make_eval_step(model))
  if teacher is not None:
    teacher_eval = evaluate(xla_options.jit(step_lib.make_eval_step(teacher)), teacher_variables,
                            test_loader)
    print(f"teacher {config.teacher.model}: test top-1 {teacher_eval['test_top1']:.2f}%")

  checkpoints = checkpoints_lib.StateCheckpoints(workdir)
  steps_per_epoch = train_loader.steps_per_epoch
  start_epoch, best = 1, {"test_top1": -1.0}
  restored = checkpoints.restore_latest(state)
  if restored is not None:
    state, best = restored
    start_epoch = int(state.step) // steps_per_epoch + 1
    print(f"resuming {workdir} from epoch {start_epoch} (step {int(state.step)})")
  elif method is not None and method.pretrain is not None and method.pretrain.epochs > 0:
    state = run_pretrain(config, workdir, model, teacher, teacher_variables, method, method2,
                         state, mesh, train_loader)
  checkpoints_lib.truncate_log(os.path.join(workdir, LOG_FILE), start_epoch)

  epochs = config.train.epochs
  test = None
  show_progress = config.progress and sys.stdout.isatty()
  progress_every = max(1, steps_per_epoch // 20)
  log_path = os.path.join(workdir, LOG_FILE)
  # Process 0 alone traces and writes events (one trace and one event file per job).
  trace = profiling.StepTrace(config.profile.start_step if distributed.is_writer() else 0,
                              config.profile.num_steps, workdir, k)
  writer = (_tensorboard_writer(workdir, start_epoch)
            if config.train.tensorboard and distributed.is_writer() else None)
  for epoch in range(start_epoch, epochs + 1):
    start, step_metrics = time.time(), []
    for first, count, call in _host_calls(train_step, multi_step, train_loader, epoch - 1, k):
      global_step = (epoch - 1) * steps_per_epoch + first + 1
      trace.before_step(global_step)
      state, metrics = call(state, teacher_variables)
      trace.after_step(global_step + count - 1, metrics)
      step_metrics.append(metrics)
      crossed = (first + count) // progress_every > first // progress_every
      if show_progress and crossed and len(step_metrics) >= 2:
        # Wait for the call before this one only: one call stays in flight.
        jax.block_until_ready(step_metrics[-2])
        _progress(epoch, epochs, first, steps_per_epoch, start, first * config.train.batch_size)
    step_metrics = _per_step(step_metrics)
    _check_finite(step_metrics, epoch, (epoch - 1) * steps_per_epoch)
    train_means = _epoch_means(step_metrics)
    variables = {"params": state.params["student"], "batch_stats": state.batch_stats}
    test = evaluate(eval_step, variables, test_loader)
    lr = float(optim.epoch_learning_rate(epoch, _learning_rate(config, model_name),
                                         config.train.lr_decay_epochs, config.train.lr_decay_rate))
    record = {"epoch": epoch, "lr": lr, "time_s": round(time.time() - start, 3),
              **{f"train_{k}": v for k, v in train_means.items()}, **test}
    if distributed.is_writer():
      with open(log_path, "a") as f:
        f.write(json.dumps(record) + "\n")
    if writer is not None:
      for key, value in record.items():
        if key != "epoch":
          writer.add_scalar(key.replace("_", "/", 1), value, epoch)
      writer.flush()
    if show_progress:
      sys.stdout.write("\r" + " " * 79 + "\r")
    skipped = (f", {train_means['skipped']} non-finite steps skipped"
               if train_means.get("skipped") else "")
    print(f"epoch {epoch}/{epochs} lr {lr:g} train loss {train_means['loss']:.4f} "
          f"top-1 {train_means['top1']:.2f}% | test loss {test['test_loss']:.4f} "
          f"top-1 {test['test_top1']:.2f}% top-5 {test['test_top5']:.2f}% "
          f"({record['time_s']:.1f}s{skipped})")
    meta = {"epoch": epoch, "test_top1": test["test_top1"], "test_top5": test["test_top5"],
            "trained_by": config.mode}
    if test["test_top1"] > best["test_top1"]:
      best = {"epoch": epoch, "test_top1": test["test_top1"], "test_top5": test["test_top5"]}
      convert.save_model_dir(os.path.join(workdir, BEST_MODEL), model_name, num_classes,
                             jax.device_get(variables), meta, overwrite=True)
    if epoch % config.train.checkpoint_every_epochs == 0 or epoch == epochs:
      checkpoints.save(state, best)
  trace.stop(state)
  if writer is not None:
    writer.close()
  checkpoints.wait()
  variables = {"params": state.params["student"], "batch_stats": state.batch_stats}
  final = test if test is not None else evaluate(eval_step, variables, test_loader)
  convert.save_model_dir(os.path.join(workdir, LAST_MODEL), model_name, num_classes,
                         jax.device_get(variables),
                         {"epoch": epochs, **final, "trained_by": config.mode}, overwrite=True)
  summary = {"model": model_name, "best_top1": best["test_top1"], "best_epoch": best.get("epoch"),
             "last_top1": final["test_top1"], "best_model": os.path.join(workdir, BEST_MODEL),
             "last_model": os.path.join(workdir, LAST_MODEL)}
  if distributed.is_writer():
    with open(os.path.join(workdir, SUMMARY_FILE), "w") as f:
      json.dump(summary, f, indent=1)
  return summary


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: Optional[str]) -> Dict[str, Any]:
  """``config.mode='evaluate'``: top-1/top-5 of the model directory
  ``config.eval.checkpoint`` on the test split of ``config.dataset``; printed,
  and written to ``workdir/eval.json`` when a workdir is given."""
  path = config.eval.checkpoint
  meta, variables = restore_model_dir("eval.checkpoint", path,
                                      f"use a WORKDIR/{BEST_MODEL} or WORKDIR/{LAST_MODEL} of a "
                                      f"run, or the OUT_DIR of cktf_jax.models.convert")
  if int(meta["num_classes"]) != config.dataset.num_classes:
    raise ConfigError(f"{path} holds a {meta['model']} with {meta['num_classes']} classes; "
                      f"config.dataset.num_classes is {config.dataset.num_classes}")
  mesh = pipeline.data_mesh()
  test_loader = _loader(config, _datasets(config)[1], mesh, train=False)
  model = models.create_model(meta["model"], int(meta["num_classes"]))
  variables = distributed.global_tree(variables, NamedSharding(mesh, P()))
  result = {"checkpoint": os.path.abspath(path), "model": meta["model"],
            "dataset": config.dataset.name, "num_examples": test_loader.num_examples,
            **evaluate(xla_options.jit(step_lib.make_eval_step(model)), variables, test_loader)}
  print(f"{meta['model']} on {config.dataset.name} test ({result['num_examples']} images): "
        f"top-1 {result['test_top1']:.2f}%  top-5 {result['test_top5']:.2f}%")
  if workdir and distributed.is_writer():
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "eval.json"), "w") as f:
      json.dump(result, f, indent=1)
  return result
