"""Multi-process (multi-host) runs: ``jax.distributed`` from the environment,
global arrays from host values, and the process that writes files.

A job is multi-process when either

* ``JAX_NUM_PROCESSES`` > 1, with ``JAX_COORDINATOR_ADDRESS`` (``host:port``
  of process 0) and ``JAX_PROCESS_ID`` (0..n-1): our own variables, for any
  launcher (jax itself reads only the address); or
* one of the clusters jax detects by itself (SLURM, Open MPI, Cloud TPU,
  Kubernetes Jobs; ``jax._src.clusters``) is present and names more than one
  process. ``jax.distributed.initialize()`` then fills in everything.

Otherwise (a plain run, or a one-task SLURM job) nothing is initialised.

On CPU the cross-process collectives are gloo's (TCP, built into jaxlib; the
default of ``jax_cpu_collectives_implementation``, so nothing to set), and
processes of simulated CPU devices (``--xla_force_host_platform_device_count``)
form one mesh. On GPU jax uses NCCL.

Every process runs the same program on the same host data (same files, same
seed), so a host value becomes a global array with ``global_array``: each
process fills only its own devices' shards. Everything computed is global;
what is read back is fully replicated, hence the same on every process. Only
process 0 (``is_writer()``) writes logs, JSON and model directories' metadata;
orbax checkpoints are written by all processes together.
"""

import contextlib
import os
from typing import Any, Iterator

import jax
import numpy as np
from jax._src import clusters  # jax's own cluster auto-detection (no public API)
from jax.experimental import multihost_utils
from jax.sharding import Sharding

COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"
NUM_PROCESSES_ENV = "JAX_NUM_PROCESSES"
PROCESS_ID_ENV = "JAX_PROCESS_ID"


class DistributedSetupError(ValueError):
  """The environment names a multi-process job but not all of it."""


def _detected_cluster():
  """The cluster environment ``jax.distributed.initialize()`` would pick, or None."""
  return next((env for env in clusters.ClusterEnv._cluster_types
               if not env.opt_in_only_method and env.is_env_present()), None)


def initialize_from_environment() -> bool:
  """``jax.distributed.initialize`` when the environment names a job of
  several processes (see the module docstring); True when it did. Call it
  before any jax computation."""
  num = os.environ.get(NUM_PROCESSES_ENV)
  if num is not None:
    if int(num) <= 1:
      return False
    missing = [v for v in (COORDINATOR_ENV, PROCESS_ID_ENV) if not os.environ.get(v)]
    if missing:
      raise DistributedSetupError(
          f"{NUM_PROCESSES_ENV}={num} names a multi-process job, but {' and '.join(missing)} "
          f"{'is' if len(missing) == 1 else 'are'} not set ({COORDINATOR_ENV}: host:port of "
          f"process 0; {PROCESS_ID_ENV}: this process's id, 0..{int(num) - 1})")
    kwargs = dict(coordinator_address=os.environ[COORDINATOR_ENV], num_processes=int(num),
                  process_id=int(os.environ[PROCESS_ID_ENV]))
  else:
    cluster = _detected_cluster()
    if cluster is None or cluster.get_process_count() <= 1:
      return False
    kwargs = {}
  jax.distributed.initialize(**kwargs)
  return True


def is_writer() -> bool:
  """True on the one process that writes files (process 0)."""
  return jax.process_index() == 0


@contextlib.contextmanager
def stdout_of_writer_only() -> Iterator[None]:
  """Within it, the other processes' stdout is discarded: one progress display per job."""
  if is_writer():
    yield
    return
  with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
    yield


def global_array(value: Any, sharding: Sharding) -> jax.Array:
  """The host value ``value`` (the same on every process) as a global array
  with ``sharding``; each process fills its addressable shards."""
  host = np.asarray(value)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def global_tree(tree: Any, sharding: Sharding) -> Any:
  """``global_array`` of every leaf of ``tree``."""
  return jax.tree_util.tree_map(lambda x: global_array(x, sharding), tree)


def barrier(name: str) -> None:
  """Wait until every process reaches ``name`` (no-op with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
