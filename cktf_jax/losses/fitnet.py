"""FitNet hint loss (Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015).

Reference ``distiller_zoo/FitNet.py: HintLoss`` (``nn.MSELoss()``), applied to
``ConvReg(f_s)`` (``losses.modules.ConvReg``) and the teacher's feature.
"""

from typing import Optional

import jax
import jax.numpy as jnp

from cktf_jax.losses.modules import batch_mean

Array = jax.Array


def hint_loss(f_s: Array, f_t: Array, mask: Optional[Array] = None) -> Array:
  """Mean squared error between the regressed student map and the teacher's.

      L = mean_{n,h,w,c} (r_s[n,h,w,c] - f_t[n,h,w,c])^2

  Args:
    f_s: the regressor's output ``ConvReg(feat_s)``, ``[N, H, W, C]``.
    f_t: the teacher's feature, same shape.
    mask: optional ``[N]`` bool; the mean runs over the valid examples only.

  Returns:
    A scalar.
  """
  if f_s.shape != f_t.shape:
    raise ValueError(f"hint_loss needs equal shapes; got {f_s.shape} and {f_t.shape}")
  return batch_mean(jnp.square(f_s - f_t), mask)
