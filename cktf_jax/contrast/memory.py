"""The contrastive memory bank of CRD (Tian et al., ICLR 2020), row-sharded.

Semantics follow the reference's ``crd/memory.py: ContrastMemory``:

* two banks of ``n_data x feat_dim`` unit-ish vectors: ``memory_v1`` holds the
  student embeddings ``v1``, ``memory_v2`` the teacher embeddings ``v2``,
  both initialised ``U(-stdv, stdv)`` with ``stdv = 1 / sqrt(feat_dim / 3)``;
* scores are *cross-paired*: the student embedding is scored against the
  TEACHER bank and vice versa::

      out_v1[b, k] = exp(<memory_v2[contrast_idx[b, k]], v1[b]> / T) / Z_v1
      out_v2[b, k] = exp(<memory_v1[contrast_idx[b, k]], v2[b]> / T) / Z_v2

  with the bank rows treated as constants (no gradient into the bank);
* the normalisation constants ``Z`` are fixed once, on the first call, to
  ``mean(exp(scores / T)) * n_data`` (float32) and are constants afterwards.
  The reference does this with a ``-1`` sentinel and a host ``.item()``; here
  ``Z`` starts at the same sentinel and is set inside the step with a
  ``jnp.where`` on ``Z < 0`` (no host sync);
* after scoring, without gradient, row ``index[b]`` (the DATASET index, not
  ``contrast_idx[b, 0]``, which differs in relax mode) of each bank becomes
  ``normalize(m * row + (1 - m) * v)``, an L2 renormalisation WITHOUT eps.
  Scores of a call always use the banks as they were before the call.

State is a plain dict ``{'memory_v1', 'memory_v2', 'z_v1', 'z_v2'}`` (a
non-``params`` collection of the owning method, e.g. ``'contrast'``).

Sharding. The banks are device arrays sharded by rows over one mesh axis
(``NamedSharding(mesh, P('data', None))``): with ``N`` devices each holds
``ceil(n_data / N)`` rows; ``n_data`` not divisible by ``N`` is padded with
zero rows at the end that no index ever reaches. Scoring and the update run per
device inside ``jax.shard_map``: a device scores only the (example, slot)
pairs whose row it owns, writes zeros elsewhere, and one ``psum`` over the axis
assembles the ``[B, K+1]`` score matrix (exactly one device owns each row, so
the sum is exact and an N-device run gives the 1-device numbers). The update
writes only owned rows. A mesh of one device runs the same code.

Scoring paths (the cost model of ``shared/DESIGN.md``, per bank per device):

* ``'gather'``: gather the ``B*(K+1)`` rows named by ``contrast_idx`` and dot
  each with its example's embedding (the reference's ``index_select`` +
  ``bmm``). Reads ``B*(K+1)*d`` values (and materialises them).
* ``'dense'``: ``memory_shard @ V^T`` (``[n_shard, B]``), then gather the
  ``B*(K+1)`` scalar scores. Reads ``n_shard*d`` values.

``'auto'`` (default) takes ``'gather'`` when ``B*(K+1) <= n_shard`` and
``'dense'`` otherwise (CIFAR-100 with K=16384, B=64: 1M rows vs 50000/N rows,
so dense). Both compute the same dot products; they agree to float32 rounding.
"""

import dataclasses
import math
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

Array = jax.Array
BankState = Dict[str, Array]

# The reference's "Z not set yet" marker (params = [K, T, -1, -1, momentum]).
Z_UNSET = -1.0
SCORING_PATHS = ("auto", "gather", "dense")
_BANK_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

try:  # jax >= 0.6
  _shard_map_impl = jax.shard_map
  _CHECK_KW = "check_vma"
except AttributeError:  # pragma: no cover - older jax
  from jax.experimental.shard_map import shard_map as _shard_map_impl
  _CHECK_KW = "check_rep"


def shard_map(f, mesh, in_specs, out_specs):
  """``jax.shard_map`` (or the experimental one on older jax), checks on."""
  return _shard_map_impl(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                         **{_CHECK_KW: True})


def default_mesh(axis: str = "data") -> Mesh:
  """A 1-D mesh over every device, axis ``axis`` (the data-parallel mesh)."""
  return Mesh(np.asarray(jax.devices()), (axis,))


def single_device_mesh(axis: str = "data") -> Mesh:
  """A mesh of the first device only: the unsharded layout, same code path."""
  return Mesh(np.asarray(jax.devices()[:1]), (axis,))


def bank_dtype(name: Any):
  """``'float32'`` / ``'bfloat16'`` (or a dtype) -> the bank's storage dtype."""
  if isinstance(name, str):
    if name not in _BANK_DTYPES:
      raise ValueError(f"bank dtype {name!r} is not supported; use one of {sorted(_BANK_DTYPES)}")
    return _BANK_DTYPES[name]
  dtype = jnp.dtype(name)
  if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
    raise ValueError(f"bank dtype {dtype} is not supported; use float32 or bfloat16")
  return dtype.type


def choose_scoring(batch: int, k_plus_1: int, rows_per_shard: int) -> str:
  """The cheaper scoring path: rows read by a gather (``B*(K+1)``) vs by a
  dense product with the local shard (``n_shard``); both times ``feat_dim``."""
  return "gather" if batch * k_plus_1 <= rows_per_shard else "dense"


def _is_traced(x) -> bool:
  return isinstance(x, jax.core.Tracer)


@dataclasses.dataclass(frozen=True)
class ContrastMemory:
  """Static description of one pair of memory banks; all methods are pure.

  Attributes:
    n_data: dataset size (rows that can be indexed); reference ``outputSize``.
    feat_dim: embedding size; reference ``inputSize``.
    nce_t: temperature T (stored as float32 like the reference's buffer).
    nce_m: momentum of the update.
    dtype: storage dtype of the banks (float32 default; bfloat16 optional).
      Scores and updates are computed in float32 either way.
    mesh: the mesh whose ``axis`` shards the rows; ``None`` = every device.
    axis: mesh axis name for the rows.
    scoring: ``'auto'`` | ``'gather'`` | ``'dense'`` (see the module docstring).
  """

  n_data: int
  feat_dim: int
  nce_t: float = 0.07
  nce_m: float = 0.5
  dtype: Any = jnp.float32
  mesh: Optional[Mesh] = None
  axis: str = "data"
  scoring: str = "auto"

  def __post_init__(self):
    if int(self.n_data) <= 0 or int(self.feat_dim) <= 0:
      raise ValueError(f"ContrastMemory needs n_data > 0 and feat_dim > 0, got "
                       f"n_data={self.n_data}, feat_dim={self.feat_dim}")
    if self.scoring not in SCORING_PATHS:
      raise ValueError(f"scoring {self.scoring!r} is not one of {SCORING_PATHS}")
    object.__setattr__(self, "dtype", bank_dtype(self.dtype))
    if self.mesh is None:
      object.__setattr__(self, "mesh", default_mesh(self.axis))
    if self.axis not in self.mesh.axis_names:
      raise ValueError(f"mesh axes {self.mesh.axis_names} have no {self.axis!r} axis for the bank rows")

  # ----- layout ---------------------------------------------------------------
  @property
  def num_shards(self) -> int:
    return int(self.mesh.shape[self.axis])

  @property
  def rows_per_shard(self) -> int:
    return -(-int(self.n_data) // self.num_shards)

  @property
  def n_padded(self) -> int:
    return self.rows_per_shard * self.num_shards

  @property
  def sharding(self) -> NamedSharding:
    return NamedSharding(self.mesh, P(self.axis, None))

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  def _temperature(self) -> float:
    # The reference keeps T in a float32 buffer and reads it back with .item().
    return float(np.float32(self.nce_t))

  def _momentum(self) -> float:
    return float(np.float32(self.nce_m))

  # ----- state ----------------------------------------------------------------
  def init(self, rng: Array) -> BankState:
    """Fresh banks ``U(-stdv, stdv)``, ``stdv = 1/sqrt(feat_dim/3)``, Z unset."""
    stdv = 1.0 / math.sqrt(self.feat_dim / 3.0)

    def make(rng):
      k1, k2 = jax.random.split(rng)
      shape = (int(self.n_data), int(self.feat_dim))
      m1 = jax.random.uniform(k1, shape, jnp.float32, -stdv, stdv)
      m2 = jax.random.uniform(k2, shape, jnp.float32, -stdv, stdv)
      return self._pack(m1, m2, jnp.float32(Z_UNSET), jnp.float32(Z_UNSET))

    return jax.jit(make, out_shardings=self._state_shardings())(rng)

  def from_arrays(self, memory_v1, memory_v2, z_v1=Z_UNSET, z_v2=Z_UNSET) -> BankState:
    """A bank state from ``[n_data, feat_dim]`` arrays (e.g. a reference
    ``ContrastMemory`` state dict: ``memory_v1``, ``memory_v2``, and
    ``params[2]``, ``params[3]`` as Z), padded and sharded."""
    m1 = jnp.asarray(memory_v1, jnp.float32)
    m2 = jnp.asarray(memory_v2, jnp.float32)
    for name, m in (("memory_v1", m1), ("memory_v2", m2)):
      if m.shape != (self.n_data, self.feat_dim):
        raise ValueError(f"{name} has shape {m.shape}; this bank needs "
                         f"(n_data, feat_dim) = ({self.n_data}, {self.feat_dim})")
    fn = jax.jit(self._pack, out_shardings=self._state_shardings())
    return fn(m1, m2, jnp.float32(z_v1), jnp.float32(z_v2))

  def _pack(self, m1, m2, z1, z2) -> BankState:
    pad = self.n_padded - int(self.n_data)
    m1 = jnp.pad(m1, ((0, pad), (0, 0))).astype(self.dtype)
    m2 = jnp.pad(m2, ((0, pad), (0, 0))).astype(self.dtype)
    return {"memory_v1": m1, "memory_v2": m2,
            "z_v1": jnp.asarray(z1, jnp.float32), "z_v2": jnp.asarray(z2, jnp.float32)}

  def _state_shardings(self):
    return {"memory_v1": self.sharding, "memory_v2": self.sharding,
            "z_v1": self.replicated, "z_v2": self.replicated}

  def unpadded(self, state: BankState) -> Tuple[Array, Array]:
    """The two banks without their padding rows, ``[n_data, feat_dim]``."""
    return state["memory_v1"][: self.n_data], state["memory_v2"][: self.n_data]

  def check_state(self, state: BankState) -> None:
    """Raise ``ValueError`` if ``state`` is not a bank of this shape."""
    missing = {"memory_v1", "memory_v2", "z_v1", "z_v2"} - set(state)
    if missing:
      raise ValueError(f"bank state lacks {sorted(missing)}; it has {sorted(state)}")
    for name in ("memory_v1", "memory_v2"):
      shape = tuple(state[name].shape)
      if len(shape) != 2:
        raise ValueError(f"{name} must be 2-D [rows, feat_dim], got shape {shape}")
      if shape[1] != self.feat_dim:
        raise ValueError(f"{name} has feat_dim {shape[1]}, this bank expects {self.feat_dim}")
      if shape[0] != self.n_padded:
        raise ValueError(
            f"{name} has {shape[0]} rows; a bank for n_data={self.n_data} on {self.num_shards} "
            f"shard(s) has {self.n_padded} (a bank built for another n_data or mesh?)")

  def check_embeddings(self, v1, v2) -> None:
    for name, v in (("v1", v1), ("v2", v2)):
      if v.ndim != 2 or v.shape[1] != self.feat_dim:
        raise ValueError(f"embedding {name} has shape {tuple(v.shape)}; the bank expects "
                         f"[batch, feat_dim={self.feat_dim}]")
    if v1.shape[0] != v2.shape[0]:
      raise ValueError(f"v1 and v2 batch sizes differ: {v1.shape[0]} vs {v2.shape[0]}")

  def check_indices(self, index, contrast_idx, mask=None) -> None:
    """Raise ``ValueError`` for indices outside ``[0, n_data)`` (concrete
    arrays only; under a trace see ``bad_rows``)."""
    b = contrast_idx.shape[0]
    if index.shape != (b,):
      raise ValueError(f"index has shape {tuple(index.shape)}, expected [{b}] (one per example)")
    if _is_traced(index) or _is_traced(contrast_idx) or (mask is not None and _is_traced(mask)):
      return
    keep = np.ones(b, bool) if mask is None else np.asarray(mask, bool)
    idx = np.asarray(index)[keep]
    cidx = np.asarray(contrast_idx)[keep]
    for name, a in (("index", idx), ("contrast_idx", cidx)):
      if a.size and (a.min() < 0 or a.max() >= self.n_data):
        raise ValueError(f"{name} has values in [{a.min()}, {a.max()}], outside "
                         f"[0, n_data={self.n_data})")

  def bad_rows(self, index, contrast_idx) -> Array:
    """``[B]`` bool: the example's index or one of its contrast indices is out of range."""
    n = self.n_data
    bad_c = jnp.any((contrast_idx < 0) | (contrast_idx >= n), axis=1)
    return bad_c | (index < 0) | (index >= n)

  # ----- scoring --------------------------------------------------------------
  def resolve_scoring(self, batch: int, k_plus_1: int) -> str:
    if self.scoring != "auto":
      return self.scoring
    return choose_scoring(batch, k_plus_1, self.rows_per_shard)

  def dot_scores(self, state: BankState, v1: Array, v2: Array, contrast_idx: Array,
                 path: Optional[str] = None) -> Tuple[Array, Array]:
    """Raw cross-paired dot products, ``[B, K+1]`` each, float32:
    ``s1 = <memory_v2[cidx], v1>`` (student side), ``s2 = <memory_v1[cidx], v2>``.
    Differentiable in ``v1``/``v2``; the banks are constants."""
    b, k1 = contrast_idx.shape
    path = path or self.resolve_scoring(b, k1)
    if path not in ("gather", "dense"):
      raise ValueError(f"scoring path {path!r} is not 'gather' or 'dense'")
    ns, axis = self.rows_per_shard, self.axis
    hi = jax.lax.Precision.HIGHEST

    def local(mem_v1, mem_v2, v1, v2, cidx):
      start = jax.lax.axis_index(axis) * ns
      loc = cidx - start
      own = (loc >= 0) & (loc < ns)
      loc = jnp.where(own, loc, 0)
      mem_v1 = jax.lax.stop_gradient(mem_v1).astype(jnp.float32)
      mem_v2 = jax.lax.stop_gradient(mem_v2).astype(jnp.float32)
      if path == "gather":
        s1 = jnp.einsum("bkd,bd->bk", mem_v2[loc], v1, precision=hi)
        s2 = jnp.einsum("bkd,bd->bk", mem_v1[loc], v2, precision=hi)
      else:
        d1 = jnp.einsum("nd,bd->bn", mem_v2, v1, precision=hi)  # [B, n_shard]
        d2 = jnp.einsum("nd,bd->bn", mem_v1, v2, precision=hi)
        s1 = jnp.take_along_axis(d1, loc, axis=1)
        s2 = jnp.take_along_axis(d2, loc, axis=1)
      s1 = jnp.where(own, s1, 0.0)
      s2 = jnp.where(own, s2, 0.0)
      return jax.lax.psum(s1, axis), jax.lax.psum(s2, axis)

    fn = shard_map(local, self.mesh,
                   in_specs=(P(axis, None), P(axis, None), P(), P(), P()),
                   out_specs=(P(), P()))
    return fn(state["memory_v1"], state["memory_v2"], v1.astype(jnp.float32),
              v2.astype(jnp.float32), contrast_idx.astype(jnp.int32))

  def scores(self, state: BankState, v1: Array, v2: Array, contrast_idx: Array,
             mask: Optional[Array] = None, path: Optional[str] = None
             ) -> Tuple[Array, Array, Array, Array]:
    """``(out_v1, out_v2, z_v1, z_v2)``: the reference's normalised scores
    ``exp(s / T) / Z`` (``[B, K+1]``) and the Z in effect (set from this
    batch when still unset: ``mean(exp(s / T)) * n_data`` over the valid
    examples of ``mask``). Z carries no gradient."""
    self.check_state(state)
    self.check_embeddings(v1, v2)
    t = self._temperature()
    s1, s2 = self.dot_scores(state, v1, v2, contrast_idx, path)
    e1 = jnp.exp(s1 / t)
    e2 = jnp.exp(s2 / t)
    z_v1 = _fixed_z(state["z_v1"], e1, mask, self.n_data)
    z_v2 = _fixed_z(state["z_v2"], e2, mask, self.n_data)
    return e1 / z_v1, e2 / z_v2, z_v1, z_v2

  # ----- update ---------------------------------------------------------------
  def update(self, state: BankState, v1: Array, v2: Array, index: Array,
             mask: Optional[Array] = None) -> BankState:
    """Momentum update of rows ``index`` (no gradient): memory_v1 with v1,
    memory_v2 with v2; rows of masked-out examples are left alone."""
    self.check_state(state)
    self.check_embeddings(v1, v2)
    m = self._momentum()
    ns, axis, n = self.rows_per_shard, self.axis, self.n_data
    valid = jnp.ones(index.shape, bool) if mask is None else mask.astype(bool)
    valid = valid & (index >= 0) & (index < n)

    def local(mem, v, index, valid):
      start = jax.lax.axis_index(axis) * ns
      loc = index - start
      own = valid & (loc >= 0) & (loc < ns)
      rows = mem[jnp.where(own, loc, 0)].astype(jnp.float32)
      new = rows * m + v * (1.0 - m)
      # The reference renormalises without eps: x / sqrt(sum(x^2)).
      new = new / jnp.sqrt(jnp.sum(new * new, axis=1, keepdims=True))
      return mem.at[jnp.where(own, loc, ns)].set(new.astype(mem.dtype), mode="drop")

    fn = shard_map(local, self.mesh, in_specs=(P(axis, None), P(), P(), P()),
                   out_specs=P(axis, None))
    v1 = jax.lax.stop_gradient(v1).astype(jnp.float32)
    v2 = jax.lax.stop_gradient(v2).astype(jnp.float32)
    index = index.astype(jnp.int32)
    return dict(state,
                memory_v1=fn(state["memory_v1"], v1, index, valid),
                memory_v2=fn(state["memory_v2"], v2, index, valid))

  def __call__(self, state: BankState, v1: Array, v2: Array, index: Array,
               contrast_idx: Array, mask: Optional[Array] = None, update: bool = True,
               path: Optional[str] = None) -> Tuple[Array, Array, BankState]:
    """The reference's ``ContrastMemory.forward``: ``(out_v1, out_v2,
    new_state)``; scores from the old banks, then (``update``) Z fixed and
    rows ``index`` updated."""
    out_v1, out_v2, z_v1, z_v2 = self.scores(state, v1, v2, contrast_idx, mask, path)
    if not update:
      return out_v1, out_v2, state
    new_state = self.update(state, v1, v2, index, mask)
    new_state["z_v1"] = z_v1
    new_state["z_v2"] = z_v2
    return out_v1, out_v2, new_state


def _fixed_z(z_old: Array, e: Array, mask: Optional[Array], n_data: int) -> Array:
  """Z_old when set, else ``mean(e) * n_data`` (valid rows only); no gradient."""
  e = jax.lax.stop_gradient(e)
  if mask is None:
    mean = jnp.mean(e)
    have = True
  else:
    w = mask.astype(jnp.float32)[:, None]
    count = jnp.sum(w) * e.shape[1]
    mean = jnp.sum(e * w) / jnp.maximum(count, 1.0)
    have = count > 0
  z_new = (mean * jnp.float32(n_data)).astype(jnp.float32)
  return jnp.where((z_old < 0) & have, z_new, z_old).astype(jnp.float32)
