"""Readers for the original files, laid out as the reference's users have them.

Under one ``data_dir``:

* ``cifar-100-python/{train,test}``: Python pickles (``encoding='bytes'``);
  ``b'data'`` is uint8 ``[N, 3072]`` holding the R, G, B planes of a 32x32
  image row-major, ``b'fine_labels'`` the 100-class labels
  (torchvision_custom/datasets/cifar.py). They are unpickled with only the
  globals numpy arrays and bytes need, so a foreign pickle runs no code.
* ``stl10_binary/{train_X,train_y,test_X,test_y,unlabeled_X}.bin``: X is uint8
  ``(N, 3, 96, 96)`` with each plane stored column-major, so NHWC is
  ``transpose(0, 3, 2, 1)``; y holds 1..10 (we return 0..9); the unlabeled
  split gets label -1 (torchvision_custom/datasets/stl10.py).
* ``tiny-imagenet-200/`` (or ``tiny-imagenet-200.zip``): ``wnids.txt``,
  ``train/<wnid>/images/*.JPEG``, and ``val/images/`` with
  ``val/val_annotations.txt`` (or val already sorted into ``val/<wnid>/``
  folders, the layout ``ImageFolder(val)`` in dataset/imagenet.py needs). The
  label is the wnid's index in sorted order (ImageFolder's); rows are ordered
  by (label, file name) like ImageFolder; images are converted to RGB, 64x64.
"""

import concurrent.futures
import io
import os
import pickle
import zipfile
import zlib
from typing import Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image

from cktf_jax.data import instructions
from cktf_jax.data.dataset import (UNLABELED, DataFormatError, DataNotFoundError, Dataset,
                                   check_label_range)

CIFAR100_DIR = "cifar-100-python"
STL10_DIR = "stl10_binary"
TINY_IMAGENET_DIR = "tiny-imagenet-200"
_STL10_FILES = {"train": ("train_X.bin", "train_y.bin"), "test": ("test_X.bin", "test_y.bin"),
                "unlabeled": ("unlabeled_X.bin", None)}
_STL10_PIXELS = 3 * 96 * 96
_IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")


def _check_split(name: str, split: str, splits: Sequence[str]) -> None:
  if split not in splits:
    raise ValueError(f"{name}: unknown split {split!r}; valid splits are: {', '.join(splits)}")


def _require(name: str, data_dir: str, folder: str, files: Sequence[str]) -> None:
  missing = [f"{folder}/{f}" for f in files
             if not os.path.isfile(os.path.join(data_dir, folder, f))]
  if missing:
    raise DataNotFoundError(instructions.missing(name, data_dir, data_dir, missing))


# ---------------------------------------------------------------- CIFAR-100

# The only globals a CIFAR-100 pickle refers to: numpy arrays (as the originals,
# Python 2 pickles, and numpy's protocol 2 and 5 pickles spell them) and bytes
# as Python 3 writes them at protocol 2. Anything else is refused unloaded.
_CIFAR_PICKLE_GLOBALS = frozenset({
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"), ("__builtin__", "bytes")})


class _UnsafePickleError(pickle.UnpicklingError):
  """The pickle refers to a global outside ``_CIFAR_PICKLE_GLOBALS``."""


class _CifarUnpickler(pickle.Unpickler):
  """``pickle.Unpickler`` resolving only ``_CIFAR_PICKLE_GLOBALS``: loading
  runs no code a CIFAR-100 file does not need."""

  def find_class(self, module: str, name: str):
    if (module, name) not in _CIFAR_PICKLE_GLOBALS:
      raise _UnsafePickleError(f"refers to {module}.{name}, which a CIFAR-100 pickle never "
                               f"holds; refusing to load it")
    return super().find_class(module, name)


def _read_cifar100_pickle(path: str) -> dict:
  try:
    with open(path, "rb") as f:
      entry = _CifarUnpickler(f, encoding="bytes").load()
  except _UnsafePickleError as e:
    raise DataFormatError(f"{path}: {e}") from e
  except Exception as e:  # Whatever the unpickler trips on, the file is damaged.
    truncated = isinstance(e, EOFError) or "truncated" in str(e)
    problem = "truncated" if truncated else "not a CIFAR-100 pickle"
    raise DataFormatError(f"{path}: {problem} ({type(e).__name__}: {e}); extract "
                          f"cifar-100-python.tar.gz again") from e
  missing = [k for k in (b"data", b"fine_labels") if not isinstance(entry, dict) or k not in entry]
  if missing:
    found = sorted(entry, key=repr) if isinstance(entry, dict) else f"a {type(entry).__name__}"
    raise DataFormatError(f"{path}: no {' or '.join(map(repr, missing))} in the pickle "
                          f"(expected a dict holding b'data' and b'fine_labels'; got {found})")
  return entry


def load_cifar100_raw(data_dir: str, split: str) -> Dataset:
  """CIFAR-100 from ``<data_dir>/cifar-100-python/{train,test}``."""
  _check_split("cifar100", split, ("train", "test"))
  _require("cifar100", data_dir, CIFAR100_DIR, (split,))
  path = os.path.join(data_dir, CIFAR100_DIR, split)
  entry = _read_cifar100_pickle(path)
  data = np.asarray(entry[b"data"])
  labels = np.asarray(entry[b"fine_labels"])
  if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or not data.shape[0]:
    raise DataFormatError(f"{path}: b'data' must be uint8 [N, 3072] with N > 0 (one row per "
                          f"32x32x3 image); got {data.dtype} {data.shape}")
  if labels.shape != (data.shape[0],):
    raise DataFormatError(f"{path}: {data.shape[0]} images but b'fine_labels' has shape "
                          f"{labels.shape}; expected one label per image")
  if not np.issubdtype(labels.dtype, np.integer):
    raise DataFormatError(f"{path}: b'fine_labels' must be integers; got {labels.dtype}")
  check_label_range(f"{path}: b'fine_labels'", labels, 100)  # Before int32 can wrap them.
  images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
  return Dataset(images, labels.astype(np.int32), "cifar100", 100, split, path).validate(32)


# ---------------------------------------------------------------- STL-10


def _read_stl10_images(path: str) -> np.ndarray:
  size = os.path.getsize(path)
  if size == 0 or size % _STL10_PIXELS:
    raise DataFormatError(f"{path}: {size} bytes is not a positive multiple of {_STL10_PIXELS} "
                          f"(one 3x96x96 image); the file is probably truncated")
  planes = np.memmap(path, np.uint8, "r", shape=(size // _STL10_PIXELS, 3, 96, 96))
  images = np.empty((planes.shape[0], 96, 96, 3), np.uint8)
  for start in range(0, planes.shape[0], 4096):  # Chunks bound the peak memory.
    images[start:start + 4096] = planes[start:start + 4096].transpose(0, 3, 2, 1)
  return images


def load_stl10_raw(data_dir: str, split: str) -> Dataset:
  """STL-10 from ``<data_dir>/stl10_binary/*.bin``; ``split`` in train/test/unlabeled."""
  _check_split("stl10", split, tuple(_STL10_FILES))
  x_file, y_file = _STL10_FILES[split]
  _require("stl10", data_dir, STL10_DIR, [f for f in (x_file, y_file) if f])
  x_path = os.path.join(data_dir, STL10_DIR, x_file)
  images = _read_stl10_images(x_path)
  if y_file is None:
    labels = np.full(images.shape[0], UNLABELED, np.int32)
  else:
    y_path = os.path.join(data_dir, STL10_DIR, y_file)
    raw = np.fromfile(y_path, np.uint8)
    if raw.shape[0] != images.shape[0]:
      raise DataFormatError(f"{y_path}: {raw.shape[0]} labels for the {images.shape[0]} images "
                            f"of {x_path}; one of them is truncated")
    if raw.size and (raw.min() < 1 or raw.max() > 10):
      raise DataFormatError(f"{y_path}: labels must be 1..10; found {raw.min()}..{raw.max()}")
    labels = raw.astype(np.int32) - 1
  return Dataset(images, labels, "stl10", 10, split, x_path).validate(96)


# ---------------------------------------------------------------- Tiny-ImageNet


class _FolderTree:
  """Read access to an extracted ``tiny-imagenet-200/`` folder."""

  def __init__(self, root: str):
    self.root = root

  def describe(self, rel: str) -> str:
    return os.path.join(self.root, *rel.split("/"))

  def isfile(self, rel: str) -> bool:
    return os.path.isfile(self.describe(rel))

  def isdir(self, rel: str) -> bool:
    return os.path.isdir(self.describe(rel))

  def listdir(self, rel: str) -> List[str]:
    return sorted(os.listdir(self.describe(rel)))

  def read(self, rel: str) -> bytes:
    with open(self.describe(rel), "rb") as f:
      return f.read()


class _ZipTree:
  """Read access to ``tiny-imagenet-200.zip`` (top folder ``tiny-imagenet-200/``)."""

  def __init__(self, path: str):
    self.path = path
    with zipfile.ZipFile(path) as z:
      names = [n.rstrip("/") for n in z.namelist()]
    prefix = TINY_IMAGENET_DIR + "/"
    self._files = {n[len(prefix):] for n in names if n.startswith(prefix) and not n.endswith("/")}
    self._dirs: Dict[str, set] = {}
    for rel in self._files:
      parts = rel.split("/")
      for depth in range(len(parts)):
        self._dirs.setdefault("/".join(parts[:depth]), set()).add(parts[depth])
    self._zip = None

  def describe(self, rel: str) -> str:
    return f"{self.path}:{TINY_IMAGENET_DIR}/{rel}"

  def isfile(self, rel: str) -> bool:
    return rel in self._files

  def isdir(self, rel: str) -> bool:
    return rel in self._dirs

  def listdir(self, rel: str) -> List[str]:
    return sorted(self._dirs[rel])

  def read(self, rel: str) -> bytes:
    if self._zip is None:
      self._zip = zipfile.ZipFile(self.path)
    return self._zip.read(f"{TINY_IMAGENET_DIR}/{rel}")


def open_tiny_imagenet_tree(folder: str, data_dir: str):
  """The tree of ``<folder>/tiny-imagenet-200/`` or ``<folder>/tiny-imagenet-200.zip``."""
  root = os.path.join(folder, TINY_IMAGENET_DIR)
  if os.path.isfile(os.path.join(root, "wnids.txt")):
    return _FolderTree(root)
  if os.path.isfile(root + ".zip"):
    try:
      return _ZipTree(root + ".zip")
    except zipfile.BadZipFile as e:
      raise DataFormatError(f"{root}.zip: not a readable zip file ({e}); download it again") from e
  raise DataNotFoundError(instructions.missing(
      "tiny_imagenet", data_dir, folder,
      [f"{TINY_IMAGENET_DIR}/wnids.txt", f"{TINY_IMAGENET_DIR}/train/<wnid>/images/*.JPEG",
       f"{TINY_IMAGENET_DIR}/val/images/*.JPEG", f"{TINY_IMAGENET_DIR}/val/val_annotations.txt",
       f"(or {TINY_IMAGENET_DIR}.zip)"]))


def _read(tree, rel: str) -> bytes:
  """``tree.read(rel)``; an unreadable file or damaged zip member is a ``DataFormatError``."""
  try:
    return tree.read(rel)
  except (OSError, KeyError, zipfile.BadZipFile, zlib.error) as e:
    raise DataFormatError(f"{tree.describe(rel)}: cannot read ({type(e).__name__}: {e})") from e


def _read_lines(tree, rel: str) -> List[str]:
  try:
    return _read(tree, rel).decode().splitlines()
  except UnicodeDecodeError as e:
    raise DataFormatError(f"{tree.describe(rel)}: not a text file ({e})") from e


def _few(names: Sequence[str]) -> str:
  """``names`` for a message: the first five, then how many more; or 'none'."""
  if not names:
    return "none"
  return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _class_images(tree, rel: str) -> List[str]:
  """The image files in class folder ``rel``, which must hold at least one."""
  if not tree.isdir(rel):
    raise DataFormatError(f"{tree.describe(rel)}: missing")
  found = [f"{rel}/{n}" for n in tree.listdir(rel) if n.lower().endswith(_IMAGE_EXTENSIONS)]
  if not found:
    raise DataFormatError(f"{tree.describe(rel)}: no images (*{', *'.join(_IMAGE_EXTENSIONS)})")
  return found


def tiny_imagenet_index(tree, split: str) -> Tuple[List[str], List[Tuple[str, int]]]:
  """``(sorted wnids, [(relative path, label), ...])`` of ``split`` ('train' or 'test' = val)."""
  _check_split("tiny_imagenet", split, ("train", "test"))
  if not tree.isfile("wnids.txt"):
    raise DataFormatError(f"{tree.describe('wnids.txt')}: missing")
  wnids = sorted({w.strip() for w in _read_lines(tree, "wnids.txt") if w.strip()})
  label_of = {w: i for i, w in enumerate(wnids)}
  items: List[Tuple[str, int]] = []
  if split == "train":
    found = ([n for n in tree.listdir("train") if tree.isdir(f"train/{n}")]
             if tree.isdir("train") else [])
    if found != wnids:
      raise DataFormatError(
          f"{tree.describe('train')}: class folders do not match the {len(wnids)} ids in "
          f"{tree.describe('wnids.txt')}: missing {_few(sorted(set(wnids) - set(found)))}; "
          f"not in wnids.txt {_few(sorted(set(found) - set(wnids)))}")
    for w in wnids:
      items += [(p, label_of[w]) for p in _class_images(tree, f"train/{w}/images")]
  elif tree.isfile("val/val_annotations.txt"):
    annotations = tree.describe("val/val_annotations.txt")
    by_name = {}
    for line_no, line in enumerate(_read_lines(tree, "val/val_annotations.txt"), 1):
      if not line.strip():
        continue
      fields = line.split("\t")
      if len(fields) < 2 or fields[1] not in label_of:
        raise DataFormatError(f"{annotations}: line {line_no} is not '<file>\\t<wnid>...' with a "
                              f"wnid from wnids.txt: {line!r}")
      if not tree.isfile(f"val/images/{fields[0]}"):
        raise DataFormatError(f"{annotations}: line {line_no} names "
                              f"{tree.describe(f'val/images/{fields[0]}')}, which is missing")
      by_name[fields[0]] = label_of[fields[1]]
    items = sorted(((f"val/images/{n}", l) for n, l in by_name.items()),
                   key=lambda item: (item[1], item[0]))
  elif tree.isdir("val") and all(w in label_of for w in tree.listdir("val")):
    for w in tree.listdir("val"):
      sub = f"val/{w}/images" if tree.isdir(f"val/{w}/images") else f"val/{w}"
      items += [(p, label_of[w]) for p in _class_images(tree, sub)]
  else:
    raise DataFormatError(f"{tree.describe('val')}: expected val/images + val/val_annotations.txt "
                          f"or one folder per wnid")
  if not items:
    raise DataFormatError(f"{tree.describe('train' if split == 'train' else 'val')}: no images")
  return wnids, items


def decode_tiny_imagenet_image(tree, rel: str) -> Image.Image:
  """One image as a 64x64 RGB PIL image (grayscale ones are converted).

  Another size is an error, not resized: every Tiny-ImageNet image is 64x64,
  so another size means other data (which the reference's RandomResizedCrop
  and Resize(64) would silently accept)."""
  encoded = _read(tree, rel)
  try:
    image = Image.open(io.BytesIO(encoded)).convert("RGB")
  except Image.UnidentifiedImageError as e:  # Its message names only the BytesIO.
    raise DataFormatError(f"{tree.describe(rel)}: cannot decode image: not an image file in a "
                          f"format PIL reads") from e
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise DataFormatError(f"{tree.describe(rel)}: cannot decode image ({e})") from e
  if image.size != (64, 64):
    raise DataFormatError(f"{tree.describe(rel)}: image is {image.size[0]}x{image.size[1]}, "
                          f"expected 64x64")
  return image


def load_tiny_imagenet_raw(data_dir: str, split: str) -> Dataset:
  """Tiny-ImageNet from ``<data_dir>/tiny-imagenet-200/`` (or its zip); 'test' = val."""
  _check_split("tiny_imagenet", split, ("train", "test"))
  tree = open_tiny_imagenet_tree(data_dir, data_dir)
  wnids, items = tiny_imagenet_index(tree, split)
  images = np.empty((len(items), 64, 64, 3), np.uint8)

  def decode(row: int) -> None:
    images[row] = np.asarray(decode_tiny_imagenet_image(tree, items[row][0]))

  if isinstance(tree, _ZipTree):  # One zip handle: decode in this thread.
    for row in range(len(items)):
      decode(row)
  else:
    pool = concurrent.futures.ThreadPoolExecutor(os.cpu_count())
    try:
      list(pool.map(decode, range(len(items))))
    finally:  # On a bad image, skip the rest instead of decoding them first.
      pool.shutdown(cancel_futures=True)
  labels = np.array([label for _, label in items], np.int32)
  return Dataset(images, labels, "tiny_imagenet", len(wnids), split,
                 tree.describe("")).validate(64)

