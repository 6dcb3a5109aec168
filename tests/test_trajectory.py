"""Replay 12 SGD steps of the reference's train_distill and match it step by step.

Fixtures: ``tests/fixtures/parity/trajectory/`` (see its MANIFEST.md, section
"Reproducibility"): the reference's initial weights, batches and recorded
losses/logits/final state. Tolerances are the fixture's own
``suggested_tolerance`` (10x the float32 drift the reference shows against
itself under 1-ulp perturbations), never looser.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cktf_jax import methods, models
from cktf_jax.contrast import ContrastMemory
from cktf_jax.methods import crdst
from cktf_jax.models import torch_import
from cktf_jax.train import optim, step as step_lib
from parity_utils import FIXTURES, load_fixture, nchw_to_nhwc, variables_from_state, with_prefix

TRAJ = FIXTURES / "trajectory"


def _tolerances(case):
  manifest = json.loads((TRAJ / "manifest.json").read_text())
  return next(f for f in manifest["files"] if f["file"] == case)["suggested_tolerance"]


def _models(f):
  """Student and teacher modules with the case's teacher and initial student weights."""
  num_classes = int(f["hp.num_classes"])
  name_s, name_t = str(f["hp.model_s"]), str(f["hp.model_t"])
  student = models.create_model(name_s, num_classes)
  teacher = models.create_model(name_t, num_classes)
  teacher_vars = variables_from_state(name_t, num_classes, with_prefix(f, "w.teacher."))
  student_vars = variables_from_state(name_s, num_classes, with_prefix(f, "init.student."))
  return student, teacher, student_vars, teacher_vars


def _student_logits_fn(student):
  return jax.jit(lambda s, x: student.apply({"params": s.params["student"],
                                             "batch_stats": s.batch_stats},
                                            x, train=True, mutable=["batch_stats"])[0].logits)


def _batch(f, images, k):
  index = f["in.batch_index"][k]
  batch = {"image": jnp.asarray(images[index]), "label": jnp.asarray(f["in.batch_target"][k]),
           "index": jnp.asarray(index)}
  if "in.contrast_idx" in f:
    batch["contrast_idx"] = jnp.asarray(f["in.contrast_idx"][k])
  return batch


def _check_logits(logits, f, tol, k):
  expected = f["out.logit_s"][k]
  assert np.max(np.abs(logits - expected)) <= (
      tol["logit_s_rtol_of_absmax"][k] * np.max(np.abs(expected))), f"step {k + 1} logits"


def _check_final_student(f, state, tol):
  """Final student (params and BN buffers): atol = factor * max|after - init| per tensor."""
  num_classes, name_s = int(f["hp.num_classes"]), str(f["hp.model_s"])
  ours = {"params": state.params["student"], "batch_stats": state.batch_stats}
  expected = variables_from_state(name_s, num_classes, with_prefix(f, "after.student."))
  initial = variables_from_state(name_s, num_classes, with_prefix(f, "init.student."))
  factors = tol["final_params_atol_factor_of_max_update"]
  for collection in ("params", "batch_stats"):
    for path, value in jax.tree_util.tree_leaves_with_path(ours[collection]):
      key, _ = torch_import.torch_key_and_layout(
          collection, tuple(p.key for p in path), np.ndim(value))
      e = np.asarray(dict(jax.tree_util.tree_leaves_with_path(expected[collection]))[path])
      i = np.asarray(dict(jax.tree_util.tree_leaves_with_path(initial[collection]))[path])
      atol = factors[f"student.{key}"] * np.max(np.abs(e - i))
      assert np.max(np.abs(np.asarray(value) - e)) <= atol, f"final {key}"


def _student_momentum(f, state):
  """(ours, reference) momentum buffers of the student, leaf by leaf."""
  num_classes, name_s = int(f["hp.num_classes"]), str(f["hp.model_s"])
  momentum = variables_from_state(name_s, num_classes, with_prefix(f, "after.momentum.student."),
                                  collections=("params",))["params"]
  ours_m = optim.momentum_buffers(state.opt_state)["student"]
  return list(zip(jax.tree_util.tree_leaves(ours_m), jax.tree_util.tree_leaves(momentum)))


def _global_l2_rel(pairs):
  diff = sum(float(np.sum((np.asarray(a) - np.asarray(b)) ** 2)) for a, b in pairs)
  norm = sum(float(np.sum(np.asarray(b) ** 2)) for _, b in pairs)
  return np.sqrt(diff / norm)


def test_kd_trajectory_matches_reference():
  case = "traj_kd_r20_r8.npz"
  f = load_fixture(f"trajectory/{case}")
  tol = _tolerances(case)
  data = load_fixture("trajectory/dataset.npz")
  images = nchw_to_nhwc(data["in.images"])
  student, teacher, student_vars, teacher_vars = _models(f)

  method = methods.create_method(str(f["hp.distill"]), {"kd_T": float(f["hp.kd_T"])})
  weights = step_lib.LossWeights(float(f["hp.gamma"]), float(f["hp.alpha"]),
                                 float(f["hp.beta"]), float(f["hp.kd_T"]))
  tx = optim.distillation_optimizer(
      float(f["hp.lr"]), {"student": student_vars["params"], "aux": {}}, method.frozen_aux,
      float(f["hp.momentum"]), float(f["hp.weight_decay"]), bool(f["hp.nesterov"]))
  state = step_lib.create_train_state(jax.random.PRNGKey(0), student_vars, {}, tx)
  train_step = jax.jit(step_lib.make_train_step(student, tx, weights, teacher, method))
  logits_fn = _student_logits_fn(student)

  for k in range(int(f["hp.steps"])):
    batch = _batch(f, images, k)
    _check_logits(np.asarray(logits_fn(state, batch["image"])), f, tol, k)
    state, metrics = train_step(state, batch, teacher_vars)
    for ours, theirs in (("loss", "loss"), ("ce", "loss_cls"), ("kd", "loss_div")):
      rtol = tol["loss_rtol"][theirs][k]
      np.testing.assert_allclose(float(metrics[ours]), float(f[f"out.{theirs}"][k]), rtol=rtol,
                                 err_msg=f"step {k + 1} {theirs}")

  _check_final_student(f, state, tol)

  # Momentum buffers: global relative L2 deviation.
  assert _global_l2_rel(_student_momentum(f, state)) <= tol["final_momentum_global_l2_rel"]


def _crd_params_from_state(f, prefix, template, n_heads):
  """``{prefix}crd.<j>.embed_*`` (PyTorch layout) as our ``{'crd_<j-1>': ...}`` params."""
  return {crdst.head_name(i): torch_import.state_dict_to_variables(
      {k: v for k, v in with_prefix(f, f"{prefix}crd.{i + 1}.").items()
       if not k.startswith("contrast.")},
      {"params": template[crdst.head_name(i)]})["params"] for i in range(n_heads)}


def _torch_names(params):
  """Reference parameter names (``student.<key>``, ``crd.<j>.<key>``) of our params."""
  names = []
  for path, value in jax.tree_util.tree_leaves_with_path(params):
    keys = tuple(p.key for p in path)
    if keys[0] == "student":
      role, keys = "student", keys[1:]
    else:
      role, keys = f"crd.{int(keys[1][len('crd_'):]) + 1}", keys[2:]
    names.append(f"{role}.{torch_import.torch_key_and_layout('params', keys, np.ndim(value))[0]}")
  return names


def test_crdst_trajectory_matches_reference():
  """CKTF (Last) resnet20 -> resnet8: 12 steps with the recorded negatives."""
  case = "traj_crdst_last_r20_r8.npz"
  f = load_fixture(f"trajectory/{case}")
  tol = _tolerances(case)
  images = nchw_to_nhwc(load_fixture("trajectory/dataset.npz")["in.images"])
  student, teacher, student_vars, teacher_vars = _models(f)
  hp = {k: f[f"hp.{k}"].item() for k in (
      "model_s", "model_t", "st_method", "theta", "beta", "feat_dim", "nce_k", "nce_t",
      "nce_m", "mode", "head", "n_data")}
  method = methods.create_method(str(f["hp.distill"]), dict(hp, labels=f["in.labels"]))
  weights = step_lib.LossWeights(float(f["hp.gamma"]), float(f["hp.alpha"]),
                                 float(f["hp.beta"]), float(f["hp.kd_T"]))

  # The method's aux variables, loaded with the reference's initial embeds and banks.
  x = jnp.asarray(images[:2])
  feats_s = jax.eval_shape(lambda v: student.apply(v, x), student_vars)
  feats_t = jax.eval_shape(lambda v: teacher.apply(v, x), teacher_vars)
  abstract = jax.eval_shape(method.init, jax.random.PRNGKey(0), feats_s, feats_t)
  n_heads = len(abstract["params"])
  assert n_heads == f["out.crd_s_loss"].shape[1]
  memory = ContrastMemory(hp["n_data"], hp["feat_dim"], hp["nce_t"], hp["nce_m"])

  def banks(prefix):
    out = {}
    for i in range(n_heads):
      sd = with_prefix(f, f"{prefix}crd.{i + 1}.contrast.")
      out[crdst.head_name(i)] = memory.from_arrays(sd["memory_v1"], sd["memory_v2"],
                                                   sd["params"][2], sd["params"][3])
    return out

  aux = {"params": _crd_params_from_state(f, "init.", abstract["params"], n_heads),
         "contrast": banks("init.")}
  # The trainable set: student + every embed, weight decay on all (hp.trainable_params).
  tx = optim.distillation_optimizer(
      float(f["hp.lr"]), {"student": student_vars["params"], "aux": aux["params"]},
      method.frozen_aux, float(f["hp.momentum"]), float(f["hp.weight_decay"]),
      bool(f["hp.nesterov"]))
  trainable = str(f["hp.trainable_params"]).split()
  assert sorted(_torch_names({"student": student_vars["params"], "aux": aux["params"]})) == sorted(
      trainable)
  state = step_lib.create_train_state(jax.random.PRNGKey(0), student_vars, aux, tx)
  train_step = jax.jit(step_lib.make_train_step(student, tx, weights, teacher, method))
  logits_fn = _student_logits_fn(student)

  m = method.name
  for k in range(int(f["hp.steps"])):
    batch = _batch(f, images, k)
    _check_logits(np.asarray(logits_fn(state, batch["image"])), f, tol, k)
    state, metrics = train_step(state, batch, teacher_vars)
    checks = [("loss", "loss", "loss"), ("ce", "loss_cls", "loss_cls"),
              ("kd", "loss_div", "loss_div"),
              (f"{m}/crd_final", "loss_kd_crd", "loss_kd_crd"),
              (f"{m}/crd_st_sum", "loss_kd_crdSt", "loss_kd_crdSt")]
    for ours, theirs, rtol_key in checks:
      np.testing.assert_allclose(float(metrics[ours]), float(np.ravel(f[f"out.{theirs}"][k])[0]),
                                 rtol=tol["loss_rtol"][rtol_key][k],
                                 err_msg=f"step {k + 1} {theirs}")
    # Each head as the fixture stores it: heads 0..L are the terms of loss_kd_crdSt
    # (its rtol), head L+1 is loss_kd_crd (its rtol); the same for their two NCE terms.
    for i in range(n_heads):
      final = i == n_heads - 1
      rtol = tol["loss_rtol"]["loss_kd_crd" if final else "loss_kd_crdSt"][k]
      expected = f["out.loss_kd_crd"][k, 0] if final else f["out.loss_kd_crdSt_terms"][k, i, 0]
      for ours, theirs in (("", expected), ("_s", f["out.crd_s_loss"][k, i, 0]),
                           ("_t", f["out.crd_t_loss"][k, i, 0])):
        np.testing.assert_allclose(float(metrics[f"{m}/crd_{i}{ours}"]), float(theirs),
                                   rtol=rtol, err_msg=f"step {k + 1} head {i}{ours}")
    for i, choice in enumerate(f["out.st_choice"][k]):
      assert float(metrics[f"{m}/st_choice_{i}"]) == int(choice), f"step {k + 1} stage {i}"

  _check_final_student(f, state, tol)

  # Final embeds, banks and Z: atol = factor * max|after - init| per reference tensor.
  factors = tol["final_params_atol_factor_of_max_update"]
  expected = _crd_params_from_state(f, "after.", abstract["params"], n_heads)
  initial = _crd_params_from_state(f, "init.", abstract["params"], n_heads)
  ours = state.params["aux"]
  for path, value in jax.tree_util.tree_leaves_with_path(ours):
    keys = tuple(p.key for p in path)
    head = int(keys[0][len("crd_"):])
    name, _ = torch_import.torch_key_and_layout("params", keys[1:], np.ndim(value))
    e = np.asarray(dict(jax.tree_util.tree_leaves_with_path(expected))[path])
    i = np.asarray(dict(jax.tree_util.tree_leaves_with_path(initial))[path])
    atol = factors[f"crd.{head + 1}.{name}"] * np.max(np.abs(e - i))
    assert np.max(np.abs(np.asarray(value) - e)) <= atol, f"final crd.{head + 1}.{name}"
  for i in range(n_heads):
    role = f"crd.{i + 1}.contrast."
    bank = state.aux_state["contrast"][crdst.head_name(i)]
    for side, got in zip(("memory_v1", "memory_v2"), memory.unpadded(bank)):
      e, i0 = f[f"after.{role}{side}"], f[f"init.{role}{side}"]
      atol = factors[role + side] * np.max(np.abs(e - i0))
      assert np.max(np.abs(np.asarray(got) - e)) <= atol, f"final {role}{side}"
    e, i0 = f[f"after.{role}params"], f[f"init.{role}params"]
    atol = factors[role + "params"] * np.max(np.abs(e - i0))
    for z, col in (("z_v1", 2), ("z_v2", 3)):
      assert abs(float(bank[z]) - float(e[col])) <= atol, f"final {role}{z}"

  # Every trainable tensor: global L2 deviation over the global L2 update.
  ours_all = {"student": state.params["student"], "aux": state.params["aux"]}
  num_classes, name_s = int(f["hp.num_classes"]), str(f["hp.model_s"])
  expected_all = {"student": variables_from_state(name_s, num_classes,
                                                  with_prefix(f, "after.student."))["params"],
                  "aux": expected}
  initial_all = {"student": variables_from_state(name_s, num_classes,
                                                 with_prefix(f, "init.student."))["params"],
                 "aux": initial}
  dev = sum(float(np.sum((np.asarray(a) - np.asarray(b)) ** 2)) for a, b in zip(
      jax.tree_util.tree_leaves(ours_all), jax.tree_util.tree_leaves(expected_all)))
  upd = sum(float(np.sum((np.asarray(b) - np.asarray(c)) ** 2)) for b, c in zip(
      jax.tree_util.tree_leaves(expected_all), jax.tree_util.tree_leaves(initial_all)))
  assert np.sqrt(dev / upd) <= tol["final_params_global_l2_over_update"]

  # Momentum buffers of student + embeds: global relative L2 deviation.
  ours_m = optim.momentum_buffers(state.opt_state)["aux"]
  theirs_m = _crd_params_from_state(f, "after.momentum.", abstract["params"], n_heads)
  pairs = _student_momentum(f, state) + list(zip(jax.tree_util.tree_leaves(ours_m),
                                                 jax.tree_util.tree_leaves(theirs_m)))
  assert len(pairs) == len(trainable)
  assert _global_l2_rel(pairs) <= tol["final_momentum_global_l2_rel"]
