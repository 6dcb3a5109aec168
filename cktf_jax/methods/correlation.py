"""``--distill correlation``: correlation congruence through two linear embeds.

Reference ``train_student.py``: ``LinearEmbed(feat_s[-1].shape[1], opt.feat_dim)``
for the student and ``LinearEmbed(feat_t[-1].shape[1], opt.feat_dim)`` for the
teacher, both trained; ``helper/loops.py``: ``criterion_kd(embed_s(feat_s[-1]),
embed_t(feat_t[-1]))``. The aux params are ``{'embed_s': {'linear': ...},
'embed_t': {'linear': ...}}``, named like the reference's state_dict.
"""

from typing import Any, Mapping

from cktf_jax.losses.cc import correlation_embed_loss, init_correlation_embeds
from cktf_jax.methods.attention import batch_mask
from cktf_jax.methods.base import Method, register_method
from cktf_jax.methods.rkd import check_pooled_pair
from cktf_jax.models.features import Features


@register_method("correlation")
def make_correlation(hparams: Mapping[str, Any]) -> Method:
  feat_dim = int(hparams.get("feat_dim", 128))  # reference --feat_dim, default 128
  if feat_dim < 1:
    raise ValueError(f"correlation: feat_dim must be >= 1; got {feat_dim}")

  def init(rng, feats_s: Features, feats_t: Features):
    # (The loss pairs neighbouring examples and raises for a batch of 1 when traced;
    # init does not insist on N >= 2 so that it can be called on any dummy batch.)
    check_pooled_pair("correlation", feats_s, feats_t)
    return {"params": init_correlation_embeds(rng, feats_s.pooled, feats_t.pooled, feat_dim)}

  def loss(aux_params, aux_state, feats_s, feats_t, batch, train):
    del train
    value = correlation_embed_loss(aux_params, feats_s.pooled, feats_t.pooled,
                                   batch_mask(batch))
    return value, {"cc": value}, aux_state

  # scripts/run_tiny-imagenet_distill.sh, run_2kds.sh: -r 1.0 -a 0 -b 0.02
  return Method(name="correlation", init=init, loss=loss, default_weights=(1.0, 0.0, 0.02))
