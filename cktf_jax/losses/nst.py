"""Neuron selectivity transfer (NST), polynomial kernel.

Paper: Huang, Wang, "Like What You Like: Knowledge Distill via Neuron
Selectivity Transfer", arXiv:1707.01219 (2017).
Reference: ``distiller_zoo/NST.py: NSTLoss`` (``full_loss=True``).
"""

from typing import Optional

import jax
import jax.numpy as jnp

from cktf_jax.losses.at import l2_normalize, match_spatial_size, pooled_spatial_shapes
from cktf_jax.losses.kd import batch_weights

Array = jax.Array
ArrayLike = jax.typing.ArrayLike
_HIGHEST = jax.lax.Precision.HIGHEST


def _channel_vectors(f: Array) -> Array:
  # [N, H, W, C] -> [N, H*W, C], each channel unit-normalised over its H*W positions.
  return l2_normalize(f.reshape(f.shape[0], -1, f.shape[-1]), axis=1)


def _mean_poly_kernel(a: Array, b: Array) -> Array:
  # Per example: mean over channel pairs of (<a_c, b_d>)^2 (degree-2 polynomial kernel).
  k = jnp.einsum("npc,npd->ncd", a, b, precision=_HIGHEST)
  return jnp.mean(jnp.square(k), axis=(1, 2))


def nst_loss(f_s: ArrayLike, f_t: ArrayLike, mask: Optional[ArrayLike] = None) -> Array:
  """NST (squared MMD with the kernel ``k(x, y) = (x . y)^2``) of one pair of maps.

  ::

      v(f)[c] = f[:, :, c].flatten() / ||f[:, :, c]||      # per example, [C, H*W]
      K(a, b) = mean_{c, d} (v(a)[c] . v(b)[d])^2
      loss = mean_i [ K(t, t) + K(s, s) - 2 K(s, t) ]

  ``K(t, t)`` carries no gradient (``.detach()`` in the reference). The map
  with the larger height is first adaptive-average-pooled to the other's
  ``(H, H)``; channel counts may differ.

  Args:
    f_s: student map ``[N, H_s, W_s, C_s]``.
    f_t: teacher map ``[N, H_t, W_t, C_t]``.
    mask: optional ``[N]`` bool; padded examples are left out of the mean.

  Returns:
    A scalar.

  Raises:
    ValueError: if the maps are not NHWC with one batch size, or their spatial
      sizes still differ after pooling.
  """
  f_s, f_t = jnp.asarray(f_s), jnp.asarray(f_t)
  if f_s.ndim != 4 or f_t.ndim != 4 or f_s.shape[0] != f_t.shape[0]:
    raise ValueError("nst_loss needs two NHWC maps [N, H, W, C] with the same N; "
                     f"got {f_s.shape} and {f_t.shape}")
  hw_s, hw_t = pooled_spatial_shapes(f_s.shape, f_t.shape)
  if hw_s != hw_t:
    raise ValueError(
        "nst_loss: after pooling the larger map to (H, H) the spatial sizes differ "
        f"({hw_s} vs {hw_t}) for maps {f_s.shape} and {f_t.shape}; the reference assumes "
        "square maps")
  f_s, f_t = match_spatial_size(f_s, f_t)
  s, t = _channel_vectors(f_s), _channel_vectors(f_t)
  per_example = (jax.lax.stop_gradient(_mean_poly_kernel(t, t)) + _mean_poly_kernel(s, s)
                 - 2.0 * _mean_poly_kernel(s, t))
  w, n = batch_weights(mask, f_s.shape[0], per_example.dtype)
  return jnp.sum(per_example * w) / n
