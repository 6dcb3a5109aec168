"""The resumable train-state checkpoints of a run (orbax), in ``WORKDIR/checkpoints``.

Each checkpoint holds the whole ``TrainState`` (student, aux parameters and
memory banks, optimiser state, rng, step) and the best test accuracy so far,
so a run restored from it continues exactly as if it had not stopped.
"""

import os
from typing import Any, Dict, Optional, Tuple

import jax
import orbax.checkpoint as ocp

CHECKPOINTS = "checkpoints"


class StateCheckpoints:
  """The latest ``max_to_keep`` train states of the run in ``workdir``."""

  def __init__(self, workdir: str, max_to_keep: int = 2):
    self.directory = os.path.abspath(os.path.join(workdir, CHECKPOINTS))
    self._manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                                             create=True))

  def restore_latest(self, state_like) -> Optional[Tuple[Any, Dict[str, Any]]]:
    """``(state, best)`` from the latest checkpoint, with ``state_like``'s
    shapes, dtypes and shardings; None when there is none."""
    step = self._manager.latest_step()
    if step is None:
      return None
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state_like)
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                      best=ocp.args.JsonRestore()))
    return restored.state, restored.best

  def save(self, state, best: Dict[str, Any]) -> None:
    """Save ``state`` (at its step) and ``best`` (asynchronously; see ``wait``)."""
    self._manager.save(int(state.step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), best=ocp.args.JsonSave(best)))

  def wait(self) -> None:
    """Block until every started save is on disk."""
    self._manager.wait_until_finished()
