"""Multi-process runs (``cktf_jax.distributed``): when ``jax.distributed`` is
initialised, and two ``launch.py`` processes on localhost (CPU, 2 simulated
devices each, gloo collectives) training in lockstep with one process of 4."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cktf_jax import distributed, models
from cktf_jax.models import convert
from cktf_jax.train import loop

REPO = pathlib.Path(__file__).parent.parent
CLUSTER_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_JOB_ID",
               "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID",
               "OMPI_MCA_orte_hnp_uri", "PMIX_SERVER_URI2", "KUBERNETES_SERVICE_HOST")


@pytest.fixture
def initialize_calls(monkeypatch):
  """``jax.distributed.initialize``'s calls (kwargs), none made; a clean environment."""
  for name in CLUSTER_ENV:
    monkeypatch.delenv(name, raising=False)
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
  return calls


def test_a_plain_or_one_process_run_initializes_nothing(initialize_calls, monkeypatch):
  assert not distributed.initialize_from_environment()
  monkeypatch.setenv("JAX_NUM_PROCESSES", "1")
  assert not distributed.initialize_from_environment()
  monkeypatch.delenv("JAX_NUM_PROCESSES")
  slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[01-02]", "SLURM_NTASKS": "1",
           "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
  for name, value in slurm.items():
    monkeypatch.setenv(name, value)
  assert not distributed.initialize_from_environment()  # a one-task SLURM job
  assert initialize_calls == []


def test_our_variables_or_a_cluster_of_several_processes_initialize(initialize_calls,
                                                                    monkeypatch):
  monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
  with pytest.raises(distributed.DistributedSetupError,
                     match="JAX_COORDINATOR_ADDRESS and JAX_PROCESS_ID are not set"):
    distributed.initialize_from_environment()
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
  monkeypatch.setenv("JAX_PROCESS_ID", "1")
  assert distributed.initialize_from_environment()
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    monkeypatch.delenv(name)
  for name, value in {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[01-02]",
                      "SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}.items():
    monkeypatch.setenv(name, value)
  assert distributed.initialize_from_environment()  # jax reads SLURM's variables itself
  assert initialize_calls == [
      dict(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=1), {}]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _overrides(teacher_dir):
  """CRD distillation: the memory bank's 36 rows sharded over 4 devices, 18 per process."""
  return {"mode": "distill", "progress": False, "dataset.name": "synthetic",
          "dataset.num_classes": 10, "dataset.synthetic.num_examples": 36,
          "teacher.model": "resnet8", "teacher.checkpoint": teacher_dir,
          "student.model": "resnet5", "method.name": "crd", "method.nce_k": 16,
          "method.feat_dim": 16, "train.batch_size": 8, "train.epochs": 2}


def _launch(overrides, workdir, num_devices, cluster):
  """``launch.py`` on the default config with ``overrides``, in the background.
  The backend's LLVM optimisations are off in all runs: compiles dominate,
  and that setting changes no result this test compares."""
  env = {k: v for k, v in os.environ.items() if k not in CLUSTER_ENV}
  env.update(cluster, JAX_PLATFORMS="cpu",
             XLA_FLAGS=(f"--xla_force_host_platform_device_count={num_devices} "
                        "--xla_backend_optimization_level=0"))
  flags = [f"--config.{k}={v}" for k, v in overrides.items()]
  return subprocess.Popen(
      [sys.executable, "launch.py", f"--config={REPO / 'configs' / 'default.py'}", *flags,
       f"--workdir={workdir}"], cwd=REPO, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True)


def _model_leaves(model_dir):
  _, variables = convert.restore_converted(str(model_dir))
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(variables)]


def test_two_processes_train_in_lockstep_with_one(tmp_path):
  """Per-epoch train losses to rtol 1e-5 and the final student to atol 1e-5:
  the same global batches and math; only the order of the float32 sums of the
  cross-device reductions differs (gloo's all-reduce across the processes vs
  the in-process one), so the results agree to rounding, not bitwise."""
  teacher = models.create_model("resnet8", 10)
  variables = teacher.init(jax.random.PRNGKey(1), jnp.zeros((1, 32, 32, 3)))
  teacher_dir = str(tmp_path / "teacher")
  convert.save_model_dir(teacher_dir, "resnet8", 10, jax.device_get(variables), {"epoch": 0})
  overrides = _overrides(teacher_dir)
  coordinator = f"localhost:{_free_port()}"
  procs = [_launch(overrides, tmp_path / "one", 4, {})] + [
      _launch(overrides, tmp_path / "two", 2,
              {"JAX_COORDINATOR_ADDRESS": coordinator, "JAX_NUM_PROCESSES": "2",
               "JAX_PROCESS_ID": str(i)}) for i in range(2)]
  try:
    outputs = [p.communicate(timeout=300)[0] for p in procs]
  finally:
    for p in procs:
      p.kill()
  for name, p, out in zip(("one process", "process 0 of 2", "process 1 of 2"), procs, outputs):
    assert p.returncode == 0, f"{name} failed:\n{out}"
  assert "epoch 2/2" in outputs[1] and "epoch" not in outputs[2]  # process 0 prints

  logs = [[json.loads(line) for line in open(tmp_path / run / loop.LOG_FILE)]
          for run in ("one", "two")]
  assert [r["epoch"] for r in logs[1]] == [1, 2]  # written once
  for one, two in zip(*logs):
    for key in ("train_loss", "train_ce", "train_kd", "train_crd/crd", "test_loss"):
      np.testing.assert_allclose(two[key], one[key], rtol=1e-5, err_msg=key)
    assert two["train_top1"] == one["train_top1"] and two["test_top1"] == one["test_top1"]
  for a, b in zip(_model_leaves(tmp_path / "two" / loop.LAST_MODEL),
                  _model_leaves(tmp_path / "one" / loop.LAST_MODEL)):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
