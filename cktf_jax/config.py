"""Checks on a loaded config, run before anything is built or compiled."""

import ml_collections

from cktf_jax import methods, models


class ConfigError(ValueError):
  """A config field is invalid; the message names the field and what would work."""


def validate(config: ml_collections.ConfigDict) -> None:
  """Raise ``ConfigError`` naming the field and the valid values for bad names."""
  for field in ("teacher", "student"):
    try:
      models.check_model_name(config[field].model)
    except ValueError as e:
      raise ConfigError(f"config.{field}.model: {e}") from None
  for field in ("method", "method2"):
    name = config[field].name if field in config else ""
    if field == "method2" and not name:
      continue  # no second method
    try:
      methods.check_method_name(name)
    except ValueError as e:
      raise ConfigError(f"config.{field}.name: {e}") from None
