"""On-device CRD negative sampling (``cktf_jax/contrast/sampling.py``) against
the semantics of the reference's ``dataset/*InstanceSample`` classes.

Statistical tests use fixed seeds and the upper 0.1% quantile of the
chi-square law as threshold (values below from ``scipy.stats.chi2.ppf(0.999,
df)``; a correct sampler fails one of them with probability ~0.1%, and never
with these seeds). Within one row a sample without replacement is a set of
dependent draws, so the pooled-slot statistic is only an upper bound check;
the per-slot and ordered-tuple tests are exact chi-square tests over
independent calls.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cktf_jax.contrast import build_sampler
from cktf_jax.contrast.sampling import next_prime

CHI2_999 = {19: 43.820, 24: 51.179, 34: 65.247, 39: 72.055, 49: 85.351}


@pytest.fixture(autouse=True, scope="module")
def _fast_compile():
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)


def draws(sampler, index, n_calls, seed=0, calls_per_state=1):
  """``[n_calls, B, K+1]``: ``n_calls / calls_per_state`` independent sampler
  states (one key each), each called ``calls_per_state`` times in a row."""
  keys = jax.random.split(jax.random.PRNGKey(seed), n_calls // calls_per_state)
  index = jnp.asarray(index)

  def consecutive(key):
    def call(state, _):
      contrast_idx, state = sampler.sample(state, index)
      return state, contrast_idx
    return jax.lax.scan(call, sampler.init_state(key), None, length=calls_per_state)[1]

  out = np.asarray(jax.jit(jax.vmap(consecutive))(keys))
  return out.reshape((-1,) + out.shape[2:])


def sample_once(sampler, key, index):
  return sampler.sample(sampler.init_state(key), jnp.asarray(index))[0]


def chi2(counts, expected):
  counts = np.asarray(counts, np.float64)
  return float(np.sum((counts - expected) ** 2 / expected))


def mixed_labels():
  """60 examples, classes of 20 / 25 / 15, in shuffled dataset order."""
  return np.random.default_rng(7).permutation(np.repeat([0, 1, 2], [20, 25, 15]))


def test_full_scale_cifar_exact():
  """n=50000, K=16384, B=64 (the reference's CIFAR-100 setting)."""
  labels = np.random.default_rng(0).permutation(np.repeat(np.arange(100), 500))
  sampler = build_sampler(nce_k=16384, labels=labels)
  assert not sampler.some_short and sampler.mode == "exact"
  index = np.random.default_rng(1).choice(50000, 64, replace=False)
  out = np.asarray(jax.jit(sample_once, static_argnums=0)(sampler, jax.random.PRNGKey(0), index))
  assert out.shape == (64, 16385) and out.dtype == np.int32
  np.testing.assert_array_equal(out[:, 0], index)              # exact: own index
  neg = out[:, 1:]
  assert neg.min() >= 0 and neg.max() < 50000
  assert not np.any(labels[neg] == labels[index][:, None])     # never the anchor's class
  srt = np.sort(neg, axis=1)
  assert np.all(srt[:, 1:] != srt[:, :-1])                     # no repeats within a row


def test_marginal_uniformity_per_slot_and_pooled():
  labels = mixed_labels()
  k = 10
  sampler = build_sampler(nce_k=k, labels=labels)
  anchors = [int(np.flatnonzero(labels == 1)[0]), int(np.flatnonzero(labels == 0)[3])]
  out = draws(sampler, anchors, 4000)
  for row, anchor in enumerate(anchors):
    comp = np.flatnonzero(labels != labels[anchor])           # 35 or 40 allowed negatives
    df = len(comp) - 1
    neg = out[:, row, 1:]
    assert np.isin(neg, comp).all()
    for slot in (0, k - 1):                                    # independent over calls: exact test
      counts = np.array([(neg[:, slot] == j).sum() for j in comp])
      stat = chi2(counts, len(neg) / len(comp))
      assert stat < CHI2_999[df], (row, slot, stat)
    pooled = np.array([(neg == j).sum() for j in comp])
    assert chi2(pooled, neg.size / len(comp)) < CHI2_999[df]
    srt = np.sort(neg, axis=1)
    assert np.all(srt[:, 1:] != srt[:, :-1])


@pytest.mark.parametrize("call", [0, 2])
def test_ordered_tuples_are_uniform(call):
  """K=2 of M=5 allowed negatives: all 20 ordered pairs equally likely, in
  batch rows 0 and 2 of a walk's first call and of its third (p=11, B=3:
  the third call is the walk's last, the fourth redraws it)."""
  labels = np.array([0, 1, 1, 0, 1, 1, 0, 1])
  sampler = build_sampler(nce_k=2, labels=labels)
  out = draws(sampler, [0, 1, 3], 20000 * 4, seed=1, calls_per_state=4)[call::4]
  comp = np.flatnonzero(labels == 1)
  pairs = [(a, b) for a in comp for b in comp if a != b]
  for row in (0, 2):
    neg = out[:, row, 1:]
    codes = neg[:, 0] * 8 + neg[:, 1]
    counts = np.array([(codes == a * 8 + b).sum() for a, b in pairs])
    assert counts.sum() == len(neg)                            # only valid, distinct pairs
    assert chi2(counts, len(neg) / 20) < CHI2_999[19], counts


def test_rows_overlap_like_independent_draws():
  """Two rows of one batch, or of consecutive calls on one walk (same class,
  M=400, K=100), share on average K^2/M = 25 negatives with the
  hypergeometric variance 14.1, as independent draws do."""
  labels = np.repeat(np.arange(3), 200)
  sampler = build_sampler(nce_k=100, labels=labels)
  out = draws(sampler, [0, 1, 2, 3], 4000, seed=2, calls_per_state=2)
  first, second = out[0::2], out[1::2]
  m, k = 400, 100
  mean = k * k / m
  var = k * (k / m) * (1 - k / m) * (m - k) / (m - 1)
  for x, y, a, b in ((first, first, 0, 1), (first, first, 1, 3), (first, second, 2, 2)):
    ov = np.array([len(np.intersect1d(o[a, 1:], q[b, 1:])) for o, q in zip(x, y)])
    assert abs(ov.mean() - mean) < 0.5, ov.mean()             # ~6 standard errors
    assert abs(ov.var() - var) < 2.5, ov.var()                 # ~5.5 standard errors


def test_relax_positive_is_uniform_in_class():
  labels = mixed_labels()
  sampler = build_sampler(nce_k=5, labels=labels, mode="relax")
  anchor = int(np.flatnonzero(labels == 1)[4])
  out = draws(sampler, [anchor], 5000, seed=3)[:, 0]
  members = np.flatnonzero(labels == 1)
  counts = np.array([(out[:, 0] == j).sum() for j in members])
  assert counts.sum() == len(out)                              # always the anchor's class
  assert chi2(counts, len(out) / 25) < CHI2_999[24]
  assert np.all(labels[out[:, 1:]] != 1)


def test_tiny_imagenet_exact_with_replacement():
  labels = np.repeat(np.arange(4), 10)
  with warnings.catch_warnings():
    warnings.simplefilter("error")                             # enough negatives: no warning
    sampler = build_sampler(nce_k=20, labels=labels, dataset="tiny_imagenet", mode="relax")
  assert sampler.mode == "exact" and sampler.replace == "always"
  index = np.arange(0, 40, 5)
  out = draws(sampler, index, 50, seed=4)
  np.testing.assert_array_equal(out[:, :, 0], np.broadcast_to(index, out.shape[:2]))
  neg = out[:, :, 1:]
  assert np.all(labels[neg] != labels[index][None, :, None])
  srt = np.sort(neg, axis=2)
  has_repeat = np.any(srt[..., 1:] == srt[..., :-1], axis=2)
  assert has_repeat.mean() > 0.9                               # P(no repeat) ~ 1e-3 per row


def test_stl10_unlabeled_all_examples_without_replacement():
  n, k = 50, 20
  sampler = build_sampler(n_data=n, nce_k=k, labels=-np.ones(n, int), dataset="stl10")
  assert sampler.negatives == "all" and sampler.tables() == {}
  out = draws(sampler, [3, 17], 3000, seed=5)
  np.testing.assert_array_equal(out[:, 0, 0], 3)
  neg = out[:, :, 1:]
  assert neg.min() >= 0 and neg.max() < n
  srt = np.sort(neg, axis=2)
  assert np.all(srt[..., 1:] != srt[..., :-1])
  rate = np.mean(np.any(neg[:, 0] == 3, axis=1))               # anchor included: P = K/n = 0.4
  assert abs(rate - k / n) < 0.04, rate
  counts = np.bincount(neg[:, 0, 0], minlength=n)
  assert chi2(counts, len(neg) / n) < CHI2_999[49]
  with pytest.raises(ValueError, match="relax mode is impossible on stl10"):
    build_sampler(n_data=n, nce_k=k, dataset="stl10", mode="relax")


def test_too_few_negatives_warns_once_and_replaces():
  labels = np.repeat([0, 1], [5, 25])                          # class 1 anchors: only 5 negatives
  with pytest.warns(UserWarning, match="WITH replacement") as record:
    sampler = build_sampler(nce_k=10, labels=labels)
  assert len(record) == 1 and sampler.some_short and not sampler.all_short
  out = draws(sampler, [0, 29], 20, seed=6)
  short = out[:, 1, 1:]                                        # anchor 29 (class 1)
  assert np.all(labels[short] == 0)
  ok = out[:, 0, 1:]                                           # anchor 0 (class 0): 25 >= 10
  assert np.all(labels[ok] == 1)
  srt = np.sort(ok, axis=1)
  assert np.all(srt[:, 1:] != srt[:, :-1])


def test_sharded_batch_gives_same_negatives():
  labels = mixed_labels()
  sampler = build_sampler(nce_k=10, labels=labels)
  mesh = Mesh(np.asarray(jax.devices()[:4]), ("data",))
  index = jnp.arange(0, 48, 6, dtype=jnp.int32)
  state = sampler.init_state(jax.random.PRNGKey(9))
  fn = jax.jit(sampler.sample)
  plain, _ = fn(state, index)
  sharded, _ = fn(jax.device_put(state, NamedSharding(mesh, P())),
                  jax.device_put(index, NamedSharding(mesh, P("data"))))
  np.testing.assert_array_equal(np.asarray(plain), np.asarray(sharded))


def test_rows_are_the_first_good_values_of_their_walk():
  """Against a brute-force reading of the state's walk, over 30 calls (p=61,
  B=8: seven calls per walk, so four redraws): row r of a walk holds, as a
  set, the first K values < M_b of ``outer[(inner + r) % p]``, mapped onto the
  anchor's negatives; the cursor counts the walk's rows."""
  labels = mixed_labels()                                      # M_b = 40 / 35 / 45, K = 30
  sampler = build_sampler(nce_k=30, labels=labels)
  p, index = sampler.walk_length, np.arange(0, 60, 7)[:8]
  state = sampler.init_state(jax.random.PRNGKey(13))
  fn = jax.jit(sampler.sample)
  for call in range(30):
    cursor = int(state["cursor"])
    cidx, state = fn(state, jnp.asarray(index))
    walk = {name: np.asarray(a) for name, a in state["walk"].items()}
    order = np.argsort(labels, kind="stable")                  # the sampler's sorted_idx
    if int(state["cursor"]) == len(index):
      cursor = 0                                               # this call drew a new walk
    assert int(state["cursor"]) == cursor + len(index), call
    for b, anchor in enumerate(index):
      values = walk["outer"][(walk["inner"] + cursor + b) % p]
      negatives = np.flatnonzero(labels != labels[anchor])
      first_good = values[values < len(negatives)][:30]
      outside_block = np.flatnonzero(np.isin(order, negatives))  # value q -> q-th of these
      assert set(np.asarray(cidx)[b, 1:]) == set(order[outside_block[first_good]]), (call, b)


def test_bad_configuration_raises():
  labels = mixed_labels()
  with pytest.raises(ValueError, match="unknown dataset 'svhn'"):
    build_sampler(nce_k=4, labels=labels, dataset="svhn")
  with pytest.raises(ValueError, match="mode 'loose'"):
    build_sampler(nce_k=4, labels=labels, mode="loose")
  with pytest.raises(ValueError, match="needs the training labels"):
    build_sampler(n_data=60, nce_k=4)
  with pytest.raises(ValueError, match="labels has 60 entries but n_data = 61"):
    build_sampler(n_data=61, nce_k=4, labels=labels)
  with pytest.raises(ValueError, match="same label"):
    build_sampler(nce_k=4, labels=np.zeros(10, int))
  with pytest.raises(ValueError, match="need negatives='all'"):
    build_sampler(nce_k=4, labels=-np.ones(10, int))
  assert next_prime(50000) == 50021 and next_prime(7) == 7 and next_prime(1) == 2
