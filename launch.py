"""The one entry point: ``python launch.py --config configs/<experiment>.py``.

Flags: ``--config`` (a configs/*.py file; fields overridable as
``--config.student.model=resnet8``), ``--workdir`` (where a run writes).

Multi-process: start it once per process with ``JAX_COORDINATOR_ADDRESS``
(host:port of process 0), ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``, or
under SLURM / Open MPI (see ``cktf_jax/distributed.py``); every process
gets the same flags and sees the same files.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints and logs.")
flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  # Imported after flag parsing: importing jax is slow.
  from cktf_jax import config as config_lib
  from cktf_jax import data, distributed, methods, train
  from cktf_jax.models import torch_checkpoint
  from cktf_jax.train import loop

  user_errors = (config_lib.ConfigError, data.DataNotFoundError, data.DataFormatError,
                 methods.MethodShapeError, torch_checkpoint.CheckpointError,
                 loop.NonFiniteLossError, distributed.DistributedSetupError)
  try:
    distributed.initialize_from_environment()  # before any jax computation
    with distributed.stdout_of_writer_only():
      train.run(FLAGS.config, FLAGS.workdir)
  except user_errors as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
