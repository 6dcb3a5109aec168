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
  try:
    methods.check_method_name(config.method.name)
  except ValueError as e:
    raise ConfigError(f"config.method.name: {e}") from None
