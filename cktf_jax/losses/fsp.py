"""Flow of solution procedure (Yim et al., "A Gift from Knowledge Distillation:
Fast Optimization, Network Minimization and Transfer Learning", CVPR 2017).

Reference ``distiller_zoo/FSP.py: FSP``. No learnable parts; the reference
only trains on it in the init stage (``helper/pretrain.py``).
"""

from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

from cktf_jax.losses.at import match_spatial_size
from cktf_jax.losses.modules import batch_mean

Array = jax.Array


def fsp_matrices(g: Sequence[Array]) -> Tuple[Array, ...]:
  """The FSP ("Gram across layers") matrix of each consecutive pair of maps:

      G_i[n, a, b] = mean_{h,w} top[n, h, w, a] * bot[n, h, w, b]

  with ``bot = g[i]``, ``top = g[i + 1]``, the larger of the two first
  adaptive-average-pooled to the smaller's (square) size.

  Args:
    g: ``k`` maps ``[N, H_i, W_i, C_i]``.

  Returns:
    ``k - 1`` arrays ``[N, C_{i+1}, C_i]`` (the reference's ``[N, C_top, C_bot]``).
  """
  out = []
  for bot, top in zip(g[:-1], g[1:]):
    bot, top = match_spatial_size(bot, top)
    hw = bot.shape[1] * bot.shape[2]
    out.append(jnp.einsum("nhwb,nhwa->nab", bot, top) / hw)
  return tuple(out)


def fsp_losses(g_s: Sequence[Array], g_t: Sequence[Array],
               mask: Optional[Array] = None) -> Tuple[Array, ...]:
  """Per-pair FSP losses ``mean_{n,a,b} (G_s[n,a,b] - G_t[n,a,b])^2``.

  Args:
    g_s, g_t: student and teacher maps, reference ``feat[:-1]`` (stem and every
      stage); channel counts must agree layer by layer.
    mask: optional ``[N]`` bool; the means run over the valid examples only.

  Returns:
    ``len(g_s) - 1`` scalars (the reference trains on their sum).
  """
  if len(g_s) != len(g_t):
    raise ValueError(f"fsp_losses: {len(g_s)} student and {len(g_t)} teacher maps")
  return tuple(batch_mean(jnp.square(s - t), mask)
               for s, t in zip(fsp_matrices(g_s), fsp_matrices(g_t)))
