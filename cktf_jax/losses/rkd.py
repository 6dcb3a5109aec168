"""Relational knowledge distillation (RKD): distance and angle terms.

Paper: Park, Kim, Lu, Cho, "Relational Knowledge Distillation", CVPR 2019.
Reference: ``distiller_zoo/RKD.py: RKDLoss(w_d=25, w_a=50)``.
"""

from typing import Optional, Tuple

import jax
import jax.numpy as jnp

from cktf_jax.losses.at import l2_normalize
from cktf_jax.losses.kd import batch_weights

Array = jax.Array
ArrayLike = jax.typing.ArrayLike
_HIGHEST = jax.lax.Precision.HIGHEST


def smooth_l1(x: Array, beta: float = 1.0) -> Array:
  """Elementwise ``F.smooth_l1_loss`` term: ``0.5 x^2 / beta`` if ``|x| < beta`` else ``|x| - beta/2``."""
  ax = jnp.abs(x)
  return jnp.where(ax < beta, 0.5 * jnp.square(x) / beta, ax - 0.5 * beta)


def pairwise_distances(e: Array, eps: float = 1e-12) -> Array:
  """``RKDLoss.pdist``: ``sqrt(clamp(|a|^2 + |b|^2 - 2 a.b, min=eps))``, diagonal 0.

  The clamp makes every off-diagonal entry at least ``sqrt(eps)`` = 1e-6,
  even for duplicate rows.
  """
  sq = jnp.sum(jnp.square(e), axis=1)
  d2 = sq[:, None] + sq[None, :] - 2.0 * jnp.matmul(e, e.T, precision=_HIGHEST)
  d = jnp.sqrt(jnp.where(d2 >= eps, d2, eps))
  return jnp.where(jnp.eye(e.shape[0], dtype=bool), 0.0, d)


def _normalized_distances(e: Array, pair_w: Array) -> Array:
  d = pairwise_distances(e)
  # Normalised by the mean of the strictly positive entries (distiller_zoo/RKD.py).
  positive = (d > 0) & (pair_w > 0)
  mean = jnp.sum(jnp.where(positive, d, 0.0)) / jnp.maximum(jnp.sum(positive), 1)
  return d / mean


def _angles(e: Array) -> Array:
  # diff[a, b] = e[b] - e[a]; angle[a, b, c] = <unit(e[b]-e[a]), unit(e[c]-e[a])>.
  # The a == b vectors are zero and normalise to 0 (F.normalize's eps).
  diff = l2_normalize(e[None, :, :] - e[:, None, :], axis=2)
  return jnp.einsum("abd,acd->abc", diff, diff, precision=_HIGHEST)


def rkd_terms(f_s: ArrayLike, f_t: ArrayLike,
              mask: Optional[ArrayLike] = None) -> Tuple[Array, Array]:
  """The two unweighted RKD terms ``(loss_distance, loss_angle)``.

  ::

      d(x)[i, j] = ||x_i - x_j|| / mean_{d > 0} ||x_k - x_l||         # [N, N]
      loss_distance = mean_{i, j} smooth_l1(d(s)[i, j] - d(t)[i, j])
      a(x)[i, j, k] = <unit(x_j - x_i), unit(x_k - x_i)>             # [N, N, N]
      loss_angle = mean_{i, j, k} smooth_l1(a(s)[i, j, k] - a(t)[i, j, k])

  over all ``N^2`` pairs (diagonal included) and all ``N^3`` triplets, as the
  reference does. The teacher side carries no gradient (``torch.no_grad`` in
  the reference). Inputs are flattened to ``[N, -1]``.

  Args:
    f_s: student embedding ``[N, D_s]`` (in training the pooled features).
    f_t: teacher embedding ``[N, D_t]``.
    mask: optional ``[N]`` bool; padded examples are left out of every mean.

  Raises:
    ValueError: if the batch sizes differ.
  """
  f_s, f_t = jnp.asarray(f_s), jnp.asarray(f_t)
  if f_s.ndim < 2 or f_t.ndim < 2 or f_s.shape[0] != f_t.shape[0]:
    raise ValueError("rkd_loss needs embeddings [N, ...] with the same N; "
                     f"got {f_s.shape} and {f_t.shape}")
  s = f_s.reshape(f_s.shape[0], -1)
  t = jax.lax.stop_gradient(f_t.reshape(f_t.shape[0], -1))
  w, n = batch_weights(mask, s.shape[0], s.dtype)
  pair_w = w[:, None] * w[None, :]
  triple_w = pair_w[:, :, None] * w[None, None, :]

  dist = smooth_l1(_normalized_distances(s, pair_w) - _normalized_distances(t, pair_w))
  loss_d = jnp.sum(dist * pair_w) / (n * n)
  angle = smooth_l1(_angles(s) - _angles(t))
  loss_a = jnp.sum(angle * triple_w) / (n * n * n)
  return loss_d, loss_a


def rkd_loss(f_s: ArrayLike, f_t: ArrayLike, w_d: float = 25.0, w_a: float = 50.0,
             mask: Optional[ArrayLike] = None) -> Array:
  """``w_d * loss_distance + w_a * loss_angle`` (see ``rkd_terms``); a scalar."""
  loss_d, loss_a = rkd_terms(f_s, f_t, mask)
  return w_d * loss_d + w_a * loss_a
