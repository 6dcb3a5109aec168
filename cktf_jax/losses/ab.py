"""Activation-boundary distillation (Heo et al., "Knowledge Transfer via
Distillation of Activation Boundaries Formed by Hidden Neurons", AAAI 2019).

Reference ``distiller_zoo/AB.py: ABLoss`` (the connector is
``losses.modules.Connector``). Inputs are PRE-activation stage outputs
(``Features.stages_preact``).
"""

from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

from cktf_jax.losses.modules import batch_count, batch_sum

Array = jax.Array


def ab_layer_weights(num_layers: int) -> Tuple[float, ...]:
  """``w_i = 2 ** (i - n + 1)``: 1 for the last layer, halving towards the first."""
  return tuple(2.0 ** (i - num_layers + 1) for i in range(num_layers))


def ab_criterion(s: Array, t: Array, margin: float = 1.0,
                 mask: Optional[Array] = None) -> Array:
  """The alternative L2 of AB, summed over all elements:

      l = sum |(s + m)^2 * [s > -m and t <= 0] + (s - m)^2 * [s <= m and t > 0]|

  (reference ``ABLoss.criterion_alternative_l2``: a student neuron is pushed
  below ``-m`` where the teacher's is inactive and above ``m`` where it is active).

  Args:
    s: the connector's output, ``[N, H, W, C]``; t: the teacher's pre-activation
      feature, same shape. mask: optional ``[N]`` bool (padded examples excluded).
  """
  if s.shape != t.shape:
    raise ValueError(f"ab_criterion needs equal shapes; got {s.shape} and {t.shape}")
  off = ((s > -margin) & (t <= 0)).astype(s.dtype)
  on = ((s <= margin) & (t > 0)).astype(s.dtype)
  return batch_sum(jnp.abs(jnp.square(s + margin) * off + jnp.square(s - margin) * on), mask)


def ab_losses(g_s: Sequence[Array], g_t: Sequence[Array], margin: float = 1.0,
              mask: Optional[Array] = None) -> Tuple[Array, ...]:
  """Per-layer AB losses, weighted and scaled as the reference returns them:

      loss_i = w_i * l_i / N / 1000 * 3,   w_i = 2 ** (i - n + 1)

  where ``l_i = ab_criterion(g_s[i], g_t[i])``, ``n = len(g_s)`` and ``N`` the
  batch size (the valid examples under ``mask``). The ``/1000*3`` scaling is the
  reference's (``distiller_zoo/AB.py``). The init stage trains on their sum.

  Args:
    g_s: connector outputs, one ``[N, H_i, W_i, C_i]`` per stage.
    g_t: the teacher's pre-activation stage outputs, same shapes.
    margin: ``m`` (reference default 1.0).
    mask: optional ``[N]`` bool.

  Returns:
    A tuple of ``n`` scalars.
  """
  if len(g_s) != len(g_t):
    raise ValueError(f"ab_losses: {len(g_s)} student and {len(g_t)} teacher maps")
  n = batch_count(g_s[0], mask)
  weights = ab_layer_weights(len(g_s))
  return tuple(w * ab_criterion(s, t, margin, mask) / n / 1000.0 * 3.0
               for w, s, t in zip(weights, g_s, g_t))
