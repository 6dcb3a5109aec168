"""The reference's contrast part on this CPU: host negative sampling + ``ContrastMemory``.

Times, per step, what kaiqi123/CKTF does for one batch's contrast part:

1. **sampling**, as its ``CIFAR100InstanceSample.__getitem__`` does per
   sample and the DataLoader's default collate then stacks: for each of the B
   examples ``np.random.choice(cls_negative[target], K, replace=(K >
   len(cls_negative[target])))`` (``numpy``'s legacy global RandomState),
   prefixed with the positive (exact mode: the example's own index), then the
   B rows stacked into one int64 tensor ``[B, K+1]``. ``cls_negative[c]`` is
   every training index whose label is not ``c``. This loop is written here
   from the semantics in ``tests/fixtures/parity/MANIFEST.md`` ("Data-side
   semantics"); no reference code is copied;
2. **scoring + update**: the reference's ``crd/memory.py: ContrastMemory.forward
   (v1, v2, y=index, idx=contrast_idx)``, imported at run time from the
   checkout given by ``--reference`` (nothing of it is committed here).

The reference's constructor calls ``AliasMethod.cuda()``; on a CPU-only PyTorch
that is patched to a no-op before construction (the alias table is only used
when ``contrast_idx`` is None, which never happens in CRD training).

Inputs (labels, ``v1``, ``v2``, ``index``) come from
``contrast_bench.make_inputs``, so both benchmarks see the same data. The
embeddings carry no gradient (forward only, like our step). This is a
benchmark, not a test; it needs PyTorch, which is not a project dependency::

    /tmp/torchenv/bin/python benchmarks/reference_contrast_bench.py --reference /tmp/cktf_ref
"""

import argparse
import importlib.util
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from contrast_bench import (NUM_CLASSES, machine_info, make_inputs, repeat_medians,  # noqa: E402
                            summarize, write_json)


def load_reference_memory(reference):
  """``crd/memory.py`` of a reference checkout, as a module (not installed)."""
  path = os.path.join(reference, "crd", "memory.py")
  if not os.path.isfile(path):
    raise SystemExit(f"--reference {reference!r}: no crd/memory.py there (a checkout of kaiqi123/CKTF?)")
  spec = importlib.util.spec_from_file_location("cktf_reference_crd_memory", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def class_negatives(labels, num_classes):
  """``cls_negative[c]``: indices of all samples whose label is not ``c``, in
  class-major order (the classes' index lists concatenated, skipping ``c``)."""
  positives = [np.flatnonzero(labels == c) for c in range(num_classes)]
  return [np.concatenate([positives[j] for j in range(num_classes) if j != c])
          for c in range(num_classes)]


def sample_batch(torch, cls_negative, labels, index, k):
  """One batch of ``contrast_idx`` the way the reference's loader builds it:
  per sample a without-replacement ``np.random.choice`` (exact positive), then
  a default-collate-like stack into ``[B, K+1]`` int64."""
  rows = []
  for i in index:
    target = labels[i]
    neg = cls_negative[target]
    neg_idx = np.random.choice(neg, k, replace=(k > len(neg)))
    rows.append(np.hstack((np.asarray([i]), neg_idx)))
  return torch.stack([torch.as_tensor(r) for r in rows], 0)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--reference", required=True, help="path to a checkout of kaiqi123/CKTF")
  p.add_argument("--n", type=int, default=50000)
  p.add_argument("--k", type=int, default=16384)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--dim", type=int, default=128)
  p.add_argument("--steps", type=int, default=10, help="timed steps per repeat")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--threads", type=int, default=None,
                 help="torch.set_num_threads (default: PyTorch's default)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", default=None, metavar="OUT")
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  import torch

  if args.threads:
    torch.set_num_threads(args.threads)
  ref = load_reference_memory(args.reference)
  if not torch.cuda.is_available():
    ref.AliasMethod.cuda = lambda self: None  # CPU-only PyTorch: keep the table on the CPU

  machine = machine_info()  # load average before timing
  n, k, b, d = args.n, args.k, args.batch, args.dim
  inputs = make_inputs(n, b, d, args.steps, seed=args.seed)
  labels = inputs["labels"]
  cls_negative = class_negatives(labels, NUM_CLASSES)
  np.random.seed(args.seed)
  torch.manual_seed(args.seed)

  t0 = time.perf_counter()
  memory = ref.ContrastMemory(d, n, k, 0.07, 0.5)
  construct_s = time.perf_counter() - t0
  v1 = [torch.from_numpy(inputs["v1"][i]) for i in range(args.steps)]
  v2 = [torch.from_numpy(inputs["v2"][i]) for i in range(args.steps)]
  y = [torch.from_numpy(inputs["index"][i]) for i in range(args.steps)]

  def one(i):
    t_a = time.perf_counter()
    contrast_idx = sample_batch(torch, cls_negative, labels, inputs["index"][i], k)
    t_b = time.perf_counter()
    with torch.no_grad():
      out_v1, out_v2 = memory(v1[i], v2[i], y[i], contrast_idx)
    t_c = time.perf_counter()
    return t_b - t_a, t_c - t_b, out_v1, out_v2

  stdout = sys.stdout
  sys.stdout = sys.stderr  # the reference prints Z on its first call
  try:
    for i in range(args.warmup):
      one(i % args.steps)
  finally:
    sys.stdout = stdout
  t_sample, t_memory, t_total = [], [], []
  for r in range(args.repeats):
    for i in range(args.steps):
      ts, tm, o1, o2 = one(i)
      t_sample.append(ts)
      t_memory.append(tm)
      t_total.append(ts + tm)
  finite = bool(torch.isfinite(o1).all() and torch.isfinite(o2).all())

  bank_bytes = memory.memory_v1.numel() * memory.memory_v1.element_size()
  result = {
      "side": "reference", "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
      "argv": sys.argv[1:] if argv is None else list(argv),
      "config": {"n": n, "k": k, "batch": b, "dim": d, "steps": args.steps,
                 "repeats": args.repeats, "warmup": args.warmup},
      "machine": dict(machine, torch=torch.__version__, numpy=np.__version__,
                      torch_threads=torch.get_num_threads()),
      "construct_s": construct_s, "outputs_finite": finite,
      "bank_bytes_both": 2 * bank_bytes,
      # index_select of B*(K+1) rows per bank reads (and writes) B*(K+1)*d floats.
      "cost_model_scoring_read_bytes": 2 * b * (k + 1) * d * memory.memory_v1.element_size(),
      "sampling": dict(summarize(t_sample), repeat_medians_s=repeat_medians(t_sample, args.steps)),
      "memory_forward": dict(summarize(t_memory), repeat_medians_s=repeat_medians(t_memory, args.steps)),
      "total": dict(summarize(t_total), repeat_medians_s=repeat_medians(t_total, args.steps)),
  }
  result["machine"]["loadavg_at_end"] = list(os.getloadavg())
  for name in ("sampling", "memory_forward", "total"):
    e = result[name]
    print(f"{name}: median {e['median_s'] * 1e3:.1f} ms  [{e['min_s'] * 1e3:.1f}, "
          f"{e['max_s'] * 1e3:.1f}] over {e['count']} steps; repeat medians "
          f"{[round(x * 1e3, 1) for x in e['repeat_medians_s']]} ms", flush=True)
  write_json(args.json, result)
  return result


if __name__ == "__main__":
  main()
