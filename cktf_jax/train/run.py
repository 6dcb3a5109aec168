"""Dispatch a validated config to its mode."""

from typing import Callable, Dict, Optional

import ml_collections

from cktf_jax import config as config_lib
from cktf_jax.train import loop, quickstart, summary, transfer

# config.mode -> runner(config, workdir)
MODES: Dict[str, Callable[[ml_collections.ConfigDict, Optional[str]], object]] = {
    "summary": summary.summarize,
    "train_teacher": loop.train_and_evaluate,
    "distill": loop.train_and_evaluate,
    "fine_tune": loop.train_and_evaluate,
    "transfer": transfer.run_transfer,
    "evaluate": loop.evaluate_checkpoint,
    "quickstart": quickstart.run_quickstart,
}


def run(config: ml_collections.ConfigDict, workdir: Optional[str] = None):
  """Validate ``config`` (every field, before anything is built), then run its mode."""
  config_lib.validate(config, MODES)
  return MODES[config.mode](config, workdir)
