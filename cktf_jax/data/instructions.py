"""What a missing-data error tells the user: where we looked and how to get the files.

Both kinds of source read under one ``data_dir``: the original archives
extracted in place (``source='raw'``), or TFDS array_record data prepared once
(``source='tfds'``, read without TensorFlow).
"""

import os

# Where each original archive comes from and the folder it extracts to.
ARCHIVES = {
    "cifar100": ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                 "tar -xzf cifar-100-python.tar.gz -C {data_dir}", "cifar-100-python"),
    "stl10": ("http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz",
              "tar -xzf stl10_binary.tar.gz -C {data_dir}", "stl10_binary"),
    "tiny_imagenet": ("http://cs231n.stanford.edu/tiny-imagenet-200.zip",
                      "unzip tiny-imagenet-200.zip -d {data_dir}", "tiny-imagenet-200"),
}


def _tfds_way(name: str, data_dir: str) -> str:
  if name == "tiny_imagenet":
    manual = os.path.join(data_dir, "downloads", "manual")
    return (f"TFDS: put tiny-imagenet-200.zip (or its extracted tiny-imagenet-200/ folder) in "
            f"{manual}/ and run `python -c \"from cktf_jax.data import prepare_tfds; "
            f"prepare_tfds('tiny_imagenet', '{data_dir}')\"` (no TensorFlow needed); "
            f"it writes {os.path.join(data_dir, 'tiny_imagenet')}/")
  return (f"TFDS: on a machine with TensorFlow and internet run `python -c \"import "
          f"tensorflow_datasets as tfds; tfds.builder('{name}', data_dir='{data_dir}')"
          f".download_and_prepare(file_format='array_record')\"` (or "
          f"cktf_jax.data.prepare_tfds('{name}', '{data_dir}')) and copy "
          f"{os.path.join(data_dir, name)}/ here; reading it needs no TensorFlow")


def how_to_get(name: str, data_dir: str) -> str:
  """The two ways to obtain dataset ``name`` under ``data_dir``, as one paragraph."""
  url, extract, folder = ARCHIVES[name]
  return (f"Two ways to get it: (1) {_tfds_way(name, data_dir)}; (2) original archive: "
          f"download {url} and run `{extract.format(data_dir=data_dir)}` so that "
          f"{os.path.join(data_dir, folder)}/ exists.")


def missing(name: str, data_dir: str, looked_in: str, expected) -> str:
  """Message for ``DataNotFoundError``: where we looked, what was expected, how to get it."""
  return (f"{name}: no data in {looked_in} (expected {', '.join(expected)}). "
          + how_to_get(name, data_dir))
