"""Variational information distillation (Ahn et al., "Variational Information
Distillation for Knowledge Transfer", CVPR 2019).

Reference ``distiller_zoo/VID.py: VIDLoss``; the learnable regressor and
variance live in ``losses.modules.VIDRegressor``.
"""

from typing import Optional

import jax
import jax.numpy as jnp

from cktf_jax.losses.modules import batch_mean

Array = jax.Array


def vid_pred_var(log_scale: Array, eps: float = 1e-5) -> Array:
  """The per-channel variance ``log(1 + exp(log_scale)) + eps``.

  Computed literally as the reference does (``distiller_zoo/VID.py``), not with
  a stable softplus: it overflows to ``inf`` for ``log_scale`` above ~88 in
  float32, exactly like the reference.
  """
  return jnp.log(1.0 + jnp.exp(log_scale)) + eps


def vid_loss(pred_mean: Array, target: Array, log_scale: Array, eps: float = 1e-5,
             mask: Optional[Array] = None) -> Array:
  """Negative log-likelihood of the teacher feature under a Gaussian with the
  regressed mean and a learned per-channel variance (constant dropped):

      var_c = log(1 + exp(log_scale_c)) + eps
      L = mean_{n,h,w,c} 0.5 * ((mu[n,h,w,c] - t[n,h,w,c])^2 / var_c + log var_c)

  The spatial sizes must already match (``losses.at.match_spatial_size``
  pools the larger map first, as the reference).

  Args:
    pred_mean: the regressor's output ``mu``, ``[N, H, W, C_t]``.
    target: the teacher's feature ``t``, ``[N, H, W, C_t]``.
    log_scale: ``[C_t]``.
    eps: added to the variance (reference default 1e-5).
    mask: optional ``[N]`` bool; the mean runs over the valid examples only.

  Returns:
    A scalar.
  """
  if pred_mean.shape != target.shape or log_scale.shape != target.shape[-1:]:
    raise ValueError(f"vid_loss shapes: pred_mean {pred_mean.shape}, target "
                     f"{target.shape}, log_scale {log_scale.shape}")
  var = vid_pred_var(log_scale, eps)
  nll = 0.5 * (jnp.square(pred_mean - target) / var + jnp.log(var))
  return batch_mean(nll, mask)
