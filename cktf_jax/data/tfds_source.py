"""TFDS sources: array_record data read with ``tfds.data_source`` (no TensorFlow).

Our split names map to TFDS's: cifar100 ``train``/``test``; stl10
``train``/``test``/``unlabeled`` -> ``unlabelled`` (label -1 there);
tiny_imagenet ``train``/``test`` -> ``validation``. Reading never downloads:
data that is not prepared raises ``DataNotFoundError`` at once (a TFDS download
attempt without internet takes minutes to fail).
"""

import os
from typing import Optional

import numpy as np

from cktf_jax.data import instructions
from cktf_jax.data.dataset import DataFormatError, DataNotFoundError, Dataset

# Our split name -> the TFDS split name, per dataset.
TFDS_SPLITS = {
    "cifar100": {"train": "train", "test": "test"},
    "stl10": {"train": "train", "test": "test", "unlabeled": "unlabelled"},
    "tiny_imagenet": {"train": "train", "test": "validation"},
}
_PREPARE_AGAIN = "delete the dataset's folder and prepare it again (data.prepare_tfds)"


def _tfds(name: str):
  """``tensorflow_datasets``, with our Tiny-ImageNet builder registered."""
  import tensorflow_datasets as tfds  # Imported here: TFDS is slow to import.

  if name == "tiny_imagenet":
    from cktf_jax.data import tiny_imagenet_builder  # noqa: F401  registers the builder
  return tfds


def _tfds_split(name: str, split: str) -> str:
  if name not in TFDS_SPLITS:
    raise ValueError(f"unknown TFDS dataset {name!r}; valid names are: {', '.join(TFDS_SPLITS)}")
  if split not in TFDS_SPLITS[name]:
    raise ValueError(f"{name}: unknown split {split!r}; valid splits are: "
                     f"{', '.join(TFDS_SPLITS[name])}")
  return TFDS_SPLITS[name][split]


class TfdsSource:
  """Random access to one prepared TFDS split: ``len()`` and ``source[i] ->
  {'image': uint8 [H, W, 3], 'label': int32}`` (the host-fed pipeline's input)."""

  def __init__(self, name: str, split: str, data_dir: Optional[str] = None):
    tfds = _tfds(name)
    self.name, self.split = name, split
    tfds_split = _tfds_split(name, split)
    root = data_dir or "~/tensorflow_datasets"
    try:
      self._source = tfds.data_source(name, split=tfds_split, data_dir=data_dir, download=False)
    except (NotImplementedError, FileNotFoundError) as e:
      # TFDS reports unprepared data as a missing TFRecord reader or missing files.
      expected = ["dataset_info.json", f"{name}-{tfds_split}.array_record-* "
                  "(prepared with file_format='array_record')"]
      raise DataNotFoundError(
          instructions.missing(name, root, os.path.join(root, name), expected)) from e
    except Exception as e:  # A damaged dataset_info.json, features.json, ...
      raise DataFormatError(f"{os.path.join(root, name)}: cannot open the prepared TFDS data "
                            f"({type(e).__name__}: {e}); {_PREPARE_AGAIN}") from e
    info = self._source.dataset_info
    self.num_classes = int(info.features["label"].num_classes)
    self.location = os.fspath(info.data_dir)
    self._files = os.path.join(self.location, f"{name}-{tfds_split}.array_record-*")

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i: int):
    try:
      row = self._source[int(i)]
    except RuntimeError as e:  # array_record's report of a truncated or corrupted file.
      raise DataFormatError(f"{self._files}: cannot read row {i} ({e}); {_PREPARE_AGAIN}") from e
    return {"image": np.asarray(row["image"], np.uint8), "label": np.int32(row["label"])}


def load_tfds(name: str, split: str, data_dir: Optional[str] = None) -> Dataset:
  """A whole prepared TFDS split as a ``Dataset`` (for the device-resident path)."""
  source = TfdsSource(name, split, data_dir)
  first = source[0]["image"]
  images = np.empty((len(source),) + first.shape, np.uint8)
  labels = np.empty(len(source), np.int32)
  for i in range(len(source)):
    row = source[i]
    images[i], labels[i] = row["image"], row["label"]
  return Dataset(images, labels, name, source.num_classes, split, source.location).validate()


def prepare_tfds(name: str, data_dir: str, manual_dir: Optional[str] = None) -> str:
  """Prepare ``name`` once as array_record under ``data_dir``; returns its folder.

  ``tiny_imagenet`` is built offline from ``manual_dir`` (default
  ``<data_dir>/downloads/manual/``) holding ``tiny-imagenet-200/`` or its zip;
  ``cifar100``/``stl10`` use the TFDS catalogue builders, which download and
  need TensorFlow.
  """
  tfds = _tfds(name)
  if name not in TFDS_SPLITS:
    raise ValueError(f"unknown TFDS dataset {name!r}; valid names are: {', '.join(TFDS_SPLITS)}")
  manual_dir = manual_dir or os.path.join(data_dir, "downloads", "manual")
  if name == "tiny_imagenet":
    from cktf_jax.data import raw

    raw.open_tiny_imagenet_tree(manual_dir, data_dir)  # Fails early, saying what is missing.
  builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return os.fspath(builder.data_dir)
