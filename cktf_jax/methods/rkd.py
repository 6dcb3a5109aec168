"""``--distill rkd``: relational KD on the pooled features.

Reference ``helper/loops.py``: ``criterion_kd(feat_s[-1], feat_t[-1])`` with
``RKDLoss(w_d=25, w_a=50)`` (train_student.py uses the defaults).
"""

from typing import Any, Mapping

from cktf_jax.losses.rkd import rkd_terms
from cktf_jax.methods.attention import batch_mask
from cktf_jax.methods.base import Method, MethodShapeError, register_method
from cktf_jax.models.features import Features


def check_pooled_pair(method: str, feats_s: Features, feats_t: Features) -> None:
  """Pooled vectors ``[N, D_s]``/``[N, D_t]`` with one ``N``."""
  a, b = tuple(feats_s.pooled.shape), tuple(feats_t.pooled.shape)
  if len(a) != 2 or len(b) != 2 or a[0] != b[0]:
    raise MethodShapeError(
        f"{method}: compares examples within the batch through the pooled features, which "
        f"must be [N, D] with the same N; got student {a} and teacher {b} (D may differ)")


@register_method("rkd")
def make_rkd(hparams: Mapping[str, Any]) -> Method:
  w_d = float(hparams.get("rkd_w_d", 25.0))
  w_a = float(hparams.get("rkd_w_a", 50.0))

  def init(rng, feats_s: Features, feats_t: Features):
    del rng
    check_pooled_pair("rkd", feats_s, feats_t)
    return {}

  def loss(aux_params, aux_state, feats_s, feats_t, batch, train):
    del aux_params, train
    loss_d, loss_a = rkd_terms(feats_s.pooled, feats_t.pooled, batch_mask(batch))
    value = w_d * loss_d + w_a * loss_a
    return value, {"rkd_distance": loss_d, "rkd_angle": loss_a}, aux_state

  # scripts/run_tiny-imagenet_distill.sh, run_2kds.sh: -r 1.0 -a 0 -b 1
  return Method(name="rkd", init=init, loss=loss, default_weights=(1.0, 0.0, 1.0))
