"""Data sources: raw readers on tiny files written here in the original formats,
digits/synthetic, TFDS (mock data and our Tiny-ImageNet builder prepared
offline), and the errors for missing or damaged data. Nothing downloads."""

import os
import pickle
import shutil
import time
import zipfile

import numpy as np
import pytest
from PIL import Image

from cktf_jax import data

RNG = np.random.default_rng(0)


# ------------------------------------------------------------ fake files


def write_cifar100(data_dir, split, images, labels):
  """``cifar-100-python/<split>`` as the original pickle: R, G, B planes row-major."""
  folder = os.path.join(data_dir, "cifar-100-python")
  os.makedirs(folder, exist_ok=True)
  entry = {b"data": images.transpose(0, 3, 1, 2).reshape(len(images), 3072),
           b"fine_labels": [int(l) for l in labels],
           b"coarse_labels": [int(l) // 5 for l in labels],
           b"filenames": [b"img%d.png" % i for i in range(len(labels))]}
  with open(os.path.join(folder, split), "wb") as f:
    pickle.dump(entry, f, protocol=2)


def write_stl10(data_dir, prefix, images, labels=None):
  """``stl10_binary/<prefix>_X.bin`` (planes column-major) and ``<prefix>_y.bin`` (1..10)."""
  folder = os.path.join(data_dir, "stl10_binary")
  os.makedirs(folder, exist_ok=True)
  images.transpose(0, 3, 2, 1).tofile(os.path.join(folder, f"{prefix}_X.bin"))
  if labels is not None:
    (np.asarray(labels) + 1).astype(np.uint8).tofile(os.path.join(folder, f"{prefix}_y.bin"))


WNIDS = ["n02", "n01", "n03"]  # Unsorted on purpose: labels follow sorted order.


def write_tiny_imagenet(folder):
  """A 3-class ``tiny-imagenet-200/`` tree: 2 train JPEGs per class (one
  grayscale), 4 val JPEGs listed in val_annotations.txt."""
  root = os.path.join(folder, "tiny-imagenet-200")
  os.makedirs(os.path.join(root, "val", "images"), exist_ok=True)
  with open(os.path.join(root, "wnids.txt"), "w") as f:
    f.write("\n".join(WNIDS) + "\n")
  for w in WNIDS:
    os.makedirs(os.path.join(root, "train", w, "images"))
    for k in range(2):
      pixels = RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)
      image = Image.fromarray(pixels)
      if (w, k) == ("n03", 1):
        image = image.convert("L")
      image.save(os.path.join(root, "train", w, "images", f"{w}_{k}.JPEG"), "JPEG")
    with open(os.path.join(root, "train", w, f"{w}_boxes.txt"), "w") as f:
      f.write("ignored\n")
  lines = []
  for k, w in enumerate(["n03", "n01", "n02", "n01"]):
    Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
        os.path.join(root, "val", "images", f"val_{k}.JPEG"), "JPEG")
    lines.append(f"val_{k}.JPEG\t{w}\t0\t0\t63\t63")
  with open(os.path.join(root, "val", "val_annotations.txt"), "w") as f:
    f.write("\n".join(lines) + "\n")
  return root


def zip_tree(root):
  path = root + ".zip"
  with zipfile.ZipFile(path, "w") as z:
    for dirpath, _, files in os.walk(root):
      for name in files:
        full = os.path.join(dirpath, name)
        z.write(full, os.path.relpath(full, os.path.dirname(root)))
  return path


def pil_rgb(path):
  return np.asarray(Image.open(path).convert("RGB"))


# ------------------------------------------------------------ raw readers


def test_cifar100_raw_is_pixel_and_label_exact(tmp_path):
  images = RNG.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
  write_cifar100(tmp_path, "train", images, [0, 99, 3, 3, 42])
  ds = data.load_dataset("cifar100", "train", source="raw", data_dir=str(tmp_path))
  np.testing.assert_array_equal(ds.images, images)
  np.testing.assert_array_equal(ds.labels, [0, 99, 3, 3, 42])
  assert ds.labels.dtype == np.int32 and ds.num_classes == 100 and ds.split == "train"


def test_cifar100_raw_plane_layout(tmp_path):
  # Byte c*1024 + row*32 + col of a record is channel c of pixel (row, col).
  record = np.zeros((1, 3072), np.uint8)
  record[0, 0 * 1024 + 2 * 32 + 5] = 200
  record[0, 2 * 1024 + 31 * 32 + 0] = 7
  folder = tmp_path / "cifar-100-python"
  folder.mkdir()
  (folder / "test").write_bytes(pickle.dumps({b"data": record, b"fine_labels": [1]}))
  ds = data.load_dataset("cifar100", "test", source="raw", data_dir=str(tmp_path))
  assert ds.images[0, 2, 5, 0] == 200 and ds.images[0, 31, 0, 2] == 7
  assert ds.images.sum() == 207


def test_cifar100_num_train_categories(tmp_path):
  images = RNG.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
  labels = [5, 1, 9, 0, 2, 7]
  write_cifar100(tmp_path, "train", images, labels)
  write_cifar100(tmp_path, "test", images, labels)
  train = data.load_dataset("cifar100", "train", data_dir=str(tmp_path), num_train_categories=3)
  test = data.load_dataset("cifar100", "test", data_dir=str(tmp_path), num_train_categories=3)
  np.testing.assert_array_equal(train.labels, [1, 0, 2])
  np.testing.assert_array_equal(train.images, images[[1, 3, 4]])
  assert train.num_classes == 100 and len(test) == 6


def test_stl10_raw_is_pixel_and_label_exact(tmp_path):
  images = RNG.integers(0, 256, (3, 96, 96, 3), dtype=np.uint8)
  write_stl10(tmp_path, "train", images, [0, 9, 4])
  write_stl10(tmp_path, "unlabeled", images[:2])
  ds = data.load_dataset("stl10", "train", source="raw", data_dir=str(tmp_path))
  np.testing.assert_array_equal(ds.images, images)
  np.testing.assert_array_equal(ds.labels, [0, 9, 4])
  unlabeled = data.load_dataset("stl10", "unlabeled", source="raw", data_dir=str(tmp_path))
  np.testing.assert_array_equal(unlabeled.labels, [-1, -1])
  np.testing.assert_array_equal(unlabeled.relabel_unlabeled(0).labels, [0, 0])


def test_stl10_raw_column_major_layout(tmp_path):
  # Byte c*9216 + col*96 + row of a record is channel c of pixel (row, col).
  record = np.zeros(3 * 96 * 96, np.uint8)
  record[1 * 9216 + 10 * 96 + 3] = 99
  folder = tmp_path / "stl10_binary"
  folder.mkdir()
  record.tofile(folder / "test_X.bin")
  np.array([10], np.uint8).tofile(folder / "test_y.bin")
  ds = data.load_dataset("stl10", "test", source="raw", data_dir=str(tmp_path))
  assert ds.images[0, 3, 10, 1] == 99 and ds.images.sum() == 99
  assert ds.labels.tolist() == [9]


@pytest.mark.parametrize("as_zip", [False, True])
def test_tiny_imagenet_raw(tmp_path, as_zip):
  root = write_tiny_imagenet(str(tmp_path))
  if as_zip:
    zip_tree(root)
    os.rename(root, root + ".unused")
  base = root + ".unused" if as_zip else root
  train = data.load_dataset("tiny_imagenet", "train", source="raw", data_dir=str(tmp_path))
  # Label = index in sorted wnids; rows in (label, file name) order, like ImageFolder.
  assert train.labels.tolist() == [0, 0, 1, 1, 2, 2] and train.num_classes == 3
  expected = [pil_rgb(os.path.join(base, "train", w, "images", f"{w}_{k}.JPEG"))
              for w in sorted(WNIDS) for k in range(2)]
  np.testing.assert_array_equal(train.images, np.stack(expected))
  grey = train.images[5]  # n03_1 was saved as grayscale: R = G = B.
  assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
  test = data.load_dataset("tiny_imagenet", "test", source="raw", data_dir=str(tmp_path))
  assert test.labels.tolist() == [0, 0, 1, 2]  # val_1, val_3 (n01), val_2 (n02), val_0 (n03)
  np.testing.assert_array_equal(test.images[3], pil_rgb(os.path.join(base, "val", "images",
                                                                     "val_0.JPEG")))


def test_tiny_imagenet_raw_val_in_class_folders(tmp_path):
  root = write_tiny_imagenet(str(tmp_path))
  for k, w in enumerate(["n03", "n01", "n02", "n01"]):
    os.makedirs(os.path.join(root, "val", w), exist_ok=True)
    os.rename(os.path.join(root, "val", "images", f"val_{k}.JPEG"),
              os.path.join(root, "val", w, f"val_{k}.JPEG"))
  os.remove(os.path.join(root, "val", "val_annotations.txt"))
  os.rmdir(os.path.join(root, "val", "images"))
  test = data.load_dataset("tiny_imagenet", "test", source="raw", data_dir=str(tmp_path))
  assert test.labels.tolist() == [0, 0, 1, 2]


# ------------------------------------------------------------ built-in sources


def test_digits_shapes_and_deterministic_split():
  train, test = data.load_dataset("digits", "train"), data.load_dataset("digits", "test")
  assert train.images.shape == (1437, 32, 32, 3) and test.images.shape == (360, 32, 32, 3)
  assert train.images.dtype == np.uint8 and train.images.max() == 255
  assert np.bincount(test.labels).min() >= 35  # Stratified: 36 per class, +-1.
  again = data.load_dataset("digits", "test")
  np.testing.assert_array_equal(again.images, test.images)
  np.testing.assert_array_equal(again.labels, test.labels)


def test_synthetic_is_seeded_and_class_dependent():
  a = data.load_dataset("synthetic", "train", num_examples=40, num_classes=4, image_size=16)
  b = data.load_dataset("synthetic", "train", num_examples=40, num_classes=4, image_size=16)
  t = data.load_dataset("synthetic", "test", num_examples=40, num_classes=4, image_size=16)
  np.testing.assert_array_equal(a.images, b.images)
  assert a.images.shape == (40, 16, 16, 3) and np.bincount(a.labels).tolist() == [10] * 4
  assert not np.array_equal(a.images, t.images)
  # Same prototypes in both splits: class means agree far better than across classes.
  means = lambda ds: np.stack([ds.images[ds.labels == c].mean(0) for c in range(4)])
  same = np.abs(means(a) - means(t)).mean()
  other = np.abs(means(a) - np.roll(means(t), 1, axis=0)).mean()
  assert same < 15 < other


# ------------------------------------------------------------ TFDS


def test_tfds_mock_cifar100_stl10_tiny_imagenet(tmp_path):
  import tensorflow_datasets as tfds

  with tfds.testing.mock_data(num_examples=5):
    # 'auto' finds no raw files under tmp_path and falls back to TFDS.
    cifar = data.load_dataset("cifar100", "train", data_dir=str(tmp_path))
    stl = data.load_dataset("stl10", "unlabeled", source="tfds")
    tiny = data.load_dataset("tiny_imagenet", "test", source="tfds")
    source = data.TfdsSource("stl10", "test")
    row = source[3]
  assert cifar.images.shape == (5, 32, 32, 3) and cifar.num_classes == 100
  assert stl.images.shape == (5, 96, 96, 3) and stl.num_classes == 10
  assert tiny.images.shape == (5, 64, 64, 3) and tiny.num_classes == 200
  assert row["image"].dtype == np.uint8 and row["label"].dtype == np.int32


@pytest.mark.parametrize("as_zip", [False, True])
def test_tiny_imagenet_builder_prepares_offline(tmp_path, as_zip):
  manual = tmp_path / "downloads" / "manual"
  manual.mkdir(parents=True)
  root = write_tiny_imagenet(str(manual))
  if as_zip:
    zip_tree(root)
    shutil.rmtree(root)
  prepared = data.prepare_tfds("tiny_imagenet", str(tmp_path))
  assert os.path.isfile(os.path.join(prepared, "dataset_info.json"))
  for split in ("train", "test"):
    from_tfds = data.load_dataset("tiny_imagenet", split, source="tfds", data_dir=str(tmp_path))
    from_raw = data.load_dataset("tiny_imagenet", split, source="raw", data_dir=str(manual))
    np.testing.assert_array_equal(from_tfds.images, from_raw.images)
    np.testing.assert_array_equal(from_tfds.labels, from_raw.labels)
    assert from_tfds.num_classes == 200


# ------------------------------------------------------------ errors


def test_missing_data_says_where_and_how(tmp_path):
  start = time.time()
  with pytest.raises(data.DataNotFoundError) as e:
    data.load_dataset("cifar100", "train", data_dir=str(tmp_path))
  message = str(e.value)
  assert str(tmp_path) in message and "cifar-100-python/train" in message
  assert "download_and_prepare" in message and "cifar-100-python.tar.gz" in message
  with pytest.raises(data.DataNotFoundError, match="stl10_binary/test_X.bin"):
    data.load_dataset("stl10", "test", source="raw", data_dir=str(tmp_path))
  with pytest.raises(data.DataNotFoundError, match="downloads/manual"):
    data.load_dataset("tiny_imagenet", "train", source="tfds", data_dir=str(tmp_path))
  with pytest.raises(data.DataNotFoundError, match="wnids.txt"):
    data.prepare_tfds("tiny_imagenet", str(tmp_path))
  assert time.time() - start < 20  # Never a download attempt.


def test_truncated_files_are_named(tmp_path):
  images = RNG.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
  write_cifar100(tmp_path, "train", images, [1, 2])
  path = tmp_path / "cifar-100-python" / "train"
  path.write_bytes(path.read_bytes()[:1000])
  with pytest.raises(data.DataFormatError, match=f"{path}.*truncated"):
    data.load_dataset("cifar100", "train", data_dir=str(tmp_path))

  write_stl10(tmp_path, "test", RNG.integers(0, 256, (2, 96, 96, 3), dtype=np.uint8), [1, 2])
  x_path = tmp_path / "stl10_binary" / "test_X.bin"
  x_path.write_bytes(x_path.read_bytes()[:-10])
  with pytest.raises(data.DataFormatError, match=f"{x_path}.*truncated"):
    data.load_dataset("stl10", "test", data_dir=str(tmp_path))
  write_stl10(tmp_path, "test", RNG.integers(0, 256, (2, 96, 96, 3), dtype=np.uint8), [1])
  with pytest.raises(data.DataFormatError, match="test_y.bin: 1 labels for the 2 images"):
    data.load_dataset("stl10", "test", data_dir=str(tmp_path))


def test_bad_tiny_imagenet_image_is_named(tmp_path):
  root = write_tiny_imagenet(str(tmp_path))
  bad = os.path.join(root, "train", "n01", "images", "n01_1.JPEG")
  Image.fromarray(np.zeros((32, 64, 3), np.uint8)).save(bad, "JPEG")
  with pytest.raises(data.DataFormatError, match=f"{bad}: image is 64x32, expected 64x64"):
    data.load_dataset("tiny_imagenet", "train", data_dir=str(tmp_path))
  with open(bad, "wb") as f:
    f.write(b"\xff\xd8 not a jpeg")
  with pytest.raises(data.DataFormatError, match=f"{bad}: cannot decode"):
    data.load_dataset("tiny_imagenet", "train", data_dir=str(tmp_path))


def test_validate_reports_size_dtype_and_label_range():
  good = np.zeros((3, 8, 8, 3), np.uint8)
  ds = data.Dataset(good, np.array([0, 1, 2], np.int32), "toy", 3, "train", "toy.bin")
  assert ds.validate(8) is ds
  with pytest.raises(data.DataFormatError,
                     match=r"toy/train \(from toy.bin\): images must be 32x32"):
    ds.validate(32)
  with pytest.raises(data.DataFormatError, match="uint8"):
    data.Dataset(good.astype(np.float32), ds.labels, "toy", 3, "train", "toy.bin").validate()
  with pytest.raises(data.DataFormatError,
                     match=r"2 labels outside \[0, 3\): row 0 = -1, row 2 = 3"):
    data.Dataset(good, np.array([-1, 1, 3], np.int32), "toy", 3, "train", "toy.bin").validate()
  data.Dataset(good, np.array([-1, 1, 2], np.int32), "toy", 3, "unlabeled").validate()
  with pytest.raises(data.DataFormatError, match="3 images but 2 labels"):
    data.Dataset(good, np.array([0, 1], np.int32), "toy", 3, "train").validate()


def test_bad_names_list_the_valid_ones():
  with pytest.raises(ValueError, match="valid datasets are: cifar100, stl10"):
    data.load_dataset("cifar10", "train")
  with pytest.raises(ValueError, match="valid splits are: train, test, unlabeled"):
    data.load_dataset("stl10", "val")
  with pytest.raises(ValueError, match="cifar100 only"):
    data.load_dataset("stl10", "train", num_train_categories=5)
