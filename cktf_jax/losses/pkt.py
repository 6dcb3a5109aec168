"""Probabilistic knowledge transfer (PKT).

Paper: Passalis, Tefas, "Learning Deep Representations with Probabilistic
Knowledge Transfer", ECCV 2018.
Reference: ``distiller_zoo/PKT.py: PKT`` (``cosine_similarity_loss``).
"""

from typing import Optional

import jax
import jax.numpy as jnp

from cktf_jax.losses.at import l2_norm
from cktf_jax.losses.kd import batch_weights

Array = jax.Array
ArrayLike = jax.typing.ArrayLike
_HIGHEST = jax.lax.Precision.HIGHEST


def _conditional_probabilities(x: Array, w: Array, eps: float) -> Array:
  # Rows scaled by 1 / (||x|| + eps) (eps added, not clamped), NaN -> 0.
  x = x / (l2_norm(x, axis=1) + eps)
  x = jnp.where(jnp.isnan(x), 0.0, x)
  sim = (jnp.matmul(x, x.T, precision=_HIGHEST) + 1.0) / 2.0
  return sim / jnp.sum(sim * w[None, :], axis=1, keepdims=True)


def pkt_loss(f_s: ArrayLike, f_t: ArrayLike, mask: Optional[ArrayLike] = None,
             eps: float = 1e-7) -> Array:
  """PKT loss: a KL divergence between cosine-kernel neighbour distributions.

  ::

      c(x)[i, j] = (cos(x_i, x_j) + 1) / 2,  cos via x / (||x|| + eps)
      P(x)[i, j] = c(x)[i, j] / sum_k c(x)[i, k]                       # [N, N]
      loss = mean_{i, j} P_t[i, j] * log((P_t[i, j] + eps) / (P_s[i, j] + eps))

  (the mean runs over all ``N^2`` entries, as in the reference).

  Args:
    f_s: student embedding ``[N, D_s]`` (in training the pooled features).
    f_t: teacher embedding ``[N, D_t]``.
    mask: optional ``[N]`` bool; padded examples are left out of the row sums
      and the mean.
    eps: the reference's ``eps=1e-7``.

  Returns:
    A scalar.

  Raises:
    ValueError: if the inputs are not 2-D with the same ``N``.
  """
  f_s, f_t = jnp.asarray(f_s), jnp.asarray(f_t)
  if f_s.ndim != 2 or f_t.ndim != 2 or f_s.shape[0] != f_t.shape[0]:
    raise ValueError("pkt_loss needs embeddings [N, D] with the same N; "
                     f"got {f_s.shape} and {f_t.shape}")
  w, n = batch_weights(mask, f_s.shape[0], f_s.dtype)
  p_s = _conditional_probabilities(f_s, w, eps)
  p_t = _conditional_probabilities(f_t, w, eps)
  kl = p_t * jnp.log((p_t + eps) / (p_s + eps))
  return jnp.sum(kl * (w[:, None] * w[None, :])) / (n * n)
