"""Similarity-preserving knowledge distillation (SP).

Paper: Tung, Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019.
Reference: ``distiller_zoo/SP.py: Similarity``.
"""

from typing import Optional

import jax
import jax.numpy as jnp

from cktf_jax.losses.at import l2_normalize
from cktf_jax.losses.kd import batch_weights

Array = jax.Array
ArrayLike = jax.typing.ArrayLike
_HIGHEST = jax.lax.Precision.HIGHEST


def _normalized_gram(f: Array, w: Array) -> Array:
  g = f.reshape(f.shape[0], -1)
  gram = jnp.matmul(g, g.T, precision=_HIGHEST) * (w[:, None] * w[None, :])
  # Row-wise F.normalize (dim=1) of the Gram matrix, as distiller_zoo/SP.py does
  # (not the Frobenius normalisation of the paper / its commented-out line).
  return l2_normalize(gram, axis=1)


def similarity_preserving_loss(f_s: ArrayLike, f_t: ArrayLike,
                               mask: Optional[ArrayLike] = None) -> Array:
  """SP loss of one student/teacher pair of features.

  ::

      G = normalize_rows(F F^T),   F = f.reshape(N, -1)        # [N, N]
      loss = sum_{i, j} (G_t[i, j] - G_s[i, j])^2 / N^2

  The Gram matrices compare examples with each other, so the value depends on
  the whole batch (``distiller_zoo/SP.py``). The reference returns a
  ``[1]``-shaped tensor; this returns a scalar with the same value. The
  flattening order (NHWC here, NCHW there) does not change ``F F^T``.

  Args:
    f_s: student features ``[N, ...]`` (in training the last stage map).
    f_t: teacher features ``[N, ...]``; feature sizes may differ.
    mask: optional ``[N]`` bool; padded examples drop out of the Gram
      matrices and ``N`` becomes the number of real examples.

  Returns:
    A scalar.

  Raises:
    ValueError: if the batch sizes differ.
  """
  f_s, f_t = jnp.asarray(f_s), jnp.asarray(f_t)
  if f_s.ndim < 2 or f_t.ndim < 2 or f_s.shape[0] != f_t.shape[0]:
    raise ValueError("similarity_preserving_loss needs features [N, ...] with the same N; "
                     f"got {f_s.shape} and {f_t.shape}")
  w, n = batch_weights(mask, f_s.shape[0], f_s.dtype)
  diff = _normalized_gram(f_t, w) - _normalized_gram(f_s, w)
  return jnp.sum(jnp.square(diff)) / (n * n)
