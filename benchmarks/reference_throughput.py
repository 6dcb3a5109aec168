"""The reference's (kaiqi123/CKTF) training step on this machine, timed whole and by part.

The reference side of ``throughput.py``: one distillation step of
``train_student.py`` + ``helper/loops.py: train_distill`` (or
``train_vanilla`` for ``--method vanilla``), built from the modules of a
checkout of the reference given by ``--reference_repo`` and imported from it
at run time (nothing of it is committed here):

* ``models.model_dict`` (student and teacher, randomly initialised; the
  teacher in eval mode under ``torch.no_grad()``, as the loop runs it);
* ``distiller_zoo.DistillKL`` (the KD term, every method computes it) and
  ``distiller_zoo.SimilarityTransfer`` (CKTF's layer pairing);
* ``crd.criterion.CRDLoss`` (embeds + ``crd.memory.ContrastMemory`` + NCE):
  one for ``crd``, one per layer pair (``len(feat_s)`` of them) for
  ``crdst``, with the head sizes train_student.py gives them;
* ``dataset.cifar100``: its ``get_cifar100_dataloaders_sample`` (``crd``,
  ``crdst``) or ``get_cifar100_dataloaders(is_instance=True)`` (``kd``,
  ``vanilla``) builds the training set and its transforms, so the data path
  is the reference's own ``__getitem__``: ``Image.fromarray`` + its
  torchvision ``Compose`` (RandomCrop(32, padding=4), RandomHorizontalFlip,
  ToTensor, Normalize) and, for CRD/CKTF, the per-example
  ``np.random.choice`` of ``nce_k`` negatives among the other classes.

Two things are replaced, and only those. (1) The dataset module imports
``torchvision_custom``, the reference's vendored torchvision 0.5 fork, whose
compiled ``_C.so`` does not load with a modern torch; its only use here is
the ``CIFAR100`` base class that reads the pickles. A stand-in module with a
``CIFAR100`` class that serves synthetic uint8 images and labels (the
arrays ``make_data`` gives both sides) is put in ``sys.modules`` first. The
transforms are the real ``torchvision.transforms`` the reference module
imports itself (the same classes torchvision_custom re-exports).
(2) ``AliasMethod.cuda`` is a no-op on a CPU-only torch (the alias table is
never used when ``contrast_idx`` is given, i.e. always in CRD training). The
loader is rebuilt as ``DataLoader(train_set, batch, shuffle=True,
num_workers=--num_workers, drop_last=True)`` (the reference's uses 8
workers, which a 2-core machine cannot run in parallel; 0 = in the main
process; ``drop_last`` only keeps every timed batch full).

Timed (seconds, median and p10/p90 over ``--steps`` steps after
``--warmup``):

* ``full_step``: next batch from the loader + zero_grad + forward (student,
  teacher) + losses + backward + ``optimizer.step()``: one loop iteration.
  ``data_time`` is the loader part of it (the reference's own meter).
* the parts, each alone: ``augment`` (64 x the reference ``__getitem__``
  without sampling + default collate), ``sampling`` (64 x
  ``np.random.choice(cls_negative[target], K)`` with the positive in front
  + collate, on the dataset's own ``cls_negative``), ``loader_batch``
  (``__getitem__`` with sampling + collate: the two together, as the loader
  runs them), ``memory`` (``ContrastMemory.forward`` of every head, no grad),
  ``losses`` (CE + KD + the method's criterion, forward + backward into
  fixed features and the embed heads), ``optimizer`` (``optimizer.step()``),
  ``teacher_fwd``, ``student_fwdbwd`` (forward in train mode + backward of CE).

Needs torch + torchvision, which are not project dependencies (use a
throwaway venv). ``throughput.py --compare_with_reference`` runs this script
as a subprocess and prints both sides. This module's top level imports numpy
and the standard library only: ``throughput.py`` imports its helpers. This is
a benchmark, not a test::

    /tmp/tvenv/bin/python benchmarks/reference_throughput.py --reference_repo /tmp/cktf_ref_full \\
        --method crdst --teacher resnet32x4 --student resnet8x4 --batch 64 --steps 5 --threads 2
"""

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
import types

import numpy as np

from contrast_bench import machine_info, write_json  # noqa: E402  (numpy + stdlib only, like this file)

# Parts timed on both sides, in table order, with what each one covers.
PARTS = ("augment", "sampling", "memory", "losses", "optimizer", "teacher_fwd", "student_fwdbwd")
PART_TITLES = {
    "augment": "augmentation + batch gather",
    "sampling": "negative sampling",
    "memory": "memory-bank scoring + update (all heads)",
    "losses": "losses fwd+bwd (CE, KD, method; incl. memory)",
    "optimizer": "optimizer update",
    "teacher_fwd": "teacher forward",
    "student_fwdbwd": "student fwd + bwd",
    "loader_batch": "augmentation + sampling (loader batch)",
    "augment_kernel": "augmentation kernel alone (indices on device)",
    "losses_fwd": "losses forward only",
    "full_step": "full step",
}
CONTRAST_METHODS = ("crd", "crdst")
# Stored image size, network input size, classes and training-set size.
DATASET_SHAPES = {
    "cifar100": dict(stored_size=32, image_size=32, num_classes=100, n_data=50000),
    "tiny_imagenet": dict(stored_size=64, image_size=64, num_classes=200, n_data=100000),
}
# The reference scripts' loss weights (gamma, alpha, beta, theta): RepDistiller's
# kd `-r 0.1 -a 0.9 -b 0`, crd `-r 1 -a 0 -b 0.8`, CKTF `-r 1 -a 0 -b 0.8 --theta 0.1`;
# "+kd" sets alpha = 1 (scripts/run_cifar100_distill.sh, "CKTF + KD").
REFERENCE_WEIGHTS = {"vanilla": (1.0, 0.0, 0.0, 0.0), "kd": (0.1, 0.9, 0.0, 0.0),
                     "crd": (1.0, 0.0, 0.8, 0.0), "crdst": (1.0, 0.0, 0.8, 0.1)}


def split_method(name):
  """``'crdst+kd'`` -> ``('crdst', True)``: a method and whether KD is added (alpha = 1)."""
  if name.endswith("+kd"):
    return name[:-3], True
  return name, False


def stats(times):
  """Median, p10, p90, min, max, mean (seconds) and count of per-step times."""
  t = np.asarray(times, np.float64)
  if t.size == 0:
    return {"count": 0}
  return {"median_s": float(np.median(t)), "p10_s": float(np.percentile(t, 10)),
          "p90_s": float(np.percentile(t, 90)), "min_s": float(t.min()),
          "max_s": float(t.max()), "mean_s": float(t.mean()), "count": int(t.size)}


def make_data(n, size, num_classes, seed=0):
  """Synthetic training split, numpy only: uint8 ``[n, size, size, 3]`` random
  pixels and int32 labels, ``n / num_classes`` per class (``n`` must be a
  multiple: the reference's CIFAR dataset stacks the per-class negative lists
  into one array), shuffled."""
  if n % num_classes:
    raise ValueError(f"n_data={n} must be a multiple of num_classes={num_classes}")
  rng = np.random.default_rng(seed)
  labels = rng.permutation(np.repeat(np.arange(num_classes), n // num_classes)).astype(np.int32)
  images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
  return images, labels


def fmt_ms(entry):
  """``'123.4 [110.0-140.2]'`` (ms) from a ``stats`` dict, or ``'-'``."""
  if not entry or not entry.get("count"):
    return "-"
  return (f"{entry['median_s'] * 1e3:.1f} [{entry['p10_s'] * 1e3:.1f}-"
          f"{entry['p90_s'] * 1e3:.1f}]")


# ------------------------------------------------------------------ reference side


def _install_cifar_stand_in(torch, images, labels):
  """``torchvision_custom.datasets.CIFAR100`` replaced by a class serving the
  synthetic arrays (see the module docstring); nothing else of the fork is used."""

  class CIFAR100(torch.utils.data.Dataset):
    def __init__(self, root=None, train=True, transform=None, target_transform=None,
                 download=False, target_labels=None):
      self.root, self.train = root, train
      self.transform, self.target_transform = transform, target_transform
      self.data = images
      self.targets = [int(v) for v in labels]

    def __len__(self):
      return len(self.data)

  package = types.ModuleType("torchvision_custom")
  datasets = types.ModuleType("torchvision_custom.datasets")
  datasets.CIFAR100 = CIFAR100
  package.datasets = datasets
  sys.modules["torchvision_custom"] = package
  sys.modules["torchvision_custom.datasets"] = datasets


@contextlib.contextmanager
def _quiet():
  """The reference prints while it builds (Z constants, shapes): to stderr."""
  stdout = sys.stdout
  sys.stdout = sys.stderr
  try:
    yield
  finally:
    sys.stdout = stdout


def _load_reference(torch, repo, images, labels):
  for sub in ("models", "distiller_zoo", "crd", "dataset"):
    if not os.path.isdir(os.path.join(repo, sub)):
      raise SystemExit(f"--reference_repo {repo!r}: no {sub}/ there (a checkout of "
                       f"kaiqi123/CKTF with models/, distiller_zoo/, crd/, dataset/?)")
  _install_cifar_stand_in(torch, images, labels)
  sys.path.insert(0, os.path.abspath(repo))
  import crd.memory as ref_memory
  from crd.criterion import CRDLoss
  from dataset import cifar100 as ref_cifar100
  from distiller_zoo import DistillKL, SimilarityTransfer
  from models import model_dict

  if not torch.cuda.is_available():
    ref_memory.AliasMethod.cuda = lambda self: None  # CPU-only torch: keep the table on the CPU
  return types.SimpleNamespace(model_dict=model_dict, DistillKL=DistillKL, CRDLoss=CRDLoss,
                               SimilarityTransfer=SimilarityTransfer, cifar100=ref_cifar100)


def sample_negatives(torch, cls_negative, targets, index, k):
  """``contrast_idx`` of one batch the way the reference's ``__getitem__``
  draws it per example (exact positive first, ``k`` negatives of the other
  classes with numpy's global RandomState, without replacement unless the
  class has fewer), then stacked as the default collate does."""
  rows = []
  for i in index:
    neg = cls_negative[targets[i]]
    rows.append(np.hstack((np.asarray([i]), np.random.choice(neg, k, replace=k > len(neg)))))
  return torch.stack([torch.as_tensor(r) for r in rows], 0)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--reference_repo", required=True, help="checkout of kaiqi123/CKTF")
  p.add_argument("--method", default="crdst",
                 help="vanilla | kd | crd | crdst, optionally '+kd' (alpha = 1)")
  p.add_argument("--teacher", default="resnet32x4")
  p.add_argument("--student", default="resnet8x4")
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--steps", type=int, default=5, help="timed full steps (and part calls)")
  p.add_argument("--part_steps", type=int, default=None, help="timed calls per part (default --steps)")
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--n_data", type=int, default=50000)
  p.add_argument("--nce_k", type=int, default=16384)
  p.add_argument("--num_classes", type=int, default=100,
                 help="100: the reference's CIFAR dataset class hard-codes 100 classes")
  p.add_argument("--feat_dim", type=int, default=128)
  p.add_argument("--nce_t", type=float, default=0.1)
  p.add_argument("--nce_m", type=float, default=0.5)
  p.add_argument("--st_method", default="Last")
  p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
  p.add_argument("--num_workers", type=int, default=0, help="DataLoader workers (0: in process)")
  p.add_argument("--no_parts", action="store_true", help="time the full step only")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", default=None, metavar="OUT")
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  import torch
  import torch.nn as nn
  from torch.utils.data import DataLoader
  try:
    from torch.utils.data import default_collate
  except ImportError:  # older torch
    from torch.utils.data.dataloader import default_collate

  if args.threads:
    torch.set_num_threads(args.threads)
  base, with_kd = split_method(args.method)
  if base not in REFERENCE_WEIGHTS:
    raise SystemExit(f"--method {args.method!r}: the reference side supports "
                     f"{', '.join(REFERENCE_WEIGHTS)} (optionally '+kd')")
  gamma, alpha, beta, theta = REFERENCE_WEIGHTS[base]
  if with_kd:
    alpha = 1.0
  contrast, is_st = base in CONTRAST_METHODS, base == "crdst"
  machine = machine_info()
  np.random.seed(args.seed)
  torch.manual_seed(args.seed)
  images, labels = make_data(args.n_data, 32, args.num_classes, args.seed)
  ref = _load_reference(torch, args.reference_repo, images, labels)

  t_setup = time.perf_counter()
  targets = list(range(args.num_classes))
  here = os.getcwd()
  with tempfile.TemporaryDirectory() as tmp, _quiet():
    os.chdir(tmp)  # get_data_folder() creates ./data/
    try:
      if contrast:
        loaders = ref.cifar100.get_cifar100_dataloaders_sample(
            batch_size=args.batch, num_workers=0, k=args.nce_k, mode="exact",
            train_target_labels=targets, test_target_labels=targets)
      else:
        loaders = ref.cifar100.get_cifar100_dataloaders(
            batch_size=args.batch, num_workers=0, is_instance=True,
            train_target_labels=targets, test_target_labels=targets)
    finally:
      os.chdir(here)
  train_set, n_data = loaders[0].dataset, loaders[2]
  loader = DataLoader(train_set, batch_size=args.batch, shuffle=True,
                      num_workers=args.num_workers, drop_last=True)

  num_classes = args.num_classes
  model_s = ref.model_dict[args.student](num_classes=num_classes)
  model_t = None if base == "vanilla" else ref.model_dict[args.teacher](num_classes=num_classes)
  trainable = [model_s]
  heads, st = [], None
  opt = types.SimpleNamespace(feat_dim=args.feat_dim, n_data=n_data, nce_k=args.nce_k,
                              nce_t=args.nce_t, nce_m=args.nce_m, head="linear")
  with _quiet():
    if model_t is not None:
      probe = torch.randn(2, 3, 32, 32)
      model_t.eval()
      model_s.eval()
      feat_t, _, _ = model_t(probe, is_feat=True, flatGroupOut=is_st, kd2=False)
      feat_s, _, _ = model_s(probe, is_feat=True, flatGroupOut=is_st, kd2=False)
      if base == "crd":
        opt.s_dim, opt.t_dim = feat_s[-1].shape[1], feat_t[-1].shape[1]
        heads = [ref.CRDLoss(opt)]
      elif is_st:  # train_student.py's sizes: teacher dims except the last head
        st = ref.SimilarityTransfer(args.st_method, args.student)
        for i in range(len(feat_s)):
          opt.s_dim = feat_t[i].shape[1] if i < len(feat_s) - 1 else feat_s[i].shape[1]
          opt.t_dim = feat_t[i].shape[1]
          heads.append(ref.CRDLoss(opt))
  for h in heads:
    trainable += [h.embed_s, h.embed_t]
  params = [p for m in trainable for p in m.parameters()]
  optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)
  criterion_cls = nn.CrossEntropyLoss()
  criterion_div = ref.DistillKL(4.0)
  setup_s = time.perf_counter() - t_setup

  def train_mode():
    for m in trainable:
      m.train()
    if model_t is not None:
      model_t.eval()

  def loss_terms(feat_s, block_s, logit_s, feat_t, block_t, logit_t, target, index, cidx):
    loss = gamma * criterion_cls(logit_s, target)
    if model_t is None:
      return loss
    loss = loss + alpha * criterion_div(logit_s, logit_t)
    if base == "crd":
      loss = loss + beta * heads[0](feat_s[-1], feat_t[-1], index, cidx)
    elif is_st:
      pairs = st(block_s, block_t)
      st_terms = [heads[0](feat_s[0], feat_t[0], index, cidx)]
      st_terms += [heads[1 + j](f_s, f_t, index, cidx) for j, (f_s, f_t) in enumerate(pairs)]
      loss = loss + beta * heads[-1](feat_s[-1], feat_t[-1], index, cidx) + theta * sum(st_terms)
    return loss

  def forward(x):
    if model_t is None:
      return [], None, model_s(x), [], None, None
    feat_s, block_s, logit_s = model_s(x, is_feat=True, preact=False, flatGroupOut=is_st, kd2=False)
    with torch.no_grad():
      feat_t, block_t, logit_t = model_t(x, is_feat=True, preact=False, flatGroupOut=is_st,
                                         kd2=False)
      feat_t = [f.detach() for f in feat_t]
    return feat_s, block_s, logit_s, feat_t, block_t, logit_t

  def batches():
    while True:
      for b in loader:
        yield b

  stream = batches()
  last = {}

  def full_step():
    t0 = time.perf_counter()
    data = next(stream)
    t1 = time.perf_counter()
    x, target, index = data[0].float(), data[1], data[2]
    cidx = data[3] if contrast else None
    loss = loss_terms(*forward(x), target, index, cidx)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    t2 = time.perf_counter()
    last["loss"] = float(loss.detach().reshape(-1)[0])
    return t2 - t0, t1 - t0

  train_mode()
  with _quiet():
    for _ in range(args.warmup):
      full_step()
  step_times, data_times = [], []
  for _ in range(args.steps):
    total, data = full_step()
    step_times.append(total)
    data_times.append(data)
  result = {
      "side": "reference", "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
      "argv": sys.argv[1:] if argv is None else list(argv),
      "case": {"method": args.method, "teacher": None if model_t is None else args.teacher,
               "student": args.student, "batch": args.batch, "n_data": n_data,
               "nce_k": args.nce_k if contrast else None, "num_classes": num_classes,
               "weights": {"gamma": gamma, "alpha": alpha, "beta": beta, "theta": theta},
               "crd_heads": len(heads), "num_workers": args.num_workers},
      "machine": dict(machine, torch=torch.__version__, torch_threads=torch.get_num_threads()),
      "setup_s": setup_s, "steps": args.steps, "warmup": args.warmup,
      "full_step": stats(step_times), "data_time": stats(data_times),
      "loss_finite": bool(np.isfinite(last.get("loss", np.nan))),
      "images_per_s": args.batch / float(np.median(step_times)),
      "parts": {},
  }
  print(f"reference {args.method} {args.teacher}->{args.student} b{args.batch}: full step "
        f"{fmt_ms(result['full_step'])} ms (data {fmt_ms(result['data_time'])} ms)", flush=True)

  if not args.no_parts:
    n_parts = args.part_steps or args.steps
    rng = np.random.default_rng(args.seed + 1)

    def timed(name, fn, setup=None):
      if setup is not None:
        setup()
      with _quiet():
        fn()  # warm-up
      times = []
      for _ in range(n_parts):
        if setup is not None:
          setup()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
      result["parts"][name] = stats(times)
      print(f"  {name:15s} {fmt_ms(result['parts'][name])} ms", flush=True)

    def index_batch():
      return [int(i) for i in rng.choice(len(train_set), args.batch, replace=False)]

    def augment():
      idx = index_batch()
      if contrast:
        train_set.is_sample = False
      try:
        default_collate([train_set[i] for i in idx])
      finally:
        if contrast:
          train_set.is_sample = True

    timed("augment", augment)
    if contrast:
      targets_list = train_set.targets
      timed("sampling", lambda: sample_negatives(torch, train_set.cls_negative, targets_list,
                                                 index_batch(), args.nce_k))
      timed("loader_batch", lambda: default_collate([train_set[i] for i in index_batch()]))

    data = next(stream)
    x, target, index = data[0].float(), data[1], data[2]
    cidx = data[3] if contrast else None
    if heads:
      v = [torch.nn.functional.normalize(torch.randn(args.batch, args.feat_dim), dim=1)
           for _ in range(2)]

      def memory():
        with torch.no_grad():
          for h in heads:
            h.contrast(v[0], v[1], index, cidx)

      timed("memory", memory)

    with torch.no_grad():
      feats = forward(x)

    def as_leaf(t):
      return t.detach().clone().requires_grad_(True)

    def losses():
      feat_s, block_s, logit_s, feat_t, block_t, logit_t = feats
      fs = [as_leaf(f) for f in feat_s]
      bs = None if block_s is None else [[as_leaf(b) for b in stage] for stage in block_s]
      optimizer.zero_grad()
      loss = loss_terms(fs, bs, as_leaf(logit_s), feat_t, block_t, logit_t, target, index, cidx)
      loss.backward()

    timed("losses", losses)
    # Gradients for every parameter, then the update alone.
    optimizer.zero_grad()
    loss_terms(*forward(x), target, index, cidx).backward()
    for p in params:
      if p.grad is None:
        p.grad = torch.zeros_like(p)
    timed("optimizer", optimizer.step)
    if model_t is not None:
      def teacher_fwd():
        with torch.no_grad():
          model_t(x, is_feat=True, preact=False, flatGroupOut=is_st, kd2=False)

      timed("teacher_fwd", teacher_fwd)

    def student_fwdbwd():
      model_s.zero_grad()
      if model_t is None:
        logit = model_s(x)
      else:
        _, _, logit = model_s(x, is_feat=True, preact=False, flatGroupOut=is_st, kd2=False)
      criterion_cls(logit, target).backward()

    timed("student_fwdbwd", student_fwdbwd)

  result["machine"]["loadavg_at_end"] = list(os.getloadavg())
  write_json(args.json, result)
  return result


if __name__ == "__main__":
  main()
