"""``--distill nst``: neuron selectivity transfer on every stage output.

Reference ``helper/loops.py``: ``criterion_kd(feat_s[1:-1], feat_t[1:-1])``
with ``NSTLoss``, one term per stage, summed.
"""

from typing import Any, Mapping

import jax.numpy as jnp

from cktf_jax.losses.nst import nst_loss
from cktf_jax.methods.attention import batch_mask, check_stage_pairs
from cktf_jax.methods.base import Method, register_method
from cktf_jax.models.features import Features


@register_method("nst")
def make_nst(hparams: Mapping[str, Any]) -> Method:
  del hparams

  def init(rng, feats_s: Features, feats_t: Features):
    del rng
    check_stage_pairs("nst", feats_s, feats_t)
    return {}

  def loss(aux_params, aux_state, feats_s, feats_t, batch, train):
    del aux_params, train
    mask = batch_mask(batch)
    terms = [nst_loss(a, b, mask) for a, b in zip(feats_s.stages, feats_t.stages)]
    metrics = {f"nst_{i}": t for i, t in enumerate(terms)}
    return jnp.sum(jnp.stack(terms)), metrics, aux_state

  # scripts/run_tiny-imagenet_distill.sh, run_2kds.sh: -r 1.0 -a 0 -b 50
  return Method(name="nst", init=init, loss=loss, default_weights=(1.0, 0.0, 50.0))
