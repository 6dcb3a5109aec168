"""Read RepDistiller/CKTF PyTorch checkpoints without PyTorch.

The reference saves ``torch.save({'epoch': ..., 'model': state_dict,
'accuracy': tensor, ['optimizer': ...]}, path)``. ``read_torch_file`` reads
such a file in either of torch's formats:

* zip (torch >= 1.6): ``<archive>/data.pkl`` plus one raw storage per
  ``<archive>/data/<key>`` entry;
* legacy (torch < 1.6, how 2019 teachers were published): five pickles in a
  row (magic number, protocol version, sys_info, the object, the storage
  keys), then each storage's raw bytes behind an 8-byte element count;

as well as an ``.npz`` holding a state dict (keys = state_dict names).

Pickles are read by a restricted unpickler: only the globals a state dict
needs (tensor/storage rebuilders, ``OrderedDict``, dtypes, a few builtins)
resolve; anything else (``os.system``, a whole pickled ``nn.Module``, ...) is
refused before it can run. ``load_torch_checkpoint`` then maps the state dict
onto a model with ``torch_import.state_dict_to_variables``.
"""

import _compat_pickle
import collections
import pickle
import struct
import zipfile
from typing import Any, Dict, Mapping, Optional, Tuple

import ml_dtypes
import numpy as np

try:  # numpy >= 2
  from numpy._core.multiarray import scalar as _np_scalar
except ImportError:  # numpy 1.x
  from numpy.core.multiarray import scalar as _np_scalar

from cktf_jax.models.registry import abstract_variables
from cktf_jax.models.torch_import import state_dict_to_variables

PathLike = Any
_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
_LEGACY_PROTOCOL = 1001

# torch storage class name -> numpy dtype.
_STORAGE_DTYPES = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}
# Untyped storages are bytes; _rebuild_tensor_v3 says the tensor's dtype.
_UNTYPED_STORAGES = {("torch", "UntypedStorage"), ("torch.storage", "UntypedStorage"),
                     ("torch.storage", "_UntypedStorage")}
_TYPED_STORAGES = {("torch.storage", "TypedStorage"), ("torch.storage", "_TypedStorage")}
# torch dtype objects (torch.float32, ...) -> numpy dtypes.
_TORCH_DTYPES = {
    "float32": np.float32, "float": np.float32, "float64": np.float64, "double": np.float64,
    "float16": np.float16, "half": np.float16, "bfloat16": ml_dtypes.bfloat16,
    "int64": np.int64, "long": np.int64, "int32": np.int32, "int": np.int32,
    "int16": np.int16, "short": np.int16, "int8": np.int8, "uint8": np.uint8, "bool": np.bool_,
}


class CheckpointError(ValueError):
  """A file that is not a readable, safe PyTorch/npz state-dict checkpoint."""


class _StorageType:
  """What a pickled ``torch.FloatStorage`` (etc.) class reference resolves to."""

  def __init__(self, name: str, dtype: Optional[np.dtype]):
    self.name, self.dtype = name, dtype

  def __repr__(self):
    return f"<storage type {self.name}>"


class _Storage:
  """One storage: a flat numpy array, filled in later for the legacy format."""

  def __init__(self, dtype: np.dtype, numel: int, data: Optional[np.ndarray] = None):
    self.dtype, self.numel, self.data = dtype, numel, data


class _LazyTensor:
  """A tensor whose storage bytes may not have been read yet (legacy format)."""

  def __init__(self, storage, offset, size, stride, dtype=None):
    self.storage, self.offset, self.size, self.stride = storage, offset, size, stride
    self.dtype = dtype  # set by _rebuild_tensor_v3 (untyped storage)


def _rebuild_tensor(storage, storage_offset, size, stride):
  return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  del requires_grad, backward_hooks, metadata
  return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                       dtype, metadata=None):
  del requires_grad, backward_hooks, metadata
  return _LazyTensor(storage, storage_offset, size, stride, dtype=np.dtype(dtype))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
  del requires_grad, backward_hooks
  return data


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
  del requires_grad, backward_hooks, state
  return data


def _latin1_encode(text, encoding="latin1", errors="strict"):
  """``_codecs.encode``, which protocol-2 pickles use for ``bytes``: latin-1 only."""
  if encoding.replace("_", "-").lower() not in ("latin1", "latin-1"):
    raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
  return text.encode("latin1", errors)


_SAFE_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
    ("_codecs", "encode"): _latin1_encode,
    # Accuracies saved as numpy scalars (np.float64(...)).
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "scalar"): _np_scalar,
    ("numpy._core.multiarray", "scalar"): _np_scalar,
}


class _RestrictedUnpickler(pickle.Unpickler):
  """``pickle.Unpickler`` that resolves only state-dict globals and torch storages.

  ``storage_loader(storage_type, key, location, numel, view_metadata)`` turns a
  persistent id into a ``_Storage``; without one, persistent ids are refused.
  """

  def __init__(self, file, what: str, storage_loader=None):
    super().__init__(file)
    self._what = what
    self._storage_loader = storage_loader

  def find_class(self, module, name):
    # Protocol-2 pickles name Python 2 modules (``__builtin__.set``).
    if (module, name) in _compat_pickle.NAME_MAPPING:
      module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    if (module, name) in _SAFE_GLOBALS:
      return _SAFE_GLOBALS[(module, name)]
    if module in ("torch", "torch.cuda") and name in _STORAGE_DTYPES:
      return _StorageType(name, _STORAGE_DTYPES[name])
    if (module, name) in _UNTYPED_STORAGES:
      return _StorageType(name, np.dtype(np.uint8))
    if (module, name) in _TYPED_STORAGES:
      return _StorageType(name, None)
    if module == "torch" and name in _TORCH_DTYPES:
      return np.dtype(_TORCH_DTYPES[name])
    raise CheckpointError(
        f"{self._what}: refusing to load the global '{module}.{name}': only tensors, "
        f"storages and plain containers are allowed in a state-dict checkpoint (was a "
        f"whole object saved instead of model.state_dict()?). Nothing was executed.")

  def persistent_load(self, pid):
    if self._storage_loader is None:
      raise CheckpointError(f"{self._what}: unexpected persistent id {pid!r} in a plain pickle")
    if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
      kind = pid[0] if isinstance(pid, tuple) and pid else pid
      raise CheckpointError(
          f"{self._what}: refusing persistent object of kind {kind!r}: only tensor "
          f"storages are allowed (was a whole nn.Module saved instead of its state_dict?)")
    if len(pid) not in (5, 6) or not isinstance(pid[1], _StorageType):
      raise CheckpointError(f"{self._what}: malformed storage reference {pid!r}")
    _, storage_type, key, location, numel = pid[:5]
    view_metadata = pid[5] if len(pid) == 6 else None
    dtype = storage_type.dtype if storage_type.dtype is not None else np.dtype(np.uint8)
    del location  # cpu or cuda:N: everything is read to host memory
    return self._storage_loader(dtype, str(key), int(numel), view_metadata)


# ---------------------------------------------------------------------------
# Formats.


def _read_zip(zf: zipfile.ZipFile, what: str) -> Any:
  """torch >= 1.6: ``<archive>/data.pkl`` + ``<archive>/data/<key>``."""
  names = zf.namelist()
  pickles = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
  if len(pickles) != 1:
    raise CheckpointError(f"{what} is a zip but not a PyTorch checkpoint (no single data.pkl)")
  prefix = pickles[0][: -len("data.pkl")]
  byteorder = "little"
  if prefix + "byteorder" in names:
    byteorder = zf.read(prefix + "byteorder").decode().strip()
  if byteorder not in ("little", "big"):
    raise CheckpointError(f"{what}: unknown byteorder {byteorder!r}")
  storages: Dict[str, _Storage] = {}

  def load(dtype, key, numel, view_metadata):
    del view_metadata  # only the legacy format has storage views
    if key not in storages:
      entry = f"{prefix}data/{key}"
      try:
        raw = zf.read(entry)
      except KeyError:
        raise CheckpointError(f"{what}: storage {entry} is missing from the archive") from None
      storages[key] = _Storage(dtype, numel, _from_bytes(raw, dtype, byteorder, what, key))
    return storages[key]

  with zf.open(pickles[0]) as f:
    return _RestrictedUnpickler(f, what, load).load()


def _read_legacy(f, what: str) -> Any:
  """torch < 1.6: magic, protocol, sys_info, object, storage keys, raw storages."""
  plain = lambda: _RestrictedUnpickler(f, what).load()  # noqa: E731
  magic = plain()
  if magic != _LEGACY_MAGIC:
    raise CheckpointError(f"{what}: not a legacy torch file (bad magic number)")
  protocol = plain()
  if protocol != _LEGACY_PROTOCOL:
    raise CheckpointError(f"{what}: unsupported legacy torch protocol version {protocol!r}")
  sys_info = plain()
  byteorder = "little"
  if isinstance(sys_info, dict) and sys_info.get("little_endian") is False:
    byteorder = "big"
  storages: Dict[str, _Storage] = {}
  views = []

  def load(dtype, key, numel, view_metadata):
    if key not in storages:
      storages[key] = _Storage(dtype, numel)
    root = storages[key]
    if view_metadata is None:
      return root
    _, offset, size = view_metadata  # (view_key, offset, size): torch < 0.4 storage views
    view = _Storage(dtype, int(size))
    views.append((view, root, int(offset)))
    return view

  obj = _RestrictedUnpickler(f, what, load).load()
  keys = plain()
  if not isinstance(keys, list):
    raise CheckpointError(f"{what}: malformed legacy checkpoint (no storage key list)")
  order = "<" if byteorder == "little" else ">"
  for key in keys:
    key = str(key)
    if key not in storages:
      raise CheckpointError(f"{what}: storage {key} is listed but never referenced")
    storage = storages[key]
    header = f.read(8)
    if len(header) != 8:
      raise CheckpointError(f"{what}: truncated file (storage {key} header)")
    (numel,) = struct.unpack(order + "q", header)
    nbytes = numel * storage.dtype.itemsize
    raw = f.read(nbytes)
    if numel < 0 or len(raw) != nbytes:
      raise CheckpointError(f"{what}: truncated file (storage {key} has {len(raw)} of {nbytes} bytes)")
    storage.data = _from_bytes(raw, storage.dtype, byteorder, what, key)
    storage.numel = numel
  for view, root, offset in views:
    if root.data is None or offset + view.numel > root.data.size:
      raise CheckpointError(f"{what}: storage view out of range")
    view.data = root.data[offset:offset + view.numel]
  return obj


def _from_bytes(raw: bytes, dtype: np.dtype, byteorder: str, what: str, key: str) -> np.ndarray:
  if len(raw) % dtype.itemsize:
    raise CheckpointError(f"{what}: storage {key} has {len(raw)} bytes, not a multiple of "
                          f"{dtype.itemsize} ({dtype})")
  if byteorder == "big" and dtype.itemsize > 1:
    return np.frombuffer(raw, dtype.newbyteorder(">")).astype(dtype)
  return np.frombuffer(raw, dtype)


def _materialize(t: _LazyTensor, what: str) -> np.ndarray:
  """The numpy array a pickled tensor describes (size/stride/offset in elements)."""
  storage = t.storage
  if not isinstance(storage, _Storage):
    raise CheckpointError(f"{what}: tensor without a storage ({storage!r})")
  if storage.data is None:
    raise CheckpointError(f"{what}: storage was never written (truncated legacy file?)")
  data = storage.data
  if t.dtype is not None and t.dtype != data.dtype:
    data = data.view(t.dtype) if data.size * data.itemsize % t.dtype.itemsize == 0 else None
    if data is None:
      raise CheckpointError(f"{what}: untyped storage size does not fit dtype {t.dtype}")
  size = tuple(int(s) for s in t.size)
  stride = tuple(int(s) for s in t.stride)
  offset = int(t.offset)
  if len(size) != len(stride) or any(s < 0 for s in size + stride) or offset < 0:
    raise CheckpointError(f"{what}: bad tensor geometry size={size} stride={stride} offset={offset}")
  if 0 in size:
    return np.zeros(size, data.dtype)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= data.size:
    raise CheckpointError(f"{what}: tensor size={size} stride={stride} offset={offset} "
                          f"reaches past its storage of {data.size} elements")
  view = np.lib.stride_tricks.as_strided(
      data[offset:], shape=size, strides=tuple(s * data.itemsize for s in stride),
      writeable=False)
  return np.array(view)


def _resolve(obj: Any, what: str, memo: Dict[int, Any]) -> Any:
  """Replace every ``_LazyTensor`` in a container tree by its numpy array."""
  if isinstance(obj, _LazyTensor):
    if id(obj) not in memo:
      memo[id(obj)] = _materialize(obj, what)
    return memo[id(obj)]
  if isinstance(obj, (_Storage, _StorageType)):
    raise CheckpointError(f"{what}: bare storages are not supported outside tensors")
  if isinstance(obj, collections.OrderedDict):
    return collections.OrderedDict((k, _resolve(v, what, memo)) for k, v in obj.items())
  if isinstance(obj, dict):
    return {k: _resolve(v, what, memo) for k, v in obj.items()}
  if isinstance(obj, list):
    return [_resolve(v, what, memo) for v in obj]
  if isinstance(obj, tuple):
    return tuple(_resolve(v, what, memo) for v in obj)
  return obj


def _read(path: PathLike) -> Tuple[dict, str]:
  """``(dict, format)``: see ``read_torch_file``."""
  what = str(path)
  with open(path, "rb") as f:
    head = f.read(8)
    f.seek(0)
    if zipfile.is_zipfile(f):
      f.seek(0)
      with zipfile.ZipFile(f) as zf:
        names = zf.namelist()
        if names and all(n.endswith(".npy") for n in names):
          obj, fmt = _guarded(lambda _, w: _read_npz(path), zf, what), "npz"
        else:
          obj, fmt = _guarded(_read_zip, zf, what), "zip"
    elif head[:1] == b"\x80":  # torch pickles use protocol 2
      f.seek(0)
      obj, fmt = _read_pickles(f, what)
    else:
      obj = fmt = None
  if fmt is None:
    raise CheckpointError(
        f"{what} is not a checkpoint: expected a PyTorch file (zip or legacy "
        f"pickle format) or an .npz state dict")
  obj = _guarded(lambda o, w: _resolve(o, w, {}), obj, what)
  if not isinstance(obj, dict):
    raise CheckpointError(f"{what} is not a checkpoint: expected a dict (a checkpoint or "
                          f"a state dict); found {type(obj).__name__}")
  return obj, fmt


def _guarded(read, f, what: str):
  """``read(f, what)``, turning low-level decoding errors into a ``CheckpointError``."""
  try:
    return read(f, what)
  except CheckpointError:
    raise
  except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError,
          AttributeError, struct.error, UnicodeDecodeError, zipfile.BadZipFile) as e:
    raise CheckpointError(f"{what} is not a readable checkpoint (corrupt, or not a PyTorch "
                          f"file: {type(e).__name__}: {e})") from None


def _read_pickles(f, what: str) -> Tuple[Any, str]:
  """Legacy torch file, or a single pickled dict (no torch framing)."""
  first = _guarded(lambda f, what: _RestrictedUnpickler(f, what).load(), f, what)
  if isinstance(first, int) and first == _LEGACY_MAGIC:
    f.seek(0)
    return _guarded(_read_legacy, f, what), "legacy"
  return first, "pickle"


def _read_npz(path: PathLike) -> dict:
  with np.load(path, allow_pickle=False) as z:
    return collections.OrderedDict((k, z[k]) for k in z.files)


def read_torch_file(path: PathLike, with_format: bool = False):
  """The dict a ``torch.save`` file (zip or legacy) or ``.npz`` holds.

  Tensors come back as numpy arrays (their own dtype; bfloat16 via
  ``ml_dtypes``), everything else as plain Python objects. With
  ``with_format``: ``(dict, format)``, format one of ``'zip'``, ``'legacy'``,
  ``'npz'`` or ``'pickle'`` (a plain pickled dict).

  Raises:
    CheckpointError (a ``ValueError``): the file is not such a checkpoint, is
      corrupt, or refers to a global other than a state dict's.
  """
  obj, fmt = _read(path)
  return (obj, fmt) if with_format else obj


# ---------------------------------------------------------------------------
# Checkpoints -> model variables.


def split_checkpoint(obj: Mapping[str, Any], what: str = "checkpoint") -> Tuple[dict, dict]:
  """``(state_dict, meta)`` of a reference checkpoint or a bare state dict.

  ``meta`` holds ``epoch`` and ``accuracy`` (plain numbers) when present; a
  bare state dict (every value an array) is returned as is with empty meta.
  """
  for key in ("model", "state_dict"):
    if isinstance(obj.get(key), Mapping):
      meta = {}
      for name in ("epoch", "accuracy", "best_acc"):
        if name in obj:
          value = obj[name]
          try:
            meta[name] = np.asarray(value).item()
          except (TypeError, ValueError):
            meta[name] = repr(value)
      return dict(obj[key]), meta
  if obj and all(isinstance(v, np.ndarray) for v in obj.values()):
    return dict(obj), {}
  raise CheckpointError(
      f"{what}: no state dict found: expected a 'model' entry (RepDistiller/CKTF "
      f"checkpoint) or a flat name -> tensor dict; top-level keys are {', '.join(sorted(map(str, obj)))}")


def load_torch_checkpoint(path: PathLike, model_name: str, num_classes: int) -> Dict[str, Any]:
  """``{'params', 'batch_stats'}`` (float32 numpy) for ``model_name`` from a checkpoint.

  ``path``: a reference ``torch.save`` file (zip or legacy format; a
  ``{'model': state_dict, ...}`` checkpoint or a bare state dict) or an ``.npz``
  of state_dict names. Raises ``ValueError`` naming every missing, unexpected
  or mis-shaped key, or saying why the file is not a checkpoint.
  """
  state, _ = split_checkpoint(read_torch_file(path), str(path))
  return state_dict_to_variables(state, abstract_variables(model_name, num_classes),
                                 what=str(path))
