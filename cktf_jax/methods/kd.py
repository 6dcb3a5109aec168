"""``--distill kd``: Hinton KD on its own.

The train step computes ``alpha * distill_kl(logits_s, logits_t, kd_T)`` for
every method (reference ``helper/loops.py: train_distill``, ``loss_div``), so
this method adds nothing: its loss is 0 (the reference's ``loss_kd = 0``) and
only its default weights differ.
"""

from typing import Any, Mapping

import jax.numpy as jnp

from cktf_jax.losses.kd import distill_kl  # noqa: F401  (re-exported for the train step)
from cktf_jax.methods.base import Method, MethodShapeError, register_method
from cktf_jax.models.features import Features

# Reference train_student.py: --kd_T default 4 (used by loss_div for every method).
DEFAULT_KD_T = 4.0


def kd_temperature(hparams: Mapping[str, Any]) -> float:
  """The KD temperature from a method config (``kd_T``, default 4); must be > 0."""
  t = float(hparams.get("kd_T", DEFAULT_KD_T))
  if not t > 0:
    raise ValueError(f"kd_T must be > 0; got {t}")
  return t


@register_method("kd")
def make_kd(hparams: Mapping[str, Any]) -> Method:
  kd_temperature(hparams)  # validate early

  def init(rng, feats_s: Features, feats_t: Features):
    del rng
    if feats_s.logits.shape != feats_t.logits.shape:
      raise MethodShapeError(
          f"kd: student logits {feats_s.logits.shape} and teacher logits "
          f"{feats_t.logits.shape} must have the same shape [N, num_classes]; use a teacher "
          "trained on the same classes")
    return {}

  def loss(aux_params, aux_state, feats_s, feats_t, batch, train):
    del aux_params, feats_s, feats_t, batch, train
    return jnp.zeros((), jnp.float32), {}, aux_state

  # scripts/run_tiny-imagenet_distill.sh: --distill kd -r 0.1 -a 0.9 -b 0.0
  return Method(name="kd", init=init, loss=loss, default_weights=(0.1, 0.9, 0.0))
