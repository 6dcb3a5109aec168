"""Parity of the objectives with learnable parts (FitNet, VID, AB, FT, FSP) with
the PyTorch reference, and their Methods.

* per fixture (``tests/fixtures/parity``): module outputs, loss values,
  gradients w.r.t. the student features and the auxiliary parameters, and the
  BatchNorm running statistics after the train-mode call, all under ``jax.jit``;
* per method: ``create_method`` -> ``init`` under ``jax.eval_shape`` (whose
  variables are what the reference ``state_dict`` maps onto) -> ``loss`` (and the
  init-stage loss) under ``jax.jit`` on the fixture inputs; a bad-shape case
  with its message; the ``PretrainStage`` fields.

Tolerances (MANIFEST): losses rtol 1e-5 / atol 1e-6; gradients rtol 1e-4 /
atol 1e-6 relative to the array's max |value|; module outputs and BN running
statistics as the model tests (rtol 1e-4 / atol 1e-4, running stats atol 1e-5).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from cktf_jax.losses.ab import ab_layer_weights, ab_losses
from cktf_jax.losses.fitnet import hint_loss
from cktf_jax.losses.fsp import fsp_losses
from cktf_jax.losses.ft import ft_loss, ft_reconstruction_loss
from cktf_jax.losses.at import match_spatial_size
from cktf_jax.losses.modules import (Connector, ConvReg, Paraphraser, Translator,
                                     VIDRegressor, conv_reg_branch)
from cktf_jax.losses.vid import vid_loss, vid_pred_var
from cktf_jax.methods import MethodShapeError, create_method
from cktf_jax.models import torch_import
from cktf_jax.models.features import Features
from parity_utils import assert_close, load_fixture, nchw_to_nhwc, with_prefix

LOSS_TOL = dict(rtol=1e-5, atol=1e-6)
GRAD_TOL = dict(rtol=1e-4, atol=1e-6)
OUT_TOL = dict(rtol=1e-4, atol=1e-4)
STATS_TOL = dict(rtol=1e-4, atol=1e-5)

_TORCH_LEAVES = {"kernel", "scale", "bias", "mean", "var"}


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------


def _import(template, state_dict):
  """``torch_import.state_dict_to_variables`` plus plain ``nn.Parameter``
  attributes (VID's ``log_scale``), which map to ``<path>.<name>`` unchanged."""
  extra, kept = {}, {}
  for collection, tree in template.items():
    flat = traverse_util.flatten_dict(tree)
    kept[collection] = {}
    for path, leaf in flat.items():
      if path[-1] in _TORCH_LEAVES:
        kept[collection][path] = leaf
      else:
        extra[(collection, path)] = np.asarray(state_dict[".".join(path)], np.float32)
  state = {k: v for k, v in state_dict.items()
           if not any(k == ".".join(p) for _, p in extra)}
  kept = {c: traverse_util.unflatten_dict(v) for c, v in kept.items()}
  out = torch_import.state_dict_to_variables(state, kept, what="fixture")
  for collection in template:
    flat = traverse_util.flatten_dict(out.get(collection, {}))
    flat.update({p: v for (c, p), v in extra.items() if c == collection})
    out[collection] = traverse_util.unflatten_dict(flat)
  return out


def _params_only(template):
  return {"params": template["params"]}


def _assert_tree_close(actual, expected, tol, what):
  flat_a = dict(jax.tree_util.tree_leaves_with_path(actual))
  flat_e = dict(jax.tree_util.tree_leaves_with_path(expected))
  assert flat_a.keys() == flat_e.keys(), (
      f"{what}: {sorted(map(str, flat_a))} vs {sorted(map(str, flat_e))}")
  for path, value in flat_e.items():
    name = f"{what}{jax.tree_util.keystr(path)}"
    assert np.all(np.isfinite(np.asarray(flat_a[path]))), f"{name} not finite"
    assert_close(flat_a[path], value, what=name, **tol)


def _assert_same_structure(abstract, concrete, what):
  """``init``'s abstract variables have exactly the fixture's names and shapes."""
  leaves = jax.tree_util.tree_leaves_with_path
  a = {jax.tree_util.keystr(p): tuple(v.shape) for p, v in leaves(abstract)}
  c = {jax.tree_util.keystr(p): tuple(np.shape(v)) for p, v in leaves(concrete)}
  assert a == c, f"{what}: init variables {a} != fixture {c}"


def _maps(f, prefix):
  i, out = 0, []
  while f"{prefix}.{i}" in f:
    out.append(jnp.asarray(nchw_to_nhwc(f[f"{prefix}.{i}"])))
    i += 1
  return out


def _features(stem, stages, preact=None):
  stages = tuple(stages)
  n = stem.shape[0]
  return Features(stem=stem, stages=stages,
                  stages_preact=tuple(preact) if preact is not None else stages,
                  blocks=tuple((s,) for s in stages),
                  pooled=jnp.zeros((n, stages[-1].shape[-1])), logits=jnp.zeros((n, 10)))


def _abstract_init(method, feats_s, feats_t):
  return jax.eval_shape(lambda s, t: method.init(jax.random.PRNGKey(0), s, t), feats_s, feats_t)


def _aux_state(variables):
  return {k: v for k, v in variables.items() if k != "params"}


# ----------------------------------------------------------------------------
# FitNet: HintLoss(ConvReg(f_s), f_t)
# ----------------------------------------------------------------------------

HINT_FIXTURES = ["hint_conv1x1.npz", "hint_convT.npz", "hint_conv_stride2.npz",
                 "hint_conv_valid.npz"]
HINT_BRANCH = {"hint_conv1x1.npz": "valid", "hint_convT.npz": "transpose",
               "hint_conv_stride2.npz": "stride2", "hint_conv_valid.npz": "valid"}


def _hint_case(name):
  f = load_fixture(name)
  f_s, f_t = jnp.asarray(nchw_to_nhwc(f["in.f_s"])), jnp.asarray(nchw_to_nhwc(f["in.f_t"]))
  # hint_layer 1 = the one stage of these Features (reference list [f0, f1, pooled]).
  method = create_method("hint", {"hint_layer": 1})
  feats_s, feats_t = _features(f_s, [f_s]), _features(f_t, [f_t])
  template = _abstract_init(method, feats_s, feats_t)
  variables = _import(template, with_prefix(f, "w."))
  return f, f_s, f_t, method, feats_s, feats_t, template, variables


@pytest.mark.parametrize("name", HINT_FIXTURES)
def test_hint_parity(name):
  f, f_s, f_t, _, _, _, template, variables = _hint_case(name)
  assert conv_reg_branch(f_s.shape, f_t.shape) == HINT_BRANCH[name], str(f["hp.branch"])
  reg = ConvReg(tuple(f_s.shape), tuple(f_t.shape))

  def total(params, x, stats):
    out, upd = reg.apply({"params": params, "batch_stats": stats}, x, True,
                         mutable=["batch_stats"])
    return hint_loss(out, f_t), (out, upd["batch_stats"])

  fn = jax.jit(jax.value_and_grad(total, argnums=(0, 1), has_aux=True))
  (loss, (out, stats)), (g_params, g_x) = fn(variables["params"]["reg"], f_s,
                                             variables["batch_stats"]["reg"])
  assert_close(out, nchw_to_nhwc(f["out.reg_out"]), what=f"{name} reg_out", **OUT_TOL)
  assert_close(loss, f["out.loss"], what=f"{name} loss", **LOSS_TOL)
  assert_close(g_x, nchw_to_nhwc(f["grad.in.f_s"]), what=f"{name} grad f_s", **GRAD_TOL)
  expected_g = _import(_params_only(template), with_prefix(f, "grad.w."))["params"]["reg"]
  _assert_tree_close(g_params, expected_g, GRAD_TOL, f"{name} grad ")
  after = dict(with_prefix(f, "w."), **with_prefix(f, "after."))
  expected_stats = _import(template, after)["batch_stats"]["reg"]
  _assert_tree_close(stats, expected_stats, STATS_TOL, f"{name} running stats ")


def test_hint_method_matches_reference_and_updates_stats():
  f, _, _, method, feats_s, feats_t, _, variables = _hint_case("hint_convT.npz")
  assert method.default_weights == (1.0, 0.0, 100.0) and method.pretrain is None
  fn = jax.jit(method.loss, static_argnames="train")
  loss, metrics, new_state = fn(variables["params"], _aux_state(variables), feats_s, feats_t,
                                {}, train=True)
  assert_close(loss, f["out.loss"], what="hint method loss", **LOSS_TOL)
  assert_close(metrics["hint"], f["out.loss"], what="hint metric", **LOSS_TOL)
  expected = _import(variables, dict(with_prefix(f, "w."), **with_prefix(f, "after.")))
  _assert_tree_close(new_state["batch_stats"], expected["batch_stats"], STATS_TOL, "hint state ")


def test_hint_masked_batch_equals_smaller_batch():
  """Padding of a partial batch is excluded from the loss and the BN statistics."""
  f, f_s, f_t, _, _, _, _, variables = _hint_case("hint_conv1x1.npz")
  reg = ConvReg(tuple(f_s.shape), tuple(f_t.shape))
  v = {"params": variables["params"]["reg"], "batch_stats": variables["batch_stats"]["reg"]}
  mask = jnp.array([True, True, True, False])

  @jax.jit
  def run(v):
    out_m, st_m = reg.apply(v, f_s, True, mask, mutable=["batch_stats"])
    out_3, st_3 = reg.apply(v, f_s[:3], True, mutable=["batch_stats"])
    return hint_loss(out_m, f_t, mask), hint_loss(out_3, f_t[:3]), st_m, st_3

  loss_m, loss_3, st_m, st_3 = run(v)
  assert_close(loss_m, loss_3, what="masked hint", **LOSS_TOL)
  _assert_tree_close(st_m, st_3, STATS_TOL, "masked stats ")


def test_hint_bad_shapes():
  x8 = jnp.zeros((2, 8, 8, 4))
  feats_s = _features(x8, [x8, jnp.zeros((2, 3, 3, 4))])
  feats_t = _features(x8, [x8, jnp.zeros((2, 8, 8, 4))])
  # The reference default --hint_layer 2 = the second stage: 3x3 -> 8x8 is impossible.
  with pytest.raises(MethodShapeError, match=r"hint.*height 3.*height 8.*s_H == 2\*t_H"):
    _abstract_init(create_method("hint"), feats_s, feats_t)
  with pytest.raises(MethodShapeError, match=r"hint: hint_layer=3 is out of range.*0\.\.2"):
    _abstract_init(create_method("hint", {"hint_layer": 3}), feats_s, feats_t)
  # hint_layer 1 pairs equal 8x8 maps: a 1x1 conv.
  template = _abstract_init(create_method("hint", {"hint_layer": 1}), feats_s, feats_t)
  assert template["params"]["reg"]["conv"]["kernel"].shape == (1, 1, 4, 4)


def test_conv_reg_init_matches_torch_defaults():
  s, t = (2, 4, 4, 8), (2, 8, 8, 6)
  v = jax.jit(lambda key: ConvReg(s, t).init(key, jnp.zeros(s), False))(jax.random.PRNGKey(1))
  kernel = v["params"]["conv"]["kernel"]
  assert kernel.shape == (4, 4, 6, 8)  # torch ConvTranspose2d weight [8, 6, 4, 4]
  bound = 1 / math.sqrt(6 * 4 * 4)  # torch's fan_in of a transposed conv: out * k * k
  assert float(jnp.max(jnp.abs(kernel))) <= bound and float(jnp.max(jnp.abs(kernel))) > 0.8 * bound
  assert float(jnp.max(jnp.abs(v["params"]["conv"]["bias"]))) <= bound
  np.testing.assert_array_equal(v["params"]["bn"]["scale"], np.ones(6))
  np.testing.assert_array_equal(v["batch_stats"]["bn"]["var"], np.ones(6))


# ----------------------------------------------------------------------------
# VID
# ----------------------------------------------------------------------------


def _vid_case():
  f = load_fixture("vid.npz")
  g_s, g_t = _maps(f, "in.g_s"), _maps(f, "in.g_t")
  method = create_method("vid", {"vid_init_pred_var": float(f["hp.init_pred_var"]),
                                 "vid_eps": float(f["hp.eps"])})
  feats_s, feats_t = _features(g_s[0], g_s), _features(g_t[0], g_t)
  template = _abstract_init(method, feats_s, feats_t)
  variables = _import(template, with_prefix(f, "w."))
  return f, g_s, g_t, method, feats_s, feats_t, template, variables


def test_vid_parity():
  f, g_s, g_t, _, _, _, template, variables = _vid_case()
  eps = float(f["hp.eps"])

  def total(params, xs):
    losses = []
    for i, (x, t) in enumerate(zip(xs, g_t)):
      x, t = match_spatial_size(x, t)
      mod = VIDRegressor(x.shape[-1], t.shape[-1], t.shape[-1], eps=eps)
      pred_mean, log_scale = mod.apply({"params": params[str(i)]}, x)
      losses.append(vid_loss(pred_mean, t, log_scale, eps))
    return sum(losses), losses

  fn = jax.jit(jax.value_and_grad(total, argnums=(0, 1), has_aux=True))
  (loss, losses), (g_params, g_x) = fn(variables["params"]["vid"], g_s)
  for i, l in enumerate(losses):
    assert_close(l, f[f"out.losses.{i}"], what=f"vid loss {i}", **LOSS_TOL)
  assert_close(loss, f["out.total"], what="vid total", **LOSS_TOL)
  for i, g in enumerate(g_x):
    assert_close(g, nchw_to_nhwc(f[f"grad.in.g_s.{i}"]), what=f"vid grad g_s {i}", **GRAD_TOL)
  expected_g = _import(_params_only(template), with_prefix(f, "grad.w."))["params"]["vid"]
  _assert_tree_close(g_params, expected_g, GRAD_TOL, "vid grad ")


def test_vid_method_and_init():
  f, _, _, method, feats_s, feats_t, template, variables = _vid_case()
  assert method.default_weights == (1.0, 0.0, 1.0) and method.pretrain is None
  fn = jax.jit(method.loss, static_argnames="train")
  loss, metrics, state = fn(variables["params"], {}, feats_s, feats_t, {}, train=True)
  assert_close(loss, f["out.total"], what="vid method", **LOSS_TOL)
  assert_close(metrics["vid_2"], f["out.losses.2"], what="vid metric 2", **LOSS_TOL)
  assert state == {}
  # The reference init: softplus(log_scale) + eps == init_pred_var; bias-free convs.
  real = jax.jit(method.init)(jax.random.PRNGKey(0), feats_s, feats_t)
  _assert_same_structure(template, real, "vid")
  log_scale = real["params"]["vid"]["1"]["log_scale"]
  expected = np.log(np.exp(5.0 - 1e-5) - 1.0)
  np.testing.assert_allclose(log_scale, np.full(64, expected, np.float32), rtol=1e-6)
  np.testing.assert_allclose(vid_pred_var(log_scale), 5.0, rtol=1e-6)
  assert set(real["params"]["vid"]["0"]["regressor"]) == {"0", "2", "4"}
  assert all(set(p) == {"kernel"} for p in real["params"]["vid"]["0"]["regressor"].values())


def test_vid_bad_shapes():
  s = [jnp.zeros((2, 8, 8, 4)), jnp.zeros((2, 4, 4, 8))]
  t = [jnp.zeros((2, 8, 8, 8)), jnp.zeros((2, 4, 4, 16)), jnp.zeros((2, 2, 2, 32))]
  with pytest.raises(MethodShapeError, match=r"vid pairs .* got 2 student stages .* 3 teacher"):
    _abstract_init(create_method("vid"), _features(s[0], s), _features(t[0], t))


# ----------------------------------------------------------------------------
# AB: Connector + ABLoss (init stage)
# ----------------------------------------------------------------------------


def _ab_case():
  f = load_fixture("ab.npz")
  g_s, g_t = _maps(f, "in.g_s"), _maps(f, "in.g_t")
  method = create_method("abound", {"ab_margin": float(f["hp.margin"])})
  # Pre-activation features; the post-activation ones must not be used.
  feats_s = _features(g_s[0], [jnp.full_like(x, jnp.nan) for x in g_s], preact=g_s)
  feats_t = _features(g_t[0], [jnp.full_like(x, jnp.nan) for x in g_t], preact=g_t)
  template = _abstract_init(method, feats_s, feats_t)
  variables = _import(template, with_prefix(f, "w."))
  return f, g_s, g_t, method, feats_s, feats_t, template, variables


def test_ab_parity():
  f, g_s, g_t, _, _, _, template, variables = _ab_case()
  margin = float(f["hp.margin"])
  connector = Connector(tuple(tuple(x.shape) for x in g_s), tuple(tuple(t.shape) for t in g_t))

  def total(params, xs, stats):
    outs, upd = connector.apply({"params": params, "batch_stats": stats}, xs, True,
                                mutable=["batch_stats"])
    losses = ab_losses(outs, g_t, margin)
    return sum(losses), (outs, losses, upd["batch_stats"])

  fn = jax.jit(jax.value_and_grad(total, argnums=(0, 1), has_aux=True))
  (loss, (outs, losses, stats)), (g_params, g_x) = fn(
      variables["params"]["connector"], g_s, variables["batch_stats"]["connector"])
  for i, out in enumerate(outs):
    assert_close(out, nchw_to_nhwc(f[f"out.connector.{i}"]), what=f"ab connector {i}", **OUT_TOL)
  for i, l in enumerate(losses):
    assert_close(l, f[f"out.losses.{i}"], what=f"ab loss {i}", **LOSS_TOL)
  assert_close(loss, f["out.total"], what="ab total", **LOSS_TOL)
  for i, g in enumerate(g_x):
    assert_close(g, nchw_to_nhwc(f[f"grad.in.g_s.{i}"]), what=f"ab grad g_s {i}", **GRAD_TOL)
  expected_g = _import(_params_only(template), with_prefix(f, "grad.w."))["params"]["connector"]
  _assert_tree_close(g_params, expected_g, GRAD_TOL, "ab grad ")
  after = dict(with_prefix(f, "w."), **with_prefix(f, "after."))
  _assert_tree_close(stats, _import(template, after)["batch_stats"]["connector"], STATS_TOL,
                     "ab running stats ")
  assert ab_layer_weights(3) == (0.25, 0.5, 1.0)


def test_ab_method_pretrain_and_main_stage():
  f, g_s, _, method, feats_s, feats_t, template, variables = _ab_case()
  assert method.default_weights == (1.0, 0.0, 1.0)
  stage = method.pretrain
  assert (stage.epochs, stage.train_student, stage.trainable) == (30, True, ("connector",))
  assert create_method("abound", {"init_epochs": 5}).pretrain.epochs == 5
  # Connector entry 0 is the identity: no variables.
  assert set(template["params"]["connector"]["connectors"]) == {"1", "2"}
  fn = jax.jit(stage.loss, static_argnames="train")
  loss, metrics, state = fn(variables["params"], _aux_state(variables), feats_s, feats_t, {},
                            train=True)
  assert_close(loss, f["out.total"], what="abound init-stage loss", **LOSS_TOL)
  assert_close(metrics["abound_1"], f["out.losses.1"], what="abound metric", **LOSS_TOL)
  after = _import(template, dict(with_prefix(f, "w."), **with_prefix(f, "after.")))
  _assert_tree_close(state["batch_stats"], after["batch_stats"], STATS_TOL, "abound state ")
  # Main stage: loss_kd = 0 (helper/loops.py).
  main = method.loss(variables["params"], _aux_state(variables), feats_s, feats_t, {}, True)
  assert float(main[0]) == 0.0


def test_ab_masked_batch_equals_smaller_batch():
  f = load_fixture("ab.npz")
  g_s, g_t = _maps(f, "out.connector"), _maps(f, "in.g_t")
  mask = jnp.array([True, False, True, True])
  keep = np.array([0, 2, 3])
  masked, small = jax.jit(lambda g_s, g_t: (
      ab_losses(g_s, g_t, 1.0, mask),
      ab_losses([x[keep] for x in g_s], [t[keep] for t in g_t], 1.0)))(g_s, g_t)
  for a, b in zip(masked, small):
    assert_close(a, b, what="masked ab", **LOSS_TOL)


def test_ab_bad_shapes():
  s = [jnp.zeros((2, 8, 8, 4)), jnp.zeros((2, 2, 2, 8))]
  t = [jnp.zeros((2, 8, 8, 8)), jnp.zeros((2, 8, 8, 16))]  # 2x2 -> 8x8: no ConvReg branch
  with pytest.raises(MethodShapeError,
                     match=r"abound: stage 1 connector: ConvReg cannot map.*height 2.*height 8"):
    _abstract_init(create_method("abound"), _features(s[0], s), _features(t[0], t))


# ----------------------------------------------------------------------------
# FT: Translator / Paraphraser + FactorTransfer, paraphraser init stage
# ----------------------------------------------------------------------------


def _ft_case():
  f = load_fixture("ft.npz")
  f_s, f_t = jnp.asarray(nchw_to_nhwc(f["in.f_s"])), jnp.asarray(nchw_to_nhwc(f["in.f_t"]))
  hp = {"ft_k": float(f["hp.k"]), "ft_p1": int(f["hp.p1"]), "ft_p2": int(f["hp.p2"])}
  method = create_method("factor", hp)
  feats_s, feats_t = _features(f_s, [f_s]), _features(f_t, [f_t])
  template = _abstract_init(method, feats_s, feats_t)
  variables = _import(template, with_prefix(f, "w."))
  return f, f_s, f_t, hp, method, feats_s, feats_t, template, variables


def test_ft_parity():
  f, f_s, f_t, hp, _, _, _, template, variables = _ft_case()
  k, p1, p2 = hp["ft_k"], hp["ft_p1"], hp["ft_p2"]
  translator = Translator(f_s.shape[-1], f_t.shape[-1], k)
  paraphraser = Paraphraser(f_t.shape[-1], k)

  def main(params, x, stats, para_params):
    factor_s, upd = translator.apply({"params": params, "batch_stats": stats}, x, True,
                                     mutable=["batch_stats"])
    factor_t = paraphraser.apply({"params": para_params}, f_t, is_factor=True)
    return ft_loss(factor_s, factor_t, p1, p2), (factor_s, factor_t, upd["batch_stats"])

  def rec(para_params):
    factor, r = paraphraser.apply({"params": para_params}, f_t)
    return ft_reconstruction_loss(r, f_t), (factor, r)

  @jax.jit
  def both(v):
    m = jax.value_and_grad(main, argnums=(0, 1), has_aux=True)(
        v["params"]["translator"], f_s, v["batch_stats"]["translator"], v["params"]["paraphraser"])
    r = jax.value_and_grad(rec, has_aux=True)(v["params"]["paraphraser"])
    return m, r

  main_out, rec_out = both(variables)
  (loss, (factor_s, factor_t, stats)), (g_params, g_x) = main_out
  (rec_loss, (factor, r)), g_para = rec_out
  assert_close(factor_s, nchw_to_nhwc(f["out.factor_s"]), what="ft factor_s", **OUT_TOL)
  assert_close(factor_t, nchw_to_nhwc(f["out.factor_t"]), what="ft factor_t", **OUT_TOL)
  assert_close(loss, f["out.loss"], what="ft loss", **LOSS_TOL)
  assert_close(g_x, nchw_to_nhwc(f["grad.in.f_s"]), what="ft grad f_s", **GRAD_TOL)
  grads = _import({"params": {"translator": template["params"]["translator"]}},
                  with_prefix(f, "grad.w."))["params"]["translator"]
  _assert_tree_close(g_params, grads, GRAD_TOL, "ft grad ")
  after = dict(with_prefix(f, "w."), **with_prefix(f, "after."))
  _assert_tree_close(stats, _import(template, after)["batch_stats"]["translator"], STATS_TOL,
                     "ft running stats ")
  # Init stage: reconstruction through the ConvTranspose2d decoder.
  assert_close(factor, nchw_to_nhwc(f["out.rec.factor"]), what="ft rec factor", **OUT_TOL)
  assert_close(r, nchw_to_nhwc(f["out.rec.rec"]), what="ft rec", **OUT_TOL)
  assert_close(rec_loss, f["out.rec.loss"], what="ft rec loss", **LOSS_TOL)
  rec_grads = _import({"params": {"paraphraser": template["params"]["paraphraser"]}},
                      with_prefix(f, "grad.rec.w."))["params"]["paraphraser"]
  _assert_tree_close(g_para, rec_grads, GRAD_TOL, "ft rec grad ")


def test_ft_method_pretrain_and_frozen_paraphraser():
  f, _, _, _, method, feats_s, feats_t, template, variables = _ft_case()
  assert method.default_weights == (1.0, 0.0, 200.0)
  stage = method.pretrain
  assert (stage.epochs, stage.train_student, stage.trainable) == (30, False, ("paraphraser",))
  assert set(template["batch_stats"]) == {"translator"}  # the paraphraser has no BN

  @jax.jit
  def run(v):
    def main(params):
      loss, _, state = method.loss(params, _aux_state(v), feats_s, feats_t, {}, True)
      return loss, state
    (loss, state), grads = jax.value_and_grad(main, has_aux=True)(v["params"])
    init_loss, _, _ = stage.loss(v["params"], _aux_state(v), feats_s, feats_t, {}, True)
    return loss, state, grads, init_loss

  loss, state, grads, init_loss = run(variables)
  assert_close(loss, f["out.loss"], what="factor main loss", **LOSS_TOL)
  assert_close(init_loss, f["out.rec.loss"], what="factor init-stage loss", **LOSS_TOL)
  after = _import(template, dict(with_prefix(f, "w."), **with_prefix(f, "after.")))
  _assert_tree_close(state["batch_stats"], after["batch_stats"], STATS_TOL, "factor state ")
  # The paraphraser is frozen in the main stage.
  assert all(float(jnp.max(jnp.abs(g))) == 0.0
             for g in jax.tree_util.tree_leaves(grads["paraphraser"]))
  assert float(jnp.max(jnp.abs(grads["translator"]["encoder"]["0"]["kernel"]))) > 0


def test_ft_bad_shapes():
  s, t = jnp.zeros((2, 4, 4, 8)), jnp.zeros((2, 4, 4, 1))
  with pytest.raises(MethodShapeError, match=r"factor: k=0.5 leaves int\(1 \* k\) = 0"):
    _abstract_init(create_method("factor"), _features(s, [s]), _features(t, [t]))


# ----------------------------------------------------------------------------
# FSP (init stage only)
# ----------------------------------------------------------------------------


def test_fsp_parity_and_method():
  f = load_fixture("fsp.npz")
  g_s, g_t = _maps(f, "in.g_s"), _maps(f, "in.g_t")
  method = create_method("fsp")
  feats_s, feats_t = _features(g_s[0], g_s[1:]), _features(g_t[0], g_t[1:])
  assert _abstract_init(method, feats_s, feats_t) == {}
  stage = method.pretrain
  assert method.default_weights == (1.0, 0.0, 50.0)
  assert (stage.epochs, stage.train_student, stage.trainable) == (30, True, ())

  @jax.jit
  def run(xs):
    def total(xs):
      losses = fsp_losses(xs, g_t)
      return sum(losses), losses
    (loss, losses), g = jax.value_and_grad(total, has_aux=True)(xs)
    s = _features(xs[0], xs[1:])
    stage_loss, _, _ = stage.loss({}, {}, s, feats_t, {}, True)
    main_loss, _, _ = method.loss({}, {}, s, feats_t, {}, True)
    return loss, losses, g, stage_loss, main_loss

  loss, losses, g, stage_loss, main_loss = run(g_s)
  for i, l in enumerate(losses):
    assert_close(l, f[f"out.losses.{i}"], what=f"fsp loss {i}", **LOSS_TOL)
  assert_close(loss, f["out.total"], what="fsp total", **LOSS_TOL)
  assert_close(stage_loss, f["out.total"], what="fsp init-stage loss", **LOSS_TOL)
  assert float(main_loss) == 0.0  # helper/loops.py: loss_kd = 0 in the main stage
  for i, gi in enumerate(g):
    assert_close(gi, nchw_to_nhwc(f[f"grad.in.g_s.{i}"]), what=f"fsp grad g_s {i}", **GRAD_TOL)


def test_fsp_bad_shapes():
  s = [jnp.zeros((2, 8, 8, 4)), jnp.zeros((2, 4, 4, 8))]
  t = [jnp.zeros((2, 8, 8, 4)), jnp.zeros((2, 4, 4, 16))]
  with pytest.raises(MethodShapeError, match=r"fsp needs equal channels.*\[4, 8\].*\[4, 16\]"):
    _abstract_init(create_method("fsp"), _features(s[0], s[1:]), _features(t[0], t[1:]))
  with pytest.raises(MethodShapeError, match=r"fsp compares .* 2 student maps .* 3 teacher maps"):
    _abstract_init(create_method("fsp"), _features(s[0], s[1:]),
                   _features(t[0], [t[1], jnp.zeros((2, 2, 2, 16))]))
