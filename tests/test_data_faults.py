"""Bad data (issue #9): each fault, injected into a small file in the original
format (test_data_sources' writers), makes ``load_dataset`` raise
``DataFormatError`` (``DataNotFoundError`` for a missing file) whose message
names the file and the problem; launch.py prints these without a traceback."""

import io
import pathlib
import pickle
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from cktf_jax import data
from test_data_sources import write_cifar100, write_stl10, write_tiny_imagenet, zip_tree

RNG = np.random.default_rng(1)


class _RunsCode:
  """Pickles as a call of ``print``: a pickle the CIFAR-100 reader must refuse."""

  def __reduce__(self):
    return print, ("unpickling ran code",)


# ------------------------------------------------------------ faults
# A set-up writes good files, damages one and returns the path the error must name.


def cifar(damage=None, **entry):
  """A 4-image ``cifar-100-python/train`` with its bytes passed through
  ``damage``, or its dict's keys ``data``/``fine_labels`` replaced by ``entry``
  (``None``: key removed)."""

  def setup(tmp):
    write_cifar100(tmp, "train", RNG.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8),
                   [0, 1, 2, 99])
    path = tmp / "cifar-100-python" / "train"
    if damage:
      path.write_bytes(damage(path.read_bytes()))
    else:
      content = pickle.loads(path.read_bytes(), encoding="bytes")
      for key, value in entry.items():
        content.pop(key.encode())
        if value is not None:
          content[key.encode()] = value
      path.write_bytes(pickle.dumps(content, protocol=2))
    return path

  return setup


def stl10(x=None, y=None):
  """3 STL-10 train images (labels stored as 1, 2, 3) with ``train_X.bin``'s
  bytes passed through ``x``, or ``train_y.bin``'s through ``y`` (``None``
  from ``y``: the file removed)."""

  def setup(tmp):
    write_stl10(tmp, "train", RNG.integers(0, 256, (3, 96, 96, 3), dtype=np.uint8), [0, 1, 2])
    path = tmp / "stl10_binary" / ("train_X.bin" if x else "train_y.bin")
    content = (x or y)(path.read_bytes())
    if content is None:
      path.unlink()
      return "stl10_binary/train_y.bin"
    path.write_bytes(content)
    return path

  return setup


def tiny(damage):
  """The 3-class ``tiny-imagenet-200/`` of test_data_sources, then
  ``damage(root)`` (a ``pathlib.Path``), which returns the path to name."""
  return lambda tmp: damage(tmp / write_tiny_imagenet(str(tmp)))


def jpeg(width, height):
  buffer = io.BytesIO()
  Image.fromarray(RNG.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, "JPEG")
  return buffer.getvalue()


def rewrite(path, change):
  """``path``'s bytes replaced by ``change(old bytes)``; returns ``path``."""
  path.write_bytes(change(path.read_bytes()))
  return path


def truncate(content):
  return content[:len(content) // 2]


def train_image(change):
  """Damage: train/n01/images/n01_1.JPEG's bytes replaced by ``change(old)``."""
  return lambda root: rewrite(root / "train" / "n01" / "images" / "n01_1.JPEG", change)


def append_annotation(line):
  """Damage: ``line`` added to val_annotations.txt (as its line 5)."""
  return lambda root: rewrite(root / "val" / "val_annotations.txt",
                              lambda b: b + line.encode() + b"\n")


def empty_class_folder(root):
  folder = root / "train" / "n02" / "images"
  for image in folder.iterdir():
    image.unlink()
  return folder


def remove_class_folder(root):
  shutil.rmtree(root / "train" / "n02")
  return root / "train"


def add_class_folder(root):
  (root / "train" / "n99" / "images").mkdir(parents=True)
  return root / "train"


def zipped(root):
  """The tree zipped (members stored uncompressed), the folder removed."""
  path = pathlib.Path(zip_tree(str(root)))
  shutil.rmtree(root)
  return path


def corrupt_zip_member(root, rel="train/n01/images/n01_0.JPEG"):
  """Damage: one byte of member ``rel`` flipped in the zipped tree."""
  member = (root / rel).read_bytes()

  def flip(content):
    at = content.find(member) + len(member) // 2
    return content[:at] + bytes([content[at] ^ 0xFF]) + content[at + 1:]

  return f"{rewrite(zipped(root), flip)}:tiny-imagenet-200/{rel}"


FORMAT, NOT_FOUND = data.DataFormatError, data.DataNotFoundError
CASES = [  # id, name, split, set-up, error, the problem (a regex).
    ("cifar-truncated", "cifar100", "train", cifar(truncate), FORMAT, r"truncated"),
    ("cifar-empty", "cifar100", "train", cifar(lambda b: b""), FORMAT, r"truncated \(EOFError"),
    ("cifar-random-bytes", "cifar100", "train",
     cifar(lambda b: np.random.default_rng(7).bytes(len(b))), FORMAT, r"not a CIFAR-100 pickle"),
    ("cifar-text-file", "cifar100", "train", cifar(lambda b: b"data,label\n1,2\n"), FORMAT,
     r"not a CIFAR-100 pickle \(UnpicklingError"),
    ("cifar-pickle-runs-code", "cifar100", "train", cifar(lambda b: pickle.dumps(_RunsCode())),
     FORMAT, r"refers to builtins\.print, .*refusing to load it"),
    ("cifar-not-a-dict", "cifar100", "train", cifar(lambda b: pickle.dumps([1, 2])), FORMAT,
     r"no b'data' or b'fine_labels' in the pickle .*got a list"),
    ("cifar-no-data", "cifar100", "train", cifar(data=None), FORMAT, r"no b'data' in the pickle"),
    ("cifar-no-fine-labels", "cifar100", "train", cifar(fine_labels=None), FORMAT,
     r"no b'fine_labels' in the pickle"),
    ("cifar-row-length", "cifar100", "train", cifar(data=np.zeros((4, 3000), np.uint8)), FORMAT,
     r"b'data' must be uint8 \[N, 3072\].*got uint8 \(4, 3000\)"),
    ("cifar-no-rows", "cifar100", "train",
     cifar(data=np.zeros((0, 3072), np.uint8), fine_labels=[]), FORMAT, r"with N > 0"),
    ("cifar-float-data", "cifar100", "train", cifar(data=np.zeros((4, 3072), np.float32)),
     FORMAT, r"must be uint8 .*got float32"),
    ("cifar-label-100", "cifar100", "train", cifar(fine_labels=[0, 100, 2, 3]), FORMAT,
     r"b'fine_labels': 1 labels outside \[0, 100\): row 1 = 100$"),
    ("cifar-label-minus-1", "cifar100", "train", cifar(fine_labels=[0, 1, -1, 3]), FORMAT,
     r"row 2 = -1$"),
    ("cifar-label-past-int32", "cifar100", "train", cifar(fine_labels=[0, 1, 2, 2**32 + 3]),
     FORMAT, r"row 3 = 4294967299$"),  # Not wrapped to 3 by the int32 cast.
    ("cifar-float-labels", "cifar100", "train", cifar(fine_labels=[0.0, 1.5, 2.0, 3.0]), FORMAT,
     r"must be integers; got float64"),
    ("cifar-label-count", "cifar100", "train", cifar(fine_labels=[0, 1, 2]), FORMAT,
     r"4 images but b'fine_labels' has shape \(3,\)"),
    ("stl-x-truncated", "stl10", "train", stl10(x=lambda b: b[:-100]), FORMAT,
     r"not a positive multiple of 27648 .*truncated"),
    ("stl-x-empty", "stl10", "train", stl10(x=lambda b: b""), FORMAT,
     r"0 bytes is not a positive multiple"),
    ("stl-y-short", "stl10", "train", stl10(y=lambda b: b[:2]), FORMAT,
     r"2 labels for the 3 images of"),
    ("stl-y-long", "stl10", "train", stl10(y=lambda b: b + b"\x01"), FORMAT,
     r"4 labels for the 3 images"),
    ("stl-label-0", "stl10", "train", stl10(y=lambda b: bytes([1, 0, 2])), FORMAT,
     r"labels must be 1\.\.10; found 0\.\.2"),
    ("stl-label-11", "stl10", "train", stl10(y=lambda b: bytes([1, 11, 2])), FORMAT,
     r"labels must be 1\.\.10; found 1\.\.11"),
    ("stl-y-missing", "stl10", "train", stl10(y=lambda b: None), NOT_FOUND, r"no data in"),
    ("tiny-jpeg-truncated", "tiny_imagenet", "train", tiny(train_image(truncate)), FORMAT,
     r"cannot decode image \(image file is truncated"),
    ("tiny-not-an-image", "tiny_imagenet", "train", tiny(train_image(lambda b: b"<html>")),
     FORMAT, r"cannot decode image: not an image file"),
    ("tiny-train-size", "tiny_imagenet", "train", tiny(train_image(lambda b: jpeg(72, 64))),
     FORMAT, r"image is 72x64, expected 64x64"),
    ("tiny-val-size", "tiny_imagenet", "test",
     tiny(lambda r: rewrite(r / "val" / "images" / "val_2.JPEG", lambda b: jpeg(56, 56))),
     FORMAT, r"image is 56x56, expected 64x64"),
    ("tiny-annotation-wnid", "tiny_imagenet", "test",
     tiny(append_annotation("val_2.JPEG\tn99\t0\t0\t9\t9")), FORMAT,
     r"line 5 is not .* with a wnid from wnids.txt: 'val_2.JPEG\\tn99"),
    ("tiny-annotation-missing-file", "tiny_imagenet", "test",
     tiny(append_annotation("val_9.JPEG\tn01\t0\t0\t9\t9")), FORMAT,
     r"line 5 names .*val_9\.JPEG, which is missing"),
    ("tiny-empty-class", "tiny_imagenet", "train", tiny(empty_class_folder), FORMAT,
     r"images: no images \(\*\.jpeg"),
    ("tiny-missing-class", "tiny_imagenet", "train", tiny(remove_class_folder), FORMAT,
     r"class folders do not match the 3 ids in .*wnids.txt: missing n02; not in wnids.txt none"),
    ("tiny-extra-class", "tiny_imagenet", "train", tiny(add_class_folder), FORMAT,
     r"missing none; not in wnids.txt n99"),
    ("tiny-wnids-binary", "tiny_imagenet", "train",
     tiny(lambda r: rewrite(r / "wnids.txt", lambda b: b"\xff\xfe\x00")), FORMAT,
     r"not a text file"),
    ("tiny-zip-member-crc", "tiny_imagenet", "train", tiny(corrupt_zip_member), FORMAT,
     r"cannot read \(BadZipFile: Bad CRC-32"),
    ("tiny-zip-truncated", "tiny_imagenet", "train",
     tiny(lambda r: rewrite(zipped(r), truncate)), FORMAT, r"not a readable zip file"),
]


@pytest.mark.parametrize("name, split, setup, error, problem",
                         [pytest.param(*case[1:], id=case[0]) for case in CASES])
def test_fault_names_file_and_problem(tmp_path, name, split, setup, error, problem):
  path = setup(tmp_path)
  with pytest.raises(error) as caught:
    data.load_dataset(name, split, data_dir=str(tmp_path))
  message = str(caught.value)
  assert str(path) in message, message
  assert re.search(problem, message), message


@pytest.mark.parametrize("protocol, numpy_module", [(2, b"numpy.core.multiarray"), (2, None),
                                                    (5, None)])
def test_restricted_unpickler_reads_every_spelling(tmp_path, protocol, numpy_module):
  # The originals are Python 2 pickles naming numpy.core.multiarray._reconstruct.
  images = RNG.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
  write_cifar100(tmp_path, "test", images, [7, 8])
  path = tmp_path / "cifar-100-python" / "test"
  content = pickle.dumps(pickle.loads(path.read_bytes(), encoding="bytes"), protocol=protocol)
  if numpy_module:
    assert b"numpy._core.multiarray\n_reconstruct" in content
    content = content.replace(b"numpy._core.multiarray\n", numpy_module + b"\n")
  path.write_bytes(content)
  ds = data.load_dataset("cifar100", "test", data_dir=str(tmp_path))
  np.testing.assert_array_equal(ds.images, images)
  assert ds.labels.tolist() == [7, 8]


# ------------------------------------------------------------ TFDS-prepared data


@pytest.fixture(scope="module")
def prepared_tiny_imagenet(tmp_path_factory):
  """Our builder's array_record Tiny-ImageNet, prepared once; returns its data_dir."""
  data_dir = tmp_path_factory.mktemp("tfds")
  write_tiny_imagenet(str(data_dir / "downloads" / "manual"))
  data.prepare_tfds("tiny_imagenet", str(data_dir))
  shutil.rmtree(data_dir / "downloads")
  return data_dir


@pytest.mark.parametrize("damaged, problem", [
    ("tiny_imagenet-train.array_record-00000-of-00001", r"array_record-\*: cannot read row 0 "
     r"\(Corrupted Riegeli"),
    ("dataset_info.json", r"cannot open the prepared TFDS data \(ParseError"),
])
def test_damaged_tfds_data_is_named(prepared_tiny_imagenet, tmp_path, damaged, problem):
  shutil.copytree(prepared_tiny_imagenet, tmp_path, dirs_exist_ok=True)
  folder = tmp_path / "tiny_imagenet"
  rewrite(next(folder.glob(f"*/{damaged}")), truncate)
  with pytest.raises(data.DataFormatError) as caught:
    data.load_dataset("tiny_imagenet", "train", source="tfds", data_dir=str(tmp_path))
  message = str(caught.value)
  assert str(folder) in message and re.search(problem, message), message
