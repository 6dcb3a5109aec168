"""Factor transfer (Kim et al., "Paraphrasing Complex Network: Network
Compression via Factor Transfer", NeurIPS 2018).

Reference ``distiller_zoo/FT.py: FactorTransfer(p1=2, p2=1)``; the learnable
Paraphraser/Translator are in ``losses.modules``. The init stage's
reconstruction loss is ``ft_reconstruction_loss``.
"""

from typing import Optional

import jax
import jax.numpy as jnp

from cktf_jax.losses.at import match_spatial_size
from cktf_jax.losses.modules import batch_mean

Array = jax.Array


def ft_factor(f: Array, p1: int = 2) -> Array:
  """``normalize(mean_c f^p1)`` per example: ``[N, H, W, C] -> [N, H*W]``.

  ``F.normalize`` semantics: ``x / max(||x||_2, 1e-12)`` (reference
  ``distiller_zoo/FT.py: factor``).
  """
  v = jnp.mean(f ** p1, axis=-1).reshape(f.shape[0], -1)
  norm = jnp.sqrt(jnp.sum(jnp.square(v), axis=1, keepdims=True))
  return v / jnp.maximum(norm, 1e-12)


def ft_loss(factor_s: Array, factor_t: Array, p1: int = 2, p2: int = 1,
            mask: Optional[Array] = None) -> Array:
  """Distance between the normalised factors of the translator's and the
  paraphraser's outputs:

      F(f) = normalize(mean_c f^p1),   L = mean |F(s) - F(t)|       (p2 == 1)
                                       L = mean (F(s) - F(t))^p2    (otherwise)

  The larger map is adaptive-average-pooled to the smaller's (square) size
  first. As in the reference (``distiller_zoo/FT.py``), ``p2 != 1`` takes the
  plain power, without an absolute value.

  Args:
    factor_s: ``Translator(f_s)``, ``[N, H, W, K]``.
    factor_t: ``Paraphraser(f_t, is_factor=True)``, ``[N, H', W', K']``.
    p1, p2: reference defaults 2 and 1.
    mask: optional ``[N]`` bool; the mean runs over the valid examples only.

  Returns:
    A scalar.
  """
  factor_s, factor_t = match_spatial_size(factor_s, factor_t)
  diff = ft_factor(factor_s, p1) - ft_factor(factor_t, p1)
  return batch_mean(jnp.abs(diff) if p2 == 1 else diff ** p2, mask)


def ft_reconstruction_loss(rec: Array, f_t: Array, mask: Optional[Array] = None) -> Array:
  """The paraphraser's init-stage loss ``mean (rec - f_t)^2`` (``nn.MSELoss``,
  reference ``helper/pretrain.py``); ``rec`` is the decoder's output."""
  if rec.shape != f_t.shape:
    raise ValueError(f"ft_reconstruction_loss shapes: {rec.shape} and {f_t.shape}")
  return batch_mean(jnp.square(rec - f_t), mask)
