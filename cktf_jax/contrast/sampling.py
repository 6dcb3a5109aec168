"""On-device CRD negative sampling with the reference datasets' semantics.

Every training example ``b`` gets a row ``contrast_idx[b] = [positive,
negative_1 .. negative_K]`` of dataset indices, as the reference's
``*InstanceSample`` datasets draw it with ``numpy.random`` at load time:

=================  ==========================  ====================================================
dataset            positive (column 0)         negatives
=================  ==========================  ====================================================
cifar100 exact     the example's own index     K of the OTHER classes' examples, without replacement
                                               (with replacement only if that class has fewer than
                                               K negatives; a warning is issued once, at build time)
cifar100 relax     a uniform example of the    as above
                   anchor's class (may be the
                   anchor itself)
tiny_imagenet,     own index (always exact:    K of the other classes' examples WITH replacement
imagenet           ``--mode`` is not passed)
stl10 unlabeled    own index                   K of ALL examples (anchor included) without
                                               replacement (all labels are -1; relax would raise)
=================  ==========================  ====================================================

(``dataset/cifar100.py: CIFAR100InstanceSample``, ``dataset/imagenet.py:
ImageFolderSample``, ``dataset/stl10.py: STL10InstanceSample``.)

Method, no sort per example. The examples are laid out class by class in a
host-built table ``sorted_idx`` (a stable argsort of the labels); class ``c``
occupies positions ``[start_c, start_c + count_c)``. The negatives of an
anchor of class ``c`` are then the ``M_c = n - count_c`` positions outside that
block: position ``q in [0, M_c)`` maps to ``q`` if ``q < start_c`` else
``q + count_c``, a bijection onto the complement. So it suffices to draw K
distinct uniform values of ``[0, M_c)`` per example (without classes, stl10,
``M = n``):

1. a *walk*: two uniformly random permutations ``pi1``, ``pi2`` of ``[0,
   p)``, ``p`` the smallest prime ``>= n``, kept in the sampler state and
   shared by ``floor(p / B)`` consecutive calls (then redrawn, inside the
   step, by a ``lax.cond``);
2. the r-th row drawn from a walk (``r = 0 .. p-1``, counted across calls by
   the state's ``cursor``) reads ``sigma_r(i) = pi1[(pi2[i] + r) mod p]`` at
   ``i < K``. Entries ``>= M_b`` are "bad"; only the ``E = p - min_c M_c``
   values ``>= min_c M_c`` can be (min over the classes with ``M_c >= K``;
   521 for CIFAR-100), and their walk positions come from ``pi1^-1``,
   ``pi2^-1`` (``[B, E]`` work). Each bad entry at ``i < K`` is replaced by
   one of the first good entries after position K, so the row is, as a set,
   the first K good values of ``sigma_r``.

Why each row is exactly a uniform draw without replacement: ``sigma_r = pi1 o
shift_r o pi2`` is a uniformly distributed permutation of ``[0, p)`` because
``pi1`` is uniform and independent of ``shift_r o pi2``. Given the bad part
of a uniform permutation (where the bad values are and which), its good values
read in walk order ``u_0, u_1, ..`` are a uniform permutation of ``[0, M_b)``.
The row is ``(u_phi(0), .., u_phi(K-1))`` with ``phi`` a bijection of ``[0,
K)`` fixed by the bad part alone (good slot: its own ordinal; the bad slots
take the ordinals ``K - d .. K-1`` in the order of their values), and
rearranging a uniformly random ordered K-subset by an independent bijection
leaves it one: the law of ``numpy.random.choice(cls_negative[c], K,
replace=False)``. Distinct walk positions give distinct values: no repeats.

Rows of one walk are not independent: ``sigma_s = sigma_r o c^(s-r)`` with
``c = pi2^-1 o shift_1 o pi2`` a uniformly random p-cycle. Because ``p`` is
prime, every power ``c^j`` (``0 < j < p``) is itself a single p-cycle, so
every pair of rows of a walk -- in one batch or in two calls -- has the same
joint law; no two rows coincide and no pair is related by a short cycle (a
shift modulo a composite ``n`` would relate some pairs by involutions and
inflate their overlap). Rows of different walks are independent. The tests
check, per row, marginal and ordered-tuple uniformity with chi-square tests,
and that the overlap of two rows (same call and consecutive calls) has the
mean and variance of independent draws. Cost for n=50000 (p=50021), K=16384,
B=64: ``B*K = 1M`` two-level gathers and ``[B, E]`` bookkeeping per call; the
two permutations (sorts of p keys) once per 781 calls.

With replacement: ``randint(0, M_b)`` per slot, mapped through the same
bijection. Positives in relax mode: ``sorted_idx[start_c + randint(0,
count_c)]``.

The state is data (device arrays, replicated), the rest is static: a
``NegativeSampler`` plus ``state = sampler.init_state(key)``;
``contrast_idx, state = sampler.sample(state, index)`` is pure and jit-able.
"""

import dataclasses
import warnings
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Tables = Dict[str, Array]
State = Dict[str, Any]

MODES = ("exact", "relax")
NEGATIVES = ("other_classes", "all")
REPLACE = ("auto", "always")
# dataset name -> (negatives, replace, relax allowed)
DATASET_POLICIES = {
    "cifar100": ("other_classes", "auto", True),
    "cifar10": ("other_classes", "auto", True),
    "tiny_imagenet": ("other_classes", "always", False),
    "imagenet": ("other_classes", "always", False),
    "stl10": ("all", "auto", False),
    # Not in the reference: the quick start's and the tests' data sets, sampled
    # as CIFAR-100 is.
    "digits": ("other_classes", "auto", True),
    "synthetic": ("other_classes", "auto", True),
}
DEFAULT_NCE_K = 16384


@dataclasses.dataclass(frozen=True)
class NegativeSampler:
  """Static sampling policy; build it with ``build_sampler``.

  Attributes:
    n_data: number of dataset examples (indices ``[0, n_data)``).
    nce_k: negatives per example K.
    mode: ``'exact'`` (positive = own index) or ``'relax'`` (a random example
      of the anchor's class).
    negatives: ``'other_classes'`` (the anchor's whole class excluded) or
      ``'all'`` (every example, anchor included).
    replace: ``'auto'`` (with replacement only for anchors whose class has
      fewer than K negatives, like the reference's ``replace = k > len(...)``)
      or ``'always'``.
    some_short / all_short: whether some / every anchor class has fewer than
      K negatives (from the labels, on the host): selects the code paths.
    min_avail: the fewest negatives of a class with at least K of them (the
      walk's values ``>= min_avail`` are the candidate bad entries; 0 makes
      every value a candidate: correct, slower).
  """

  n_data: int
  nce_k: int = DEFAULT_NCE_K
  mode: str = "exact"
  negatives: str = "other_classes"
  replace: str = "auto"
  some_short: bool = False
  all_short: bool = False
  min_avail: int = 0
  _labels: Optional[np.ndarray] = dataclasses.field(default=None, repr=False, compare=False,
                                                    hash=False)

  @property
  def uses_replacement_only(self) -> bool:
    return self.replace == "always" or self.all_short

  def tables(self) -> Tables:
    """Device arrays the sampler reads (``int32``, replicated): ``sorted_idx``
    ``[n]`` (indices grouped by class) and, per example, the ``block_start``
    / ``block_count`` of its class in ``sorted_idx``. Empty for 'all'."""
    if self.negatives == "all":
      return {}
    labels = self._labels
    order = np.argsort(labels, kind="stable").astype(np.int32)
    classes, first, counts = np.unique(labels[order], return_index=True, return_counts=True)
    where = np.searchsorted(classes, labels)
    return {"sorted_idx": jnp.asarray(order, jnp.int32),
            "block_start": jnp.asarray(first[where], jnp.int32),
            "block_count": jnp.asarray(counts[where], jnp.int32)}

  @property
  def walk_length(self) -> int:
    """``p``: the smallest prime ``>= n_data``."""
    return next_prime(self.n_data)

  def init_state(self, key: Array) -> State:
    """``tables()`` plus the call key, the first walk and its cursor (rows
    of that walk used so far); replicate it, ``sample`` advances it."""
    key, k_walk = jax.random.split(key)
    state = dict(self.tables(), key=raw_key(key))
    if not self.uses_replacement_only:
      state.update(walk=self._draw_walk(k_walk), cursor=jnp.zeros((), jnp.int32))
    return state

  def _draw_walk(self, key: Array) -> Tables:
    """Uniform permutations ``outer`` (``pi1``) and ``inner`` (``pi2``) of
    ``[0, p)``, with ``inner_inv`` (``pi2^-1``) and ``outer_inv_bad``
    (``pi1^-1`` at the candidate bad values ``[min_avail, p)``)."""
    p = self.walk_length
    k_outer, k_inner = jax.random.split(key)
    outer = jax.random.permutation(k_outer, p).astype(jnp.int32)
    inner = jax.random.permutation(k_inner, p).astype(jnp.int32)
    iota = jnp.arange(p, dtype=jnp.int32)
    outer_inv = jnp.zeros((p,), jnp.int32).at[outer].set(iota)
    return {"outer": outer, "inner": inner,
            "inner_inv": jnp.zeros((p,), jnp.int32).at[inner].set(iota),
            "outer_inv_bad": outer_inv[min(self.min_avail, p):]}

  def sample(self, state: State, index: Array):
    """``(contrast_idx [B, K+1] int32, new_state)`` for the examples ``index`` ``[B]``."""
    index = jnp.asarray(index).astype(jnp.int32)
    if index.ndim != 1:
      raise ValueError(f"index must be [B], got shape {tuple(index.shape)}")
    b, k, n = index.shape[0], int(self.nce_k), int(self.n_data)
    key, k_pos, k_rep, k_walk = jax.random.split(state["key"], 4)
    new_state = dict(state, key=key)
    classed = self.negatives == "other_classes"
    if classed:
      start = state["block_start"][index]
      count = state["block_count"][index]
      avail = n - count  # M_b: negatives available to each anchor
    else:
      start = count = jnp.zeros((b,), jnp.int32)
      avail = jnp.full((b,), n, jnp.int32)

    if self.mode == "exact":
      positive = index
    else:
      offset = jax.random.randint(k_pos, (b,), 0, jnp.maximum(count, 1))
      positive = state["sorted_idx"][start + offset]

    pos = None
    if not self.uses_replacement_only:
      p = self.walk_length
      if b > p:
        raise ValueError(f"CRD sampling: batch {b} exceeds the walk length {p} (> n_data)")
      walk, cursor = jax.lax.cond(
          state["cursor"] + b > p,
          lambda: (self._draw_walk(k_walk), jnp.zeros((), jnp.int32)),
          lambda: (state["walk"], state["cursor"]))
      new_state.update(walk=walk, cursor=cursor + b)
      pos = _distinct_positions(walk, cursor + jnp.arange(b, dtype=jnp.int32), avail, k)
    if self.uses_replacement_only or self.some_short:
      rep = jax.random.randint(k_rep, (b, k), 0, avail[:, None])
      if pos is None:
        pos = rep
      else:
        pos = jnp.where((avail < k)[:, None], rep, pos)
    if classed:
      q = jnp.where(pos < start[:, None], pos, pos + count[:, None])
      negatives = state["sorted_idx"][q]
    else:
      negatives = pos
    contrast_idx = jnp.concatenate([positive[:, None], negatives.astype(jnp.int32)], axis=1)
    return contrast_idx, new_state


def raw_key(key: Array) -> Array:
  """The ``uint32`` data of a key (typed keys unwrapped), as the aux state stores keys."""
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(key)
  return key


def next_prime(n: int) -> int:
  """The smallest prime >= max(n, 2)."""
  c = max(int(n), 2)
  while True:
    if all(c % d for d in range(2, int(c ** 0.5) + 1)):
      return c
    c += 1


def _distinct_positions(walk: Tables, rows: Array, avail: Array, k: int) -> Array:
  """``[B, K]``: row ``b`` holds the first K values ``< avail[b]`` of the
  walk ``sigma_r(i) = outer[(inner[i] + r) % p]``, ``r = rows[b]``: the
  walk's first K entries with each bad one (``>= avail[b]``) replaced by one
  of the first good entries after position K (see the module docstring).
  Rows with fewer than K good values come out wrong (callers switch them to
  replacement)."""
  outer, inner = walk["outer"], walk["inner"]
  p = outer.shape[0]
  shift = rows[:, None]

  def values_at(i):   # inner + shift < 2p: one conditional subtraction, not an integer modulo
    x = inner[i] + shift
    return outer[jnp.where(x >= p, x - p, x)]

  head = values_at(jnp.arange(k, dtype=jnp.int32)[None, :])        # [B, K]
  e = walk["outer_inv_bad"].shape[0]
  if e == 0:
    return head
  # Where row b meets each candidate bad value v in [p - e, p): pi2^-1[pi1^-1[v] - r].
  at = walk["outer_inv_bad"][None, :] - shift                            # [B, E], > -p
  at = walk["inner_inv"][jnp.where(at < 0, at + p, at)]
  bad = jnp.arange(p - e, p, dtype=jnp.int32)[None, :] >= avail[:, None]
  in_head = bad & (at < k)
  # The good positions of the window [K, K + L) in order; the window holds at
  # least as many good entries as the head has bad ones (<= E bad overall).
  window = max(1, min(e, p - k))
  row_ids = jnp.arange(rows.shape[0])[:, None]
  in_window = bad & (at >= k) & (at < k + window)
  bad_in_window = jnp.zeros((rows.shape[0], window), bool).at[
      row_ids, jnp.where(in_window, at - k, window)].set(True, mode="drop")
  good_rank = jnp.cumsum(~bad_in_window, axis=1) - 1
  sources = jnp.zeros((rows.shape[0], window), jnp.int32).at[
      row_ids, jnp.where(bad_in_window, window, good_rank)].set(
          k + jnp.arange(window, dtype=jnp.int32)[None, :], mode="drop")
  ordinal = jnp.clip(jnp.cumsum(in_head, axis=1) - 1, 0, window - 1)  # t-th bad head entry
  replacement = values_at(jnp.take_along_axis(sources, ordinal, axis=1))
  return head.at[row_ids, jnp.where(in_head, at, k)].set(replacement, mode="drop")


def build_sampler(n_data: Optional[int] = None, nce_k: int = DEFAULT_NCE_K,
                  mode: str = "exact", labels=None, dataset: str = "cifar100",
                  negatives: Optional[str] = None, replace: Optional[str] = None
                  ) -> NegativeSampler:
  """The sampler for a dataset (see the module docstring's table).

  Args:
    n_data: dataset size; defaults to ``len(labels)``.
    nce_k: negatives per example.
    mode: ``'exact'`` or ``'relax'`` (cifar only; tiny-imagenet/imagenet use
      exact whatever is asked, as the reference does; stl10 relax raises).
    labels: host array ``[n_data]`` of the training labels (needed unless the
      policy's negatives are 'all'). Labels < 0 mean "unlabeled".
    dataset: a key of ``DATASET_POLICIES``.
    negatives / replace: override the dataset's policy.

  Raises ValueError on unknown names, missing/mis-sized labels, or relax
  where the reference cannot sample it. Warns once when some class has fewer
  than K negatives (those anchors sample with replacement).
  """
  if dataset not in DATASET_POLICIES:
    raise ValueError(f"unknown dataset {dataset!r} for CRD sampling; known: {sorted(DATASET_POLICIES)}")
  pol_neg, pol_rep, relax_ok = DATASET_POLICIES[dataset]
  negatives = negatives or pol_neg
  replace = replace or pol_rep
  if negatives not in NEGATIVES:
    raise ValueError(f"negatives {negatives!r} is not one of {NEGATIVES}")
  if replace not in REPLACE:
    raise ValueError(f"replace {replace!r} is not one of {REPLACE}")
  if mode not in MODES:
    raise ValueError(f"CRD sampling mode {mode!r} is not one of {MODES}")
  if mode == "relax" and not relax_ok:
    if dataset == "stl10":
      raise ValueError("relax mode is impossible on stl10 unlabeled: every label is -1, so the "
                       "anchor's class is empty (the reference raises too); use mode='exact'")
    mode = "exact"  # dataset/imagenet.py: ImageFolderSample ignores --mode
  if labels is not None:
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    if n_data is None:
      n_data = labels.shape[0]
    if labels.shape[0] != n_data:
      raise ValueError(f"labels has {labels.shape[0]} entries but n_data = {n_data}")
  if n_data is None or int(n_data) <= 0:
    raise ValueError("CRD sampling needs n_data > 0 (or the labels array)")
  n_data, nce_k = int(n_data), int(nce_k)
  if nce_k <= 0:
    raise ValueError(f"nce_k must be positive, got {nce_k}")

  if negatives == "all":
    avail = np.array([n_data])
    labels = None
  else:
    if labels is None:
      raise ValueError(f"class-aware CRD sampling ({dataset}) needs the training labels "
                       "(hparams['labels'], an [n_data] array)")
    if labels.min() < 0:
      raise ValueError("labels < 0 (unlabeled examples) need negatives='all' (the stl10 policy)")
    _, counts = np.unique(labels, return_counts=True)
    avail = n_data - counts  # per class
    if avail.min() == 0:
      raise ValueError("CRD sampling: every example has the same label, so an anchor has no "
                       "negatives of another class")
  short = avail < nce_k
  some_short, all_short = bool(short.any()), bool(short.all())
  if some_short and replace == "auto":
    warnings.warn(
        f"CRD sampling: nce_k={nce_k} exceeds the negatives available to "
        f"{int(short.sum())} of {short.size} class(es) (min {int(avail.min())}); those anchors "
        "draw their negatives WITH replacement (as the reference's replace=k > len(...))",
        UserWarning, stacklevel=2)
  return NegativeSampler(n_data=n_data, nce_k=nce_k, mode=mode, negatives=negatives,
                         replace=replace, some_short=some_short, all_short=all_short,
                         min_avail=0 if all_short else int(avail[~short].min()),
                         _labels=labels)
