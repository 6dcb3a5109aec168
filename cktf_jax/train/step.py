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


def make_train_step(student: nn.Module, tx: optax.GradientTransformation,
                    weights: LossWeights, teacher: Optional[nn.Module] = None,
                    method: Optional[Method] = None,
                    augment: Optional[Callable[[Array, Array], Array]] = None):
  """``train_step(state, batch, teacher_variables) -> (state, metrics)``.

  Args:
    student: the model being trained.
    tx: the optimiser (``optim.torch_sgd``).
    weights: the loss weights.
    teacher: the frozen teacher, or None for teacher training (CE only).
    method: the distillation Method, or None (only CE and KD).
    augment: ``augment(key, images) -> images`` run inside the step, or None
      when the batch already holds network inputs.

  ``batch``: see ``methods.base.Batch``. Metrics are per-batch means over the
  real examples (``loss``, ``ce``, ``kd``, ``method`` and the method's terms)
  plus ``top1``/``top5`` counts and ``count``.
  """

  def loss_fn(params, state: TrainState, batch: Batch, teacher_variables, images):
    mask = batch.get("mask")
    feats_s, new_model_state = student.apply(
        {"params": params["student"], "batch_stats": state.batch_stats}, images,
        train=True, mask=mask, mutable=["batch_stats"])
    ce = cross_entropy(feats_s.logits, batch["label"], mask)
    metrics = {"ce": ce}
    loss = weights.gamma * ce
    new_aux_state = state.aux_state
    if teacher is not None:
      feats_t = jax.lax.stop_gradient(teacher.apply(teacher_variables, images, train=False))
      kd = distill_kl(feats_s.logits, feats_t.logits, weights.kd_T, mask)
      metrics["kd"] = kd
      loss = loss + weights.alpha * kd
      if method is not None:
        method_loss, method_metrics, new_aux_state = method.loss(
            params["aux"], state.aux_state, feats_s, feats_t, batch, True)
        metrics["method"] = method_loss
        metrics.update({f"{method.name}/{k}": v for k, v in method_metrics.items()})
        loss = loss + weights.beta * method_loss
    metrics["loss"] = loss
    return loss, (metrics, feats_s.logits, new_model_state["batch_stats"], new_aux_state)

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
    return new_state, metrics

  return train_step


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
