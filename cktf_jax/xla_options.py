"""XLA compiler options for the training programs, and ``jit`` that applies them.

CPU backend only: XLA:CPU (jaxlib 0.10) hands convolutions to YNNPACK
(``ynn_fusion`` ops in a profile), whose filter-gradient path is an order of
magnitude slower than XLA's own convolution: in a CPU profile of the CKTF
resnet32x4 -> resnet8x4 step, one 3x3, 64-channel filter gradient took 2.0 s of
the 5.2 s step. With YNNPACK kept to dots (``LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT``)
the student's forward + backward went from 3.1 s to 1.2 s (docs/BENCHMARKS.md,
"Session 3"). Dots keep YNNPACK, their fast path.

The options go through ``jax.jit(..., compiler_options=...)``, not
``XLA_FLAGS``: an option this jaxlib does not know is then a compile error we
catch (a probe, once), where an unknown flag would abort the process. Nothing
is set when ``XLA_FLAGS`` already names the option (the user's choice wins) or
the backend is not the CPU.
"""

import functools
import os
from typing import Dict, Optional

import jax
import jax.numpy as jnp

CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


@functools.lru_cache(maxsize=None)
def compiler_options() -> Optional[Dict[str, str]]:
  """``CPU_OPTIONS`` on a CPU backend whose jaxlib accepts them, else None."""
  if jax.default_backend() != "cpu":
    return None
  if any(name in os.environ.get("XLA_FLAGS", "") for name in CPU_OPTIONS):
    return None
  try:
    jax.jit(lambda x: x + 1, compiler_options=CPU_OPTIONS).lower(jnp.float32(0)).compile()
  except Exception:  # an older or newer jaxlib without the option: its defaults
    return None
  return dict(CPU_OPTIONS)


def jit(fun, **kwargs):
  """``jax.jit(fun, **kwargs)`` with ``compiler_options()``."""
  return jax.jit(fun, compiler_options=compiler_options(), **kwargs)
