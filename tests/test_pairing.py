"""CKTF layer pairing (``cktf_jax.contrast.pairing``) against the reference.

* ``distiller_zoo/ST.py: SimilarityTransfer`` for Last/Smallest/Largest/First on
  ``st_ResNet.npz`` (AdaptiveAvgPool) and ``st_wrn_padded.npz`` (8x8 pool,
  channel zero-padding): pairs, selected blocks, similarities, and the
  gradient of the fixture's probe w.r.t. the student blocks, all under jit;
* the pairs stored by the ``crdst_*.npz`` combined-objective fixtures and the
  CRD head sizes their ``init.crd.<j>`` embeds were built with;
* the stem pooling against the models' ``flatGroupOut`` features (``model_*.npz``);
* Random's invariants and the bad-input errors.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cktf_jax.contrast import pairing
from cktf_jax.contrast.pairing import PoolKind
from cktf_jax.models.features import Features
from parity_utils import assert_close, load_fixture, nchw_to_nhwc

# MANIFEST: losses rtol 1e-5 / atol 1e-6; gradients rtol 1e-4 / atol 1e-6.
RTOL, ATOL = 1e-5, 1e-6
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-6
METHODS = ("Last", "Smallest", "Largest", "First")
ST_FIXTURES = ("st_ResNet.npz", "st_wrn_padded.npz")


def _blocks(fx: dict, side: str):
  """``in.block_out_<side>.<stage>.<block>`` as per-stage tuples of NHWC arrays."""
  prefix = f"in.block_out_{side}."
  index = sorted(tuple(int(p) for p in k[len(prefix):].split("."))
                 for k in fx if k.startswith(prefix))
  stages = []
  for stage, block in index:
    if stage == len(stages):
      stages.append([])
    assert block == len(stages[stage])
    stages[stage].append(jnp.asarray(nchw_to_nhwc(fx[f"{prefix}{stage}.{block}"])))
  return tuple(tuple(s) for s in stages)


@functools.lru_cache(maxsize=None)
def _fixture(name):
  fx = load_fixture(name)
  return fx, _blocks(fx, "s"), _blocks(fx, "t"), pairing.pool_kind_for_model(str(fx["hp.model_s"]))


def _jitted_st(method, pool):
  return jax.jit(functools.partial(pairing.similarity_transfer, method=method, pool=pool))


@functools.lru_cache(maxsize=None)
def _all_methods(name):
  """Every method's result on one fixture, from one compiled call (keeps the suite fast)."""
  _, blocks_s, blocks_t, pool = _fixture(name)
  run = jax.jit(lambda bs, bt: {m: pairing.similarity_transfer(bs, bt, m, pool)
                                for m in METHODS})
  return jax.device_get(run(blocks_s, blocks_t))


def test_pool_kind_for_model_follows_the_reference_substrings():
  assert pairing.pool_kind_for_model("ResNet10") is PoolKind.GLOBAL
  assert pairing.pool_kind_for_model("ResNet50") is PoolKind.GLOBAL
  assert pairing.pool_kind_for_model("vgg13") is PoolKind.GLOBAL
  assert pairing.pool_kind_for_model("resnet8x4") is PoolKind.AVG8
  assert pairing.pool_kind_for_model("resnet110") is PoolKind.AVG8
  assert pairing.pool_kind_for_model("wrn_40_1") is PoolKind.AVG8
  for name in ("MobileNetV2", "ShuffleV1", "ShuffleV2"):
    with pytest.raises(ValueError, match="wrn"):
      pairing.pool_kind_for_model(name)


@pytest.mark.parametrize("name", ST_FIXTURES)
@pytest.mark.parametrize("method", METHODS)
def test_similarity_transfer_matches_reference(name, method):
  fx, _, blocks_t, _ = _fixture(name)
  out = _all_methods(name)[method]
  assert len(out.pairs) == len(blocks_t)
  for i, ((s, t), k, simi) in enumerate(zip(out.pairs, out.keys, out.similarities)):
    assert int(k) == int(fx[f"out.{method}.key.{i}"]), f"{name} {method} stage {i} key"
    assert_close(simi, fx[f"out.simi.{i}"], RTOL, ATOL, f"{name} simi.{i}")
    assert_close(s, fx[f"out.{method}.pair.{i}.s"], RTOL, ATOL, f"{name} {method} pair.{i}.s")
    assert_close(t, fx[f"out.{method}.pair.{i}.t"], RTOL, ATOL, f"{name} {method} pair.{i}.t")


@pytest.mark.parametrize("name", ST_FIXTURES)
def test_probe_gradient_matches_reference(name):
  fx, blocks_s, blocks_t, pool = _fixture(name)
  probes = [jnp.asarray(fx[f"in.probe.{i}"]) for i in range(len(blocks_t))]

  def probe_j(bs):
    out = pairing.similarity_transfer(bs, blocks_t, "Last", pool)
    return sum(jnp.sum(s * p) for (s, _), p in zip(out.pairs, probes))

  value, grads = jax.jit(jax.value_and_grad(probe_j))(blocks_s)
  assert_close(value, fx["out.probe_J"], RTOL, ATOL, f"{name} probe_J")
  for i, g_stage in enumerate(grads):
    last = len(g_stage) - 1
    expected = nchw_to_nhwc(fx[f"grad.in.block_out_s.{i}.{last}"])
    assert_close(g_stage[-1], expected, GRAD_RTOL, GRAD_ATOL, f"{name} grad stage {i}")
    for g in g_stage[:-1]:
      assert not np.any(np.asarray(g)), "only the last student block gets a gradient"


def _features(blocks, stem, pooled):
  stages = tuple(b[-1] for b in blocks)
  return Features(stem=stem, stages=stages, stages_preact=stages, blocks=blocks,
                  pooled=pooled, logits=pooled[:, :1])


@pytest.mark.parametrize("name,method,stem_hw", [
    ("crdst_ResNet_smallest.npz", "Smallest", 8), ("crdst_wrn_last.npz", "Last", 32)])
def test_cktf_pairs_in_reference_order_and_head_sizes(name, method, stem_hw):
  """The crdst fixtures' ST pairs, plus our stem/final pairs and head sizes."""
  fx, blocks_s, blocks_t, pool = _fixture(name)
  n = blocks_s[0][0].shape[0]
  rng = np.random.default_rng(0)
  # Stem maps whose flatGroupOut width is the fixture's feat.0 width (stub models).
  c0 = fx["in.feat_s.0"].shape[1] // (1 if pool is PoolKind.GLOBAL else (stem_hw // 8) ** 2)
  stem_s, stem_t = (jnp.asarray(rng.standard_normal((n, stem_hw, stem_hw, c0)), jnp.float32)
                    for _ in range(2))
  feats_s = _features(blocks_s, stem_s, jnp.asarray(fx["in.feat_s.last"]))
  feats_t = _features(blocks_t, stem_t, jnp.asarray(fx["in.feat_t.last"]))

  pairs = jax.jit(functools.partial(pairing.cktf_pairs, method=method, student_pool=pool))(
      feats_s, feats_t)
  assert len(pairs) == len(blocks_t) + 2
  for want, got in zip(pairs[0], (stem_s, stem_t)):
    assert_close(want, pairing.pool_and_flatten(got, pool), RTOL, ATOL, "stem pair")
  for i, (s, t) in enumerate(pairs[1:-1]):
    assert_close(s, fx[f"out.pair.{i}.s"], RTOL, ATOL, f"{name} pair.{i}.s")
    assert_close(t, fx[f"out.pair.{i}.t"], RTOL, ATOL, f"{name} pair.{i}.t")
  np.testing.assert_array_equal(pairs[-1][0], fx["in.feat_s.last"])
  np.testing.assert_array_equal(pairs[-1][1], fx["in.feat_t.last"])

  dims = pairing.crdst_embed_dims(jax.eval_shape(lambda f: f, feats_s),
                                  jax.eval_shape(lambda f: f, feats_t), pool)
  expected = tuple((fx[f"init.crd.{j}.embed_s.linear.weight"].shape[1],
                    fx[f"init.crd.{j}.embed_t.linear.weight"].shape[1])
                   for j in range(1, len(pairs) + 1))
  assert dims == expected
  assert dims == tuple((s.shape[1], t.shape[1]) for s, t in pairs)


@pytest.mark.parametrize("name,num_stages", [
    ("model_resnet8.npz", 3), ("model_resnet8x4.npz", 3), ("model_wrn_16_2.npz", 3),
    ("model_vgg8.npz", 4), ("model_ResNet10_64.npz", 4)])
def test_pool_and_flatten_matches_models_flat_group_out(name, num_stages):
  """Our pooling + (C, h, w) flattening of f0..fL equals the models' flatGroupOut."""
  fx = load_fixture(name)
  pool = pairing.pool_kind_for_model(str(fx["hp.arch"]))
  maps = [jnp.asarray(nchw_to_nhwc(fx[f"out.eval.feat.{i}"])) for i in range(num_stages + 1)]
  flat = jax.jit(lambda ms: [pairing.pool_and_flatten(m, pool) for m in ms])(maps)
  for i, got in enumerate(flat):
    assert_close(got, fx[f"out.eval_flat.feat.{i}"], RTOL, ATOL, f"{name} flat feat.{i}")


def test_crdst_embed_dims_of_real_models():
  from cktf_jax import models

  def shapes(name):
    model = models.create_model(name, 100)
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), x)
    return jax.eval_shape(lambda v, x: model.apply(v, x), variables, x)

  dims = pairing.crdst_embed_dims(shapes("wrn_16_1"), shapes("wrn_16_2"),
                                  pairing.pool_kind_for_model("wrn_16_1"))
  assert dims == ((256, 256), (512, 512), (256, 256), (128, 128), (64, 128))


def _small_stages(n=4, seed=1):
  """Two small synthetic stages: student 4 / 8 channels, teacher 8 / 8 (3 and 4 blocks)."""
  rng = np.random.default_rng(seed)
  mk = lambda *shape: jnp.asarray(np.maximum(rng.standard_normal(shape) + 0.2, 0) + 1e-3,
                                  jnp.float32)
  blocks_s = ((mk(n, 4, 4, 4),), (mk(n, 2, 2, 8), mk(n, 2, 2, 8)))
  blocks_t = (tuple(mk(n, 4, 4, 8) for _ in range(3)), tuple(mk(n, 2, 2, 8) for _ in range(4)))
  return blocks_s, blocks_t


def test_random_is_valid_and_deterministic_per_key():
  blocks_s, blocks_t = _small_stages()
  pool = PoolKind.GLOBAL
  run = _jitted_st("Random", pool)
  a = run(blocks_s, blocks_t, key=jax.random.PRNGKey(3))
  b = run(blocks_s, blocks_t, key=jax.random.PRNGKey(3))
  for (s_a, t_a), (s_b, t_b), k_a, k_b in zip(a.pairs, b.pairs, a.keys, b.keys):
    assert int(k_a) == int(k_b)
    np.testing.assert_array_equal(t_a, t_b)
    np.testing.assert_array_equal(s_a, s_b)
  # Every teacher block normalised and pooled, in one compiled call.
  candidates = jax.jit(lambda bt: [[pairing.pool_and_flatten(pairing.normalize_over_batch(t), pool)
                                    for t in st] for st in bt])(blocks_t)
  seen = [set() for _ in blocks_t]
  for seed in range(16):
    out = run(blocks_s, blocks_t, key=jax.random.PRNGKey(seed))
    for i, ((s, t), k) in enumerate(zip(out.pairs, out.keys)):
      k = int(k)
      assert 0 <= k < len(blocks_t[i])
      seen[i].add(k)
      # (different compiled graphs: equal up to float32 rounding)
      assert_close(t, candidates[i][k], RTOL, ATOL, f"Random stage {i} block {k}")
      # the student side does not depend on the method
      np.testing.assert_array_equal(s, a.pairs[i][0])
  assert all(len(s) > 1 for s in seen), f"Random hardly varied over 16 keys: {seen}"
  with pytest.raises(ValueError, match="PRNG key"):
    pairing.similarity_transfer(blocks_s, blocks_t, "Random", pool)


def test_mask_normalises_over_real_examples_only():
  blocks_s, blocks_t = _small_stages()
  real = 3
  sub = lambda blocks: tuple(tuple(b[:real] for b in st) for st in blocks)
  mask = jnp.arange(blocks_s[0][0].shape[0]) < real
  run = jax.jit(lambda bs, bt, m: (
      pairing.similarity_transfer(bs, bt, "Smallest", PoolKind.GLOBAL, mask=m),
      pairing.similarity_transfer(sub(bs), sub(bt), "Smallest", PoolKind.GLOBAL)))
  masked, small = run(blocks_s, blocks_t, mask)
  for (s_m, t_m), (s, t), k_m, k in zip(masked.pairs, small.pairs, masked.keys, small.keys):
    assert int(k_m) == int(k)
    assert_close(s_m[:real], s, RTOL, ATOL, "masked s")
    assert_close(t_m[:real], t, RTOL, ATOL, "masked t")
    assert not np.any(np.asarray(s_m[real:])) and not np.any(np.asarray(t_m[real:]))


def _maps(*shapes, seed=0):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.random(s) + 0.1, jnp.float32) for s in shapes]


def test_wider_student_is_cropped_like_negative_f_pad():
  s, t = _maps((3, 2, 2, 8), (3, 2, 2, 4))
  def both(s, t):
    out = pairing.similarity_transfer(((s,),), ((t,),), "Last", PoolKind.GLOBAL)
    want = pairing.pool_and_flatten(pairing.normalize_over_batch(s)[..., 2:6], PoolKind.GLOBAL)
    return out.pairs[0][0], want

  got, want = jax.jit(both)(s, t)
  assert got.shape == (3, 4)
  np.testing.assert_array_equal(got, want)


def test_bad_inputs_raise_value_errors_naming_shapes():
  s, t_odd, t, t_small = _maps((2, 8, 8, 4), (2, 8, 8, 7), (2, 8, 8, 8), (2, 4, 4, 8))
  with pytest.raises(ValueError, match=r"even channel difference.*\(2, 8, 8, 4\)|"
                                       r"\(2, 8, 8, 4\).*even channel difference"):
    pairing.similarity_transfer(((s,),), ((t_odd,),), "Last", PoolKind.GLOBAL)
  with pytest.raises(ValueError, match="same batch and spatial size"):
    pairing.similarity_transfer(((s,),), ((t_small,),), "Last", PoolKind.GLOBAL)
  with pytest.raises(ValueError, match="1 student stages.*2 teacher stages"):
    pairing.similarity_transfer(((s,),), ((t,), (t,)), "Last", PoolKind.GLOBAL)
  with pytest.raises(ValueError, match="different shapes"):
    pairing.similarity_transfer(((s,),), ((t, t_odd),), "Largest", PoolKind.GLOBAL)
  with pytest.raises(ValueError, match="unknown st_method"):
    pairing.similarity_transfer(((s,),), ((t,),), "Middle", PoolKind.GLOBAL)
  with pytest.raises(ValueError, match=r"at least 8x8.*\(2, 4, 4, 8\)"):
    pairing.pool_and_flatten(t_small, PoolKind.AVG8)
  with pytest.raises(ValueError, match="unknown pool kind"):
    pairing.pool_and_flatten(t, "max")

  # Head sizes: a student stem that does not flatten to the teacher's width.
  pooled = jnp.zeros((2, 8))
  feats_s = _features(((s,),), jnp.zeros((2, 8, 8, 4)), pooled)
  feats_t = _features(((t,),), jnp.zeros((2, 8, 8, 8)), pooled)
  with pytest.raises(ValueError, match="stem"):
    pairing.crdst_embed_dims(feats_s, feats_t, PoolKind.GLOBAL)
