"""Helpers to read the reference's parity fixtures (NCHW, PyTorch names)."""

import pathlib

import numpy as np

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "parity"


def load_fixture(name: str) -> dict:
  """All arrays of ``fixtures/parity/<name>`` as a plain dict."""
  with np.load(FIXTURES / name) as f:
    return {k: f[k] for k in f.files}


def with_prefix(arrays: dict, prefix: str) -> dict:
  """The entries whose key starts with ``prefix``, with the prefix removed."""
  return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}


def nchw_to_nhwc(x: np.ndarray) -> np.ndarray:
  """Reference feature maps are NCHW; ours are NHWC. Vectors pass through."""
  return np.transpose(x, (0, 2, 3, 1)) if np.ndim(x) == 4 else x


def assert_close(actual, expected, rtol: float, atol: float, what: str) -> None:
  """``|a - e| <= atol + rtol * max|e|`` elementwise (the MANIFEST's convention:
  relative to the array's largest magnitude), with a message naming ``what``."""
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
  scale = float(np.max(np.abs(expected))) if expected.size else 0.0
  err = float(np.max(np.abs(actual - expected))) if expected.size else 0.0
  assert err <= atol + rtol * scale, (
      f"{what}: max abs error {err:.3e} > atol {atol:g} + rtol {rtol:g} * max|expected| {scale:.3e}")


def variables_from_state(model_name: str, num_classes: int, state: dict,
                         collections=("params", "batch_stats")) -> dict:
  """Our Flax variables for a reference ``state_dict`` (through the real importer)."""
  from cktf_jax.models import abstract_variables, state_dict_to_variables

  template = abstract_variables(model_name, num_classes)
  return state_dict_to_variables(state, {c: template[c] for c in collections},
                                 what="parity fixture")
