"""Benchmark of loading each dataset into memory with ``load_dataset``.

digits and synthetic need no files. For cifar100, stl10 and tiny_imagenet the
script first writes files in the original formats, filled with random pixels,
under ``--root`` (default ``/tmp/cktf_data_bench``), then times
``load_dataset(name, split, source='raw', data_dir=root)``:

* ``cifar-100-python/{train,test}``: pickles (protocol 4) of dicts with
  ``b'data'`` uint8 ``[N, 3072]``, ``b'fine_labels'``, ``b'coarse_labels'``,
  ``b'filenames'``, ``b'batch_label'``; 50000 + 10000 images (real size).
  The real files were written by Python 2, whose strings (the pixels too)
  unpickle as raw byte copies; protocol 4's BINBYTES does the same. (Python
  3's protocol 2 would store bytes through ``codecs.encode`` of a str, a
  45% larger file that is slower to load.)
* ``stl10_binary/``: ``train_X/y`` 5000, ``test_X/y`` 8000 and
  ``unlabeled_X.bin`` with ``--stl10-unlabeled`` images (default 100000, the
  real 2.76 GB file).
* ``tiny-imagenet-200/``: ``--tiny-classes`` classes (default 10 of 200) x 500
  train JPEGs and x 50 val JPEGs with ``val_annotations.txt`` (PIL quality 75,
  64x64 RGB). The real dataset is 200 x 500 + 10000; the per-image time is
  reported so it can be scaled.

Files just written are in the page cache, so these are warm-cache times
(no disk reads). Each load runs ``--repeats`` times; the median is reported.
This is a benchmark, not a test. Usage (see benchmarks/README.md)::

    python benchmarks/data_load_bench.py --json /tmp/load.json
"""

import argparse
import os
import pickle
import statistics
import sys
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from contrast_bench import write_json  # noqa: E402  (numpy + stdlib only)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def write_cifar100(root, rng):
  folder = os.path.join(root, "cifar-100-python")
  os.makedirs(folder, exist_ok=True)
  for split, n in (("train", 50000), ("test", 10000)):
    fine = rng.integers(0, 100, n)
    entry = {b"filenames": [b"img_%d.png" % i for i in range(n)], b"batch_label": split.encode(),
             b"fine_labels": fine.tolist(), b"coarse_labels": (fine // 5).tolist(),
             b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)}
    with open(os.path.join(folder, split), "wb") as f:
      pickle.dump(entry, f, protocol=4)


def write_stl10(root, rng, unlabeled):
  folder = os.path.join(root, "stl10_binary")
  os.makedirs(folder, exist_ok=True)
  for split, n in (("train", 5000), ("test", 8000)):
    rng.integers(0, 256, n * 3 * 96 * 96, dtype=np.uint8).tofile(os.path.join(folder, f"{split}_X.bin"))
    rng.integers(1, 11, n, dtype=np.uint8).tofile(os.path.join(folder, f"{split}_y.bin"))
  with open(os.path.join(folder, "unlabeled_X.bin"), "wb") as f:
    for start in range(0, unlabeled, 10000):
      f.write(rng.integers(0, 256, min(10000, unlabeled - start) * 3 * 96 * 96,
                           dtype=np.uint8).tobytes())


def write_tiny_imagenet(root, rng, classes):
  base = os.path.join(root, "tiny-imagenet-200")
  wnids = [f"n{i:08d}" for i in range(classes)]
  with open(os.path.join(_mkdir(base), "wnids.txt"), "w") as f:
    f.write("\n".join(wnids) + "\n")
  val = _mkdir(os.path.join(base, "val", "images"))
  lines = []
  for c, w in enumerate(wnids):
    train = _mkdir(os.path.join(base, "train", w, "images"))
    for i in range(500):
      Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
          os.path.join(train, f"{w}_{i}.JPEG"), quality=75)
    for i in range(50):
      name = f"val_{c * 50 + i}.JPEG"
      Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
          os.path.join(val, name), quality=75)
      lines.append(f"{name}\t{w}\t0\t0\t63\t63")
  with open(os.path.join(base, "val", "val_annotations.txt"), "w") as f:
    f.write("\n".join(lines) + "\n")


def _mkdir(path):
  os.makedirs(path, exist_ok=True)
  return path


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--root", default="/tmp/cktf_data_bench")
  parser.add_argument("--stl10-unlabeled", type=int, default=100000)
  parser.add_argument("--tiny-classes", type=int, default=10)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--no-write", action="store_true", help="reuse files already under --root")
  parser.add_argument("--json", default=None)
  args = parser.parse_args(argv)

  from cktf_jax.data.load import load_dataset

  results = {"root": args.root, "repeats": args.repeats, "write_s": {}, "load": []}
  if not args.no_write:
    rng = np.random.default_rng(0)
    for name, write in (("cifar100", lambda: write_cifar100(args.root, rng)),
                        ("stl10", lambda: write_stl10(args.root, rng, args.stl10_unlabeled)),
                        ("tiny_imagenet", lambda: write_tiny_imagenet(args.root, rng,
                                                                      args.tiny_classes))):
      t = time.perf_counter()
      write()
      results["write_s"][name] = time.perf_counter() - t
      print(f"wrote {name} in {results['write_s'][name]:.1f} s", flush=True)

  cases = [("digits", "train", {}), ("digits", "test", {}),
           ("synthetic", "train", {}), ("synthetic", "train", {"num_examples": 50000}),
           ("cifar100", "train", {}), ("cifar100", "test", {}),
           ("stl10", "train", {}), ("stl10", "test", {}), ("stl10", "unlabeled", {}),
           ("tiny_imagenet", "train", {}), ("tiny_imagenet", "test", {})]
  for name, split, options in cases:
    kwargs = dict(options)
    if name in ("cifar100", "stl10", "tiny_imagenet"):
      kwargs.update(source="raw", data_dir=args.root)
    times = []
    for _ in range(args.repeats):
      t = time.perf_counter()
      dataset = load_dataset(name, split, **kwargs)
      times.append(time.perf_counter() - t)
      n, nbytes, shape = len(dataset.labels), dataset.images.nbytes, dataset.images.shape
      del dataset
    median = statistics.median(times)
    row = {"dataset": name, "split": split, "options": options, "images": n,
           "shape": list(shape), "bytes": nbytes, "load_s_median": median,
           "load_s": sorted(times), "us_per_image": 1e6 * median / n,
           "mb_per_s": nbytes / median / 1e6}
    results["load"].append(row)
    print(f"{name:13s} {split:9s} {str(options):24s} n={n:6d} {median:8.3f} s "
          f"[{min(times):.3f}-{max(times):.3f}]  {row['us_per_image']:8.1f} us/image "
          f"{row['mb_per_s']:8.0f} MB/s", flush=True)
  write_json(args.json, results, indent=1)
  return results


if __name__ == "__main__":
  main()
