"""The in-memory ``Dataset`` every source returns, and the data errors.

A split is a pair of host arrays: ``images`` uint8 ``[N, H, W, 3]`` (RGB,
NHWC) and ``labels`` int32 ``[N]``. An example's index (what the reference's
``*Instance`` datasets return as ``index``, and what CRD's memory bank is
addressed by) is its row number.
"""

import dataclasses
from typing import Optional

import numpy as np

# torchvision's STL10 gives the unlabeled split label -1 (dataset/stl10.py
# then overwrites it with 0 for training; see ``Dataset.relabel_unlabeled``).
UNLABELED = -1


class DataNotFoundError(FileNotFoundError):
  """The data files are not where we looked; the message says how to get them."""


class DataFormatError(ValueError):
  """A data file (or array) is truncated or malformed; the message names it."""


def check_label_range(where: str, labels: np.ndarray, num_classes: int,
                      unlabeled: bool = False) -> None:
  """Raise ``DataFormatError`` (prefixed ``where``) listing the first integer
  labels outside ``[0, num_classes)``; ``-1`` is accepted when ``unlabeled``."""
  bad = (labels < 0) | (labels >= num_classes)
  if unlabeled:
    bad &= labels != UNLABELED
  if bad.any():
    rows = np.flatnonzero(bad)
    shown = ", ".join(f"row {r} = {labels[r]}" for r in rows[:5])
    raise DataFormatError(f"{where}: {rows.size} labels outside [0, {num_classes}): "
                          f"{shown}{', ...' if rows.size > 5 else ''}")


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """One split held in host memory.

  Attributes:
    images: uint8 ``[N, H, W, 3]``.
    labels: int32 ``[N]`` in ``[0, num_classes)``; ``-1`` only in an
      ``'unlabeled'`` split.
    name: dataset name (``'cifar100'``, ``'stl10'``, ``'tiny_imagenet'``,
      ``'digits'``, ``'synthetic'``).
    num_classes: the classifier's output size for this dataset.
    split: ``'train'``, ``'test'`` or ``'unlabeled'``.
    source: where the arrays came from (a file or folder), for error messages.
  """

  images: np.ndarray
  labels: np.ndarray
  name: str
  num_classes: int
  split: str
  source: str = ""

  def __len__(self) -> int:
    return int(self.labels.shape[0])

  def __getitem__(self, i: int):
    """One example as ``{'image', 'label'}``, like a TFDS data source's rows."""
    return {"image": self.images[i], "label": self.labels[i]}

  @property
  def image_size(self):
    """``(H, W)`` of the stored images."""
    return tuple(self.images.shape[1:3])

  def _where(self) -> str:
    return f"{self.name}/{self.split}" + (f" (from {self.source})" if self.source else "")

  def validate(self, image_size: Optional[int] = None) -> "Dataset":
    """Check dtypes, shapes and label range; returns ``self``.

    Raises ``DataFormatError`` naming the dataset, split and source file when
    images are not uint8 ``[N, H, W, 3]`` (``H = W = image_size`` if given),
    labels are not one int per image, or a label lies outside
    ``[0, num_classes)`` (``-1`` is accepted in the ``'unlabeled'`` split).
    """
    where = self._where()
    images, labels = self.images, self.labels
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
      raise DataFormatError(f"{where}: images must be a uint8 numpy array; got "
                            f"{type(images).__name__} of {getattr(images, 'dtype', '?')}")
    if images.ndim != 4 or images.shape[-1] != 3:
      raise DataFormatError(f"{where}: images must be [N, H, W, 3]; got shape {images.shape}")
    if image_size is not None and images.shape[1:3] != (image_size, image_size):
      raise DataFormatError(f"{where}: images must be {image_size}x{image_size}; got "
                            f"{images.shape[1]}x{images.shape[2]}")
    if not isinstance(labels, np.ndarray) or labels.dtype != np.int32 or labels.ndim != 1:
      raise DataFormatError(f"{where}: labels must be a 1-D int32 numpy array; got "
                            f"{type(labels).__name__} {getattr(labels, 'dtype', '?')} "
                            f"{getattr(labels, 'shape', '')}")
    if labels.shape[0] != images.shape[0]:
      raise DataFormatError(f"{where}: {images.shape[0]} images but {labels.shape[0]} labels")
    check_label_range(where, labels, self.num_classes, self.split == "unlabeled")
    return self

  def keep_classes_below(self, k: int) -> "Dataset":
    """Rows with ``label < k``, in their original order; labels and
    ``num_classes`` unchanged (the reference's ``--num_train_categories K``,
    torchvision_custom/datasets/cifar.py ``target_labels = range(K)``)."""
    if not 1 <= k <= self.num_classes:
      raise ValueError(f"{self._where()}: keep_classes_below({k}) needs 1 <= k <= "
                       f"{self.num_classes}")
    keep = self.labels < k
    return dataclasses.replace(self, images=self.images[keep], labels=self.labels[keep])

  def relabel_unlabeled(self, value: int = 0) -> "Dataset":
    """Replace label ``-1`` by ``value`` (dataset/stl10.py trains on the
    unlabeled split with every label set to 0)."""
    labels = np.where(self.labels == UNLABELED, np.int32(value), self.labels).astype(np.int32)
    return dataclasses.replace(self, labels=labels)
