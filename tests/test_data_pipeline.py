"""Epoch batching, resumption, masks of partial batches, and the sharded
device/host batch paths on 4 simulated CPU devices (tests/conftest.py)."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from cktf_jax import data
from cktf_jax.data import augment, pipeline

N, BATCH = 22, 8  # 3 steps per epoch; the last one holds 6 real rows and 2 of padding.


@pytest.fixture(scope="module")
def dataset():
  return data.load_dataset("synthetic", "train", num_examples=N, num_classes=3, image_size=8)


@pytest.fixture(scope="module")
def mesh():
  assert jax.device_count() == 4
  return pipeline.data_mesh()


def _seen(batches):
  return np.concatenate([b.indices[b.mask] for b in batches])


def test_every_example_once_per_epoch_and_partial_batch_mask():
  batches = list(pipeline.batches_for_epoch(N, BATCH, seed=3, epoch=0))
  assert len(batches) == pipeline.steps_per_epoch(N, BATCH) == 3
  assert all(b.indices.shape == (BATCH,) and b.indices.dtype == np.int32 for b in batches)
  assert [int(b.mask.sum()) for b in batches] == [8, 8, 6]
  assert batches[-1].mask.tolist() == [True] * 6 + [False] * 2
  assert sorted(_seen(batches)) == list(range(N))
  assert ((batches[-1].indices >= 0) & (batches[-1].indices < N)).all()  # Padding is in range.
  other = _seen(pipeline.batches_for_epoch(N, BATCH, seed=3, epoch=1))
  assert sorted(other) == list(range(N)) and not np.array_equal(other, _seen(batches))
  again = _seen(pipeline.batches_for_epoch(N, BATCH, seed=3, epoch=0))
  np.testing.assert_array_equal(again, _seen(batches))


def test_evaluation_order_covers_every_example_once():
  batches = list(pipeline.batches_for_epoch(N, BATCH, shuffle=False))
  np.testing.assert_array_equal(_seen(batches), np.arange(N))
  small = list(pipeline.batches_for_epoch(3, BATCH, shuffle=False))  # Batch larger than the split.
  assert len(small) == 1 and small[0].mask.sum() == 3 and small[0].indices.shape == (BATCH,)


def test_resuming_from_a_step_count_gives_the_same_batches():
  steps = pipeline.steps_per_epoch(N, BATCH)
  full = [b for e in range(3) for b in pipeline.batches_for_epoch(N, BATCH, seed=1, epoch=e)]
  for step in (0, 2, 4, 7):
    epoch, offset = pipeline.locate_step(step, steps)
    resumed = list(pipeline.batches_for_epoch(N, BATCH, seed=1, epoch=epoch, start_step=offset))
    for a, b in zip(resumed, full[step:]):
      np.testing.assert_array_equal(a.indices, b.indices)
      np.testing.assert_array_equal(a.mask, b.mask)
  assert pipeline.locate_step(7, steps) == (2, 1)


def test_device_loader_shards_batches_over_data_axis(dataset, mesh):
  loader = pipeline.DeviceLoader(dataset, augment.CifarTransform(train=False), mesh, BATCH,
                                 shuffle=False)
  batches = list(loader.epoch(0))
  assert len(batches) == loader.steps_per_epoch == 3
  for batch in batches:
    assert set(batch) == {"image", "label", "index", "mask"}
    assert batch["image"].shape == (BATCH, 8, 8, 3) and batch["image"].dtype == np.float32
    assert batch["label"].dtype == np.int32 and batch["mask"].dtype == bool
    for value in batch.values():
      assert isinstance(value.sharding, NamedSharding) and value.sharding.spec == P("data")
      assert len(value.addressable_shards) == 4
      assert value.addressable_shards[0].data.shape[0] == BATCH // 4
  index = np.concatenate([np.asarray(b["index"]) for b in batches])
  mask = np.concatenate([np.asarray(b["mask"]) for b in batches])
  np.testing.assert_array_equal(index[mask], np.arange(N))
  labels = np.concatenate([np.asarray(b["label"]) for b in batches])
  np.testing.assert_array_equal(labels, dataset.labels[index])
  images = np.concatenate([np.asarray(b["image"]) for b in batches])
  expected = augment.normalize(dataset.images[index], augment.CIFAR100_MEAN, augment.CIFAR100_STD)
  np.testing.assert_allclose(images, expected, rtol=1e-6, atol=1e-6)


def test_device_and_host_paths_agree_and_resume(dataset, mesh):
  transform = augment.CifarTransform(train=True)
  device = pipeline.DeviceLoader(dataset, transform, mesh, BATCH, shuffle=True, seed=5)
  host = pipeline.HostLoader(dataset, transform, mesh, BATCH, shuffle=True, seed=5)
  epoch1 = list(device.epoch(1))
  for a, b in zip(epoch1, host.epoch(1)):  # Images up to XLA's fusion order (1 ulp).
    np.testing.assert_allclose(np.asarray(a["image"]), np.asarray(b["image"]), atol=1e-6)
    for k in ("label", "index", "mask"):
      np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))
  # Same example and epoch, same augmentation; another epoch, another one.
  resumed = list(device.epoch(1, start_step=2))
  np.testing.assert_array_equal(np.asarray(resumed[0]["image"]), np.asarray(epoch1[2]["image"]))
  epoch2 = next(device.epoch(2))
  assert not np.array_equal(np.asarray(epoch2["index"]), np.asarray(epoch1[0]["index"]))


def test_host_loader_reads_a_tfds_source(mesh):
  import tensorflow_datasets as tfds

  with tfds.testing.mock_data(num_examples=10):
    source = data.TfdsSource("cifar100", "test")
    loader = pipeline.HostLoader(source, augment.CifarTransform(train=False), mesh, 8,
                                 shuffle=False)
    batches = list(loader.epoch(0))
  assert [int(np.asarray(b["mask"]).sum()) for b in batches] == [8, 2]
  assert batches[0]["image"].shape == (8, 32, 32, 3)


def test_bad_batch_sizes_and_source_errors(dataset, mesh):
  with pytest.raises(ValueError, match="multiple of the 4 devices"):
    pipeline.DeviceLoader(dataset, augment.CifarTransform(train=False), mesh, 6, shuffle=False)

  class Broken:
    def __len__(self):
      return 4

    def __getitem__(self, i):
      raise OSError(f"cannot read row {i}")

  with pytest.raises(OSError, match="cannot read row"):
    list(pipeline.host_batches(Broken(), pipeline.batches_for_epoch(4, 4, shuffle=False)))
