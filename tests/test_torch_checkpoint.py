"""Reading PyTorch checkpoints without PyTorch (``models/torch_checkpoint.py``)
and converting them to orbax (``models/convert.py``).

* the reference's real ``.pth`` files (zip and legacy formats) reproduce its logits;
* a small in-test writer of both torch formats (no torch needed) checks dtypes,
  strides, offsets and shared storages, and builds broken or malicious files.
"""

import re
import collections
import io
import json
import os
import pickle
import struct
import zipfile

import jax
import ml_dtypes
import numpy as np
import pytest

from cktf_jax import models
from cktf_jax.models import convert, torch_checkpoint
from cktf_jax.models.torch_checkpoint import (CheckpointError, load_torch_checkpoint,
                                              read_torch_file)
from parity_utils import FIXTURES, assert_close

PTH = FIXTURES / "pth"
INDEX = json.loads((PTH / "index.json").read_text())
RTOL, ATOL = 1e-4, 1e-4


# ---------------------------------------------------------------------------
# A minimal torch.save writer: numpy arrays become tensors (views share their
# base array's storage, with its offset and strides), in either file format.

_STORAGE_NAMES = {
    np.dtype(np.float32): "FloatStorage", np.dtype(np.float64): "DoubleStorage",
    np.dtype(np.float16): "HalfStorage", np.dtype(ml_dtypes.bfloat16): "BFloat16Storage",
    np.dtype(np.int64): "LongStorage", np.dtype(np.int32): "IntStorage",
    np.dtype(np.uint8): "ByteStorage", np.dtype(np.bool_): "BoolStorage",
}


class _Global:
  """Pickled as the global ``module.name`` (which need not be importable)."""

  def __init__(self, module, name):
    self.module, self.name = module, name

  def __call__(self, *args):
    raise AssertionError("never called")


class _StorageRef:

  def __init__(self, key, root):
    self.key, self.root = key, root


class _Tensor:

  def __init__(self, storage, offset, size, stride):
    self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

  def __reduce_ex__(self, protocol):
    return (_Global("torch._utils", "_rebuild_tensor_v2"),
            (self.storage, self.offset, self.size, self.stride, False, collections.OrderedDict()))


class _TorchPickler(pickle._Pickler):  # the pure-Python pickler lets us emit any GLOBAL
  dispatch = pickle._Pickler.dispatch.copy()

  def __init__(self, file, legacy):
    super().__init__(file, protocol=2)
    self.legacy = legacy

  def save_fake_global(self, obj):
    self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
    self.memoize(obj)

  dispatch[_Global] = save_fake_global

  def persistent_id(self, obj):
    if not isinstance(obj, _StorageRef):
      return None
    pid = ("storage", _Global("torch", _STORAGE_NAMES[obj.root.dtype]), obj.key, "cpu",
           obj.root.size)
    return pid + (None,) if self.legacy else pid


def _root(a):
  while isinstance(a.base, np.ndarray):
    a = a.base
  return a


def _tensorize(obj, storages):
  """Replace numpy arrays (not scalars) by ``_Tensor``s; fill ``storages`` key -> root."""
  if isinstance(obj, np.ndarray):
    root = _root(obj)
    assert root.flags.c_contiguous
    key = next((k for k, r in storages.items() if r is root), None)
    if key is None:
      key = str(len(storages))
      storages[key] = root
    item = obj.itemsize
    offset = (obj.__array_interface__["data"][0] - root.__array_interface__["data"][0]) // item
    return _Tensor(_StorageRef(key, root.reshape(-1)), offset, tuple(obj.shape),
                   tuple(s // item for s in obj.strides))
  if isinstance(obj, dict):
    return type(obj)((k, _tensorize(v, storages)) for k, v in obj.items())
  if isinstance(obj, (list, tuple)):
    return type(obj)(_tensorize(v, storages) for v in obj)
  return obj


def torch_save(obj, path, legacy=False):
  """Write ``obj`` like ``torch.save`` (zip, or the legacy format when ``legacy``)."""
  storages = {}
  buf = io.BytesIO()
  _TorchPickler(buf, legacy).dump(_tensorize(obj, storages))
  if not legacy:
    archive = os.path.splitext(os.path.basename(path))[0]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
      z.writestr(f"{archive}/data.pkl", buf.getvalue())
      z.writestr(f"{archive}/byteorder", "little")
      for key, root in storages.items():
        z.writestr(f"{archive}/data/{key}", np.ascontiguousarray(root).tobytes())
      z.writestr(f"{archive}/version", "3\n")
    return
  with open(path, "wb") as f:
    for header in (0x1950a86a20f9469cfc6c, 1001,
                   {"protocol_version": 1001, "little_endian": True,
                    "type_sizes": {"short": 2, "int": 4, "long": 4}}):
      pickle.dump(header, f, protocol=2)
    f.write(buf.getvalue())
    keys = sorted(storages)
    pickle.dump(keys, f, protocol=2)
    for key in keys:
      f.write(struct.pack("<q", storages[key].size) + storages[key].tobytes())


# ---------------------------------------------------------------------------
# The reference's own files.


def _template_apply(model_name, num_classes, variables, x_nchw):
  model = models.create_model(model_name, num_classes)
  return model.apply(variables, np.transpose(x_nchw, (0, 2, 3, 1)), train=False).logits


@pytest.mark.parametrize("entry", INDEX, ids=[e["file"] for e in INDEX])
def test_reference_pth_reproduces_logits(entry):
  path = PTH / entry["file"]
  expected = np.load(str(path).replace(".pth", "_expected.npz"))
  variables = load_torch_checkpoint(path, entry["model"], entry["num_classes"])
  assert set(variables) == {"params", "batch_stats"}
  logits = _template_apply(entry["model"], entry["num_classes"], variables, expected["x_nchw"])
  assert_close(logits, expected["logits"], RTOL, ATOL, f"{entry['file']} logits")

  obj, fmt = read_torch_file(path, with_format=True)
  assert fmt == ("legacy" if entry["format"].startswith("legacy") else "zip")
  assert obj["epoch"] == 240 and obj["accuracy"].shape == ()
  assert ("optimizer" in obj) == entry["has_optimizer_state"]


# ---------------------------------------------------------------------------
# Layouts, dtypes, containers.


def _layout_cases():
  base = np.arange(120, dtype=np.float32).reshape(4, 5, 6) / 7
  rng = np.random.default_rng(0)
  return collections.OrderedDict([
      ("f32", rng.standard_normal((3, 4)).astype(np.float32)),
      ("f64", rng.standard_normal((2, 3))),
      ("f16", rng.standard_normal(5).astype(np.float16)),
      ("bf16", rng.standard_normal(5).astype(ml_dtypes.bfloat16)),
      ("i64", np.arange(-3, 4, dtype=np.int64)),
      ("i32", np.arange(-3, 4, dtype=np.int32)),
      ("u8", np.arange(250, 256, dtype=np.uint8)),
      ("bool", np.array([True, False, True])),
      ("scalar", np.array(3.5, np.float32)),
      ("empty", np.zeros((0, 3), np.float32)),
      ("transposed", base.transpose(2, 0, 1)),        # shares base's storage
      ("offset_strided", base[1:, 2:, ::2]),          # offset + non-unit strides
      ("row", base[3]),                               # offset, contiguous
  ])


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_reader_dtypes_strides_offsets(tmp_path, legacy):
  tensors = _layout_cases()
  obj = {"epoch": 7, "model": tensors, "accuracy": np.array(12.5, np.float32),
         "best_acc": np.float64(1.5), "extra": [{1, 2}, (b"\x00\xff", None), 3.25]}
  path = tmp_path / "layouts.pth"
  torch_save(obj, path, legacy=legacy)
  got, fmt = read_torch_file(path, with_format=True)
  assert fmt == ("legacy" if legacy else "zip")
  assert isinstance(got["model"], collections.OrderedDict)
  assert list(got["model"]) == list(tensors)
  for name, want in tensors.items():
    have = got["model"][name]
    assert isinstance(have, np.ndarray) and have.dtype == want.dtype, name
    np.testing.assert_array_equal(have, want, err_msg=name)
  assert got["epoch"] == 7 and float(got["accuracy"]) == 12.5 and got["best_acc"] == 1.5
  assert got["extra"] == [{1, 2}, (b"\x00\xff", None), 3.25]
  state, meta = torch_checkpoint.split_checkpoint(got)
  assert meta == {"epoch": 7, "accuracy": 12.5, "best_acc": 1.5}
  assert list(state) == list(tensors)


def test_tensor_past_its_storage_is_rejected(tmp_path):
  path = tmp_path / "oob.pth"
  tensor = _tensorize(np.zeros(4, np.float32), {})
  tensor.size, tensor.stride = (4, 4), (4, 1)  # 16 elements from a 4-element storage
  buf = io.BytesIO()
  _TorchPickler(buf, legacy=False).dump({"w": tensor})
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("oob/data.pkl", buf.getvalue())
    z.writestr("oob/data/0", np.zeros(4, np.float32).tobytes())
  with pytest.raises(ValueError, match="reaches past its storage"):
    read_torch_file(path)


# ---------------------------------------------------------------------------
# State dict sources and mismatches.


@pytest.fixture(scope="module")
def resnet8():
  path = PTH / "resnet8_zip.pth"
  state, _ = torch_checkpoint.split_checkpoint(read_torch_file(path))
  return path, state, load_torch_checkpoint(path, "resnet8", 100)


def _assert_same(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_npz_and_bare_state_dict_round_trip(tmp_path, resnet8):
  _, state, variables = resnet8
  npz = tmp_path / "state.npz"
  np.savez(npz, **state)
  _assert_same(load_torch_checkpoint(npz, "resnet8", 100), variables)
  assert read_torch_file(npz, with_format=True)[1] == "npz"
  bare = tmp_path / "bare.pth"  # torch.save(state_dict) without the {'model': ...} wrapper
  torch_save(collections.OrderedDict(state), bare)
  _assert_same(load_torch_checkpoint(bare, "resnet8", 100), variables)
  parallel = tmp_path / "parallel.pth"  # nn.DataParallel's module. prefix
  torch_save({"model": {f"module.{k}": v for k, v in state.items()}, "epoch": 1}, parallel,
             legacy=True)
  _assert_same(load_torch_checkpoint(parallel, "resnet8", 100), variables)


def test_missing_unexpected_and_misshaped_keys_are_named(tmp_path, resnet8):
  _, state, _ = resnet8
  broken = dict(state)
  del broken["layer1.0.bn2.running_var"]
  broken["head.extra.weight"] = np.zeros(3, np.float32)
  broken["fc.weight"] = np.zeros((10, 64), np.float32)
  path = tmp_path / "broken.pth"
  torch_save({"model": broken, "epoch": 1}, path)
  with pytest.raises(ValueError) as info:
    load_torch_checkpoint(path, "resnet8", 100)
  message = str(info.value)
  for expected in (str(path), "missing keys (1): layer1.0.bn2.running_var",
                   "unexpected keys (1): head.extra.weight",
                   "fc.weight: ", "has (10, 64), model needs (100, 64)"):
    assert expected in message


def test_files_that_are_not_checkpoints(tmp_path):
  cases = {
      "notes.txt": b"hello, not a checkpoint\n",
      "empty.pth": b"",
      "garbage.pth": b"\x80\x02" + bytes(range(256)),
  }
  archive = io.BytesIO()
  with zipfile.ZipFile(archive, "w") as z:
    z.writestr("readme.md", "a zip, but no data.pkl")
  cases["other.zip"] = archive.getvalue()
  cases["list.pkl"] = pickle.dumps([1, 2, 3], protocol=2)
  for name, content in cases.items():
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match="not a"):
      load_torch_checkpoint(path, "resnet8", 100)
    with pytest.raises(ValueError, match=str(path)):
      read_torch_file(path)
  no_model = tmp_path / "no_model.pth"
  torch_save({"epoch": 3, "accuracy": np.array(1.0)}, no_model)
  with pytest.raises(ValueError, match="no state dict found.*accuracy, epoch"):
    load_torch_checkpoint(no_model, "resnet8", 100)


class _Exploit:
  """Unpickling this would run a shell command."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("kind", ["pickle", "zip", "legacy"])
def test_disallowed_global_is_refused_without_running(tmp_path, kind):
  marker = tmp_path / "pwned"
  payload = {"model": {"w": _Exploit(marker)}, "epoch": 1}
  path = tmp_path / f"evil_{kind}.pth"
  if kind == "pickle":
    path.write_bytes(pickle.dumps(payload, protocol=2))
  elif kind == "zip":
    with zipfile.ZipFile(path, "w") as z:
      z.writestr("evil/data.pkl", pickle.dumps(payload, protocol=2))
  else:
    buf = io.BytesIO()
    for header in (0x1950a86a20f9469cfc6c, 1001, {"little_endian": True}, payload):
      pickle.dump(header, buf, protocol=2)
    path.write_bytes(buf.getvalue())
  with pytest.raises(CheckpointError, match=r"refusing to load the global '(posix|os|nt)\.system'"):
    read_torch_file(path)
  assert not marker.exists()


# ---------------------------------------------------------------------------
# The conversion CLI.


def test_convert_cli_round_trip(tmp_path, capsys, resnet8):
  path, _, variables = resnet8
  out = tmp_path / "teacher"
  argv = ["--model", "resnet8", "--num_classes", "100", str(path), str(out)]
  assert convert.main(argv) == 0
  printed = capsys.readouterr().out
  assert "wrote" in printed and str(out / "variables") in printed and "meta.json" in printed

  meta, restored = convert.restore_converted(out)
  assert meta["model"] == "resnet8" and meta["num_classes"] == 100
  assert meta["source"] == str(path.resolve()) and meta["source_format"] == "zip"
  assert meta["epoch"] == 240 and meta["accuracy"] == pytest.approx(75.61, abs=1e-4)
  _assert_same(restored, variables)

  assert convert.main(argv) == 1  # refuses to overwrite by default
  assert "already exists" in capsys.readouterr().err
  assert convert.main(argv + ["--overwrite"]) == 0
  assert convert.main(["--model", "resnet8", "--num_classes", "10", str(path),
                       str(tmp_path / "bad")]) == 1
  assert "fc.weight" in capsys.readouterr().err


def _largest_file(folder):
  files = [p for p in folder.rglob("*") if p.is_file()]
  return max(files, key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("damage", ["garble_data", "truncate_data", "garble_meta"])
def test_a_damaged_model_directory_is_named_not_used(tmp_path, resnet8, damage):
  _, _, variables = resnet8
  out = tmp_path / "teacher"
  convert.save_model_dir(str(out), "resnet8", 100, variables)
  if damage == "garble_meta":
    (out / "meta.json").write_text("{not json")
  else:
    target = _largest_file(out / "variables")
    raw = bytearray(target.read_bytes())
    if damage == "truncate_data":
      raw = raw[:len(raw) // 2]
    else:
      raw[len(raw) // 2:len(raw) // 2 + 64] = bytes(64)  # zero a run in the middle
    target.write_bytes(bytes(raw))
  with pytest.raises(torch_checkpoint.CheckpointError,
                     match=rf"model directory {re.escape(str(out))} is damaged"):
    convert.restore_converted(str(out))
