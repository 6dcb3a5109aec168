"""``--distill kdsvd``: SVD-based KD between consecutive stage outputs.

Reference ``helper/loops.py``: ``criterion_kd(feat_s[1:-1], feat_t[1:-1])``
with ``KDSVD()`` (k=1): ``len(stages) - 1`` terms, summed.
"""

from typing import Any, Mapping

import jax.numpy as jnp

from cktf_jax.losses.kdsvd import check_kdsvd_shapes, kdsvd_losses
from cktf_jax.methods.attention import batch_mask
from cktf_jax.methods.base import Method, MethodShapeError, register_method
from cktf_jax.models.features import Features

# No reference script runs kdsvd (scripts/*.sh list no `--distill kdsvd`, and the
# README's tables do not report it); train_student.py's -b default is None, which
# would fail. 1.0 is a neutral default here; set it with the config's beta.
KDSVD_DEFAULT_BETA = 1.0


@register_method("kdsvd")
def make_kdsvd(hparams: Mapping[str, Any]) -> Method:
  k = int(hparams.get("kdsvd_k", 1))  # reference KDSVD(k=1), not a flag
  if k < 1:
    raise ValueError(f"kdsvd: kdsvd_k must be >= 1; got {k}")

  def init(rng, feats_s: Features, feats_t: Features):
    del rng
    shapes_s = [tuple(f.shape) for f in feats_s.stages]
    shapes_t = [tuple(f.shape) for f in feats_t.stages]
    problem = check_kdsvd_shapes(shapes_s, shapes_t)
    if problem is None and len(shapes_s) < 2:
      problem = f"needs at least 2 stages (its terms pair consecutive stages); got {shapes_s}"
    if problem is not None:
      raise MethodShapeError(
          f"kdsvd: {problem}. Student stages {shapes_s}, teacher stages {shapes_t} (NHWC); "
          "it works with equally many square stage maps whose channel counts match "
          "stage by stage (spatial sizes may differ).")
    return {}

  def loss(aux_params, aux_state, feats_s, feats_t, batch, train):
    del aux_params, train
    terms = kdsvd_losses(feats_s.stages, feats_t.stages, k, batch_mask(batch))
    metrics = {f"kdsvd_{i + 1}": t for i, t in enumerate(terms)}
    return jnp.sum(jnp.stack(terms)), metrics, aux_state

  return Method(name="kdsvd", init=init, loss=loss,
                default_weights=(1.0, 0.0, KDSVD_DEFAULT_BETA))
