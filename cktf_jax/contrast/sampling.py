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
block: position ``p in [0, M_c)`` maps to ``p`` if ``p < start_c`` else
``p + count_c``, a bijection onto the complement. So it suffices to draw K
distinct uniform values of ``[0, M_c)`` per example:

1. per call, two uniformly random permutations ``pi1``, ``pi2`` of
   ``[0, p)``, ``p`` the smallest prime ``>= n`` (two sorts of ``p`` keys,
   shared by the whole batch);
2. batch row ``b`` walks ``sigma_b(i) = pi1[(pi2[i] + b) mod p]`` for
   ``i = 0..p-1`` and keeps, in walk order, the first K values ``< M_b`` (a
   cumulative sum and a scatter: ``O(p)`` per row, no per-row sort). Without
   classes (stl10) ``M_b = n``.

Why each row is exactly a uniform draw without replacement: ``sigma_b = pi1 o
shift_b o pi2`` is a uniformly distributed permutation of ``[0, p)`` because
``pi1`` is uniform and independent of ``shift_b o pi2``. The values ``< M_b``
of a uniform permutation, read in order, form a uniform permutation of ``[0,
M_b)`` (every relative order of those values is equally likely), so its first
K entries are a uniformly random ordered K-subset of ``[0, M_b)`` -- the law of
``numpy.random.choice(cls_negative[c], K, replace=False)``. Distinct walk
positions give distinct values: no repeats.

Rows of one batch are not independent: ``sigma_b = sigma_0 o c^b`` with ``c =
pi2^-1 o shift_1 o pi2`` a uniformly random p-cycle. Because ``p`` is prime,
every pair of rows relates through a power ``c^j`` (``0 < j < p``) that is
itself a single p-cycle, i.e. every pair of rows has the same joint law; no
two rows coincide and no pair is related by a short cycle (a shift modulo a
composite ``n`` would relate some pairs by involutions and inflate their
overlap). The tests check, per row, marginal and ordered-tuple uniformity with
chi-square tests, and that the overlap of two rows has the mean and variance of
independent draws. Cost for n=50000 (p=50021), K=16384, B=64: two sorts of p
keys plus ``B*p = 3.2M`` gathers/compares/cumsum elements per step.

With replacement: ``randint(0, M_b)`` per slot, mapped through the same
bijection. Positives in relax mode: ``sorted_idx[start_c + randint(0,
count_c)]``.

The tables are data (device arrays, replicated), the rest is static: a
``NegativeSampler`` plus ``tables = sampler.tables()``; ``sampler.sample(key,
tables, index)`` is pure and jit-able.
"""

import dataclasses
import warnings
from typing import Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Tables = Dict[str, Array]

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
  """

  n_data: int
  nce_k: int = DEFAULT_NCE_K
  mode: str = "exact"
  negatives: str = "other_classes"
  replace: str = "auto"
  some_short: bool = False
  all_short: bool = False
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

  def sample(self, key: Array, tables: Tables, index: Array) -> Array:
    """``contrast_idx`` ``[B, K+1]`` int32 for the examples ``index`` ``[B]``."""
    index = jnp.asarray(index).astype(jnp.int32)
    if index.ndim != 1:
      raise ValueError(f"index must be [B], got shape {tuple(index.shape)}")
    b, k, n = index.shape[0], int(self.nce_k), int(self.n_data)
    k_pos, k_p1, k_p2, k_rep = jax.random.split(key, 4)
    classed = self.negatives == "other_classes"
    if classed:
      start = tables["block_start"][index]
      count = tables["block_count"][index]
      avail = n - count  # M_b: negatives available to each anchor
    else:
      start = count = jnp.zeros((b,), jnp.int32)
      avail = jnp.full((b,), n, jnp.int32)

    if self.mode == "exact":
      positive = index
    else:
      offset = jax.random.randint(k_pos, (b,), 0, jnp.maximum(count, 1))
      positive = tables["sorted_idx"][start + offset]

    pos = None
    if not self.uses_replacement_only:
      pos = _distinct_positions(k_p1, k_p2, avail, b, k, n)
    if self.uses_replacement_only or self.some_short:
      rep = jax.random.randint(k_rep, (b, k), 0, avail[:, None])
      if pos is None:
        pos = rep
      else:
        pos = jnp.where((avail < k)[:, None], rep, pos)
    if classed:
      q = jnp.where(pos < start[:, None], pos, pos + count[:, None])
      negatives = tables["sorted_idx"][q]
    else:
      negatives = pos
    return jnp.concatenate([positive[:, None], negatives.astype(jnp.int32)], axis=1)


def next_prime(n: int) -> int:
  """The smallest prime >= max(n, 2)."""
  c = max(int(n), 2)
  while True:
    if all(c % d for d in range(2, int(c ** 0.5) + 1)):
      return c
    c += 1


def _distinct_positions(k_p1, k_p2, avail: Array, b: int, k: int, n: int):
  """Per row ``b``, the first K values ``< avail[b]`` of the walk
  ``pi1[(pi2[i] + b) % p]``, ``i = 0..p-1``, with ``p`` the smallest prime
  ``>= n`` and ``pi1``, ``pi2`` uniform permutations of ``[0, p)``. Rows
  with fewer than K qualifying values are left partly 0 (callers switch them
  to replacement)."""
  p = next_prime(n)
  if b > p:
    raise ValueError(f"CRD sampling: batch {b} exceeds the walk length {p} (> n_data)")
  pi1 = jax.random.permutation(k_p1, p).astype(jnp.int32)
  pi2 = jax.random.permutation(k_p2, p).astype(jnp.int32)
  rows = jnp.arange(b, dtype=jnp.int32)[:, None]
  walk = pi1[(pi2[None, :] + rows) % p]                  # [B, p]
  keep = walk < avail[:, None]
  rank = jnp.cumsum(keep.astype(jnp.int32), axis=1) - 1
  slot = jnp.where(keep & (rank < k), rank, k)           # k = out of bounds: dropped

  def one(slot_row, walk_row):
    return jnp.zeros((k,), jnp.int32).at[slot_row].set(walk_row, mode="drop")

  return jax.vmap(one)(slot, walk)


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
                         _labels=labels)
