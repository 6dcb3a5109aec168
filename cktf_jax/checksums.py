"""CRC32 checksums of array trees: how a restored checkpoint proves it is the
one that was saved (orbax restores some damaged array files silently)."""

import zlib
from typing import Any, Dict

import jax
import numpy as np
from jax.experimental import multihost_utils


def crc32(array) -> int:
  """CRC32 of an array's bytes (C order)."""
  return zlib.crc32(np.ascontiguousarray(array).reshape(-1).view(np.uint8))


def _host_value(x):
  """``x`` on the host; an array spread over several processes (a row-sharded
  memory bank) is gathered from all of them (a collective: every process
  calls this for the same leaves in the same order)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    return multihost_utils.process_allgather(x, tiled=True)
  return jax.device_get(x)


def tree_checksums(tree: Any) -> Dict[str, int]:
  """``{key path: crc32}`` of every leaf of ``tree`` (fetched to the host)."""
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  return {jax.tree_util.keystr(path): crc32(_host_value(x)) for path, x in leaves}


def mismatches(tree: Any, expected: Dict[str, int]) -> list:
  """The key paths whose leaves are missing, extra, or differ from ``expected``."""
  actual = tree_checksums(tree)
  return sorted(k for k in set(actual) | set(expected) if actual.get(k) != expected.get(k))
