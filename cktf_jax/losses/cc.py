"""Correlation congruence (CC) and its learnable linear embeddings.

Paper: Peng et al., "Correlation Congruence for Knowledge Distillation", ICCV 2019.
Reference: ``distiller_zoo/CC.py: Correlation`` (the loss) and
``models/util.py: LinearEmbed`` (one for the student, one for the teacher,
built in ``train_student.py`` with ``dim_out=--feat_dim``, default 128).
"""

from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from cktf_jax.losses.kd import batch_weights
from cktf_jax.models.layers import linear

Array = jax.Array
ArrayLike = jax.typing.ArrayLike


class LinearEmbed(nn.Module):
  """``models/util.py: LinearEmbed``: flatten, then one ``nn.Linear(dim_in, dim_out)``.

  The submodule is called ``linear`` like the PyTorch attribute, so
  ``torch_import.state_dict_to_variables`` maps ``linear.weight``/``linear.bias``.
  A 4-D NHWC input is flattened in NCHW order, so imported weights see the
  reference's feature order.
  """

  dim_out: int = 128

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if x.ndim == 4:
      x = jnp.transpose(x, (0, 3, 1, 2))
    x = x.reshape(x.shape[0], -1)
    dense = linear(x.shape[1], self.dim_out, name="linear")
    return dense(x)


class CorrelationEmbeds(nn.Module):
  """The two CC embeds; submodules ``embed_s``/``embed_t`` (state_dict prefixes)."""

  feat_dim: int = 128

  def setup(self):
    self.embed_s = LinearEmbed(self.feat_dim)
    self.embed_t = LinearEmbed(self.feat_dim)

  def __call__(self, feat_s: Array, feat_t: Array) -> Tuple[Array, Array]:
    return self.embed_s(feat_s), self.embed_t(feat_t)


def init_correlation_embeds(rng: jax.Array, feat_s: ArrayLike, feat_t: ArrayLike,
                            feat_dim: int = 128) -> Dict[str, Any]:
  """Parameters ``{'embed_s': ..., 'embed_t': ...}`` with PyTorch's Linear init."""
  return CorrelationEmbeds(feat_dim).init(rng, jnp.asarray(feat_s), jnp.asarray(feat_t))["params"]


def correlation_embed_loss(params: Dict[str, Any], feat_s: ArrayLike, feat_t: ArrayLike,
                           mask: Optional[ArrayLike] = None) -> Array:
  """CC as train_distill computes it: ``correlation_loss(embed_s(f_s), embed_t(f_t))``.

  ``params`` comes from ``init_correlation_embeds``; both embeds are trained
  (the reference puts ``embed_t`` in ``trainable_list`` too), so gradients
  reach both.
  """
  f_s, f_t = CorrelationEmbeds(_feat_dim(params)).apply(
      {"params": params}, jnp.asarray(feat_s), jnp.asarray(feat_t))
  return correlation_loss(f_s, f_t, mask)


def _feat_dim(params: Dict[str, Any]) -> int:
  return params["embed_s"]["linear"]["kernel"].shape[-1]


def correlation_loss(f_s: ArrayLike, f_t: ArrayLike,
                     mask: Optional[ArrayLike] = None) -> Array:
  """CC loss of two embedded batches.

  ::

      delta = |f_s - f_t|                                     # [N, D]
      loss  = 1/(N-1) * sum_{i=0}^{N-2} sum_d delta[i, d] * delta[i+1, d]

  The product pairs each example with the NEXT one in the batch, so the value
  depends on the batch order (reproduced from ``distiller_zoo/CC.py``).

  Args:
    f_s: student embedding ``[N, D]``.
    f_t: teacher embedding ``[N, D]``.
    mask: optional ``[N]`` bool (padding at the end of a partial batch); only
      pairs of two real neighbours count. Where no such pair exists the loss
      is 0 (the reference's mean over an empty set would be NaN).

  Returns:
    A scalar.

  Raises:
    ValueError: if the shapes differ, are not 2-D, or ``N < 2``.
  """
  f_s, f_t = jnp.asarray(f_s), jnp.asarray(f_t)
  if f_s.ndim != 2 or f_s.shape != f_t.shape:
    raise ValueError("correlation_loss needs student and teacher embeddings of one shape "
                     f"[N, D]; got {f_s.shape} and {f_t.shape}")
  if f_s.shape[0] < 2:
    raise ValueError("correlation_loss pairs consecutive examples and needs N >= 2; "
                     f"got {f_s.shape}")
  w, _ = batch_weights(mask, f_s.shape[0], f_s.dtype)
  delta = jnp.abs(f_s - f_t)
  pair_w = w[:-1] * w[1:]
  per_pair = jnp.sum(delta[:-1] * delta[1:], axis=1)
  return jnp.sum(per_pair * pair_w) / jnp.maximum(jnp.sum(pair_w), 1.0)
