"""Fault injection: runs killed with SIGKILL, damaged checkpoints, a full disk.

The end-to-end faults run ``launch.py`` in a subprocess, as a user does,
through this file's ``__main__``: ``python tests/test_faults.py FAULT ARGS...``
injects FAULT into the real code path, then runs ``launch.py ARGS...``:

* ``kill_between_steps:E:I``: SIGKILL before step I (0-based) of epoch E, once
  the earlier checkpoints are committed;
* ``kill_at_commit:STEP``: SIGKILL when the save of STEP is fully written to
  its temporary directory, just before orbax commits (renames) it;
* ``enospc_at_commit:STEP``: that commit fails with ENOSPC (disk full).

The checkpoint-level faults (each kind of damage, a full disk) run in this
process on a tiny state.
"""

import errno
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from orbax.checkpoint._src.path import atomicity

from cktf_jax import models
from cktf_jax.data import pipeline
from cktf_jax.models import convert, torch_checkpoint
from cktf_jax.train import checkpoints as checkpoints_lib

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _failing_finalize(step: int, fault):
  """orbax's commit of ``checkpoints/STEP``, calling ``fault(tmp_dir)`` first."""
  real = atomicity.AtomicRenameTemporaryPath.finalize

  async def finalize(self):
    final = self.get_final()
    if final.parent.name == checkpoints_lib.CHECKPOINTS and final.name == str(step):
      fault(self.get())
    await real(self)

  return finalize


def _kill(*_):
  os.kill(os.getpid(), signal.SIGKILL)


def _no_space(tmp_dir):
  raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_dir / "commit_success.txt"))


def _inject(fault: str) -> None:
  """Install ``fault`` (see the module docstring) in this process."""
  name, *args = fault.split(":")
  if name == "kill_between_steps":
    epoch, index = map(int, args)
    managers = []
    real_init = checkpoints_lib.StateCheckpoints.__init__
    real_epoch = pipeline.DeviceLoader.epoch

    def init(self, *a, **k):
      real_init(self, *a, **k)
      managers.append(self)

    def train_epoch(self, e, *a, **k):
      for i, batch in enumerate(real_epoch(self, e, *a, **k)):
        if self.shuffle and (e + 1, i) == (epoch, index):
          for manager in managers:
            manager.wait()
          _kill()
        yield batch

    checkpoints_lib.StateCheckpoints.__init__ = init
    pipeline.DeviceLoader.epoch = train_epoch
  else:
    action = {"kill_at_commit": _kill, "enospc_at_commit": _no_space}[name]
    atomicity.AtomicRenameTemporaryPath.finalize = _failing_finalize(int(args[0]), action)


TMP = atomicity.TMP_DIR_SUFFIX

# 48 examples in batches of 16: 3 steps an epoch, checkpoints at steps 3, 6, 9, 12.
CONFIG = """
from configs import default


def get_config():
  config = default.get_config()
  config.mode = "distill"
  config.progress = False
  config.dataset.name = "synthetic"
  config.dataset.num_classes = 10
  config.dataset.synthetic.num_examples = 48
  config.teacher.model = "resnet8"
  config.teacher.checkpoint = {teacher!r}
  config.student.model = "resnet5"
  config.method.name = "crd"  # memory banks in the state
  config.method.nce_k = 16
  config.method.feat_dim = 16
  config.train.batch_size = 16
  config.train.epochs = 4
  config.train.checkpoint_every_epochs = 1
  config.train.tensorboard = False
  return config
"""


def _random_variables(name: str):
  """Random variables of model ``name`` (10 classes), without compiling its init."""
  model, rng = models.create_model(name, 10), np.random.default_rng(0)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
  return jax.tree_util.tree_map_with_path(
      lambda path, s: (np.ones(s.shape, s.dtype) if path[-1].key == "var"
                       else 0.1 * rng.standard_normal(s.shape).astype(s.dtype)), shapes)


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
  """``launch(workdir, fault=None)``: launch.py on the tiny CRD config, with
  ``fault`` injected; compiles are cached across the subprocesses."""
  tmp = tmp_path_factory.mktemp("faults")
  convert.save_model_dir(str(tmp / "teacher"), "resnet8", 10, _random_variables("resnet8"))
  config = tmp / "tiny_crd.py"
  config.write_text(CONFIG.format(teacher=str(tmp / "teacher")))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
             JAX_COMPILATION_CACHE_DIR=str(tmp / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")

  def run(workdir, fault=None):
    entry = ["launch.py"] if fault is None else [__file__, fault]
    return subprocess.run([sys.executable, *entry, "--config", str(config), "--workdir",
                           str(workdir)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)

  return run


def _entries(workdir):
  return sorted(os.listdir(os.path.join(workdir, "checkpoints")))


def _epochs(workdir):
  """The epochs of the complete lines of ``workdir/log.jsonl``."""
  return [json.loads(line)["epoch"] for line in open(os.path.join(workdir, "log.jsonl"))
          if line.endswith("\n")]


def _final_state(workdir):
  """The latest checkpoint's state as a flat ``{key path: array}``."""
  step = max(int(e) for e in _entries(workdir) if e.isdigit())
  with ocp.StandardCheckpointer() as ckptr:
    state = ckptr.restore(os.path.join(workdir, "checkpoints", str(step), "state"))
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(state)}


def _files(directory):
  return {p: p.read_bytes() for p in sorted(pathlib.Path(directory).rglob("*")) if p.is_file()}


def _data_file(step_dir):
  """The largest array data file of a checkpoint step directory."""
  return max((pathlib.Path(step_dir) / "state" / "ocdbt.process_0" / "d").iterdir(),
             key=lambda p: p.stat().st_size)


def _flip_byte(path):
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0xFF
  path.write_bytes(bytes(data))


def _expect(result, rc=0):
  """``result`` of a launch, checked to have exited with ``rc``."""
  assert result.returncode == rc, (f"rc {result.returncode}\n{result.stdout}\n"
                                   f"{result.stderr[-3000:]}")
  return result


def test_killed_damaged_and_disk_full_runs_resume_to_the_uninterrupted_state(launch, tmp_path):
  _expect(launch(tmp_path / "straight"))
  w = tmp_path / "w"
  ckpts = w / "checkpoints"

  # 1. SIGKILL between two steps of epoch 2 (epoch 1's checkpoint committed).
  _expect(launch(w, "kill_between_steps:2:1"), -signal.SIGKILL)
  assert _entries(w) == ["3"] and _epochs(w) == [1]

  # 2. SIGKILL mid-save: step 9 is fully written but not committed, epoch 3
  # logged (maybe epoch 4 too: the commit runs in a thread).
  _expect(launch(w, "kill_at_commit:9"), -signal.SIGKILL)
  assert _entries(w) == ["3", "6", "9" + TMP]  # only a temporary directory for step 9
  assert _epochs(w)[:3] == [1, 2, 3]
  assert checkpoints_lib.StateCheckpoints(str(w)).all_steps() == [3, 6]

  # 3. Every checkpoint damaged: a clear error, nothing changed or truncated.
  backup = tmp_path / "backup"
  shutil.copytree(ckpts, backup)
  for step in ("3", "6"):
    _flip_byte(_data_file(ckpts / step))
  before = _files(w)
  r = _expect(launch(w), 2)
  assert f"error: no intact checkpoint in {ckpts} ({ckpts}/6: " in r.stderr
  assert f"; {ckpts}/3: " in r.stderr and "Traceback" not in r.stderr
  assert _files(w) == before

  # 4. Only the latest damaged: reported, set aside, the one before used; then
  # the disk fills while step 9 is written.
  shutil.rmtree(ckpts / "3")
  shutil.copytree(backup / "3", ckpts / "3")
  r = _expect(launch(w, "enospc_at_commit:9"), 2)
  assert f"warning: checkpoint {ckpts}/6 is damaged (ValueError: state leaves not matching " \
         f"their CRC32" in r.stderr
  assert f"moved the damaged checkpoint to {ckpts}/6.damaged; resuming from {ckpts}/3" in r.stderr
  assert f"resuming {w} from epoch 2 (step 3)" in r.stdout
  assert (f"error: no space left on device while writing checkpoint at step 9 to {ckpts}/9; "
          f"existing checkpoints are intact") in r.stderr
  assert _entries(w) == ["3", "6", "6.damaged", "9" + TMP]

  # 5. A plain rerun resumes after step 6 and ends where the straight run did.
  r = _expect(launch(w))
  assert f"resuming {w} from epoch 3 (step 6)" in r.stdout
  assert _entries(w) == ["12", "6.damaged", "9"]  # the leftover replaced, then rotated
  final, expected = _final_state(w), _final_state(tmp_path / "straight")
  assert {k.split("'")[1] for k in expected} == {"step", "params", "batch_stats", "aux_state",
                                                  "opt_state", "rng"}
  assert any("memory" in k for k in expected if k.startswith("['aux_state']"))
  assert final.keys() == expected.keys()
  for key in expected:
    np.testing.assert_array_equal(final[key], expected[key], err_msg=key)  # bitwise on CPU
  for model in ("best_model", "last_model"):
    (meta_a, a), (meta_b, b) = (convert.restore_converted(str(d / model))
                                for d in (tmp_path / "straight", w))
    assert meta_a == meta_b
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
  logs = [[{k: v for k, v in json.loads(line).items() if k != "time_s"}
           for line in open(d / "log.jsonl")] for d in (tmp_path / "straight", w)]
  assert [record["epoch"] for record in logs[1]] == [1, 2, 3, 4] and logs[0] == logs[1]


# ---------------------------------------------------------------- checkpoint level


@flax.struct.dataclass
class TinyState:
  step: jax.Array
  weights: jax.Array
  bank: jax.Array  # row-sharded, like CRD's memory banks


def _tiny_state(step: int) -> TinyState:
  mesh = pipeline.data_mesh()
  bank = jax.device_put(jnp.full((8, 4), float(step)), NamedSharding(mesh, P("data")))
  return TinyState(step=jnp.asarray(step, jnp.int32), bank=bank,
                   weights=jnp.arange(4000, dtype=jnp.float32) * step)


def _two_checkpoints(workdir):
  checkpoints = checkpoints_lib.StateCheckpoints(str(workdir))
  for step in (1, 2):
    checkpoints.save(_tiny_state(step), {"test_top1": float(step)})
  checkpoints.wait()
  return checkpoints


def _restored_step(workdir) -> int:
  state, best = checkpoints_lib.StateCheckpoints(str(workdir)).restore_latest(_tiny_state(0))
  expected = _tiny_state(int(state.step))
  for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(expected)):
    np.testing.assert_array_equal(a, b)
  assert state.bank.sharding == expected.bank.sharding
  assert best == {"test_top1": float(state.step)}
  return int(state.step)


DAMAGE = {
    # orbax restores this one silently as garbage: only the CRCs catch it.
    "garbled array data": (lambda d: _flip_byte(_data_file(d)), "state leaves not matching "
                           "their CRC32: .weights"),
    "truncated array data": (lambda d: os.truncate(_data_file(d), 100), "Error reading"),
    "deleted array metadata": (lambda d: os.remove(d / "state" / "_METADATA"), "ValueError"),
    "garbled best record": (lambda d: (d / "best" / "metadata").write_text('{"test_top1": 2'),
                            "JSONDecodeError"),
    "missing CRCs": (lambda d: shutil.rmtree(d / "checksums"), 'Item "checksums" was not found'),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_latest_checkpoint_is_reported_and_the_one_before_used(tmp_path, capsys,
                                                                         damage):
  _two_checkpoints(tmp_path)
  ckpts = tmp_path / "checkpoints"
  corrupt, reason = DAMAGE[damage]
  corrupt(ckpts / "2")
  assert _restored_step(tmp_path) == 1
  err = capsys.readouterr().err
  assert f"warning: checkpoint {ckpts}/2 is damaged (" in err and reason in err
  assert f"moved the damaged checkpoint to {ckpts}/2.damaged; resuming from {ckpts}/1" in err
  assert _entries(tmp_path) == ["1", "2.damaged"]
  # The resumed run's next save of step 2 is not in its way.
  checkpoints = checkpoints_lib.StateCheckpoints(str(tmp_path))
  checkpoints.save(_tiny_state(2), {"test_top1": 2.0})
  checkpoints.wait()
  assert _restored_step(tmp_path) == 2


def test_no_intact_checkpoint_is_an_error_and_nothing_is_changed(tmp_path):
  _two_checkpoints(tmp_path)
  ckpts = tmp_path / "checkpoints"
  _flip_byte(_data_file(ckpts / "1"))
  os.remove(ckpts / "2" / "state" / "_METADATA")
  before = _files(tmp_path)
  with pytest.raises(checkpoints_lib.StateCheckpointError,
                     match=rf"^no intact checkpoint in {ckpts} \({ckpts}/2: ValueError: .*; "
                           rf"{ckpts}/1: ValueError: state leaves not matching their CRC32"):
    checkpoints_lib.StateCheckpoints(str(tmp_path)).restore_latest(_tiny_state(0))
  assert _files(tmp_path) == before
  # launch.py prints it as `error: ...` (it catches torch_checkpoint.CheckpointError).
  assert issubclass(checkpoints_lib.StateCheckpointError, torch_checkpoint.CheckpointError)


@flax.struct.dataclass
class TinyStateWithWalk:
  step: jax.Array
  weights: jax.Array
  bank: jax.Array
  walk: jax.Array  # a field the writing version did not have


def test_a_checkpoint_of_another_state_layout_is_named_not_moved(tmp_path, capsys):
  _two_checkpoints(tmp_path)
  before = _files(tmp_path)
  state = _tiny_state(0)
  other = TinyStateWithWalk(step=state.step, weights=state.weights, bank=state.bank,
                            walk=jnp.zeros((3,), jnp.int32))
  with pytest.raises(checkpoints_lib.StateCheckpointError,
                     match=rf"^checkpoint {tmp_path}/checkpoints/2 holds a train state of another "
                           r"layout than this run's .* nothing was changed"):
    checkpoints_lib.StateCheckpoints(str(tmp_path)).restore_latest(other)
  assert _files(tmp_path) == before
  assert "damaged" not in capsys.readouterr().err


@pytest.mark.parametrize("error, surfaces_at, message", [
    (errno.ENOSPC, "wait", "no space left on device while writing checkpoint at step 3 to "
     "{ckpts}/3; existing checkpoints are intact"),
    (errno.ENOSPC, "save", "no space left on device while writing checkpoint at step 3 to "
     "{ckpts}/3; existing checkpoints are intact"),
    (errno.EIO, "wait", "writing checkpoint at step 3 to {ckpts}/3 failed (OSError: [Errno 5] "
     "Input/output error"),
])
def test_a_failed_write_names_step_and_path_and_keeps_the_checkpoints(tmp_path, monkeypatch,
                                                                      error, surfaces_at,
                                                                      message):
  checkpoints = _two_checkpoints(tmp_path)
  ckpts = tmp_path / "checkpoints"

  def fail(tmp_dir):
    raise OSError(error, os.strerror(error), str(tmp_dir / "commit_success.txt"))

  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize",
                      _failing_finalize(3, fail))
  checkpoints.save(_tiny_state(3), {"test_top1": 3.0})  # asynchronous: no error yet
  with pytest.raises(checkpoints_lib.StateCheckpointError) as raised:
    if surfaces_at == "wait":
      checkpoints.wait()
    else:
      checkpoints.save(_tiny_state(4), {"test_top1": 4.0})
  assert str(raised.value).startswith(message.format(ckpts=ckpts))
  monkeypatch.undo()
  assert _entries(tmp_path) == ["1", "2", "3" + TMP]
  assert _restored_step(tmp_path) == 2


def test_truncate_log_drops_rerun_epochs_and_a_partial_line(tmp_path):
  log = tmp_path / "log.jsonl"
  checkpoints_lib.truncate_log(str(log), 1)  # no log yet: nothing to do
  log.write_text("".join(json.dumps({"epoch": e}) + "\n" for e in (1, 2, 3)) + '{"epo')
  checkpoints_lib.truncate_log(str(log), 5)
  assert _epochs(tmp_path) == [1, 2, 3] and log.read_text().endswith("}\n")
  checkpoints_lib.truncate_log(str(log), 3)
  assert _epochs(tmp_path) == [1, 2]


if __name__ == "__main__":
  import runpy

  _inject(sys.argv.pop(1))
  sys.argv[0] = str(ROOT / "launch.py")
  runpy.run_path(sys.argv[0], run_name="__main__")
