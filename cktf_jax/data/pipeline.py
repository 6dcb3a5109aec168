"""Epoch batching, on-device batch assembly and sharding, and the host-fed path.

An epoch visits a permutation of the split, ``epoch_order(n, seed, epoch)``
(the reference's ``DataLoader(shuffle=True)``; no shuffle for evaluation). It
is cut into ``ceil(n / batch_size)`` steps of the global batch size; the last
partial batch is kept and padded to full size with real rows whose ``mask``
is False, so every example is seen exactly once per epoch and losses,
metrics, BatchNorm statistics and memory-bank updates can leave the padding
out. Everything is a function of ``(seed, epoch, step)``: training resumes
from a step count (``locate_step``) with the same batches.

A batch is the Batch contract of ``cktf_jax/methods/base.py``: ``'image'``
float32 ``[B, H, W, 3]`` (augmented, normalised), ``'label'`` int32 ``[B]``,
``'index'`` int32 ``[B]`` (row in the split), ``'mask'`` bool ``[B]``; each
sharded ``P('data')`` over the mesh. Augmentation keys are
``fold_in(fold_in(key(seed), epoch), index)``: the same example in the same
epoch gets the same augmentation whatever the batching or device count.

Two ways to feed it: ``DeviceLoader`` keeps the uint8 split on every device
(replicated) and gathers batches there (``jnp.take``), so only indices cross
from the host; ``HostLoader`` reads rows from a random-access source (a TFDS
data source, a ``Dataset``) in a background thread and ships uint8 batches.
With several processes (``cktf_jax.distributed``) every process holds the same
host data and computes the same indices; each fills only its own devices'
shards of the global arrays.
"""

import functools
import queue
import threading
from typing import Any, Dict, Iterable, Iterator, NamedTuple, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cktf_jax import distributed
from cktf_jax.data.augment import example_keys
from cktf_jax.data.dataset import Dataset

Batch = Dict[str, jax.Array]
DATA_AXIS = "data"


class BatchIndices(NamedTuple):
  """One step's rows: ``indices`` int32 ``[B]`` and ``mask`` bool ``[B]`` (False on padding)."""

  indices: np.ndarray
  mask: np.ndarray


def epoch_order(num_examples: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
  """int32 row order of ``epoch``: a permutation drawn from ``(seed, epoch)``, or 0..n-1."""
  if not shuffle:
    return np.arange(num_examples, dtype=np.int32)
  return np.random.default_rng((seed, epoch)).permutation(num_examples).astype(np.int32)


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """``ceil(num_examples / batch_size)``: the last partial batch counts."""
  return -(-num_examples // batch_size)


def locate_step(step: int, num_steps_per_epoch: int) -> Tuple[int, int]:
  """``(epoch, step within that epoch)`` of global step ``step`` (for resuming)."""
  return divmod(step, num_steps_per_epoch)


def epoch_table(num_examples: int, batch_size: int, *, seed: int = 0, epoch: int = 0,
                shuffle: bool = True) -> BatchIndices:
  """Every step of the epoch at once: ``indices`` and ``mask`` of shape
  ``[steps, batch_size]``; row ``s`` is step ``s``'s ``BatchIndices``. The
  last batch is padded with the epoch's first rows (real data, mask False)."""
  if num_examples < 1 or batch_size < 1:
    raise ValueError(f"need num_examples >= 1 and batch_size >= 1; got {num_examples}, "
                     f"{batch_size}")
  order = epoch_order(num_examples, seed, epoch, shuffle)
  shape = (steps_per_epoch(num_examples, batch_size), batch_size)
  positions = np.arange(shape[0] * batch_size)
  return BatchIndices(np.resize(order, positions.size).reshape(shape).astype(np.int32),
                      (positions < num_examples).reshape(shape))


def batches_for_epoch(num_examples: int, batch_size: int, *, seed: int = 0, epoch: int = 0,
                      shuffle: bool = True, start_step: int = 0) -> Iterator[BatchIndices]:
  """The epoch's ``BatchIndices`` from step ``start_step`` on; see the module docstring."""
  table = epoch_table(num_examples, batch_size, seed=seed, epoch=epoch, shuffle=shuffle)
  for step in range(start_step, table.indices.shape[0]):
    yield BatchIndices(table.indices[step], table.mask[step])


# ---------------------------------------------------------------- device side


def data_mesh(devices=None) -> Mesh:
  """A 1-D mesh over ``devices`` (default: all) with the axis ``'data'``."""
  return Mesh(np.asarray(devices if devices is not None else jax.devices()), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batches are split over the mesh's ``'data'`` axis: ``P('data')``."""
  return NamedSharding(mesh, P(DATA_AXIS))


def _check_batch_size(batch_size: int, mesh: Mesh) -> None:
  devices = mesh.shape[DATA_AXIS]
  if batch_size % devices:
    raise ValueError(f"global batch size {batch_size} must be a multiple of the {devices} "
                     f"devices of the mesh's '{DATA_AXIS}' axis")


def _finish(transform, images, labels, indices, mask, key, epoch) -> Batch:
  keys = example_keys(jax.random.fold_in(key, epoch), indices)
  return {"image": transform(images, keys), "label": labels, "index": indices, "mask": mask}


def device_batch(transform, images, labels, table_indices, table_mask, step, key,
                 epoch) -> Batch:
  """Row ``step`` of the device-resident epoch table (``epoch_table``): those
  rows of the device-resident split (uint8 ``images``, int32 ``labels``),
  gathered with ``jnp.take`` and augmented. Traceable (``step`` may be traced)."""
  indices, mask = table_indices[step], table_mask[step]
  return _finish(transform, jnp.take(images, indices, axis=0), jnp.take(labels, indices),
                 indices, mask, key, epoch)


def device_batch_fn(transform, mesh: Mesh):
  """``device_batch`` jitted, the batch sharded ``P('data')``: per step only
  the scalar ``step`` crosses from the host."""
  return jax.jit(functools.partial(device_batch, transform), out_shardings=batch_sharding(mesh))


def host_batch_fn(transform, mesh: Mesh):
  """Jitted ``fn(images, labels, indices, mask, key, epoch) -> Batch`` for a
  batch that already holds the rows (uint8 ``images [B, H, W, 3]``)."""
  return jax.jit(functools.partial(_finish, transform), out_shardings=batch_sharding(mesh))


class DeviceLoader:
  """Batches of a split held on every device; see the module docstring.

  ``loader.epoch(e, start_step=0)`` yields the Batches of epoch ``e``.
  """

  def __init__(self, dataset: Dataset, transform, mesh: Mesh, batch_size: int, *,
               shuffle: bool, seed: int = 0):
    _check_batch_size(batch_size, mesh)
    replicated = NamedSharding(mesh, P())
    self.num_examples = len(dataset)
    self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
    self.steps_per_epoch = steps_per_epoch(self.num_examples, batch_size)
    self._replicated = replicated
    self._images = distributed.global_array(dataset.images, replicated)
    self._labels = distributed.global_array(dataset.labels, replicated)
    self._sharding = batch_sharding(mesh)
    self._transform = transform
    self._fn = device_batch_fn(transform, mesh)
    self._key = jax.random.key(seed)

  def step_data(self, epoch: int):
    """``(images, labels, table_indices, table_mask)`` of ``epoch`` on the
    devices (the tables placed now, once per epoch): what ``batch_at`` reads."""
    table = epoch_table(self.num_examples, self.batch_size, seed=self.seed, epoch=epoch,
                        shuffle=self.shuffle)
    return (self._images, self._labels) + tuple(distributed.global_tree(tuple(table),
                                                                        self._replicated))

  def batch_at(self, data, step, epoch) -> Batch:
    """Traceable batch ``step`` of ``epoch`` from ``step_data(epoch)``: for
    batches made inside another jitted function (several steps per call)."""
    batch = device_batch(self._transform, *data, step, self._key, epoch)
    return jax.lax.with_sharding_constraint(batch, self._sharding)

  def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
    data = self.step_data(epoch)
    for step in range(start_step, self.steps_per_epoch):
      yield self._fn(*data, step, self._key, epoch)


# ---------------------------------------------------------------- host side


def host_batches(source, batches: Iterable[BatchIndices],
                 prefetch: int = 2) -> Iterator[Dict[str, np.ndarray]]:
  """numpy batches ``{'image' uint8, 'label' int32, 'index', 'mask'}`` read
  with ``source[i]`` (rows ``{'image', 'label', ...}``) by a background
  thread that stays at most ``prefetch`` batches ahead. An error in the thread
  is raised here; closing the generator stops the thread."""
  out: "queue.Queue[Any]" = queue.Queue(maxsize=max(prefetch, 1))
  stop = threading.Event()
  end = object()

  def put(item) -> bool:
    while not stop.is_set():
      try:
        out.put(item, timeout=0.05)
        return True
      except queue.Full:
        pass
    return False

  def work():
    try:
      for b in batches:
        rows = [source[int(i)] for i in b.indices]
        item = {"image": np.stack([np.asarray(r["image"], np.uint8) for r in rows]),
                "label": np.array([r["label"] for r in rows], np.int32),
                "index": b.indices, "mask": b.mask}
        if not put(item):
          return
      put(end)
    except BaseException as e:  # Handed to the consumer, raised there.
      put(e)

  thread = threading.Thread(target=work, daemon=True)
  thread.start()
  try:
    while True:
      item = out.get()
      if item is end:
        return
      if isinstance(item, BaseException):
        raise item
      yield item
  finally:
    stop.set()


class HostLoader:
  """Batches read on the host from a random-access ``source`` (``len(source)``
  and ``source[i] -> {'image', 'label'}``, e.g. ``TfdsSource`` or a
  ``Dataset``) by a prefetch thread; the same Batches as ``DeviceLoader``
  gives for the same data. ``loader.epoch(e, start_step=0)`` yields them.
  """

  def __init__(self, source, transform, mesh: Mesh, batch_size: int, *, shuffle: bool,
               seed: int = 0, prefetch: int = 2):
    _check_batch_size(batch_size, mesh)
    self.source = source
    self.num_examples = len(source)
    self.batch_size, self.shuffle, self.seed, self.prefetch = batch_size, shuffle, seed, prefetch
    self.steps_per_epoch = steps_per_epoch(self.num_examples, batch_size)
    self._sharding = batch_sharding(mesh)
    self._fn = host_batch_fn(transform, mesh)
    self._key = jax.random.key(seed)

  def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
    batches = batches_for_epoch(self.num_examples, self.batch_size, seed=self.seed, epoch=epoch,
                                shuffle=self.shuffle, start_step=start_step)
    for hb in host_batches(self.source, batches, self.prefetch):
      images, labels, indices, mask = distributed.global_tree(
          (hb["image"], hb["label"], hb["index"], hb["mask"]), self._sharding)
      yield self._fn(images, labels, indices, mask, self._key, epoch)
