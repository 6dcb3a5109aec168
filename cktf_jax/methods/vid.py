"""VID (``--distill vid``): one ``VIDLoss`` per stage pair, summed.

Reference ``train_student.py`` (``VIDLoss(C_s, C_t, C_t)`` for each pair of
``feat[1:-1]``, trained with the student) and ``helper/loops.py``
(``loss_kd = sum(per-layer losses)``). Per layer, the spatially larger map is
adaptive-average-pooled to the smaller first (``losses.at.match_spatial_size``).

Unlike the reference's ``zip``, which silently pairs only the first
``min(#student, #teacher)`` stages, different stage counts are refused.
"""

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from cktf_jax.losses.at import match_spatial_size, pooled_spatial_shapes
from cktf_jax.losses.modules import VIDRegressor
from cktf_jax.losses.vid import vid_loss
from cktf_jax.methods.base import Method, MethodShapeError, register_method
from cktf_jax.models.features import Features

# scripts/run_tiny-imagenet_distill.sh and run_2kds.sh: `--distill vid -r 1.0 -a 0 -b 1`.
DEFAULT_WEIGHTS = (1.0, 0.0, 1.0)


@register_method("vid")
def vid_method(hparams: Mapping[str, Any]) -> Method:
  """``hparams``: ``vid_init_pred_var`` (default 5.0), ``vid_eps`` (default 1e-5)."""
  init_pred_var = float(hparams.get("vid_init_pred_var", 5.0))
  eps = float(hparams.get("vid_eps", 1e-5))

  def check(feats_s: Features, feats_t: Features):
    s_all = [tuple(f.shape) for f in feats_s.stages]
    t_all = [tuple(f.shape) for f in feats_t.stages]
    if len(s_all) != len(t_all):
      raise MethodShapeError(
          f"vid pairs the student's and the teacher's stages (feat[1:-1]) one to one; got "
          f"{len(s_all)} student stages {s_all} and {len(t_all)} teacher stages {t_all} "
          f"(NHWC); use a teacher/student pair with the same number of stages")
    for i, (s, t) in enumerate(zip(s_all, t_all)):
      s_hw, t_hw = pooled_spatial_shapes(s, t)
      if len(s) != 4 or len(t) != 4 or s[0] != t[0] or s_hw != t_hw:
        raise MethodShapeError(
            f"vid: stage {i} maps cannot be compared: student {s}, teacher {t} (NHWC); "
            f"VID needs [N, H, W, C] maps of one batch, square (the larger one is pooled "
            f"to the smaller's height, as a square, as in the reference)")
    return s_all, t_all

  def modules(s_all, t_all):
    return [VIDRegressor(s[-1], t[-1], t[-1], init_pred_var=init_pred_var, eps=eps)
            for s, t in zip(s_all, t_all)]

  def init(rng, feats_s: Features, feats_t: Features):
    s_all, t_all = check(feats_s, feats_t)
    params = {}
    for i, (mod, s) in enumerate(zip(modules(s_all, t_all), s_all)):
      x = jnp.zeros((1, 1, 1, s[-1]), jnp.float32)  # 1x1 convs: any spatial size
      params[str(i)] = mod.init(jax.random.fold_in(rng, i), x)["params"]
    return {"params": {"vid": params}}

  def loss(aux_params, aux_state, feats_s: Features, feats_t: Features, batch, train: bool):
    del train  # no batch statistics
    s_all, t_all = check(feats_s, feats_t)
    mask = batch.get("mask") if batch else None
    metrics, total = {}, jnp.zeros((), jnp.float32)
    for i, (mod, f_s, f_t) in enumerate(zip(modules(s_all, t_all), feats_s.stages,
                                            feats_t.stages)):
      f_s, f_t = match_spatial_size(f_s, jax.lax.stop_gradient(f_t))
      pred_mean, log_scale = mod.apply({"params": aux_params["vid"][str(i)]}, f_s)
      value = vid_loss(pred_mean, f_t, log_scale, eps, mask)
      metrics[f"vid_{i}"] = value
      total = total + value
    metrics["vid"] = total
    return total, metrics, aux_state

  return Method(name="vid", init=init, loss=loss, default_weights=DEFAULT_WEIGHTS)
