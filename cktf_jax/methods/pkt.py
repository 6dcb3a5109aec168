"""``--distill pkt``: probabilistic knowledge transfer on the pooled features.

Reference ``helper/loops.py``: ``criterion_kd(feat_s[-1], feat_t[-1])`` with ``PKT``.
"""

from typing import Any, Mapping

from cktf_jax.losses.pkt import pkt_loss
from cktf_jax.methods.attention import batch_mask
from cktf_jax.methods.base import Method, register_method
from cktf_jax.methods.rkd import check_pooled_pair
from cktf_jax.models.features import Features


@register_method("pkt")
def make_pkt(hparams: Mapping[str, Any]) -> Method:
  del hparams

  def init(rng, feats_s: Features, feats_t: Features):
    del rng
    check_pooled_pair("pkt", feats_s, feats_t)
    return {}

  def loss(aux_params, aux_state, feats_s, feats_t, batch, train):
    del aux_params, train
    value = pkt_loss(feats_s.pooled, feats_t.pooled, batch_mask(batch))
    return value, {"pkt": value}, aux_state

  # scripts/run_tiny-imagenet_distill.sh, run_2kds.sh: -r 1.0 -a 0 -b 30000
  return Method(name="pkt", init=init, loss=loss, default_weights=(1.0, 0.0, 30000.0))
