"""Attention transfer (AT), plus two helpers several loss families share:
``l2_normalize`` (PyTorch's ``F.normalize``) and ``match_spatial_size`` (the
"pool the larger map" rule of AT and NST).

Paper: Zagoruyko, Komodakis, "Paying More Attention to Attention: Improving the
Performance of Convolutional Neural Networks via Attention Transfer", ICLR 2017.
Reference: ``distiller_zoo/AT.py: Attention``.
"""

from typing import Optional, Tuple

import jax
import jax.numpy as jnp

from cktf_jax.losses.kd import batch_weights
from cktf_jax.models.layers import adaptive_avg_pool

Array = jax.Array
ArrayLike = jax.typing.ArrayLike


def l2_norm(x: Array, axis: int) -> Array:
  """``||x||_2`` along ``axis`` (keepdims), with a zero (not NaN) gradient at 0."""
  sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  positive = sq > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def l2_normalize(x: Array, axis: int = -1, eps: float = 1e-12) -> Array:
  """PyTorch's ``F.normalize(x, p=2, dim=axis, eps)``: ``x / max(||x||_2, eps)``."""
  norm = l2_norm(x, axis)
  return x / jnp.where(norm >= eps, norm, eps)


def match_spatial_size(f_s: Array, f_t: Array) -> Tuple[Array, Array]:
  """Pool the map with the larger height to the other's ``(H, H)`` (NHWC).

  Like ``distiller_zoo/AT.py``, ``NST.py``, ``VID.py``, ``FT.py`` and ``FSP.py``:
  only the heights are compared
  and the target is square ``(H_small, H_small)`` whatever the widths are;
  ``adaptive_avg_pool`` reproduces PyTorch's overlapping bins for
  non-divisible sizes. Equal heights leave both maps untouched.
  """
  h_s, h_t = f_s.shape[1], f_t.shape[1]
  if h_s > h_t:
    f_s = adaptive_avg_pool(f_s, (h_t, h_t))
  elif h_s < h_t:
    f_t = adaptive_avg_pool(f_t, (h_s, h_s))
  return f_s, f_t


def _check_maps(name: str, f_s: Array, f_t: Array) -> None:
  if f_s.ndim != 4 or f_t.ndim != 4 or f_s.shape[0] != f_t.shape[0]:
    raise ValueError(f"{name} needs two NHWC maps [N, H, W, C] with the same N; "
                     f"got {f_s.shape} and {f_t.shape}")


def pooled_spatial_shapes(f_s_shape, f_t_shape):
  """The ``(H, W)`` of both maps after ``match_spatial_size`` (shapes only)."""
  (h_s, w_s), (h_t, w_t) = f_s_shape[1:3], f_t_shape[1:3]
  if h_s > h_t:
    h_s = w_s = h_t
  elif h_s < h_t:
    h_t = w_t = h_s
  return (h_s, w_s), (h_t, w_t)


def attention_map(f: ArrayLike, p: float = 2) -> Array:
  """``at(f) = F.normalize(mean_c f^p)`` flattened: ``[N, H, W, C] -> [N, H*W]``."""
  f = jnp.asarray(f)
  if float(p).is_integer():
    p = int(p)  # integer power: defined for negative activations, as torch.pow
  a = jnp.mean(f ** p, axis=-1).reshape(f.shape[0], -1)
  return l2_normalize(a, axis=1)


def attention_transfer_loss(f_s: ArrayLike, f_t: ArrayLike, p: float = 2,
                            mask: Optional[ArrayLike] = None) -> Array:
  """AT loss of one student/teacher pair of maps.

  ::

      at(f)  = normalize_2( (1/C) * sum_c f[:, :, :, c]^p )   # per example, over H*W
      loss   = mean_{i, hw} (at(f_s)[i, hw] - at(f_t)[i, hw])^2

  The map with the larger height is first adaptive-average-pooled to the
  other's ``(H, H)`` (``match_spatial_size``). Channel counts may differ.

  Args:
    f_s: student map ``[N, H_s, W_s, C_s]``.
    f_t: teacher map ``[N, H_t, W_t, C_t]``.
    p: the power (reference ``Attention(p=2)``).
    mask: optional ``[N]`` bool; padded examples are left out of the mean.

  Returns:
    A scalar.

  Raises:
    ValueError: if the maps are not NHWC with one batch size, or their
      spatial sizes still differ after pooling.
  """
  f_s, f_t = jnp.asarray(f_s), jnp.asarray(f_t)
  _check_maps("attention_transfer_loss", f_s, f_t)
  (hw_s, hw_t) = pooled_spatial_shapes(f_s.shape, f_t.shape)
  if hw_s != hw_t:
    raise ValueError(
        "attention_transfer_loss: after pooling the larger map to (H, H) the spatial sizes "
        f"differ ({hw_s} vs {hw_t}) for maps {f_s.shape} and {f_t.shape}; the reference "
        "assumes square maps")
  f_s, f_t = match_spatial_size(f_s, f_t)
  diff = attention_map(f_s, p) - attention_map(f_t, p)
  w, n = batch_weights(mask, f_s.shape[0], diff.dtype)
  return jnp.sum(jnp.square(diff) * w[:, None]) / (n * diff.shape[1])
