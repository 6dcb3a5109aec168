"""CRD parity with the PyTorch reference (``crd/criterion.py``, ``crd/memory.py``).

* two consecutive calls of ``CRDLoss`` (exact and relax ``contrast_idx``):
  scores, losses, gradients w.r.t. the inputs and the embed weights, banks and
  Z after each call, for both scoring paths (gather, dense);
* the 'mlp' and 'pad' heads (single call);
* the ``crd`` Method end to end, its row-sharded bank on 4 simulated devices
  equal to 1 device (also for an ``n_data`` not divisible by 4), masks,
  eval mode, bf16 storage and the errors for bad input.

Tolerances (MANIFEST): losses, scores and state rtol 1e-5 / atol 1e-6;
gradients rtol 1e-4 / atol 1e-6 (relative to the array's max magnitude).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from cktf_jax import methods
from cktf_jax.contrast import ContrastMemory, CRDHead, Z_UNSET, contrast_loss, single_device_mesh
from cktf_jax.models import torch_import
from cktf_jax.models.features import Features
from parity_utils import assert_close, load_fixture, with_prefix

LOSS_TOL = dict(rtol=1e-5, atol=1e-6)
STATE_TOL = dict(rtol=1e-5, atol=1e-6)
GRAD_TOL = dict(rtol=1e-4, atol=1e-6)
MESH1 = single_device_mesh()
MESH4 = Mesh(np.asarray(jax.devices()[:4]), ("data",))


@pytest.fixture(autouse=True, scope="module")
def _fast_compile():
  """Fewer XLA passes: these programs are tiny and compile time dominates."""
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)


def feats(x):
  return Features(stem=x, stages=(), stages_preact=(), blocks=(), pooled=x, logits=x)


def hparams(fx):
  return {k[len("hp."):]: fx[k].item() for k in fx if k.startswith("hp.")}


def grads_to_flax(fx, prefix, template):
  """Reference gradients (PyTorch names/layout) as our params pytree."""
  return torch_import.state_dict_to_variables(with_prefix(fx, prefix), {"params": template})["params"]


def call_keys(fx, call):
  """Key prefixes of one call: two-call fixtures have in.callN.*, single-call in.*."""
  if call is None:
    return "in.", "out.", "after.", "grad.in.", "grad.w.crd."
  return (f"in.call{call}.", f"out.call{call}.", f"after.call{call}.",
          f"grad.call{call}.in.", f"grad.call{call}.w.crd.")


@functools.lru_cache(maxsize=None)
def setup(name, mesh=MESH1, scoring="auto", bank_dtype="float32"):
  """The 'crd' Method for fixture ``name`` with the fixture's weights and bank."""
  fx = load_fixture(name)
  hp = hparams(fx)
  method = methods.create_method("crd", dict(
      n_data=hp["n_data"], labels=fx["in.labels"], feat_dim=hp["feat_dim"], head=hp["head"],
      nce_k=hp["nce_k"], nce_t=hp["nce_t"], nce_m=hp["nce_m"], mode=hp.get("mode", "exact"),
      mesh=mesh, scoring=scoring, bank_dtype=bank_dtype))
  first = "in.call1." if "in.call1.f_s" in fx else "in."
  fs, ft = fx[first + "f_s"], fx[first + "f_t"]
  # Shapes only (no compute): the fixture provides every value.
  abstract = jax.eval_shape(method.init, jax.random.PRNGKey(0), feats(fs), feats(ft))
  assert set(abstract) == {"params", "contrast", "crd_sampler"}
  sd = {k: v for k, v in with_prefix(fx, "init.crd.").items() if not k.startswith("contrast.")}
  params = (torch_import.state_dict_to_variables(sd, {"params": abstract["params"]})["params"]
            if sd else {})
  memory = ContrastMemory(hp["n_data"], hp["feat_dim"], hp["nce_t"], hp["nce_m"], mesh=mesh,
                          scoring=scoring, dtype=bank_dtype)
  z = fx["init.crd.contrast.params"]
  # The batch carries contrast_idx, so the sampler's state is not needed.
  state = {"contrast": memory.from_arrays(fx["init.crd.contrast.memory_v1"],
                                          fx["init.crd.contrast.memory_v2"], z[2], z[3])}
  head = CRDHead(hp["s_dim"], hp["t_dim"], memory, hp["head"])

  def loss_fn(params, state, fs, ft, batch):
    loss, metrics, new_state = method.loss(params, state, feats(fs), feats(ft), batch, True)
    return loss, (metrics, new_state)

  @jax.jit
  def step(params, state, fs, ft, batch):
    (loss, (metrics, new_state)), grads = jax.value_and_grad(
        loss_fn, argnums=(0, 2, 3), has_aux=True)(params, state, fs, ft, batch)
    # The scores of this call, from the same (old) bank, via the head.
    v1, v2 = head.embeddings(params, fs, ft)
    out_v1, out_v2, _, _ = memory.scores(state["contrast"], v1, v2, batch["contrast_idx"],
                                         batch.get("mask"))
    return loss, metrics, new_state, grads, (out_v1, out_v2)

  return fx, hp, method, memory, params, state, step


def run_calls(name, calls, **kw):
  fx, hp, method, memory, params, state, step = setup(name, **kw)
  results = []
  for call in calls:
    i, *_ = call_keys(fx, call)
    batch = {"index": fx[i + "idx"], "contrast_idx": fx[i + "contrast_idx"]}
    out = step(params, state, fx[i + "f_s"], fx[i + "f_t"], batch)
    state = out[2]
    results.append(out)
  return fx, memory, params, results


def check_against_fixture(fx, memory, params, results, calls, what):
  for call, (loss, metrics, state, grads, (out_v1, out_v2)) in zip(calls, results):
    _, o, a, gi, gw = call_keys(fx, call)
    tag = f"{what} call {call}"
    assert_close(out_v1, fx[o + "out_v1"][..., 0], **LOSS_TOL, what=f"{tag} out_v1")
    assert_close(out_v2, fx[o + "out_v2"][..., 0], **LOSS_TOL, what=f"{tag} out_v2")
    assert_close(loss, fx[o + "loss"][0], **LOSS_TOL, what=f"{tag} loss")
    assert_close(metrics["crd_s"], fx[o + "s_loss"][0], **LOSS_TOL, what=f"{tag} s_loss")
    assert_close(metrics["crd_t"], fx[o + "t_loss"][0], **LOSS_TOL, what=f"{tag} t_loss")
    g_params, g_fs, g_ft = grads
    assert_close(g_fs, fx[gi + "f_s"], **GRAD_TOL, what=f"{tag} d/df_s")
    assert_close(g_ft, fx[gi + "f_t"], **GRAD_TOL, what=f"{tag} d/df_t")
    if g_params:
      expected = grads_to_flax(fx, gw, params)
      jax.tree.map(lambda a_, e: assert_close(a_, e, **GRAD_TOL, what=f"{tag} d/dembed"),
                   g_params, expected)
    m1, m2 = memory.unpadded(state["contrast"])
    assert_close(m1, fx[a + "memory_v1"], **STATE_TOL, what=f"{tag} memory_v1")
    assert_close(m2, fx[a + "memory_v2"], **STATE_TOL, what=f"{tag} memory_v2")
    assert_close(state["contrast"]["z_v1"], fx[a + "params"][2], **STATE_TOL, what=f"{tag} Z_v1")
    assert_close(state["contrast"]["z_v2"], fx[a + "params"][3], **STATE_TOL, what=f"{tag} Z_v2")


@pytest.mark.parametrize("scoring", ["gather", "dense"])
@pytest.mark.parametrize("name", ["crd_two_calls.npz", "crd_relax_two_calls.npz"])
def test_two_calls_parity(name, scoring):
  fx, memory, params, results = run_calls(name, (1, 2), scoring=scoring)
  check_against_fixture(fx, memory, params, results, (1, 2), f"{name} {scoring}")


def test_scoring_paths_agree():
  _, _, _, gather = run_calls("crd_two_calls.npz", (1, 2), scoring="gather")
  _, _, _, dense = run_calls("crd_two_calls.npz", (1, 2), scoring="dense")
  for (lg, _, sg, gg, og), (ld, _, sd, gd, od) in zip(gather, dense):
    assert_close(lg, ld, **LOSS_TOL, what="loss gather vs dense")
    for a, b in zip(og, od):
      assert_close(a, b, **LOSS_TOL, what="scores gather vs dense")
    jax.tree.map(lambda a, b: assert_close(a, b, **GRAD_TOL, what="grads gather vs dense"), gg, gd)
    jax.tree.map(lambda a, b: assert_close(a, b, **STATE_TOL, what="bank gather vs dense"),
                 sg["contrast"], sd["contrast"])


@pytest.mark.parametrize("name", ["crd_head_mlp.npz", "crd_head_pad.npz"])
def test_head_variants_parity(name):
  fx, memory, params, results = run_calls(name, (None,))
  check_against_fixture(fx, memory, params, results, (None,), name)


def test_cost_model_choice():
  mem = ContrastMemory(n_data=50000, feat_dim=128, mesh=MESH4)
  assert mem.rows_per_shard == 12500
  assert mem.resolve_scoring(64, 16385) == "dense"   # 1M gathered rows vs 12500 local rows
  assert mem.resolve_scoring(4, 65) == "gather"
  assert ContrastMemory(200, 8, mesh=MESH1).resolve_scoring(4, 65) == "dense"  # 260 > 200


# ----- sharding -----------------------------------------------------------------


@pytest.mark.parametrize("scoring", ["gather", "dense"])
def test_four_devices_match_reference(scoring):
  fx, memory, params, results = run_calls("crd_two_calls.npz", (1, 2), mesh=MESH4, scoring=scoring)
  for *_, state, _, _ in results:
    for name in ("memory_v1", "memory_v2"):
      shards = state["contrast"][name].addressable_shards
      assert len(shards) == 4 and all(s.data.shape == (50, 128) for s in shards), name
  check_against_fixture(fx, memory, params, results, (1, 2), f"4 devices {scoring}")
  _, _, _, single = run_calls("crd_two_calls.npz", (1, 2), scoring=scoring)
  for (l4, _, s4, g4, _), (l1, _, s1, g1, _) in zip(results, single):
    assert_close(l4, l1, **LOSS_TOL, what="loss 4 vs 1 device")
    jax.tree.map(lambda a, b: assert_close(a, b, **GRAD_TOL, what="grads 4 vs 1"), g4, g1)
    jax.tree.map(lambda a, b: assert_close(a, b, **STATE_TOL, what="bank 4 vs 1"),
                 s4["contrast"], s1["contrast"])


def _synthetic_method(mesh, n_data=201, **kw):
  labels = np.random.default_rng(3).integers(0, 5, n_data)
  hp = dict(n_data=n_data, labels=labels, feat_dim=16, nce_k=24, nce_t=0.07, nce_m=0.5,
            mesh=mesh)
  hp.update(kw)
  return methods.create_method("crd", hp), labels


def _synthetic_steps(mesh, calls=2, **kw):
  """Two training calls with on-device sampling (same rng -> same negatives)."""
  method, _ = _synthetic_method(mesh, **kw)
  rng = np.random.default_rng(0)
  fs = jnp.asarray(rng.normal(size=(calls, 8, 12)), jnp.float32)
  ft = jnp.asarray(rng.normal(size=(calls, 8, 20)), jnp.float32)
  index = jnp.asarray(np.stack([rng.permutation(201)[:8] for _ in range(calls)]), jnp.int32)
  variables = method.init(jax.random.PRNGKey(1), feats(fs[0]), feats(ft[0]))
  params = variables.pop("params")

  @jax.jit
  def step(params, state, fs, ft, index):
    def f(params, fs):
      loss, m, s = method.loss(params, state, feats(fs), feats(ft), {"index": index}, True)
      return loss, s
    (loss, new_state), grads = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(params, fs)
    return loss, new_state, grads

  state, out = variables, []
  for c in range(calls):
    loss, state, grads = step(params, state, fs[c], ft[c], index[c])
    out.append((loss, state, grads))
  return out


def test_four_devices_uneven_rows_match_one_device():
  four = _synthetic_steps(MESH4)
  one = _synthetic_steps(MESH1)
  for (l4, s4, g4), (l1, s1, g1) in zip(four, one):
    for name in ("memory_v1", "memory_v2"):
      shards = s4["contrast"][name].addressable_shards
      assert sorted(s.device.id for s in shards) == [d.id for d in MESH4.devices]
      assert all(s.data.shape == (51, 16) for s in shards), [s.data.shape for s in shards]
      assert s1["contrast"][name].shape == (201, 16)
      assert_close(s4["contrast"][name][:201], s1["contrast"][name], **STATE_TOL, what=name)
      np.testing.assert_array_equal(np.asarray(s4["contrast"][name][201:]), 0.0)  # padding rows
    assert_close(l4, l1, **LOSS_TOL, what="loss")
    for k in ("z_v1", "z_v2"):
      assert_close(s4["contrast"][k], s1["contrast"][k], **STATE_TOL, what=k)
    jax.tree.map(lambda a, b: assert_close(a, b, **GRAD_TOL, what="grads"), g4, g1)
  # the sampler key advances every call
  assert not np.array_equal(np.asarray(four[0][1]["crd_sampler"]["key"]),
                            np.asarray(four[1][1]["crd_sampler"]["key"]))


# ----- method behaviour ------------------------------------------------------------


def test_method_registration_and_defaults():
  method, _ = _synthetic_method(MESH1)
  assert method.name == "crd" and "crd" in methods.method_names()
  assert method.default_weights == (1.0, 0.0, 0.8)
  assert method.needs_contrast_idx is False
  replay = methods.create_method("crd", dict(n_data=10, sampling="batch", mesh=MESH1))
  assert replay.needs_contrast_idx is True
  defaults = methods.create_method("crd", dict(n_data=50000, sampling="batch", mesh=MESH1))
  abstract = jax.eval_shape(defaults.init, jax.random.PRNGKey(0),
                            feats(jnp.zeros((2, 64))), feats(jnp.zeros((2, 256))))
  assert abstract["contrast"]["memory_v1"].shape == (50000, 128)  # feat_dim 128 by default
  assert abstract["params"]["embed_s"]["linear"]["kernel"].shape == (64, 128)


def test_bank_init_like_reference():
  mem = ContrastMemory(n_data=203, feat_dim=48, mesh=MESH4)
  bank = mem.init(jax.random.PRNGKey(0))
  stdv = 1.0 / np.sqrt(48 / 3)
  for name in ("memory_v1", "memory_v2"):
    m = np.asarray(bank[name])
    assert m.shape == (204, 48) and bank[name].sharding.spec == P("data", None)
    assert np.all(np.abs(m[:203]) <= stdv) and np.abs(m[:203]).max() > 0.99 * stdv
    assert abs(m[:203].mean()) < 0.02 and np.all(m[203:] == 0)
  assert not np.allclose(bank["memory_v1"], bank["memory_v2"])
  assert float(bank["z_v1"]) == Z_UNSET == float(bank["z_v2"])


def test_mask_excludes_padding():
  """Padded rows (mask False, garbage index) change neither loss, grads nor bank."""
  fx, hp, method, memory, params, state, step = setup("crd_two_calls.npz")
  pad_idx = np.zeros((2, hp["nce_k"] + 1), np.int64)
  batch = {"index": np.concatenate([fx["in.call1.idx"], [7, 7]]),
           "contrast_idx": np.concatenate([fx["in.call1.contrast_idx"], pad_idx]),
           "mask": np.array([True] * 4 + [False] * 2)}
  fs = np.concatenate([fx["in.call1.f_s"], np.ones((2, hp["s_dim"]), np.float32)])
  ft = np.concatenate([fx["in.call1.f_t"], np.ones((2, hp["t_dim"]), np.float32)])
  loss, metrics, new_state, (gp, gfs, gft), _ = step(params, state, fs, ft, batch)
  assert_close(loss, fx["out.call1.loss"][0], **LOSS_TOL, what="masked loss")
  assert_close(gfs[:4], fx["grad.call1.in.f_s"], **GRAD_TOL, what="masked d/df_s")
  np.testing.assert_array_equal(np.asarray(gfs[4:]), 0.0)
  m1, m2 = memory.unpadded(new_state["contrast"])
  assert_close(m1, fx["after.call1.memory_v1"], **STATE_TOL, what="masked memory_v1")
  assert_close(new_state["contrast"]["z_v1"], fx["after.call1.params"][2], **STATE_TOL, what="Z")


def test_eval_mode_and_traced_bad_index():
  method, _ = _synthetic_method(MESH1, n_data=40, feat_dim=8, nce_k=6)
  x_s, x_t = jnp.ones((2, 12)), jnp.ones((2, 20)) * jnp.arange(20)
  variables = method.init(jax.random.PRNGKey(0), feats(x_s), feats(x_t))
  params = variables.pop("params")

  @functools.partial(jax.jit, static_argnums=2)
  def run(state, batch, train):
    return method.loss(params, state, feats(x_s), feats(x_t), batch, train)

  good = {"index": jnp.array([1, 2]), "contrast_idx": jnp.array([[1] * 7, [2] * 7])}
  loss, _, new_state = run(variables, good, False)
  assert np.isfinite(loss)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               new_state, variables)                     # eval: nothing changes, Z stays unset
  bad = {"index": jnp.array([1, 40]), "contrast_idx": jnp.array([[1] * 7, [2] * 7])}
  loss, _, new_state = run(variables, bad, True)
  assert np.isnan(loss)                                  # traced: poisoned, not silent
  m_new, m_old = new_state["contrast"]["memory_v1"], variables["contrast"]["memory_v1"]
  assert np.array_equal(np.asarray(m_new[2:]), np.asarray(m_old[2:]))  # row 40 never written


def test_bf16_bank():
  fx, memory, params, results = run_calls("crd_two_calls.npz", (1, 2), bank_dtype="bfloat16")
  for (loss, _, state, _, _), call in zip(results, (1, 2)):
    assert state["contrast"]["memory_v1"].dtype == jnp.bfloat16
    assert state["contrast"]["z_v1"].dtype == jnp.float32
    np.testing.assert_allclose(float(loss), fx[f"out.call{call}.loss"][0], rtol=2e-2)


def test_contrast_loss_formula():
  x = jnp.asarray([[0.5, 0.01, 0.02], [0.2, 0.1, 0.03]], jnp.float32)
  n = 10
  c = 2 / n
  expected = -(np.log(0.5 / (0.5 + c + 1e-7)) + np.log(c / (0.01 + c + 1e-7))
               + np.log(c / (0.02 + c + 1e-7)) + np.log(0.2 / (0.2 + c + 1e-7))
               + np.log(c / (0.1 + c + 1e-7)) + np.log(c / (0.03 + c + 1e-7))) / 2
  loss = jax.jit(contrast_loss, static_argnums=1)
  np.testing.assert_allclose(float(loss(x, n)), expected, rtol=1e-6)
  np.testing.assert_allclose(float(loss(x[:, :, None], n, jnp.array([True, False]))),
                             -(np.log(0.5 / (0.5 + c + 1e-7)) + np.log(c / (0.01 + c + 1e-7))
                               + np.log(c / (0.02 + c + 1e-7))), rtol=1e-6)


# ----- bad input ---------------------------------------------------------------------


def test_bad_input_raises():
  fx, hp, method, memory, params, state, _ = setup("crd_two_calls.npz")
  fs, ft = feats(jnp.asarray(fx["in.call1.f_s"])), feats(jnp.asarray(fx["in.call1.f_t"]))
  idx, cidx = fx["in.call1.idx"], fx["in.call1.contrast_idx"]

  def loss(batch, state=state):
    return method.loss(params, state, fs, ft, batch, True)

  with pytest.raises(ValueError, match=r"index has values in \[.*, 200\], outside \[0, n_data=200\)"):
    loss({"index": np.array([0, 1, 2, 200]), "contrast_idx": cidx})
  with pytest.raises(ValueError, match="contrast_idx has values .* outside"):
    loss({"index": idx, "contrast_idx": np.where(cidx == cidx[0, 3], -1, cidx)})
  with pytest.raises(ValueError, match=r"expected \[B, nce_k \+ 1 = 65\]"):
    loss({"index": idx, "contrast_idx": cidx[:, :10]})
  other = jax.eval_shape(ContrastMemory(300, 128, mesh=MESH1).init, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="has 300 rows; a bank for n_data=200"):
    loss({"index": idx, "contrast_idx": cidx}, dict(state, contrast=other))
  narrow = jax.eval_shape(ContrastMemory(200, 64, mesh=MESH1).init, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="feat_dim 64, this bank expects 128"):
    loss({"index": idx, "contrast_idx": cidx}, dict(state, contrast=narrow))
  with pytest.raises(ValueError, match="has shape"):
    memory.from_arrays(np.zeros((199, 128)), np.zeros((200, 128)))
  with pytest.raises(ValueError, match="needs hparams\\['n_data'\\]"):
    methods.create_method("crd", {"mesh": MESH1})
  with pytest.raises(ValueError, match="needs the training labels"):
    methods.create_method("crd", {"n_data": 10, "mesh": MESH1})
  pad = methods.create_method("crd", dict(n_data=10, sampling="batch", head="pad", feat_dim=128,
                                          mesh=MESH1))
  with pytest.raises(methods.MethodShapeError, match="odd difference"):
    pad.init(jax.random.PRNGKey(0), feats(jnp.zeros((2, 63))), feats(jnp.zeros((2, 64))))
  with pytest.raises(ValueError, match="unknown CRD head 'conv'"):
    methods.create_method("crd", dict(n_data=10, sampling="batch", head="conv", mesh=MESH1))
