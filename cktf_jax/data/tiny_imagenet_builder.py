"""A TFDS builder for Tiny-ImageNet (there is none in the TFDS catalogue).

Prepares, without TensorFlow and without downloading, from a manual dir
(default ``<data_dir>/downloads/manual/``) holding ``tiny-imagenet-200/`` or
``tiny-imagenet-200.zip``. Splits: ``train`` (100000) and ``validation``
(10000, the original ``val/``). Images are decoded, converted to RGB and stored
as PNG (lossless: rows equal ``raw.load_tiny_imagenet_raw``'s, in the same
order, since shuffling is disabled). Importing this module registers the
builder as ``'tiny_imagenet'``.
"""

import os

import tensorflow_datasets as tfds

from cktf_jax.data import raw


class TinyImagenet(tfds.core.GeneratorBasedBuilder):
  """Tiny-ImageNet-200: 64x64 RGB, 200 classes (label = index in sorted wnids)."""

  name = "tiny_imagenet"
  VERSION = tfds.core.Version("1.0.0")
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Download http://cs231n.stanford.edu/tiny-imagenet-200.zip and put the zip, or the "
      "tiny-imagenet-200/ folder it holds, in the manual dir (<data_dir>/downloads/manual/).")

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Tiny-ImageNet-200 (CS231n): 100000 train and 10000 val images.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(64, 64, 3)),
            "label": tfds.features.ClassLabel(num_classes=200),
        }),
        supervised_keys=("image", "label"),
        homepage="http://cs231n.stanford.edu/",
        disable_shuffling=True,  # Rows keep raw.tiny_imagenet_index's order (keys 0, 1, ...).
    )

  def _split_generators(self, dl_manager):
    manual_dir = os.fspath(dl_manager.manual_dir)
    return {"train": self._generate_examples(manual_dir, "train"),
            "validation": self._generate_examples(manual_dir, "test")}

  def _generate_examples(self, manual_dir: str, split: str):
    tree = raw.open_tiny_imagenet_tree(manual_dir, os.path.dirname(os.path.dirname(manual_dir)))
    _, items = raw.tiny_imagenet_index(tree, split)
    for row, (rel, label) in enumerate(items):
      yield row, {"image": raw.decode_tiny_imagenet_image(tree, rel), "label": label}
