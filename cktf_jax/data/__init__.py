"""Datasets, on-device augmentation, batching and sharding.

Sources (each returns a validated ``Dataset``: uint8 ``[N, H, W, 3]`` images,
int32 labels, the row number is the example index):

* ``load_dataset(name, split, source='auto'|'raw'|'tfds', data_dir='./data',
  num_train_categories=None, **synthetic_options)`` for ``DATASETS``:
  cifar100, stl10 (train/test/unlabeled), tiny_imagenet, digits, synthetic.
* ``load_cifar100_raw`` / ``load_stl10_raw`` / ``load_tiny_imagenet_raw``:
  the original files under ``data_dir`` (``raw.py``).
* ``load_digits`` (scikit-learn's bundled digits at 32x32) and
  ``load_synthetic`` (class-dependent random images), no files needed.
* ``load_tfds`` / ``TfdsSource`` (random access for the host path) /
  ``prepare_tfds``: TFDS array_record data, read without TensorFlow; our
  Tiny-ImageNet builder (``tiny_imagenet_builder.TinyImagenet``) prepares
  offline from the original zip or folder.
* ``Dataset`` (``validate``, ``keep_classes_below``, ``relabel_unlabeled``),
  ``DataNotFoundError`` (says where we looked and how to get the data),
  ``DataFormatError`` (names the damaged file).

Augmentation (jittable, per-example keys): ``CifarTransform``,
``ImagenetTransform``, ``transform_for(name, train)``, ``example_keys``,
``normalize``, the reference's mean/std constants.

Batching: ``batches_for_epoch`` / ``epoch_order`` / ``steps_per_epoch`` /
``locate_step`` (deterministic epochs, resumable, padded last batch with
``mask``), ``data_mesh`` / ``batch_sharding``, ``DeviceLoader`` (split resident
on device, batches gathered there) and ``HostLoader`` / ``host_batches``
(prefetch thread), both yielding the ``methods.base`` Batch contract sharded
``P('data')``.
"""

from cktf_jax.data.augment import (CIFAR100_MEAN, CIFAR100_STD, IMAGENET_MEAN, IMAGENET_STD,
                                   CifarTransform, ImagenetTransform, example_keys, normalize,
                                   transform_for)
from cktf_jax.data.builtin import load_digits, load_synthetic
from cktf_jax.data.dataset import UNLABELED, DataFormatError, DataNotFoundError, Dataset
from cktf_jax.data.load import DATASETS, load_dataset
from cktf_jax.data.pipeline import (BatchIndices, DeviceLoader, HostLoader, batch_sharding,
                                    batches_for_epoch, data_mesh, epoch_order, host_batches,
                                    locate_step, steps_per_epoch)
from cktf_jax.data.raw import load_cifar100_raw, load_stl10_raw, load_tiny_imagenet_raw
from cktf_jax.data.tfds_source import TfdsSource, load_tfds, prepare_tfds

__all__ = [
    "CIFAR100_MEAN", "CIFAR100_STD", "IMAGENET_MEAN", "IMAGENET_STD", "CifarTransform",
    "ImagenetTransform", "example_keys", "normalize", "transform_for",
    "load_digits", "load_synthetic",
    "UNLABELED", "DataFormatError", "DataNotFoundError", "Dataset",
    "DATASETS", "load_dataset",
    "BatchIndices", "DeviceLoader", "HostLoader", "batch_sharding", "batches_for_epoch",
    "data_mesh", "epoch_order", "host_batches", "locate_step", "steps_per_epoch",
    "load_cifar100_raw", "load_stl10_raw", "load_tiny_imagenet_raw",
    "TfdsSource", "load_tfds", "prepare_tfds",
]
