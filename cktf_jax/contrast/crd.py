"""CRD's embedding heads, NCE loss and a reusable "CRD head" (embeds + bank).

Tian, Krishnan, Isola, "Contrastive Representation Distillation", ICLR 2020;
reference ``crd/criterion.py`` (``CRDLoss``, ``ContrastLoss``, ``Embed``,
``Embed_mlp``, ``Embed_pad``, ``Normalize``) and ``crd/memory.py``.

``CRDHead`` is one reference ``CRDLoss``: a student and a teacher embedding
(``embed_s``, ``embed_t``) into ``feat_dim``, one ``ContrastMemory`` (its own
two banks and Z constants) and the two NCE terms. CKTF instantiates one per
layer pair; all heads of a step share the batch's ``index``/``contrast_idx``.
"""

import dataclasses
from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cktf_jax.contrast.memory import BankState, ContrastMemory
from cktf_jax.models.layers import linear

Array = jax.Array
HEADS = ("linear", "mlp", "pad")
NCE_EPS = 1e-7  # crd/criterion.py: eps, only in the denominators


def l2_normalize_no_eps(x: Array) -> Array:
  """``x / ||x||_2`` over axis 1 WITHOUT eps (reference ``Normalize(2)``):
  an all-zero row gives NaN, as in the reference."""
  return x / jnp.sqrt(jnp.sum(x * x, axis=1, keepdims=True))


def _flatten(x: Array) -> Array:
  """The reference's ``x.view(N, -1)`` of an NCHW tensor: NHWC maps are put in
  NCHW order first so PyTorch-trained embed weights apply unchanged."""
  if x.ndim == 4:
    x = jnp.transpose(x, (0, 3, 1, 2))
  return x.reshape(x.shape[0], -1)


class Embed(nn.Module):
  """``Linear(dim_in, dim_out)`` then L2 normalisation (reference ``Embed``)."""

  dim_in: int
  dim_out: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = linear(self.dim_in, self.dim_out, name="linear")(_flatten(x))
    return l2_normalize_no_eps(x)


class EmbedMLP(nn.Module):
  """``Linear(d, d) -> ReLU -> Linear(d, dim_out)`` then L2 normalisation
  (reference ``Embed_mlp``)."""

  dim_in: int
  dim_out: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = linear(self.dim_in, self.dim_in, name="linear1")(_flatten(x))
    x = nn.relu(x)
    x = linear(self.dim_in, self.dim_out, name="linear2")(x)
    return l2_normalize_no_eps(x)


class EmbedPad(nn.Module):
  """Zero-pad ``(dim_out - dim_in) // 2`` on both sides (negative: crop), then
  L2 normalisation; no parameters (reference ``Embed_pad``)."""

  dim_in: int
  dim_out: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = _flatten(x)
    p = (self.dim_out - self.dim_in) // 2
    x = jax.lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (p, p, 0)))
    return l2_normalize_no_eps(x)


def make_embed(head: str, dim_in: int, dim_out: int, name: Optional[str] = None) -> nn.Module:
  """The reference's ``opt.head`` choice; raises ``ValueError`` on a bad
  name or a 'pad' that cannot reach ``dim_out``."""
  if head == "linear":
    return Embed(dim_in, dim_out, name=name)
  if head == "mlp":
    return EmbedMLP(dim_in, dim_out, name=name)
  if head == "pad":
    if (dim_out - dim_in) % 2:
      raise ValueError(f"head 'pad' pads (feat_dim - dim)//2 per side: dim {dim_in} -> feat_dim "
                       f"{dim_out} is an odd difference and gives {dim_in + 2 * ((dim_out - dim_in) // 2)}; "
                       "use an even difference or head 'linear'/'mlp'")
    return EmbedPad(dim_in, dim_out, name=name)
  raise ValueError(f"unknown CRD head {head!r}; valid heads are: {', '.join(HEADS)}")


class CRDEmbed(nn.Module):
  """The two projections of a ``CRDLoss``, named like its state dict
  (``embed_s.linear.weight``, ``embed_t.linear1.bias``...)."""

  s_dim: int
  t_dim: int
  feat_dim: int = 128
  head: str = "linear"

  def setup(self):
    self.embed_s = make_embed(self.head, self.s_dim, self.feat_dim)
    self.embed_t = make_embed(self.head, self.t_dim, self.feat_dim)

  def __call__(self, f_s: Array, f_t: Array) -> Tuple[Array, Array]:
    return self.embed_s(f_s), self.embed_t(f_t)


def contrast_loss(x: Array, n_data: int, mask: Optional[Array] = None) -> Array:
  """The NCE loss of CRD (paper Eq. 18; reference ``ContrastLoss``).

  With ``m = K`` noise samples and noise probability ``Pn = 1 / n_data``::

      loss = -1/B * sum_b [ log(x_b0 / (x_b0 + m Pn + eps))
                            + sum_{k>=1} log(m Pn / (x_bk + m Pn + eps)) ]

  eps = 1e-7 only in the denominators (as the reference).

  Args:
    x: ``[B, K+1]`` (or ``[B, K+1, 1]``) normalised scores, column 0 the positive.
    n_data: dataset size.
    mask: optional ``[B]`` bool; False rows (padding) are left out and B is
      the number of True rows.

  Returns:
    A scalar (the reference returns shape ``[1]``).
  """
  if x.ndim == 3:
    x = x[..., 0]
  if x.ndim != 2 or x.shape[1] < 2:
    raise ValueError(f"contrast_loss needs scores [B, K+1] with K >= 1, got {tuple(x.shape)}")
  m = x.shape[1] - 1
  pn = 1.0 / float(n_data)
  noise = np.float32(m * pn)
  denom = np.float32(m * pn + NCE_EPS)
  p_pos = x[:, 0]
  log_d1 = jnp.log(p_pos / (p_pos + denom))
  log_d0 = jnp.log(noise / (x[:, 1:] + denom))
  if mask is None:
    return -(jnp.sum(log_d1) + jnp.sum(log_d0)) / x.shape[0]
  mask = mask.astype(bool)
  per_example = log_d1 + jnp.sum(log_d0, axis=1)
  total = jnp.sum(jnp.where(mask, per_example, 0.0))
  return -total / jnp.maximum(jnp.sum(mask.astype(jnp.float32)), 1.0)


@dataclasses.dataclass(frozen=True)
class CRDHead:
  """One reference ``CRDLoss``: embeds ``f_s``/``f_t``, scores them against a
  ``ContrastMemory``, returns ``ContrastLoss(out_v1) + ContrastLoss(out_v2)``.

  Usage (all pure; ``params`` are trainable, ``bank`` is state)::

      head = CRDHead(s_dim, t_dim, ContrastMemory(n_data, feat_dim, nce_t, nce_m, mesh=mesh))
      params, bank = head.init(rng)
      loss, aux, bank = head.apply(params, bank, f_s, f_t, index, contrast_idx, mask)

  Attributes:
    s_dim / t_dim: flattened student / teacher feature sizes.
    memory: the bank description (its ``feat_dim`` is the embedding size).
    head: ``'linear'`` (default) | ``'mlp'`` | ``'pad'``.
  """

  s_dim: int
  t_dim: int
  memory: ContrastMemory
  head: str = "linear"

  def __post_init__(self):
    make_embed(self.head, self.s_dim, self.memory.feat_dim)  # validates
    make_embed(self.head, self.t_dim, self.memory.feat_dim)

  @property
  def feat_dim(self) -> int:
    return self.memory.feat_dim

  @property
  def n_data(self) -> int:
    return self.memory.n_data

  @property
  def embed(self) -> CRDEmbed:
    return CRDEmbed(self.s_dim, self.t_dim, self.feat_dim, self.head)

  def init(self, rng: Array) -> Tuple[Dict[str, Any], BankState]:
    """``(params, bank)``: PyTorch-default-initialised embeds and fresh banks."""
    k_embed, k_bank = jax.random.split(rng)
    dummy_s = jnp.zeros((1, self.s_dim), jnp.float32)
    dummy_t = jnp.zeros((1, self.t_dim), jnp.float32)
    params = self.embed.init(k_embed, dummy_s, dummy_t).get("params", {})
    return dict(params), self.memory.init(k_bank)

  def embeddings(self, params, f_s: Array, f_t: Array) -> Tuple[Array, Array]:
    for name, f, dim in (("f_s", f_s, self.s_dim), ("f_t", f_t, self.t_dim)):
      size = int(np.prod(f.shape[1:]))
      if size != dim:
        raise ValueError(f"CRD head: {name} has {size} features per example (shape "
                         f"{tuple(f.shape)}), the head was built for {dim}")
    return self.embed.apply({"params": params}, f_s, f_t)

  def apply(self, params, bank: BankState, f_s: Array, f_t: Array, index: Array,
            contrast_idx: Array, mask: Optional[Array] = None, train: bool = True,
            path: Optional[str] = None) -> Tuple[Array, Dict[str, Array], BankState]:
    """``(loss, aux, new_bank)``.

    Args:
      params: the embeds' params (``{'embed_s': ..., 'embed_t': ...}``).
      bank: the ``ContrastMemory`` state.
      f_s, f_t: ``[B, s_dim]`` / ``[B, t_dim]`` features (4-D maps are
        flattened in NCHW order).
      index: ``[B]`` dataset indices (rows to update).
      contrast_idx: ``[B, K+1]`` memory rows to score, column 0 the positive.
      mask: optional ``[B]`` bool, False on padding of a partial batch.
      train: update the bank and fix Z; ``False`` scores only (state unchanged).
      path: force a scoring path (``'gather'``/``'dense'``), default from the
        memory's cost model.

    Returns:
      loss (scalar, ``s_loss + t_loss``); aux with ``s_loss``, ``t_loss``,
      ``out_v1``/``out_v2`` ``[B, K+1]``, ``v1``/``v2``, ``z_v1``/``z_v2``; the
      updated bank (``train=False``: the bank unchanged, Z in aux possibly
      transient). Out-of-range indices raise ``ValueError`` on concrete
      inputs; under a trace they make the loss NaN and are not written.
    """
    index = jnp.asarray(index)
    contrast_idx = jnp.asarray(contrast_idx)
    if contrast_idx.ndim != 2:
      raise ValueError(f"contrast_idx must be [B, K+1], got shape {tuple(contrast_idx.shape)}")
    self.memory.check_state(bank)
    self.memory.check_indices(index, contrast_idx, mask)
    v1, v2 = self.embeddings(params, f_s, f_t)
    out_v1, out_v2, z_v1, z_v2 = self.memory.scores(bank, v1, v2, contrast_idx, mask, path)
    if train:
      new_bank = self.memory.update(bank, v1, v2, index, mask)
      new_bank.update(z_v1=z_v1, z_v2=z_v2)
    else:
      new_bank = bank
    s_loss = contrast_loss(out_v1, self.n_data, mask)
    t_loss = contrast_loss(out_v2, self.n_data, mask)
    loss = s_loss + t_loss
    bad = self.memory.bad_rows(index, contrast_idx)
    if mask is not None:
      bad = bad & mask.astype(bool)
    loss = jnp.where(jnp.any(bad), jnp.nan, loss)
    aux = {"s_loss": s_loss, "t_loss": t_loss, "out_v1": out_v1, "out_v2": out_v2,
           "v1": v1, "v2": v2, "z_v1": z_v1, "z_v2": z_v2}
    return loss, aux, new_bank
