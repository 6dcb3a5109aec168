"""The resumable train-state checkpoints of a run (orbax), in ``WORKDIR/checkpoints``.

Each checkpoint ``checkpoints/STEP`` holds the whole ``TrainState`` (student,
aux parameters and memory banks, optimiser state, rng, step), the best test
accuracy so far, and a CRC32 of every state leaf and of the best record, so a
run restored from it continues exactly as if it had not stopped.

What happens when things go wrong:

* Killed mid-save: orbax writes ``STEP.orbax-checkpoint-tmp`` and renames it
  to ``STEP`` only once every item is on disk, so a partial save is never
  listed as a checkpoint; the next save of that step replaces the leftover.
* Damaged checkpoint: ``restore_latest`` tries the checkpoints newest first.
  One that orbax cannot read, or whose restored data does not match its CRCs
  (orbax restores a garbled array file silently), is reported on stderr with
  its path; when an older one restores, the damaged newer ones are renamed
  ``STEP.damaged`` (kept for inspection, out of the way of the resumed run's
  saves). When none restores, ``StateCheckpointError`` lists them and
  nothing is touched: the run does not silently start from scratch.
* Failed write (disk full, ...): saves are asynchronous, so the error comes
  out of the next ``save`` or of ``wait``, as a ``StateCheckpointError``
  naming the step and its path. The earlier checkpoints are intact: orbax
  deletes those beyond ``max_to_keep`` only after a new one is committed.
* ``truncate_log``: a run killed after logging an epoch but before that
  epoch's checkpoint was committed reruns the epoch; its first record goes.
"""

import errno
import json
import os
import sys
import zlib
from typing import Any, Dict, List, Optional, Tuple

import jax
import orbax.checkpoint as ocp

from cktf_jax import checksums, distributed
from cktf_jax.models import torch_checkpoint

CHECKPOINTS = "checkpoints"
DAMAGED_SUFFIX = ".damaged"


class StateCheckpointError(torch_checkpoint.CheckpointError):
  """A train-state checkpoint that cannot be written, or none that can be restored."""


def _best_crc(best: Dict[str, Any]) -> int:
  return zlib.crc32(json.dumps(best, sort_keys=True).encode())


def _checksums(state, best: Dict[str, Any]) -> Dict[str, Any]:
  """CRC32 of every state leaf (by key path) and of ``best``."""
  return {"state": checksums.tree_checksums(state), "best": _best_crc(best)}


# orbax's words when the saved tree and the state to restore differ in structure: an intact
# checkpoint of another train-state layout, not damage (nothing is moved aside).
LAYOUT_MISMATCH = "tree structures do not match"


def _reason(error: BaseException) -> str:
  """The first line of the exception ``error`` came from, shortened."""
  while error.__cause__ is not None:
    error = error.__cause__
  lines = str(error).strip().splitlines()
  text = f"{type(error).__name__}: {lines[0] if lines else ''}"
  return text if len(text) <= 300 else text[:297] + "..."


def _no_space(error: Optional[BaseException]) -> bool:
  """Whether ``error`` or one it came from is a full disk (ENOSPC)."""
  while error is not None:
    if ((isinstance(error, OSError) and error.errno == errno.ENOSPC)
        or os.strerror(errno.ENOSPC) in str(error)):
      return True
    error = error.__cause__ or error.__context__
  return False


def truncate_log(path: str, start_epoch: int) -> None:
  """Drop the records of epochs ``>= start_epoch`` (and a partly written last
  line) from the JSON-lines log ``path``, if it exists (process 0 only: the
  one that writes logs)."""
  if not distributed.is_writer() or not os.path.exists(path):
    return
  with open(path) as f:
    text = f.read()
  kept = "".join(line for line in text.splitlines(keepends=True)
                 if line.endswith("\n") and json.loads(line)["epoch"] < start_epoch)
  if kept != text:
    with open(path + ".tmp", "w") as f:
      f.write(kept)
    os.replace(path + ".tmp", path)


class StateCheckpoints:
  """The latest ``max_to_keep`` train states of the run in ``workdir``."""

  def __init__(self, workdir: str, max_to_keep: int = 2):
    self.directory = os.path.abspath(os.path.join(workdir, CHECKPOINTS))
    self._manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                                             create=True))
    self._pending: Optional[int] = None  # the step of a save that may still be running

  def path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def all_steps(self) -> List[int]:
    """The steps of the committed checkpoints, oldest first."""
    return sorted(self._manager.all_steps())

  def restore_latest(self, state_like) -> Optional[Tuple[Any, Dict[str, Any]]]:
    """``(state, best)`` from the newest intact checkpoint, with ``state_like``'s
    shapes, dtypes and shardings; None when there is none (see the module
    docstring for damaged ones)."""
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state_like)
    damaged = []
    for step in reversed(self.all_steps()):
      try:
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), best=ocp.args.JsonRestore(),
            checksums=ocp.args.JsonRestore()))
        self._verify(restored)
      except Exception as e:  # orbax and tensorstore raise many types for damaged data
        if LAYOUT_MISMATCH in str(e):
          raise StateCheckpointError(
              f"checkpoint {self.path(step)} holds a train state of another layout than this "
              f"run's ({_reason(e)}): it was written by another cktf_jax version (for example "
              f"one before the CRD sampler kept its walk in the state); nothing was changed: "
              f"resume it with that version, or use a new --workdir") from e
        print(f"warning: checkpoint {self.path(step)} is damaged ({_reason(e)})",
              file=sys.stderr)
        damaged.append((step, _reason(e)))
        continue
      for bad, _ in damaged:
        moved = self._move_aside(bad)
        print(f"warning: moved the damaged checkpoint to {moved}; resuming from "
              f"{self.path(step)}", file=sys.stderr)
      if damaged:
        self._manager.reload()
      return restored.state, restored.best
    if damaged:
      listed = "; ".join(f"{self.path(s)}: {reason}" for s, reason in damaged)
      raise StateCheckpointError(
          f"no intact checkpoint in {self.directory} ({listed}); nothing was changed: repair "
          f"or move them away to train this workdir from scratch")
    return None

  @staticmethod
  def _verify(restored) -> None:
    """Raise when the restored state or best record does not match its CRCs."""
    expected = restored.checksums
    bad = checksums.mismatches(restored.state, expected["state"])
    if bad:
      raise ValueError(f"state leaves not matching their CRC32: {', '.join(bad[:3])}")
    if expected["best"] != _best_crc(restored.best):
      raise ValueError("the best record does not match its CRC32")

  def _move_aside(self, step: int) -> str:
    target, n = self.path(step) + DAMAGED_SUFFIX, 1
    while os.path.exists(target):
      n += 1
      target = f"{self.path(step)}{DAMAGED_SUFFIX}.{n}"
    os.rename(self.path(step), target)
    return target

  def save(self, state, best: Dict[str, Any]) -> None:
    """Save ``state`` (at its step) and ``best``, asynchronously: this waits
    for the previous save, whose failure it raises (see ``wait``)."""
    self.wait()
    step = int(state.step)
    try:
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), best=ocp.args.JsonSave(best),
          checksums=ocp.args.JsonSave(_checksums(state, best))))
    except Exception as e:
      raise self._write_error(step, e) from e
    self._pending = step

  def wait(self) -> None:
    """Block until every started save is on disk; a ``StateCheckpointError``
    if one failed."""
    step, self._pending = self._pending, None
    try:
      self._manager.wait_until_finished()
    except Exception as e:
      raise self._write_error(step, e) from e

  def _write_error(self, step: int, error: Exception) -> StateCheckpointError:
    where = f"checkpoint at step {step} to {self.path(step)}"
    if _no_space(error):
      return StateCheckpointError(f"no space left on device while writing {where}; existing "
                                  f"checkpoints are intact (free some space and rerun to "
                                  f"resume)")
    return StateCheckpointError(f"writing {where} failed ({_reason(error)}); existing "
                                f"checkpoints are intact")
