"""Hinton knowledge distillation (KD) and the batch-mask helper the losses share.

Paper: Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network",
NIPS 2014 Deep Learning Workshop (arXiv:1503.02531).
Reference: ``distiller_zoo/KD.py: DistillKL``.
"""

from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from jax.scipy.special import xlogy

Array = jax.Array
ArrayLike = jax.typing.ArrayLike


def batch_weights(mask: Optional[ArrayLike], batch_size: int,
                  dtype=jnp.float32) -> Tuple[Array, Array]:
  """Per-example weights and their count for a possibly padded batch.

  Args:
    mask: ``[N]`` bool, False on the padding of a partial batch; ``None``
      means every example is real.
    batch_size: ``N``.
    dtype: dtype of the returned weights.

  Returns:
    ``(w, n)``: ``w`` is ``[N]`` with 1 for real and 0 for padded examples,
    ``n`` the number of real examples (at least 1, so an all-padding batch
    gives a zero loss instead of 0/0).

  Raises:
    ValueError: if ``mask`` is not ``[N]``.
  """
  if mask is None:
    return jnp.ones((batch_size,), dtype), jnp.asarray(batch_size, dtype)
  mask = jnp.asarray(mask)
  if mask.shape != (batch_size,):
    raise ValueError(f"mask must have shape [N] = ({batch_size},); got {mask.shape}")
  w = mask.astype(dtype)
  return w, jnp.maximum(jnp.sum(w), 1.0)


def distill_kl(logits_s: ArrayLike, logits_t: ArrayLike, temperature: float,
               mask: Optional[ArrayLike] = None) -> Array:
  """Soft-target KD loss, the reference's ``DistillKL(T)``.

  ::

      p_t = softmax(z_t / T),  log p_s = log_softmax(z_s / T)
      loss = T^2 / N * sum_{i, c} p_t[i, c] * (log p_t[i, c] - log p_s[i, c])

  i.e. ``F.kl_div(log p_s, p_t, size_average=False)`` (a sum over the batch
  AND the classes) times ``T**2`` divided by the batch size; entries with
  ``p_t == 0`` contribute 0 (``xlogy``), as in PyTorch.

  Args:
    logits_s: student logits ``[N, C]``.
    logits_t: teacher logits ``[N, C]`` (the train step passes the frozen
      teacher's, so no gradient reaches them in practice).
    temperature: ``T`` (reference ``--kd_T``, default 4).
    mask: optional ``[N]`` bool; padded rows are left out and ``N`` becomes
      the number of real rows.

  Returns:
    A scalar.

  Raises:
    ValueError: if the logits are not two equal ``[N, C]`` arrays.
  """
  logits_s = jnp.asarray(logits_s)
  logits_t = jnp.asarray(logits_t)
  if logits_s.ndim != 2 or logits_s.shape != logits_t.shape:
    raise ValueError("distill_kl needs student and teacher logits of one shape [N, C]; "
                     f"got {logits_s.shape} and {logits_t.shape}")
  w, n = batch_weights(mask, logits_s.shape[0], logits_s.dtype)
  log_p_s = jax.nn.log_softmax(logits_s / temperature, axis=-1)
  p_t = jax.nn.softmax(logits_t / temperature, axis=-1)
  per_row = jnp.sum(xlogy(p_t, p_t) - p_t * log_p_s, axis=-1)
  return jnp.sum(per_row * w) * (temperature ** 2) / n
