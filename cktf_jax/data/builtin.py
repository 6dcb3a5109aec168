"""Datasets that need no files: scikit-learn's bundled digits, and synthetic images.

* ``digits``: ``sklearn.datasets.load_digits`` (1797 8x8 grey images, values
  0..16) scaled to 0..255 (``round(v * 255 / 16)``), resized to 32x32 with
  PIL's BILINEAR filter and repeated over 3 channels. Split with
  ``train_test_split(test_size=360, stratify=labels, random_state=0)`` into
  1437 train / 360 test; rows keep sklearn's order within each split.
* ``synthetic``: class ``c`` has a prototype, a 4x4 grid of random colours
  upsampled (nearest) to the image size; an example is its class's prototype
  plus Gaussian noise (std ``noise``), clipped to uint8. Prototypes depend
  only on ``seed``, so the train and test splits share them.
"""

import zlib

import numpy as np
from PIL import Image

from cktf_jax.data.dataset import Dataset

DIGITS_TEST_SIZE = 360


def load_digits(split: str, image_size: int = 32) -> Dataset:
  """The bundled digits as 10-class RGB uint8 images; see the module docstring."""
  from sklearn import datasets, model_selection  # Imported here: sklearn is slow to import.

  if split not in ("train", "test"):
    raise ValueError(f"digits: unknown split {split!r}; valid splits are: train, test")
  digits = datasets.load_digits()
  rows = np.arange(digits.target.shape[0])
  train, test = model_selection.train_test_split(
      rows, test_size=DIGITS_TEST_SIZE, stratify=digits.target, random_state=0)
  rows = np.sort(train if split == "train" else test)
  grey = np.round(digits.images[rows] * (255.0 / 16.0)).astype(np.uint8)
  resized = np.stack([
      np.asarray(Image.fromarray(g).resize((image_size, image_size), Image.BILINEAR))
      for g in grey])
  images = np.repeat(resized[..., None], 3, axis=-1)
  labels = digits.target[rows].astype(np.int32)
  return Dataset(images, labels, "digits", 10, split, "sklearn.datasets.load_digits").validate()


def load_synthetic(split: str, num_examples: int = 256, num_classes: int = 10,
                   image_size: int = 32, seed: int = 0, noise: float = 32.0) -> Dataset:
  """Class-dependent random images; see the module docstring. Labels are
  balanced (``i mod num_classes``, shuffled)."""
  if num_examples < 1 or num_classes < 1 or image_size < 1:
    raise ValueError(f"synthetic: num_examples, num_classes and image_size must be positive; "
                     f"got {num_examples}, {num_classes}, {image_size}")
  prototypes = np.random.default_rng(seed).integers(0, 256, (num_classes, 4, 4, 3))
  grid = np.arange(image_size) * 4 // image_size
  prototypes = prototypes[:, grid][:, :, grid].astype(np.float32)
  rng = np.random.default_rng((seed, zlib.crc32(split.encode())))
  labels = rng.permutation(np.arange(num_examples) % num_classes).astype(np.int32)
  images = prototypes[labels] + rng.normal(0.0, noise, (num_examples, image_size, image_size, 3))
  images = np.clip(np.round(images), 0, 255).astype(np.uint8)
  return Dataset(images, labels, "synthetic", num_classes, split, f"synthetic(seed={seed})"
                 ).validate()
