"""PyTorch weights in: map a reference ``state_dict`` onto our Flax variables.

Our architectures name their submodules exactly like the reference's PyTorch
attributes, so one rule maps every model (see ``layers.py``)::

    params/<path>/kernel  (4-D, HWIO) <- <path>.weight  (OIHW)   transposed (2, 3, 1, 0)
    params/<path>/kernel  (2-D, in x out) <- <path>.weight (out x in) transposed
    params/<path>/bias    <- <path>.bias
    params/<path>/scale   <- <path>.weight        (BatchNorm)
    batch_stats/<path>/mean <- <path>.running_mean
    batch_stats/<path>/var  <- <path>.running_var
    <path>.num_batches_tracked: accepted and ignored (our BatchNorm's momentum is fixed)
"""

from typing import Any, Dict, Mapping, Tuple

import numpy as np
from flax import traverse_util

Variables = Dict[str, Any]


def torch_key_and_layout(collection: str, path: Tuple[str, ...], ndim: int):
  """The state_dict key of one Flax leaf and the transpose from torch to Flax layout."""
  prefix = ".".join(path[:-1])
  leaf = path[-1]
  if collection == "params":
    if leaf == "kernel":
      transpose = {4: (2, 3, 1, 0), 2: (1, 0)}.get(ndim)
      if transpose is None:
        raise ValueError(f"cannot map a {ndim}-D kernel at {'/'.join(path)}")
      return f"{prefix}.weight", transpose
    if leaf == "scale":
      return f"{prefix}.weight", None
    if leaf == "bias":
      return f"{prefix}.bias", None
  if collection == "batch_stats":
    if leaf == "mean":
      return f"{prefix}.running_mean", None
    if leaf == "var":
      return f"{prefix}.running_var", None
  raise ValueError(f"no PyTorch name is known for {collection}/{'/'.join(path)}")


def state_dict_to_variables(state_dict: Mapping[str, Any], template: Variables,
                            what: str = "checkpoint") -> Variables:
  """Build Flax variables shaped like ``template`` from a PyTorch ``state_dict``.

  Args:
    state_dict: name -> array-like (numpy arrays, or anything ``np.asarray`` takes),
      in PyTorch layout. A ``module.`` prefix on every key (``nn.DataParallel``)
      is stripped.
    template: the model's variables, or their ``jax.eval_shape`` structs
      (``{'params': ..., 'batch_stats': ...}``).
    what: a name for the source, used in error messages.

  Returns:
    ``{'params': ..., 'batch_stats': ...}`` of float32 numpy arrays (only the
    collections present in ``template``).

  Raises:
    ValueError: naming every missing, unexpected and mis-shaped key.
  """
  state = dict(state_dict)
  if state and all(k.startswith("module.") for k in state):
    state = {k[len("module."):]: v for k, v in state.items()}

  expected = {}
  for collection in ("params", "batch_stats"):
    for path, leaf in traverse_util.flatten_dict(template.get(collection, {})).items():
      key, transpose = torch_key_and_layout(collection, path, len(leaf.shape))
      expected[key] = (collection, path, tuple(leaf.shape), transpose)

  bn_prefixes = {k[: -len(".running_mean")] for k in expected if k.endswith(".running_mean")}
  missing = sorted(k for k in expected if k not in state)
  unexpected = sorted(
      k for k in state if k not in expected
      and not (k.endswith(".num_batches_tracked")
               and k[: -len(".num_batches_tracked")] in bn_prefixes))

  flat = {"params": {}, "batch_stats": {}}
  mismatched = []
  for key, (collection, path, shape, transpose) in expected.items():
    if key not in state:
      continue
    value = np.asarray(state[key], dtype=np.float32)
    if transpose is not None and value.ndim == len(transpose):
      value = value.transpose(transpose)
    if value.shape != shape:
      torch_shape = tuple(np.shape(state[key]))
      mismatched.append(f"{key}: {what} has {torch_shape}, model needs "
                        f"{_torch_shape(shape, transpose)}")
      continue
    flat[collection][path] = value

  problems = []
  if missing:
    problems.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
  if unexpected:
    problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
  if mismatched:
    problems.append(f"mis-shaped keys ({len(mismatched)}): {'; '.join(mismatched)}")
  if problems:
    raise ValueError(f"{what} does not match the model:\n  " + "\n  ".join(problems))
  return {c: traverse_util.unflatten_dict(v) for c, v in flat.items() if c in template}


def _torch_shape(flax_shape, transpose):
  """The PyTorch-layout shape that becomes ``flax_shape`` after ``transpose``."""
  if transpose is None:
    return tuple(flax_shape)
  inverse = np.argsort(transpose)
  return tuple(flax_shape[i] for i in inverse)
