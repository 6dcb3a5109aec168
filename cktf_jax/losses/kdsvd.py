"""Self-supervised knowledge distillation via singular value decomposition (KDSVD).

Paper: Lee, Kim, Song, "Self-supervised Knowledge Distillation Using Singular
Value Decomposition", ECCV 2018.
Reference: ``distiller_zoo/KDSVD.py: KDSVD(k=1)``.
"""

from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from cktf_jax.losses.at import l2_normalize
from cktf_jax.losses.kd import batch_weights

Array = jax.Array
ArrayLike = jax.typing.ArrayLike
_HIGHEST = jax.lax.Precision.HIGHEST


def _finite_or_zero(x: Array) -> Array:
  return jnp.where(jnp.isfinite(x), x, 0.0)


def _well_conditioned(rows: int, cols: int, dtype) -> Array:
  # A stand-in for padded examples: distinct singular values 1..2, so the SVD
  # and its derivative stay finite where a zero map would give NaN.
  r = min(rows, cols)
  x = np.zeros((rows, cols), np.float32)
  x[np.arange(r), np.arange(r)] = np.linspace(2.0, 1.0, r)
  return jnp.asarray(x, dtype)


def truncated_svd(f: ArrayLike, n: int, mask: Optional[ArrayLike] = None
                  ) -> Tuple[Array, Array, Array]:
  """``KDSVD.svd(feat, n)``: the first ``n`` singular triplets, each normalised.

  ``x = f`` as ``[N, H*W, C]`` (the reference's ``view(-1, C, H*H)
  .transpose(-2, -1)``, square maps), ``u, s, v = svd(x)`` (reduced), non-finite
  entries set to 0, then ``u[:, :, :n]`` and ``v[:, :, :n]`` normalised over
  their first (row) axis and ``s[:, :n]`` over the ``n`` values. Signs are
  LAPACK's, not canonicalised (as in the reference).

  Args:
    f: ``[N, H, W, C]``.
    n: how many singular triplets to keep (fewer when ``min(H*W, C) < n``).
    mask: optional ``[N]`` bool; padded examples are decomposed as a fixed
      well-conditioned matrix instead (their results are meaningless, their
      derivatives finite).

  Returns:
    ``u [N, H*W, n]``, ``s [N, n]``, ``v [N, C, n]``.
  """
  f = jnp.asarray(f)
  num, h, w, c = f.shape
  x = f.reshape(num, h * w, c)
  if mask is not None:
    x = jnp.where(jnp.asarray(mask)[:, None, None], x, _well_conditioned(h * w, c, x.dtype))
  u, s, vh = jnp.linalg.svd(x, full_matrices=False)
  u, s, v = _finite_or_zero(u), _finite_or_zero(s), _finite_or_zero(jnp.swapaxes(vh, -1, -2))
  return (l2_normalize(u[:, :, :n], axis=1), l2_normalize(s[:, :n], axis=1),
          l2_normalize(v[:, :, :n], axis=1))


def align_right_singular_vectors(v_s: Array, v_t: Array) -> Array:
  """``KDSVD.align_rsv``: pick and sign-flip the student vectors that match the teacher's.

  ``cos = v_s^T v_t`` (``[N, n_s, k]``); for every teacher vector the student
  vector(s) of largest ``|cos|`` are kept with the sign of ``cos`` (ties keep
  all of them, summed), so ``v_s @ mask`` is ``[N, C, k]``. The selection mask
  carries no gradient.
  """
  cos = jnp.einsum("ncs,nct->nst", v_s, v_t, precision=_HIGHEST)
  abs_cos = jnp.abs(cos)
  best = jnp.max(abs_cos, axis=1, keepdims=True)
  sel = jax.lax.stop_gradient(jnp.where(abs_cos == best, jnp.sign(cos), 0.0))
  return jnp.einsum("ncs,nst->nct", v_s, sel, precision=_HIGHEST)


def _rbf(v: Array, v_prev: Array) -> Array:
  # [N, C_i, 1, k] - [N, 1, C_{i-1}, k] -> exp(-d^2 / 8), [N, C_i, C_{i-1}, k]
  return jnp.exp(-jnp.square(v[:, :, None, :] - v_prev[:, None, :, :]) / 8.0)


def check_kdsvd_shapes(shapes_s: Sequence[Tuple[int, ...]],
                       shapes_t: Sequence[Tuple[int, ...]]) -> Optional[str]:
  """Why KDSVD cannot take these feature shapes, or ``None`` if it can."""
  if len(shapes_s) != len(shapes_t):
    return (f"student and teacher must give the same number of layers; got "
            f"{len(shapes_s)} and {len(shapes_t)}")
  for i, (a, b) in enumerate(zip(shapes_s, shapes_t)):
    a, b = tuple(a), tuple(b)
    if len(a) != 4 or len(b) != 4 or a[0] != b[0]:
      return f"layer {i}: need NHWC maps with one batch size; got {a} and {b}"
    if a[-1] != b[-1]:
      return (f"layer {i}: student and teacher need the same channel count (the singular "
              f"vectors are compared entrywise); got {a} and {b}")
    for shape in (a, b):
      if shape[1] != shape[2]:
        return (f"layer {i}: maps must be square (the reference reshapes with H*H); "
                f"got {shape}")
  return None


def kdsvd_losses(g_s: Sequence[ArrayLike], g_t: Sequence[ArrayLike], k: int = 1,
                 mask: Optional[ArrayLike] = None,
                 teacher_svd: Optional[Sequence[Tuple[ArrayLike, ArrayLike]]] = None
                 ) -> Tuple[Array, ...]:
  """KDSVD losses of consecutive layer pairs; ``len(g_s) - 1`` scalars.

  Per layer ``l``: ``(s_t, v_t) = truncated_svd(f_t, k)``, ``v_s`` =
  ``truncated_svd(f_s, k + 3)`` aligned to ``v_t``
  (``align_right_singular_vectors``); both ``v_s`` and ``v_t`` are then scaled
  by the TEACHER's normalised singular values ``s_t`` (as the reference does).
  For ``l >= 1``::

      R(v)[i, c, c', j] = exp(-(v_l[i, c, j] - v_{l-1}[i, c', j])^2 / 8)
      loss_l = (1/N) * sum_{i, c, c', j} (R(v_s) - R(v_t))^2     # non-finite terms -> 0

  The teacher side carries no gradient (the reference detaches it). The value
  depends on the sign LAPACK gives the teacher's singular vectors
  (``teacher_svd`` lets a test inject the reference's).

  Args:
    g_s: student maps, one ``[N, H_l, H_l, C_l]`` per layer (training: the stages).
    g_t: teacher maps, same channel counts as the student's layer by layer.
    k: teacher singular vectors kept (reference ``KDSVD(k=1)``).
    mask: optional ``[N]`` bool; padded examples are left out (``N`` becomes
      the number of real ones).
    teacher_svd: optional per-layer ``(s_t [N, k], v_t [N, C, k])`` to use
      instead of decomposing ``g_t`` (already normalised, as ``truncated_svd``
      returns them).

  Returns:
    A tuple of ``len(g_s) - 1`` scalars.

  Raises:
    ValueError: if the layer counts, batch sizes or channel counts differ, or a
      map is not square.
  """
  g_s = [jnp.asarray(f) for f in g_s]
  g_t = [jnp.asarray(f) for f in g_t]
  problem = check_kdsvd_shapes([f.shape for f in g_s], [f.shape for f in g_t])
  if problem is not None:
    raise ValueError(f"kdsvd_losses: {problem}")
  if not g_s:
    return ()
  w, n = batch_weights(mask, g_s[0].shape[0], g_s[0].dtype)
  losses = []
  prev_s = prev_t = None
  for layer, (f_s, f_t) in enumerate(zip(g_s, g_t)):
    if teacher_svd is None:
      _, s_t, v_t = truncated_svd(jax.lax.stop_gradient(f_t), k, mask)
    else:
      s_t, v_t = (jax.lax.stop_gradient(jnp.asarray(a)) for a in teacher_svd[layer])
    _, _, v_s = truncated_svd(f_s, k + 3, mask)
    v_s = align_right_singular_vectors(v_s, v_t)
    scale = s_t[:, None, :]
    v_s, v_t = v_s * scale, v_t * scale
    if prev_s is not None:
      sq = jnp.square(_rbf(v_s, prev_s) - jax.lax.stop_gradient(_rbf(v_t, prev_t)))
      per_example = jnp.sum(_finite_or_zero(sq), axis=(1, 2, 3))
      losses.append(jnp.sum(per_example * w) / n)
    prev_s, prev_t = v_s, v_t
  return tuple(losses)
