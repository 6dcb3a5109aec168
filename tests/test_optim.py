"""Optimiser and schedule parity with torch.optim.SGD and helper/util.py."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cktf_jax.train import optim
from parity_utils import assert_close, load_fixture, with_prefix


@pytest.mark.parametrize("fixture", ["sgd_two_steps.npz", "sgd_nesterov.npz"])
def test_sgd_matches_torch(fixture):
  f = load_fixture(fixture)
  lrs = f["hp.lrs"]
  # The lr may change between steps (as adjust_learning_rate does): feed it per step.
  tx = optim.torch_sgd(lambda step: jnp.asarray(lrs)[step], float(f["hp.momentum"]),
                       float(f["hp.weight_decay"]), bool(f["hp.nesterov"]))
  params = {k: jnp.asarray(v) for k, v in with_prefix(f, "in.param.").items()}
  state = tx.init(params)
  for step in range(1, int(f["hp.steps"]) + 1):
    grads = {k: jnp.asarray(v) for k, v in with_prefix(f, f"in.grad.{step}.").items()}
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    for name, value in params.items():
      assert_close(value, f[f"out.param.{step}.{name}"], 1e-6, 1e-7, f"{fixture} step {step} {name}")
    momentum = state[1][0].trace  # optax.sgd's trace = torch's momentum_buffer
    for name, value in momentum.items():
      assert_close(value, f[f"out.momentum_buffer.{step}.{name}"], 1e-6, 1e-7,
                   f"{fixture} step {step} momentum {name}")


@pytest.mark.parametrize("case", ["default", "lr001"])
def test_epoch_schedule_matches_reference(case):
  f = load_fixture("lr_schedules.npz")
  base, epochs = float(f[f"hp.{case}.learning_rate"]), list(f[f"hp.{case}.lr_decay_epochs"])
  rate = float(f[f"hp.{case}.lr_decay_rate"])
  ours = [optim.epoch_learning_rate(int(e), base, epochs, rate) for e in f[f"in.{case}.epochs"]]
  np.testing.assert_array_equal(np.asarray(ours), f[f"out.{case}.lr"])
  # The per-step schedule the train step uses gives the same lr in every epoch (fp32).
  steps_per_epoch = 3
  schedule = jax.jit(optim.step_learning_rate_fn(base, epochs, rate, steps_per_epoch))
  steps = (np.asarray(f[f"in.{case}.epochs"]) - 1) * steps_per_epoch + 2  # mid-epoch
  np.testing.assert_allclose(np.asarray(jax.vmap(schedule)(jnp.asarray(steps))),
                             f[f"out.{case}.lr"], rtol=1e-6)
