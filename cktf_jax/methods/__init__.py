"""Distillation methods by the reference's ``--distill`` name; one registry."""

from cktf_jax.methods.base import (Batch, Method, MethodShapeError, PretrainStage,
                                   check_method_name, create_method, method_names,
                                   register_method)

# Each module registers its method on import.
from cktf_jax.methods import kd  # noqa: F401
from cktf_jax.methods import hint  # noqa: F401
from cktf_jax.methods import attention  # noqa: F401
from cktf_jax.methods import similarity  # noqa: F401
from cktf_jax.methods import correlation  # noqa: F401
from cktf_jax.methods import vid  # noqa: F401
from cktf_jax.methods import rkd  # noqa: F401
from cktf_jax.methods import pkt  # noqa: F401
from cktf_jax.methods import abound  # noqa: F401
from cktf_jax.methods import factor  # noqa: F401
from cktf_jax.methods import fsp  # noqa: F401
from cktf_jax.methods import nst  # noqa: F401
from cktf_jax.methods import kdsvd  # noqa: F401
from cktf_jax.methods import crd  # noqa: F401
from cktf_jax.methods import crdst  # noqa: F401

__all__ = ["Batch", "Method", "MethodShapeError", "PretrainStage", "check_method_name",
           "create_method", "method_names", "register_method"]
