"""Running an experiment from a config: ``run(config, workdir)``."""

from cktf_jax.train.run import MODES, run

__all__ = ["MODES", "run"]
