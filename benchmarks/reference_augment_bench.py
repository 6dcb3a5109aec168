"""The reference's augmentation: images/s of its torchvision transforms, one PIL image at a time.

The transforms are built exactly as kaiqi123/CKTF's ``dataset/cifar100.py``,
``dataset/imagenet.py`` (tiny-imagenet: crop 64, resize 64) and
``dataset/stl10.py`` build them (written out below; no reference code is
imported). Each image goes through what one DataLoader worker does per item:
``Image.fromarray(uint8 HWC)`` (the CIFAR/STL ``__getitem__``; Tiny-ImageNet's
ImageFolder decodes a JPEG instead, which is loading, not augmentation), then
``transform(img)``. The same N images as ``augment_bench.py``
(``augment_bench.make_images``) are used. The batch collate
(``torch.stack``) is timed separately. Workers run with
``torch.set_num_threads(1)``, as DataLoader workers do; this script is one
such worker (the reference uses 8 of them, on separate cores).

Needs torch + torchvision (not project dependencies: use a throwaway venv).
This is a benchmark, not a test. Usage (see benchmarks/README.md)::

    /tmp/tvenv/bin/python benchmarks/reference_augment_bench.py --dataset cifar100 --train --n 10000
"""

import argparse
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from augment_bench import IMAGE_SIZES, make_images  # noqa: E402  (numpy only)
from contrast_bench import write_json  # noqa: E402  (numpy + stdlib only)

CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def build_transform(dataset: str, train: bool):
  from torchvision import transforms

  if dataset in ("cifar100", "digits", "synthetic"):  # dataset/cifar100.py
    if train:
      return transforms.Compose([transforms.RandomCrop(32, padding=4),
                                 transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                                 transforms.Normalize(CIFAR100_MEAN, CIFAR100_STD)])
    return transforms.Compose([transforms.ToTensor(),
                               transforms.Normalize(CIFAR100_MEAN, CIFAR100_STD)])
  normalize = transforms.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)
  if train:  # dataset/imagenet.py (tiny-imagenet) and dataset/stl10.py
    return transforms.Compose([transforms.RandomResizedCrop(64), transforms.RandomHorizontalFlip(),
                               transforms.ToTensor(), normalize])
  return transforms.Compose([transforms.Resize(64), transforms.CenterCrop(64),
                             transforms.ToTensor(), normalize])


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--dataset", default="cifar100", choices=sorted(IMAGE_SIZES))
  mode = parser.add_mutually_exclusive_group()
  mode.add_argument("--train", dest="train", action="store_true", default=True)
  mode.add_argument("--test", dest="train", action="store_false")
  parser.add_argument("--n", type=int, default=10000)
  parser.add_argument("--batch", type=int, default=64, help="collate size (timed separately)")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--warmup", type=int, default=1, help="untimed passes over min(N, 500) images")
  parser.add_argument("--threads", type=int, default=1, help="torch threads (workers use 1)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--json", default=None)
  args = parser.parse_args(argv)

  import numpy as np
  import PIL
  import torch
  import torchvision
  from PIL import Image

  torch.set_num_threads(args.threads)
  torch.manual_seed(args.seed)
  transform = build_transform(args.dataset, args.train)
  host = make_images(args.dataset, args.n, args.seed)
  arrays = list(host)
  pils = [Image.fromarray(a) for a in arrays]
  for _ in range(args.warmup):
    for a in arrays[:500]:
      transform(Image.fromarray(a))

  full, only = [], []
  for _ in range(args.repeats):
    t = time.perf_counter()
    out = [transform(Image.fromarray(a)) for a in arrays]
    full.append(time.perf_counter() - t)
    t = time.perf_counter()
    for p in pils:
      transform(p)
    only.append(time.perf_counter() - t)
  t = time.perf_counter()
  for s in range(0, args.n, args.batch):
    torch.stack(out[s:s + args.batch])
  collate_s = time.perf_counter() - t

  def rates(times):
    r = sorted(args.n / x for x in times)
    return {"median": statistics.median(r), "min": r[0], "max": r[-1]}

  result = {"side": "reference", "dataset": args.dataset, "train": args.train, "n": args.n,
            "repeats": args.repeats, "threads": args.threads,
            "images_per_s": rates(full), "images_per_s_transform_only": rates(only),
            "pass_s": sorted(full), "collate_s_per_pass": collate_s,
            "images_per_s_with_collate": args.n / (statistics.median(full) + collate_s),
            "output_shape": list(out[0].shape), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "pillow": PIL.__version__,
            "numpy": np.__version__, "python": platform.python_version(),
            "nproc": os.cpu_count()}
  print(f"reference {args.dataset} {'train' if args.train else 'test'} n={args.n}: "
        f"{result['images_per_s']['median']:.0f} images/s median "
        f"[{result['images_per_s']['min']:.0f}-{result['images_per_s']['max']:.0f}] "
        f"(fromarray + transform; transform only {result['images_per_s_transform_only']['median']:.0f}; "
        f"with collate {result['images_per_s_with_collate']:.0f})")
  write_json(args.json, result, indent=1)
  return result


if __name__ == "__main__":
  main()
