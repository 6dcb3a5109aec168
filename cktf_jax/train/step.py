"""The train state and the jitted train/eval steps.

One step of the reference's ``helper/loops.py: train_distill``::

    loss = gamma * CE(z_s, y) + alpha * KD(z_s, z_t) + beta * method_loss

with the student (and the method's auxiliary modules) in train mode and the
teacher frozen in eval mode, outside the optimiser. Teacher training
(``train_vanilla``) is the same step with no teacher and no method:
``loss = CE``. Padded examples of a partial batch (``batch['mask']`` False)
are left out of every loss, metric and BatchNorm statistic.
"""

from typing import Any, Callable, Dict, Optional, Tuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from cktf_jax.losses.kd import batch_weights, distill_kl
from cktf_jax.methods.base import Batch, Method

Array = jax.Array
Metrics = Dict[str, Array]


@flax.struct.dataclass
class TrainState:
  """Everything a step changes. The teacher is not in it: it never changes.

  Attributes:
    step: number of optimiser steps taken.
    params: ``{'student': ..., 'aux': ...}``: exactly what the optimiser trains.
    batch_stats: the student's BatchNorm running statistics.
    aux_state: the method's non-parameter collections (e.g. a ConvReg's
      ``batch_stats``, CRD memory banks).
    opt_state: the optimiser's state (momentum buffers).
    rng: base key; step ``s`` uses ``fold_in(rng, s)`` (resumable).
  """

  step: Array
  params: Any
  batch_stats: Any
  aux_state: Any
  opt_state: Any
  rng: Array


@flax.struct.dataclass
class LossWeights:
  """``gamma`` (CE), ``alpha`` (KD), ``beta`` (method) and the KD temperature."""

  gamma: float
  alpha: float
  beta: float
  kd_T: float = 4.0
  kd2: float = 0.0  # the second method's weight (reference --kd2weights)


# With a second method, the aux params and aux state of the two are nested under
# these keys (``params['aux'] = {'method': ..., 'method2': ...}``); with one
# method they are the method's own (``params['aux'] = {'connector': ...}``).
METHOD_KEYS = ("method", "method2")


def aux_part(tree, key: Optional[str]):
  """The part of ``params['aux']`` / ``aux_state`` that belongs to ``key``
  (None: the whole tree, a single method's)."""
  return tree if key is None else tree[key]


def nest_aux_variables(variables1: Any, variables2: Any) -> Any:
  """The aux variables of two methods (each ``Method.init``'s output) as one
  tree: ``{'params': {'method': p1, 'method2': p2}, 'method': rest1,
  'method2': rest2}``, so that ``create_train_state`` nests both params and
  state under ``METHOD_KEYS``."""
  v1, v2 = dict(variables1), dict(variables2)
  k1, k2 = METHOD_KEYS
  return {"params": {k1: v1.pop("params", {}), k2: v2.pop("params", {})}, k1: v1, k2: v2}


def method_keys(method2: Optional[Method]) -> Tuple[Optional[str], Optional[str]]:
  """The aux keys of the first and second method: ``(None, None)`` for one method."""
  return METHOD_KEYS if method2 is not None else (None, None)


def create_train_state(rng: Array, student_variables: Any, aux_variables: Any,
                       tx: optax.GradientTransformation) -> TrainState:
  """A fresh state from initialised student and auxiliary variables."""
  aux_variables = dict(aux_variables)
  params = {"student": student_variables["params"], "aux": aux_variables.pop("params", {})}
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=student_variables.get("batch_stats", {}),
                    aux_state=aux_variables, opt_state=tx.init(params), rng=rng)


def cross_entropy(logits: Array, labels: Array, mask: Optional[Array]) -> Array:
  """``nn.CrossEntropyLoss()`` (mean over the real examples of the batch)."""
  w, n = batch_weights(mask, logits.shape[0], logits.dtype)
  per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return jnp.sum(per_example * w) / n


def topk_correct(logits: Array, labels: Array, mask: Optional[Array]) -> Tuple[Array, Array]:
  """Numbers of real examples whose label is the top-1 / within the top-5 logits."""
  w, _ = batch_weights(mask, logits.shape[0], jnp.float32)
  k = min(5, logits.shape[-1])
  top = jax.lax.top_k(logits, k)[1]
  hits = top == labels[:, None]
  return jnp.sum(hits[:, 0] * w), jnp.sum(jnp.any(hits, axis=-1) * w)


def _apply_student(student, params, batch_stats, images, mask, train: bool):
  """``(features, new_batch_stats)``: the student forward, BN statistics
  updated from the real examples in train mode, unchanged in eval mode."""
  variables = {"params": params, "batch_stats": batch_stats}
  if not train:
    return student.apply(variables, images, train=False), batch_stats
  feats, new_model_state = student.apply(variables, images, train=True, mask=mask,
                                         mutable=["batch_stats"])
  return feats, new_model_state["batch_stats"]


def _teacher_features(teacher, teacher_variables, images):
  return jax.lax.stop_gradient(teacher.apply(teacher_variables, images, train=False))


def _method_term(method: Method, loss_fn, key, params, state, feats_s, feats_t, batch, prefix):
  """One method's ``(loss, metrics, new_aux_state)``, on its part of the aux trees;
  the new aux state is the whole tree with that part replaced."""
  value, terms, new_part = loss_fn(aux_part(params["aux"], key), aux_part(state.aux_state, key),
                                   feats_s, feats_t, batch, True)
  metrics = {f"{prefix}/{k}": v for k, v in terms.items()}
  new_state = new_part if key is None else {**state.aux_state, key: new_part}
  return value, metrics, new_state


def _skip_if_nonfinite(grads, metrics, new_state: TrainState, state: TrainState):
  """``(state, metrics)``: when the loss or a gradient is NaN/inf, ``state``
  with only its step advanced (the rng and the lr schedule move on), the
  metrics zeroed with ``count`` 0 so epoch means leave the step out, and
  ``skipped`` 1."""
  finite = jnp.isfinite(metrics["loss"])
  for g in jax.tree_util.tree_leaves(grads):
    finite &= jnp.all(jnp.isfinite(g))
  kept = jax.tree_util.tree_map(lambda new, old: jnp.where(finite, new, old), new_state, state)
  metrics = {k: jnp.where(finite, v, jnp.zeros_like(v)) for k, v in metrics.items()}
  metrics["skipped"] = 1.0 - finite.astype(jnp.float32)
  return kept.replace(step=new_state.step), metrics


def _step_fn(loss_fn, tx, augment, skip_nonfinite: bool = False):
  """``train_step(state, batch, teacher_variables)`` around
  ``loss_fn(params, state, batch, teacher_variables, images) -> (loss,
  (metrics, logits, batch_stats, aux_state))``: gradient, optimiser update,
  accuracy counts; with ``skip_nonfinite``, a step with a NaN/inf loss or
  gradient changes nothing but the step counter."""

  def train_step(state: TrainState, batch: Batch, teacher_variables=None):
    images = batch["image"]
    if augment is not None:
      images = augment(jax.random.fold_in(state.rng, state.step), images)
    grads, (metrics, logits, batch_stats, aux_state) = jax.grad(loss_fn, has_aux=True)(
        state.params, state, batch, teacher_variables, images)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    top1, top5 = topk_correct(logits, batch["label"], batch.get("mask"))
    metrics.update(top1=top1, top5=top5,
                   count=batch_weights(batch.get("mask"), logits.shape[0])[0].sum())
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                              aux_state=aux_state, opt_state=opt_state)
    if skip_nonfinite:
      return _skip_if_nonfinite(grads, metrics, new_state, state)
    return new_state, metrics

  return train_step


def make_train_step(student: nn.Module, tx: optax.GradientTransformation,
                    weights: LossWeights, teacher: Optional[nn.Module] = None,
                    method: Optional[Method] = None,
                    augment: Optional[Callable[[Array, Array], Array]] = None,
                    method2: Optional[Method] = None, skip_nonfinite: bool = False):
  """``train_step(state, batch, teacher_variables) -> (state, metrics)``.

  Args:
    student: the model being trained.
    tx: the optimiser (``optim.torch_sgd``).
    weights: the loss weights.
    teacher: the frozen teacher, or None for teacher training (CE only).
    method: the distillation Method, or None (only CE and KD).
    augment: ``augment(key, images) -> images`` run inside the step, or None
      when the batch already holds network inputs.
    method2: a second Method (reference ``--distill2``), adding
      ``weights.kd2 * method2_loss``; its aux params/state and the first
      method's are then nested under ``METHOD_KEYS``.
    skip_nonfinite: leave the state as it was (but the step counter) when
      the loss or a gradient is NaN/inf, and report ``skipped`` = 1.

  ``batch``: see ``methods.base.Batch``. Metrics are per-batch means over the
  real examples (``loss``, ``ce``, ``kd``, ``method``, ``method2`` and the
  methods' terms as ``<name>/<term>``) plus ``top1``/``top5`` counts and ``count``.
  """
  key1, key2 = method_keys(method2)

  def loss_fn(params, state: TrainState, batch: Batch, teacher_variables, images):
    mask = batch.get("mask")
    feats_s, batch_stats = _apply_student(student, params["student"], state.batch_stats,
                                          images, mask, train=True)
    ce = cross_entropy(feats_s.logits, batch["label"], mask)
    metrics = {"ce": ce}
    loss = weights.gamma * ce
    aux_state = state.aux_state
    if teacher is not None:
      feats_t = _teacher_features(teacher, teacher_variables, images)
      kd = distill_kl(feats_s.logits, feats_t.logits, weights.kd_T, mask)
      metrics["kd"] = kd
      loss = loss + weights.alpha * kd
      for m, key, name, w in ((method, key1, "method", weights.beta),
                              (method2, key2, "method2", weights.kd2)):
        if m is None:
          continue
        value, terms, aux_state = _method_term(m, m.loss, key, params,
                                               state.replace(aux_state=aux_state), feats_s,
                                               feats_t, batch, m.name)
        metrics[name] = value
        metrics.update(terms)
        loss = loss + w * value
    metrics["loss"] = loss
    return loss, (metrics, feats_s.logits, batch_stats, aux_state)

  return _step_fn(loss_fn, tx, augment, skip_nonfinite)


def make_multi_step(train_step, batch_at, num_steps: int):
  """``multi_step(state, teacher_variables, data, first_step, epoch) -> (state,
  metrics)``: ``num_steps`` calls of ``train_step`` in one ``lax.scan``, the
  batch of step ``first_step + i`` made on device by ``batch_at(data, step,
  epoch)`` (``DeviceLoader.batch_at``); every metric gets a leading
  ``[num_steps]`` axis. The host is out of the loop for ``num_steps`` steps.

  On the CPU backend the scan is fully unrolled: XLA:CPU runs convolutions
  inside a while loop on a slow path (jax-ml/jax#12868; ~9x per step here,
  docs/BENCHMARKS.md "Session 3"), so a rolled loop would cost more than the
  dispatch it saves."""
  unroll = num_steps if jax.default_backend() == "cpu" else 1

  def multi_step(state: TrainState, teacher_variables, data, first_step, epoch):
    def one(state, i):
      return train_step(state, batch_at(data, first_step + i, epoch), teacher_variables)

    return jax.lax.scan(one, state, jnp.arange(num_steps), unroll=unroll)

  return multi_step


def make_pretrain_step(student: nn.Module, tx: optax.GradientTransformation,
                       teacher: nn.Module, method: Method,
                       augment: Optional[Callable[[Array, Array], Array]] = None,
                       method2: Optional[Method] = None):
  """The step of ``method.pretrain`` (reference ``helper/pretrain.py: init``):
  ``loss = pretrain.loss`` on the first method's aux part, the teacher frozen
  in eval mode, the student in train mode when the stage trains it (its
  feature layers: AB, FSP) and in eval mode otherwise (FT), as the reference's
  ``model_s.eval(); init_modules.train()`` leaves them. What is trained is up
  to ``tx`` (``optim.distillation_optimizer`` with the rest frozen).
  Same signature and metric layout as ``make_train_step``'s step.
  """
  stage = method.pretrain
  key1, _ = method_keys(method2)

  def loss_fn(params, state: TrainState, batch: Batch, teacher_variables, images):
    mask = batch.get("mask")
    feats_s, batch_stats = _apply_student(student, params["student"], state.batch_stats,
                                          images, mask, train=stage.train_student)
    feats_t = _teacher_features(teacher, teacher_variables, images)
    loss, metrics, aux_state = _method_term(method, stage.loss, key1, params, state, feats_s,
                                            feats_t, batch, method.name)
    metrics["loss"] = loss
    return loss, (metrics, feats_s.logits, batch_stats, aux_state)

  return _step_fn(loss_fn, tx, augment)


def make_eval_step(model: nn.Module):
  """``eval_step(variables, batch) -> metrics``: summed CE, top-1/top-5 counts, count.

  Sums (not means) so that an epoch's totals count every real example once.
  """

  def eval_step(variables, batch: Batch):
    logits = model.apply(variables, batch["image"], train=False).logits
    mask = batch.get("mask")
    w, _ = batch_weights(mask, logits.shape[0], logits.dtype)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    top1, top5 = topk_correct(logits, batch["label"], mask)
    return {"ce_sum": jnp.sum(ce * w), "top1": top1, "top5": top5, "count": jnp.sum(w)}

  return eval_step
