"""FitNet (``--distill hint``): MSE between ``ConvReg(feat_s[hint_layer])`` and
``feat_t[hint_layer]``.

Reference ``train_student.py`` (``regress_s = ConvReg(feat_s[hint_layer].shape,
feat_t[hint_layer].shape)``, trained with the student) and ``helper/loops.py``.
``hint_layer`` indexes the reference's feature list ``[f0, f1, ..., fk, pooled]``
(``Features.as_reference_list``); its default is 2 (``--hint_layer 2``), i.e. the
second stage. The reference infers the shapes from a 32x32 dummy batch; we use
the shapes of the features actually given to ``init``.
"""

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from cktf_jax.losses.fitnet import hint_loss
from cktf_jax.losses.modules import ConvReg, conv_reg_branch
from cktf_jax.methods.base import Method, MethodShapeError, register_method
from cktf_jax.models.features import Features

# scripts/run_tiny-imagenet_distill.sh and run_2kds.sh: `--distill hint -r 1.0 -a 0 -b 100`.
DEFAULT_WEIGHTS = (1.0, 0.0, 100.0)


@register_method("hint")
def hint_method(hparams: Mapping[str, Any]) -> Method:
  """``hparams``: ``hint_layer`` (int, default 2)."""
  hint_layer = int(hparams.get("hint_layer", 2))

  def pick(feats: Features, who: str):
    feat_list = feats.as_reference_list()
    # The last entry is the pooled vector, which ConvReg cannot take.
    if not 0 <= hint_layer < len(feat_list) - 1:
      raise MethodShapeError(
          f"hint: hint_layer={hint_layer} is out of range for the {who}, whose feature "
          f"list [f0, ..., f{len(feat_list) - 2}, pooled] has feature maps at indices "
          f"0..{len(feat_list) - 2} (shapes NHWC "
          f"{[tuple(f.shape) for f in feat_list[:-1]]}); choose one of those")
    return feat_list[hint_layer]

  def shapes(feats_s: Features, feats_t: Features):
    f_s, f_t = pick(feats_s, "student"), pick(feats_t, "teacher")
    if f_s.ndim != 4 or f_t.ndim != 4 or f_s.shape[0] != f_t.shape[0]:
      raise MethodShapeError(
          f"hint: feat[{hint_layer}] must be feature maps [N, H, W, C] with one batch; got "
          f"student {tuple(f_s.shape)}, teacher {tuple(f_t.shape)}")
    try:
      conv_reg_branch(f_s.shape, f_t.shape)
    except ValueError as e:
      raise MethodShapeError(f"hint (hint_layer={hint_layer}): {e}; another --hint_layer "
                             f"may pair compatible maps") from None
    return tuple(f_s.shape), tuple(f_t.shape)

  def init(rng, feats_s: Features, feats_t: Features):
    s_shape, t_shape = shapes(feats_s, feats_t)
    reg = ConvReg(s_shape, t_shape, use_relu=True)
    variables = reg.init(rng, jnp.zeros((1,) + s_shape[1:], jnp.float32), False)
    return {"params": {"reg": variables["params"]},
            "batch_stats": {"reg": variables["batch_stats"]}}

  def loss(aux_params, aux_state, feats_s: Features, feats_t: Features, batch, train: bool):
    s_shape, t_shape = shapes(feats_s, feats_t)
    mask = batch.get("mask") if batch else None
    f_s = pick(feats_s, "student")
    f_t = jax.lax.stop_gradient(pick(feats_t, "teacher"))
    reg = ConvReg(s_shape, t_shape, use_relu=True)
    variables = {"params": aux_params["reg"], "batch_stats": aux_state["batch_stats"]["reg"]}
    if train:
      # The regressor is trained with the student, in train() mode: batch-stat BN.
      r_s, updated = reg.apply(variables, f_s, True, mask, mutable=["batch_stats"])
      new_state = {"batch_stats": {"reg": updated["batch_stats"]}}
    else:
      r_s, new_state = reg.apply(variables, f_s, False), aux_state
    value = hint_loss(r_s, f_t, mask)
    return value, {"hint": value}, new_state

  return Method(name="hint", init=init, loss=loss, default_weights=DEFAULT_WEIGHTS)
