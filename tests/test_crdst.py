"""CKTF (``crdst``) against the reference's combined objective, one iteration.

Fixtures ``crdst_ResNet_smallest.npz`` (ResNet10, Smallest, alpha 1: CKTF+KD)
and ``crdst_wrn_last.npz`` (wrn_40_1, Last): ``helper/loops.py: train_distill``
for one batch with stub features. We feed the same features through the
``crdst`` Method (its L+2 CRD heads loaded with the fixture's embeds and
banks) and the train step's ``gamma*CE + alpha*KD + beta*method_loss``, and
compare every head's loss, the total, the gradients w.r.t. the student
features, logits and every embed, Z, and the updated bank rows. Plus the
shape errors, the hyper-parameter checks, the metric names, on-device
sampling shared by all heads, and Random.

Tolerances (MANIFEST): losses and state rtol 1e-5 / atol 1e-6; gradients
rtol 1e-4 / atol 1e-6 (relative to the array's max magnitude).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cktf_jax import methods, models
from cktf_jax.contrast import ContrastMemory, pairing
from cktf_jax.contrast.pairing import PoolKind
from cktf_jax.losses.kd import distill_kl
from cktf_jax.methods import crdst
from cktf_jax.methods.crd import ContrastSetup
from cktf_jax.models import torch_import
from cktf_jax.models.features import Features
from cktf_jax.train import step as step_lib
from parity_utils import assert_close, load_fixture, nchw_to_nhwc, with_prefix

LOSS_TOL = dict(rtol=1e-5, atol=1e-6)
STATE_TOL = dict(rtol=1e-5, atol=1e-6)
GRAD_TOL = dict(rtol=1e-4, atol=1e-6)
# The fixtures name only the student; teachers of the same family (pooling rule).
TEACHERS = {"ResNet10": "ResNet34", "wrn_40_1": "wrn_40_2"}
CASES = ("crdst_ResNet_smallest.npz", "crdst_wrn_last.npz")


@pytest.fixture(autouse=True, scope="module")
def _fast_compile():
  """Fewer XLA passes: these programs are tiny and compile time dominates."""
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)


def _blocks(fx, side):
  prefix = f"in.block_out_{side}."
  keys = sorted(tuple(int(p) for p in k[len(prefix):].split("."))
                for k in fx if k.startswith(prefix))
  stages = [[] for _ in range(keys[-1][0] + 1)]
  for stage, block in keys:
    stages[stage].append(jnp.asarray(nchw_to_nhwc(fx[f"{prefix}{stage}.{block}"])))
  return tuple(tuple(s) for s in stages)


def _stem_from_flat(v, pool, side):
  """A stem map whose reference flatGroupOut (pool + (C, h, w) flatten) is ``v``.

  Global pooling: ``[N, 1, 1, C]``. 8x8 pooling: every 8x8 window constant,
  so its average is the value (within an ulp) and d/dv sums the window."""
  n = v.shape[0]
  if pool is PoolKind.GLOBAL:
    return v.reshape(n, 1, 1, -1)
  m = jnp.transpose(v.reshape(n, -1, side, side), (0, 2, 3, 1))
  return jnp.repeat(jnp.repeat(m, 8, axis=1), 8, axis=2)


def _features(stem, blocks, pooled, logits):
  stages = tuple(b[-1] for b in blocks)
  return Features(stem=stem, stages=stages, stages_preact=stages, blocks=blocks,
                  pooled=pooled, logits=logits)


def _hparams(fx, **extra):
  model_s = str(fx["hp.model_s"])
  hp = dict(model_s=model_s, model_t=TEACHERS[model_s], st_method=str(fx["hp.st_method"]),
            theta=float(fx["hp.theta"]), beta=float(fx["hp.beta"]),
            feat_dim=int(fx["hp.feat_dim"]), nce_k=int(fx["hp.nce_k"]),
            nce_t=float(fx["hp.nce_t"]), nce_m=float(fx["hp.nce_m"]),
            n_data=int(fx["hp.n_data"]), labels=fx["in.labels"])
  hp.update(extra)
  return hp


def _memory(hp):
  return ContrastMemory(hp["n_data"], hp["feat_dim"], hp["nce_t"], hp["nce_m"])


def _load_aux(fx, method, feats_s, feats_t, memory):
  """The method's aux variables with the fixture's ``init.crd.<j>`` state."""
  abstract = jax.eval_shape(method.init, jax.random.PRNGKey(0), feats_s, feats_t)
  n_heads = len(abstract["params"])
  params, banks = {}, {}
  for i in range(n_heads):
    sd = with_prefix(fx, f"init.crd.{i + 1}.")
    name = crdst.head_name(i)
    params[name] = torch_import.state_dict_to_variables(
        {k: v for k, v in sd.items() if not k.startswith("contrast.")},
        {"params": abstract["params"][name]})["params"]
    z = sd["contrast.params"]
    banks[name] = memory.from_arrays(sd["contrast.memory_v1"], sd["contrast.memory_v2"], z[2], z[3])
  return abstract, params, {"contrast": banks}


@functools.lru_cache(maxsize=None)
def _case(name):
  fx = load_fixture(name)
  hp = _hparams(fx)
  method = methods.create_method("crdst", hp)
  pool_s = pairing.pool_kind_for_model(hp["model_s"])
  blocks_s, blocks_t = _blocks(fx, "s"), _blocks(fx, "t")
  # Stub stems at the first stage's resolution (as resnet*/wrn* stems are).
  side = blocks_s[0][0].shape[1] // 8
  stem = functools.partial(_stem_from_flat, pool=pool_s, side=side)
  feats_t = _features(stem(jnp.asarray(fx["in.feat_t.0"])), blocks_t,
                      jnp.asarray(fx["in.feat_t.last"]), jnp.asarray(fx["in.logit_t"]))
  feats_s0 = _features(stem(jnp.asarray(fx["in.feat_s.0"])), blocks_s,
                       jnp.asarray(fx["in.feat_s.last"]), jnp.asarray(fx["in.logit_s"]))
  memory = _memory(hp)
  abstract, params, state = _load_aux(fx, method, feats_s0, feats_t, memory)
  batch = {"index": jnp.asarray(fx["in.idx"]), "label": jnp.asarray(fx["in.target"]),
           "contrast_idx": jnp.asarray(fx["in.contrast_idx"])}
  gamma, alpha, beta = (float(fx[f"hp.{k}"]) for k in ("gamma", "alpha", "beta"))

  def total_fn(params, v0_s, blocks_s, pooled_s, logit_s, state):
    feats_s = _features(stem(v0_s), blocks_s, pooled_s, logit_s)
    method_loss, metrics, new_state = method.loss(params, state, feats_s, feats_t, batch, True)
    ce = step_lib.cross_entropy(logit_s, batch["label"], None)
    kd = distill_kl(logit_s, feats_t.logits, float(fx["hp.kd_T"]))
    total = gamma * ce + alpha * kd + beta * method_loss
    return total, (dict(metrics, ce=ce, kd=kd), new_state)

  run = jax.jit(jax.value_and_grad(total_fn, argnums=(0, 1, 2, 3, 4), has_aux=True))
  out = run(params, jnp.asarray(fx["in.feat_s.0"]), blocks_s, jnp.asarray(fx["in.feat_s.last"]),
            jnp.asarray(fx["in.logit_s"]), state)
  return fx, hp, method, memory, abstract, params, state, feats_s0, feats_t, batch, out


def _np_embed(w, b, x):
  y = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T + np.asarray(b, np.float64)
  return y / np.linalg.norm(y, axis=1, keepdims=True)


@pytest.mark.parametrize("name", CASES)
def test_losses_match_reference(name):
  fx, *_, out = _case(name)
  (total, (metrics, _)), _ = out
  n_heads = len([k for k in fx if k.startswith("out.crd_loss.")])
  for j in range(1, n_heads + 1):
    assert_close(metrics[crdst.head_name(j - 1)], fx[f"out.crd_loss.{j}"][0], **LOSS_TOL,
                 what=f"{name} crd_loss.{j}")
  assert_close(metrics["crd_final"], fx["out.loss_kd_crd"][0], **LOSS_TOL, what=f"{name} crd")
  assert_close(metrics["crd_st_sum"], fx["out.loss_kd_crdSt"][0], **LOSS_TOL,
               what=f"{name} crdSt")
  assert_close(metrics["ce"], fx["out.loss_cls"], **LOSS_TOL, what=f"{name} CE")
  assert_close(metrics["kd"], fx["out.loss_div"], **LOSS_TOL, what=f"{name} KD")
  assert_close(total, fx["out.loss"][0], **LOSS_TOL, what=f"{name} total")


@pytest.mark.parametrize("name", CASES)
def test_gradients_match_reference(name):
  fx, _, _, _, abstract, params, *_, out = _case(name)
  _, (g_params, g_v0, g_blocks, g_pooled, g_logits) = out
  assert_close(g_v0, fx["grad.in.feat_s.0"], **GRAD_TOL, what=f"{name} d/dfeat_s.0")
  assert_close(g_pooled, fx["grad.in.feat_s.last"], **GRAD_TOL, what=f"{name} d/dfeat_s.last")
  assert_close(g_logits, fx["grad.in.logit_s"], **GRAD_TOL, what=f"{name} d/dlogit_s")
  for i, stage in enumerate(g_blocks):
    last = len(stage) - 1
    assert_close(stage[-1], nchw_to_nhwc(fx[f"grad.in.block_out_s.{i}.{last}"]), **GRAD_TOL,
                 what=f"{name} d/dblock_out_s.{i}.{last}")
  assert set(g_params) == {crdst.head_name(i) for i in range(len(g_params))}
  for i in range(len(g_params)):
    name_i = crdst.head_name(i)
    expected = torch_import.state_dict_to_variables(
        with_prefix(fx, f"grad.w.crd.{i + 1}."), {"params": abstract["params"][name_i]})["params"]
    jax.tree.map(lambda a, e, i=i: assert_close(a, e, **GRAD_TOL, what=f"{name} d/dembed {i}"),
                 g_params[name_i], expected)


@pytest.mark.parametrize("name", CASES)
def test_banks_and_z_after_the_call(name):
  """Z as the reference set it; bank rows ``idx`` = normalize(m * old + (1 - m) * v),
  v computed here from the fixture's pairs and embeds; all other rows unchanged."""
  fx, hp, _, memory, _, _, state, *_, out = _case(name)
  (_, (_, new_state)), _ = out
  n_heads = len(new_state["contrast"])
  inputs_s = ([fx["in.feat_s.0"]] + [fx[f"out.pair.{i}.s"] for i in range(n_heads - 2)]
              + [fx["in.feat_s.last"]])
  inputs_t = ([fx["in.feat_t.0"]] + [fx[f"out.pair.{i}.t"] for i in range(n_heads - 2)]
              + [fx["in.feat_t.last"]])
  idx = fx["in.idx"]
  m = hp["nce_m"]
  for i in range(n_heads):
    j = i + 1
    bank = new_state["contrast"][crdst.head_name(i)]
    after = fx[f"after.crd.{j}.contrast.params"]
    assert_close(bank["z_v1"], after[2], **STATE_TOL, what=f"{name} crd.{j} Z_v1")
    assert_close(bank["z_v2"], after[3], **STATE_TOL, what=f"{name} crd.{j} Z_v2")
    for side, x, mem in (("s", inputs_s[i], "memory_v1"), ("t", inputs_t[i], "memory_v2")):
      v = _np_embed(fx[f"init.crd.{j}.embed_{side}.linear.weight"],
                    fx[f"init.crd.{j}.embed_{side}.linear.bias"], x)
      expected = np.array(fx[f"init.crd.{j}.contrast.{mem}"], np.float64)
      rows = m * expected[idx] + (1 - m) * v
      expected[idx] = rows / np.linalg.norm(rows, axis=1, keepdims=True)
      got = memory.unpadded(bank)[0 if mem == "memory_v1" else 1]
      assert_close(got, expected, **STATE_TOL, what=f"{name} crd.{j} {mem}")
  # The old state is untouched (pure update).
  assert float(state["contrast"]["crd_0"]["z_v1"]) == -1.0


@pytest.mark.parametrize("name", CASES)
def test_metric_names_and_st_choices(name):
  fx, hp, _, _, _, _, _, feats_s, feats_t, _, out = _case(name)
  (_, (metrics, _)), _ = out
  n_stages = len(feats_s.blocks)
  heads = [crdst.head_name(i) for i in range(n_stages + 2)]
  expected = set(heads) | {f"{h}_{x}" for h in heads for x in "st"}
  expected |= {"crd_final", "crd_st_sum", "ce", "kd"} | {f"st_choice_{i}" for i in range(n_stages)}
  assert set(metrics) == expected
  assert float(metrics["crd_final"]) == float(metrics[heads[-1]])
  for h in heads:
    assert_close(metrics[h], metrics[f"{h}_s"] + metrics[f"{h}_t"], **LOSS_TOL, what=h)
  pool = pairing.pool_kind_for_model(hp["model_s"])
  keys = pairing.similarity_transfer(feats_s.blocks, feats_t.blocks, hp["st_method"], pool).keys
  for i, k in enumerate(keys):
    assert float(metrics[f"st_choice_{i}"]) == int(k)
    if hp["st_method"] == "Last":
      assert int(k) == len(feats_t.blocks[i]) - 1


def test_default_weights_and_hparams():
  fx = load_fixture(CASES[1])
  method = methods.create_method("crdst", _hparams(fx))
  assert method.default_weights == (1.0, 0.0, 0.8)
  assert method.frozen_aux == () and not method.needs_contrast_idx
  assert methods.create_method("crdst", _hparams(fx, sampling="batch")).needs_contrast_idx
  for beta in (0.0, -0.8):
    with pytest.raises(ValueError, match="beta > 0"):
      methods.create_method("crdst", _hparams(fx, beta=beta))
  with pytest.raises(ValueError, match="st_method"):
    methods.create_method("crdst", _hparams(fx, st_method="Middle"))
  with pytest.raises(ValueError, match="model_s"):
    methods.create_method("crdst", _hparams(fx, model_s=None))
  with pytest.raises(ValueError, match="MobileNetV2"):
    methods.create_method("crdst", _hparams(fx, model_s="MobileNetV2"))


def test_bad_shapes_raise_method_shape_error_naming_models():
  """resnet8 -> resnet32x4 works for CRD but not for CKTF: the stems differ in width."""
  x = jnp.zeros((2, 32, 32, 3))

  def feats(name):
    model = models.create_model(name, 100)
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x[:1]))
    return jax.eval_shape(lambda v: model.apply(v, x), variables)

  method = methods.create_method("crdst", dict(model_s="resnet8", model_t="resnet32x4",
                                               n_data=10, nce_k=4, feat_dim=8, sampling="batch"))
  with pytest.raises(methods.MethodShapeError, match=r"resnet8 -> resnet32x4.*stem"):
    jax.eval_shape(method.init, jax.random.PRNGKey(0), feats("resnet8"), feats("resnet32x4"))
  # A compatible pair builds L + 2 heads of the reference's sizes.
  ok = methods.create_method("crdst", dict(model_s="resnet8", model_t="resnet20",
                                           n_data=10, nce_k=4, feat_dim=8, sampling="batch"))
  # Eager, as the train loop calls it: its own embeds and fresh banks per head.
  zeros = lambda tree: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), tree)
  aux = ok.init(jax.random.PRNGKey(0), zeros(feats("resnet8")), zeros(feats("resnet20")))
  assert sorted(aux["params"]) == [crdst.head_name(i) for i in range(5)]
  assert sorted(aux["contrast"]) == [crdst.head_name(i) for i in range(5)]
  assert aux["params"]["crd_2"]["embed_s"]["linear"]["kernel"].shape == (128, 8)
  banks = aux["contrast"]
  assert banks["crd_4"]["memory_v1"].shape[1] == 8
  assert all(float(b["z_v1"]) == -1.0 for b in banks.values())
  assert not np.array_equal(banks["crd_0"]["memory_v1"], banks["crd_1"]["memory_v1"])


def test_on_device_negatives_are_shared_by_all_heads():
  """Without batch['contrast_idx'] one draw per batch feeds every head: the same
  numbers as passing that draw explicitly; the sampler key advances once."""
  fx, hp, method, _, _, params, state, feats_s, feats_t, batch, _ = _case(CASES[1])
  setup = ContrastSetup.from_hparams(hp)
  sampler = setup.init_sampler_state(jax.random.PRNGKey(3))
  state = dict(state, crd_sampler=sampler)
  plain = {k: v for k, v in batch.items() if k != "contrast_idx"}
  drawn, advanced = setup.contrast_indices(sampler, plain, True)
  with_idx = dict(plain, contrast_idx=drawn)

  @jax.jit
  def both(params, state):
    a = method.loss(params, state, feats_s, feats_t, plain, True)
    b = method.loss(params, state, feats_s, feats_t, with_idx, True)
    return a, b

  (loss_a, metrics_a, state_a), (loss_b, metrics_b, state_b) = both(params, state)
  assert float(loss_a) == float(loss_b)
  for k in metrics_a:
    assert float(metrics_a[k]) == float(metrics_b[k]), k
  np.testing.assert_array_equal(state_a["crd_sampler"]["key"], advanced["key"])
  np.testing.assert_array_equal(state_b["crd_sampler"]["key"], sampler["key"])


def test_random_st_method_uses_and_advances_its_key():
  _, hp, _, _, _, params, state, feats_s, feats_t, batch, _ = _case(CASES[1])
  method = methods.create_method("crdst", dict(hp, st_method="Random", sampling="batch"))
  aux = jax.eval_shape(method.init, jax.random.PRNGKey(1), feats_s, feats_t)
  assert set(aux) == {"params", "contrast", "crdst_rng"}
  key = jax.random.key_data(jax.random.PRNGKey(1))
  assert aux["crdst_rng"]["key"].shape == key.shape
  state = dict(state, crdst_rng={"key": key})
  run = jax.jit(lambda p, s: (method.loss(p, s, feats_s, feats_t, batch, True),
                              method.loss(p, s, feats_s, feats_t, batch, False)))
  (_, m_train, s_train), (_, m_eval, s_eval) = run(params, state)
  assert not np.array_equal(s_train["crdst_rng"]["key"], state["crdst_rng"]["key"])
  np.testing.assert_array_equal(s_eval["crdst_rng"]["key"], state["crdst_rng"]["key"])
  for i, stage in enumerate(feats_t.blocks):
    assert 0 <= float(m_train[f"st_choice_{i}"]) < len(stage)
    assert float(m_train[f"st_choice_{i}"]) == float(m_eval[f"st_choice_{i}"])
  # Eval leaves the banks as they were.
  np.testing.assert_array_equal(s_eval["contrast"]["crd_0"]["memory_v1"],
                                state["contrast"]["crd_0"]["memory_v1"])
