"""Dispatch a validated config to its mode."""

from typing import Callable, Dict, Optional

import ml_collections

from cktf_jax import config as config_lib
from cktf_jax.train import loop, quickstart, summary

# config.mode -> runner(config, workdir)
MODES: Dict[str, Callable[[ml_collections.ConfigDict, Optional[str]], object]] = {
    "summary": summary.summarize,
    "train_teacher": loop.train_and_evaluate,
    "distill": loop.train_and_evaluate,
    "evaluate": loop.evaluate_checkpoint,
    "quickstart": quickstart.run_quickstart,
}


def run(config: ml_collections.ConfigDict, workdir: Optional[str] = None):
  """Validate ``config`` (names, before any compile), then run its mode."""
  if config.mode not in MODES:
    raise config_lib.ConfigError(f"config.mode: unknown mode {config.mode!r}; valid modes are: "
                     f"{', '.join(MODES)}")
  config_lib.validate(config)
  return MODES[config.mode](config, workdir)
