"""``load_dataset``: one entry point from (name, split, source) to a ``Dataset``."""

from typing import Optional

from cktf_jax.data import builtin, raw, tfds_source
from cktf_jax.data.dataset import DataNotFoundError, Dataset

# name -> (stored image size, splits); num_classes comes from the source.
DATASETS = {
    "cifar100": (32, ("train", "test")),
    "stl10": (96, ("train", "test", "unlabeled")),
    "tiny_imagenet": (64, ("train", "test")),
    "digits": (32, ("train", "test")),
    "synthetic": (None, ("train", "test")),
}
SOURCES = ("auto", "raw", "tfds")
_RAW = {"cifar100": raw.load_cifar100_raw, "stl10": raw.load_stl10_raw,
        "tiny_imagenet": raw.load_tiny_imagenet_raw}


def load_dataset(name: str, split: str, *, source: str = "auto", data_dir: str = "./data",
                 num_train_categories: Optional[int] = None, **synthetic_options) -> Dataset:
  """One split of dataset ``name``, validated.

  Args:
    name: one of ``DATASETS``.
    split: ``'train'``, ``'test'`` (or ``'unlabeled'`` for stl10).
    source: for cifar100/stl10/tiny_imagenet: ``'raw'`` (original files under
      ``data_dir``), ``'tfds'`` (array_record data prepared under
      ``data_dir``) or ``'auto'`` (raw files if present, else TFDS). Ignored
      by digits/synthetic, which need no files.
    data_dir: the folder both kinds of source read under.
    num_train_categories: cifar100 only, the reference's
      ``--num_train_categories K``: the train split keeps labels ``< K``, the
      test split keeps all 100 classes.
    **synthetic_options: ``load_synthetic``'s num_examples, num_classes,
      image_size, seed, noise.
  """
  if name not in DATASETS:
    raise ValueError(f"unknown dataset {name!r}; valid datasets are: {', '.join(DATASETS)}")
  image_size, splits = DATASETS[name]
  if split not in splits:
    raise ValueError(f"{name}: unknown split {split!r}; valid splits are: {', '.join(splits)}")
  if source not in SOURCES:
    raise ValueError(f"unknown source {source!r}; valid sources are: {', '.join(SOURCES)}")
  if num_train_categories is not None and name != "cifar100":
    raise ValueError(f"num_train_categories applies to cifar100 only, not {name!r}")
  if synthetic_options and name != "synthetic":
    raise ValueError(f"{name}: unexpected options {sorted(synthetic_options)}")

  if name == "digits":
    return builtin.load_digits(split)
  if name == "synthetic":
    return builtin.load_synthetic(split, **synthetic_options)
  if source == "raw":
    dataset = _RAW[name](data_dir, split)
  elif source == "tfds":
    dataset = tfds_source.load_tfds(name, split, data_dir)
  else:
    try:
      dataset = _RAW[name](data_dir, split)
    except DataNotFoundError as raw_missing:
      try:
        dataset = tfds_source.load_tfds(name, split, data_dir)
      except DataNotFoundError:
        raise DataNotFoundError(f"{raw_missing} (No prepared TFDS data under {data_dir} "
                                f"either.)") from None
  if num_train_categories is not None and split == "train":
    dataset = dataset.keep_classes_below(num_train_categories)
  return dataset.validate(image_size)
