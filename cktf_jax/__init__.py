"""cktf_jax: JAX/Flax Contrastive Knowledge Transfer Framework (CKTF) and its baselines."""

__version__ = "0.1.0"
