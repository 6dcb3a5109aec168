"""``--distill similarity``: similarity-preserving KD on the last stage output.

Reference ``helper/loops.py``: ``criterion_kd([feat_s[-2]], [feat_t[-2]])``,
i.e. one ``Similarity`` term on the last stage map.
"""

from typing import Any, Mapping

from cktf_jax.losses.sp import similarity_preserving_loss
from cktf_jax.methods.attention import batch_mask
from cktf_jax.methods.base import Method, MethodShapeError, register_method
from cktf_jax.models.features import Features


def _last_stage(feats: Features):
  return feats.as_reference_list()[-2]


@register_method("similarity")
def make_similarity(hparams: Mapping[str, Any]) -> Method:
  del hparams

  def init(rng, feats_s: Features, feats_t: Features):
    del rng
    a, b = tuple(_last_stage(feats_s).shape), tuple(_last_stage(feats_t).shape)
    if len(a) < 2 or len(b) < 2 or a[0] != b[0]:
      raise MethodShapeError(
          f"similarity: compares the batch Gram matrices of the last stage maps, which need "
          f"one batch size; got student {a} and teacher {b} (feature sizes may differ)")
    return {}

  def loss(aux_params, aux_state, feats_s, feats_t, batch, train):
    del aux_params, train
    value = similarity_preserving_loss(_last_stage(feats_s), _last_stage(feats_t),
                                       batch_mask(batch))
    return value, {"sp": value}, aux_state

  # scripts/run_tiny-imagenet_distill.sh, run_2kds.sh: -r 1.0 -a 0 -b 3000
  return Method(name="similarity", init=init, loss=loss, default_weights=(1.0, 0.0, 3000.0))
