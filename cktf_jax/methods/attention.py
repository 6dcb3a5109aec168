"""``--distill attention``: attention transfer on every stage output.

Reference ``helper/loops.py``: ``criterion_kd(feat_s[1:-1], feat_t[1:-1])``,
i.e. one ``Attention(p=2)`` term per stage (post-activation), summed.
"""

from typing import Any, Mapping, Optional

import jax.numpy as jnp

from cktf_jax.losses.at import attention_transfer_loss, pooled_spatial_shapes
from cktf_jax.methods.base import Method, MethodShapeError, register_method
from cktf_jax.models.features import Features


def batch_mask(batch: Optional[Mapping[str, Any]]):
  """The batch's ``mask`` (False on padding), or ``None``."""
  return None if batch is None else batch.get("mask")


def check_stage_pairs(method: str, feats_s: Features, feats_t: Features) -> None:
  """Stage maps that AT/NST can compare: equal counts, one batch size, and equal
  spatial sizes once the larger map is pooled to the smaller height (square)."""
  shapes_s = [tuple(f.shape) for f in feats_s.stages]
  shapes_t = [tuple(f.shape) for f in feats_t.stages]
  if len(shapes_s) != len(shapes_t) or not shapes_s:
    raise MethodShapeError(
        f"{method}: pairs student and teacher stages one to one, so both need the same "
        f"(non-zero) number of stages; got {len(shapes_s)} student stages {shapes_s} and "
        f"{len(shapes_t)} teacher stages {shapes_t}. Use a teacher/student of the same "
        "family (e.g. resnet32x4 -> resnet8x4, wrn_40_2 -> wrn_16_2).")
  for i, (a, b) in enumerate(zip(shapes_s, shapes_t)):
    if len(a) != 4 or len(b) != 4 or a[0] != b[0]:
      raise MethodShapeError(f"{method}: stage {i} needs NHWC maps with one batch size; "
                             f"got student {a} and teacher {b}")
    hw_s, hw_t = pooled_spatial_shapes(a, b)
    if hw_s != hw_t:
      raise MethodShapeError(
          f"{method}: stage {i} maps student {a} and teacher {b} (NHWC) still differ "
          f"spatially ({hw_s} vs {hw_t}) after pooling the taller one to (H, H); it works "
          "with square maps of any sizes")


@register_method("attention")
def make_attention(hparams: Mapping[str, Any]) -> Method:
  p = hparams.get("at_p", 2)  # reference: Attention(p=2), not a flag

  def init(rng, feats_s: Features, feats_t: Features):
    del rng
    check_stage_pairs("attention", feats_s, feats_t)
    return {}

  def loss(aux_params, aux_state, feats_s, feats_t, batch, train):
    del aux_params, train
    mask = batch_mask(batch)
    terms = [attention_transfer_loss(a, b, p, mask)
             for a, b in zip(feats_s.stages, feats_t.stages)]
    metrics = {f"at_{i}": t for i, t in enumerate(terms)}
    return jnp.sum(jnp.stack(terms)), metrics, aux_state

  # scripts/run_tiny-imagenet_distill.sh, run_2kds.sh: -r 1.0 -a 0 -b 1000
  return Method(name="attention", init=init, loss=loss, default_weights=(1.0, 0.0, 1000.0))
