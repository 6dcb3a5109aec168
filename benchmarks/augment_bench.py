"""Benchmark of our on-device augmentation: images/s of ``transform_for(dataset, train)``.

N uint8 images (``make_images``: random pixels at the dataset's stored size,
numpy only, deterministic; ``reference_augment_bench.py`` imports it too, so
both sides see the same images) are put on the device once. One jitted step
does what ``pipeline.device_batch_fn`` does for one batch: gather ``--batch``
rows of the device-resident array with ``jnp.take``, derive one PRNG key per
example (``example_keys``) and apply the transform. A pass runs the step over
all N images in ``ceil(N / batch)`` batches and waits on every batch with
``jax.block_until_ready``. Compilation and ``--warmup`` passes are not timed;
the result is the median over ``--repeats`` passes, in images/s.

This is a benchmark, not a test. Usage (see benchmarks/README.md)::

    python benchmarks/augment_bench.py --dataset cifar100 --train --n 10000
    python benchmarks/augment_bench.py --dataset stl10 --test --n 2000 --batch 0 --json /tmp/a.json

``--batch 0`` transforms all N images in one call.
"""

import argparse
import os
import platform
import statistics
import sys
import time

import numpy as np

from contrast_bench import write_json  # noqa: E402  (numpy + stdlib only)

# name -> stored (height, width) of one image: what the loaders return.
IMAGE_SIZES = {"cifar100": 32, "digits": 32, "synthetic": 32, "tiny_imagenet": 64, "stl10": 96}


def make_images(dataset: str, n: int, seed: int = 0) -> np.ndarray:
  """uint8 ``[n, S, S, 3]`` random pixels at ``dataset``'s stored size ``S``."""
  size = IMAGE_SIZES[dataset]
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _summary(times, n):
  rates = sorted(n / t for t in times)
  return {"images_per_s_median": statistics.median(rates), "images_per_s_min": rates[0],
          "images_per_s_max": rates[-1], "pass_s": sorted(times)}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--dataset", default="cifar100", choices=sorted(IMAGE_SIZES))
  mode = parser.add_mutually_exclusive_group()
  mode.add_argument("--train", dest="train", action="store_true", default=True)
  mode.add_argument("--test", dest="train", action="store_false")
  parser.add_argument("--n", type=int, default=10000, help="images per pass")
  parser.add_argument("--batch", type=int, default=64,
                      help="images per jitted call (the reference's batch size is 64); 0 = all N")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--json", default=None, help="write the results to this file")
  args = parser.parse_args(argv)

  sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
  import jax
  import jax.numpy as jnp
  from cktf_jax.data.augment import example_keys, transform_for

  transform = transform_for(args.dataset, args.train)
  host = make_images(args.dataset, args.n, args.seed)
  images = jax.device_put(host)
  batch = args.batch or args.n
  starts = list(range(0, args.n, batch))

  @jax.jit
  def step(images, indices, key):
    return transform(jnp.take(images, indices, axis=0), example_keys(key, indices))

  index_batches = [jnp.asarray(np.arange(s, s + batch) % args.n, jnp.int32) for s in starts]
  key = jax.random.key(args.seed)
  t0 = time.perf_counter()
  jax.block_until_ready(step(images, index_batches[0], key))
  compile_s = time.perf_counter() - t0

  def one_pass(p):
    k = jax.random.fold_in(key, p)
    t = time.perf_counter()
    for idx in index_batches:
      jax.block_until_ready(step(images, idx, k))
    return time.perf_counter() - t

  for p in range(args.warmup):
    one_pass(p)
  times = [one_pass(args.warmup + p) for p in range(args.repeats)]
  n_done = len(starts) * batch  # The last batch wraps around to fill it.
  result = {"side": "ours", "dataset": args.dataset, "train": args.train, "n": args.n,
            "batch": batch, "images_timed_per_pass": n_done, "repeats": args.repeats,
            "warmup": args.warmup, "compile_and_first_call_s": compile_s,
            "output_shape": list(step(images, index_batches[0], key).shape),
            **_summary(times, n_done),
            "jax": jax.__version__, "backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()], "python": platform.python_version(),
            "nproc": os.cpu_count()}
  print(f"ours {args.dataset} {'train' if args.train else 'test'} n={args.n} batch={batch}: "
        f"{result['images_per_s_median']:.0f} images/s median "
        f"[{result['images_per_s_min']:.0f}-{result['images_per_s_max']:.0f}] "
        f"(compile {compile_s:.2f} s)")
  write_json(args.json, result, indent=1)
  return result


if __name__ == "__main__":
  main()
