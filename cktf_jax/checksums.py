"""CRC32 checksums of array trees: how a restored checkpoint proves it is the
one that was saved (orbax restores some damaged array files silently)."""

import zlib
from typing import Any, Dict

import jax
import numpy as np


def crc32(array) -> int:
  """CRC32 of an array's bytes (C order)."""
  return zlib.crc32(np.ascontiguousarray(array).reshape(-1).view(np.uint8))


def tree_checksums(tree: Any) -> Dict[str, int]:
  """``{key path: crc32}`` of every leaf of ``tree`` (fetched to the host)."""
  leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(tree))
  return {jax.tree_util.keystr(path): crc32(x) for path, x in leaves}


def mismatches(tree: Any, expected: Dict[str, int]) -> list:
  """The key paths whose leaves are missing, extra, or differ from ``expected``."""
  actual = tree_checksums(tree)
  return sorted(k for k in set(actual) | set(expected) if actual.get(k) != expected.get(k))
