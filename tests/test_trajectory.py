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
from cktf_jax.models import torch_import
from cktf_jax.train import optim, step as step_lib
from parity_utils import FIXTURES, load_fixture, nchw_to_nhwc, variables_from_state, with_prefix

TRAJ = FIXTURES / "trajectory"


def _tolerances(case):
  manifest = json.loads((TRAJ / "manifest.json").read_text())
  return next(f for f in manifest["files"] if f["file"] == case)["suggested_tolerance"]


def test_kd_trajectory_matches_reference():
  case = "traj_kd_r20_r8.npz"
  f = load_fixture(f"trajectory/{case}")
  tol = _tolerances(case)
  data = load_fixture("trajectory/dataset.npz")
  images = nchw_to_nhwc(data["in.images"])
  num_classes = int(f["hp.num_classes"])
  name_s, name_t = str(f["hp.model_s"]), str(f["hp.model_t"])
  student = models.create_model(name_s, num_classes)
  teacher = models.create_model(name_t, num_classes)
  teacher_vars = variables_from_state(name_t, num_classes, with_prefix(f, "w.teacher."))
  student_vars = variables_from_state(name_s, num_classes, with_prefix(f, "init.student."))

  method = methods.create_method(str(f["hp.distill"]), {"kd_T": float(f["hp.kd_T"])})
  weights = step_lib.LossWeights(float(f["hp.gamma"]), float(f["hp.alpha"]),
                                 float(f["hp.beta"]), float(f["hp.kd_T"]))
  tx = optim.distillation_optimizer(
      float(f["hp.lr"]), {"student": student_vars["params"], "aux": {}}, method.frozen_aux,
      float(f["hp.momentum"]), float(f["hp.weight_decay"]), bool(f["hp.nesterov"]))
  state = step_lib.create_train_state(jax.random.PRNGKey(0), student_vars, {}, tx)
  train_step = jax.jit(step_lib.make_train_step(student, tx, weights, teacher, method))
  logits_fn = jax.jit(lambda s, x: student.apply({"params": s.params["student"],
                                                  "batch_stats": s.batch_stats},
                                                 x, train=True, mutable=["batch_stats"])[0].logits)

  for k in range(int(f["hp.steps"])):
    index = f["in.batch_index"][k]
    batch = {"image": jnp.asarray(images[index]), "label": jnp.asarray(f["in.batch_target"][k]),
             "index": jnp.asarray(index)}
    logits = np.asarray(logits_fn(state, batch["image"]))
    expected = f["out.logit_s"][k]
    assert np.max(np.abs(logits - expected)) <= (
        tol["logit_s_rtol_of_absmax"][k] * np.max(np.abs(expected))), f"step {k + 1} logits"
    state, metrics = train_step(state, batch, teacher_vars)
    for ours, theirs in (("loss", "loss"), ("ce", "loss_cls"), ("kd", "loss_div")):
      rtol = tol["loss_rtol"][theirs][k]
      np.testing.assert_allclose(float(metrics[ours]), float(f[f"out.{theirs}"][k]), rtol=rtol,
                                 err_msg=f"step {k + 1} {theirs}")

  # Final student (params and BN buffers): atol = factor * max|after - init| per tensor.
  init = with_prefix(f, "init.student.")
  after = with_prefix(f, "after.student.")
  ours = {"params": state.params["student"], "batch_stats": state.batch_stats}
  expected = variables_from_state(name_s, num_classes, after)
  initial = variables_from_state(name_s, num_classes, init)
  factors = tol["final_params_atol_factor_of_max_update"]
  for collection in ("params", "batch_stats"):
    for path, value in jax.tree_util.tree_leaves_with_path(ours[collection]):
      key, _ = torch_import.torch_key_and_layout(
          collection, tuple(p.key for p in path), np.ndim(value))
      e = np.asarray(dict(jax.tree_util.tree_leaves_with_path(expected[collection]))[path])
      i = np.asarray(dict(jax.tree_util.tree_leaves_with_path(initial[collection]))[path])
      atol = factors[f"student.{key}"] * np.max(np.abs(e - i))
      assert np.max(np.abs(np.asarray(value) - e)) <= atol, f"final {key}"

  # Momentum buffers: global relative L2 deviation.
  momentum = variables_from_state(name_s, num_classes, with_prefix(f, "after.momentum.student."),
                                  collections=("params",))["params"]
  ours_m = optim.momentum_buffers(state.opt_state)["student"]
  diff = sum(float(np.sum((np.asarray(a) - np.asarray(b)) ** 2))
             for a, b in zip(jax.tree_util.tree_leaves(ours_m), jax.tree_util.tree_leaves(momentum)))
  norm = sum(float(np.sum(np.asarray(b) ** 2)) for b in jax.tree_util.tree_leaves(momentum))
  assert np.sqrt(diff / norm) <= tol["final_momentum_global_l2_rel"]
