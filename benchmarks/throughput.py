"""Training-step throughput: the real train state and jitted step, timed whole and by part.

For each case of ``--matrix`` (``method:teacher:student:batch[:dtype[:dataset]]``
entries, or presets, see ``PRESETS``), this builds what ``launch.py`` builds for
``mode='distill'`` (``'train_teacher'`` for ``vanilla``) from the same config
(``--config configs/cifar100_cktf.py`` and ``--config.x=y`` overrides): the
Method(s) (``loop.create_method`` / ``create_method2``), the train state
(``loop.create_state``, placed with ``loop.place_state``), the jitted
``step.make_train_step`` with the loop's donation and shardings, and a
``DeviceLoader`` over a synthetic ``Dataset`` of the case's shapes (random
uint8 images, balanced labels; no files, no TFDS), so augmentation, the batch
gather and on-device negative sampling are all inside the measured step. The
teacher has random weights (``teacher.init``).

Per case it reports:

* ``compile_s``: ``lower`` + ``compile`` of the train step (the loader's batch
  function compiles on its first call, reported as ``batch_fn_first_call_s``);
* step time after ``--warmup`` steps: median, p10, p90 over ``--steps`` steps.
  One timed step = next loader batch (host index transfer + jitted gather and
  augmentation) + the train step. With ``--sync_every k`` the host blocks
  (``jax.block_until_ready`` on state and metrics) once per k steps and a
  sample is that block's time / k, so dispatch of step i+1 overlaps step i;
  ``k = 1`` blocks after every step;
* images/s (batch / median step), peak device memory
  (``memory_stats()['peak_bytes_in_use']``, max over devices; a process-wide
  high-water mark, so within one process it only grows from case to case; n/a
  on CPU) and XLA's static ``memory_analysis`` of the step;
* FLOPs and bytes accessed per step from XLA's ``cost_analysis`` (train step +
  batch function), and the analytical floor ``max(FLOPs / peak FLOP/s, bytes /
  peak bandwidth)`` with ``pct_of_floor = floor / measured``. Peaks come from
  ``PEAKS`` by device kind, ``--peak_flops`` / ``--peak_bw``, or on CPU an
  estimate (cores x clock x FLOP/cycle from /proc/cpuinfo; a numpy copy for
  bandwidth), labelled as such;
* with ``--parts``, each part jitted and timed alone (block after every call):
  ``augment`` (the loader's batch), ``sampling`` (on-device negatives),
  ``memory`` (scoring + update of every bank), ``losses`` (CE + KD + method
  loss, forward + backward into fixed features and the aux params; memory
  included, sampling not), ``optimizer``, ``teacher_fwd``, ``student_fwdbwd``.

Output: markdown tables on stdout, JSON in ``--results_dir/<name>.json``
(``--json_out`` to choose the path), ``--markdown_out`` for the tables.
``--profile_dir DIR`` records a ``jax.profiler`` trace of ``--profile_steps``
steps per case under ``DIR/<case>/`` (``plugins/profile/*/*.xplane.pb`` and a
Perfetto ``*.trace.json.gz``). ``--compare_with_reference REPO
--reference_python PY`` runs ``reference_throughput.py`` with ``PY`` for every
case it supports and prints both sides and their ratios. See
benchmarks/README.md. This is a benchmark, not a test.
"""

import copy
import gc
import inspect
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback

from absl import app, flags
from ml_collections import config_flags

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
import reference_throughput as ref_lib  # noqa: E402  (numpy + stdlib only)
from reference_throughput import (CONTRAST_METHODS, DATASET_SHAPES, PART_TITLES, PARTS,  # noqa: E402
                                  fmt_ms, split_method, stats)

# Timed besides PARTS (not in their sum): the augmentation kernel without the
# loader's host work, and the losses' forward alone (so fwd+bwd - fwd = backward).
EXTRA_PARTS = ("augment_kernel", "losses_fwd")

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", os.path.join(ROOT, "configs", "cifar100_cktf.py"),
                                "Experiment config (configs/*.py), as for launch.py.",
                                lock_config=False)
flags.DEFINE_list("matrix", None, "Cases 'method:teacher:student:batch[:dtype[:dataset]]' and/or "
                  "presets (paper, paper_cifar, paper_r32x4, tiny, tiny_all). Default: the "
                  "config's own case (or 'tiny' with --tiny).")
flags.DEFINE_list("batch_sweep", None, "Batch sizes to try, in order, for each case of "
                  "--sweep_matrix (or of --matrix when that is not given); a case stops at its "
                  "first failure (out of memory). Replaces the case's batch.")
flags.DEFINE_list("sweep_matrix", None, "Cases/presets run at every --batch_sweep size, after "
                  "the --matrix cases at their own batch.")
flags.DEFINE_integer("steps", 10, "Timed steps per case.")
flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
flags.DEFINE_integer("sync_every", 1, "Block on the results once per this many steps.")
flags.DEFINE_bool("parts", True, "Also time each part of the step alone.")
flags.DEFINE_integer("part_steps", None, "Timed calls per part (default: --steps).")
flags.DEFINE_bool("tiny", False, "Tiny sizes for tests: n_data 80 (10 classes), nce_k 16, batch "
                  "8, default matrix 'tiny'.")
flags.DEFINE_enum("init", "fill", ["fill", "model"], "Model variables: 'fill' = random "
                  "values of the right shapes from numpy (He-scaled kernels, BN scale 1, "
                  "running var 1), no compile; 'model' = the models' own init, jitted (its "
                  "threefry compile takes 10-15 s per model on a CPU and measures nothing).")
flags.DEFINE_integer("n_data", None, "Training-set size (default: the dataset's: 50000 CIFAR-100, "
                     "100000 Tiny-ImageNet). Rounded up to a multiple of the classes.")
flags.DEFINE_integer("nce_k", None, "Overrides config.method.nce_k (negatives per example).")
flags.DEFINE_string("name", None, "Result name (default throughput_<backend>_<time>).")
flags.DEFINE_string("results_dir", os.path.join(HERE, "results"), "Where <name>.json goes.")
flags.DEFINE_string("json_out", None, "JSON path (overrides results_dir/name).")
flags.DEFINE_string("markdown_out", None, "Also write the markdown tables here.")
flags.DEFINE_string("profile_dir", None, "jax.profiler trace of a few steps per case here.")
flags.DEFINE_integer("profile_steps", 3, "Steps traced per case with --profile_dir.")
flags.DEFINE_float("peak_flops", None, "Device peak FLOP/s for the floor (default: table/estimate).")
flags.DEFINE_float("peak_bw", None, "Device peak bytes/s for the floor (default: table/estimate).")
flags.DEFINE_float("time_budget_s", None, "Skip the remaining cases once this many seconds passed.")
flags.DEFINE_string("compare_with_reference", None, "A kaiqi123/CKTF checkout: also run "
                    "reference_throughput.py on every supported case.")
flags.DEFINE_string("reference_python", sys.executable, "Python with torch + torchvision for "
                    "the reference side.")
flags.DEFINE_integer("reference_steps", None, "Reference timed steps (default --steps).")
flags.DEFINE_integer("reference_threads", None, "torch.set_num_threads on the reference side.")
flags.DEFINE_integer("reference_timeout_s", 1800, "Per-case limit of the reference subprocess.")

PAPER_PAIRS = (("resnet32x4", "resnet8x4"), ("wrn_40_2", "wrn_16_2"),
               ("resnet110", "resnet20"), ("vgg13", "vgg8"))
PAPER_METHODS = ("vanilla", "kd", "crd", "crdst", "crdst+kd")
PRESETS = {
    # The paper's CIFAR-100 pairs (seed README Table 1) and Tiny-ImageNet vgg19 -> vgg8, x 5 methods.
    "paper_r32x4": [f"{m}:resnet32x4:resnet8x4:64" for m in PAPER_METHODS],
    "paper_cifar": [f"{m}:{t}:{s}:64" for t, s in PAPER_PAIRS for m in PAPER_METHODS],
    "paper": ([f"{m}:{t}:{s}:64" for t, s in PAPER_PAIRS for m in PAPER_METHODS]
              + [f"{m}:vgg19:vgg8:64:float32:tiny_imagenet" for m in PAPER_METHODS]),
    "tiny": ["kd:resnet8:resnet5:8", "crdst:resnet8:resnet5:8"],
    "tiny_all": [f"{m}:resnet8:resnet5:8" for m in PAPER_METHODS],
}
TINY = dict(n_data=80, num_classes=10, nce_k=16, batch=8)
DTYPES = ("float32", "bfloat16")

# Dense peaks (FLOP/s) and HBM bandwidth (B/s) from the vendors' datasheets
# (SXM parts; the "with sparsity" figures halved). float32 dots and convolutions
# at XLA's DEFAULT precision run as TF32 on these GPUs, so the float32 floor uses
# the TF32 peak; 'float32_simt' (no tensor cores) is kept in the JSON.
PEAKS = (
    ("h200", {"bfloat16": 989.5e12, "float32": 494.7e12, "float32_simt": 66.9e12, "bw": 4.8e12}),
    ("h100", {"bfloat16": 989.5e12, "float32": 494.7e12, "float32_simt": 66.9e12, "bw": 3.35e12}),
    ("a100", {"bfloat16": 312e12, "float32": 156e12, "float32_simt": 19.5e12, "bw": 2.039e12}),
)


# ------------------------------------------------------------------ cases


def parse_case(entry, default_dataset):
  """``'method:teacher:student:batch[:dtype[:dataset]]'`` -> dict."""
  fields = entry.split(":")
  if not 4 <= len(fields) <= 6:
    raise app.UsageError(f"--matrix entry {entry!r}: expected method:teacher:student:batch"
                         f"[:dtype[:dataset]] or a preset ({', '.join(PRESETS)})")
  method, teacher, student, batch = fields[:4]
  dtype = fields[4] if len(fields) > 4 and fields[4] else "float32"
  dataset = fields[5] if len(fields) > 5 and fields[5] else default_dataset
  if dtype not in DTYPES:
    raise app.UsageError(f"--matrix entry {entry!r}: dtype {dtype!r} is not one of {DTYPES}")
  return {"method": method, "teacher": teacher, "student": student, "batch": int(batch),
          "dtype": dtype, "dataset": dataset}


def case_name(case):
  return (f"{case['method']}:{case['teacher']}:{case['student']}:{case['batch']}:"
          f"{case['dtype']}:{case['dataset']}")


def expand_matrix(entries, default_dataset, config):
  if not entries:
    if FLAGS.tiny:
      entries = ["tiny"]
    else:
      w = config.weights
      name = config.method.name + ("+kd" if w.alpha and config.method.name != "kd" else "")
      if config.mode == "train_teacher":
        name = "vanilla"
      entries = [f"{name}:{config.teacher.model}:{config.student.model}:{config.train.batch_size}"]
  cases = []
  for e in entries:
    for item in PRESETS.get(e, [e]):
      cases.append(parse_case(item, default_dataset))
  return cases


def case_config(base, case, n_data):
  """The config of one case: ``base`` with the case's fields set."""
  cfg = copy.deepcopy(base)
  method, with_kd = split_method(case["method"])
  shapes = dict(DATASET_SHAPES.get(case["dataset"], {}))
  with cfg.unlocked():
    cfg.mode = "train_teacher" if method == "vanilla" else "distill"
    if case["dataset"] != base.dataset.name:
      if not shapes:
        raise app.UsageError(f"dataset {case['dataset']!r}: known shapes are "
                             f"{', '.join(DATASET_SHAPES)}")
      cfg.dataset.name = case["dataset"]
      cfg.dataset.num_classes = shapes["num_classes"]
      cfg.dataset.image_size = shapes["image_size"]
      if case["dataset"] == "tiny_imagenet":
        cfg.method.nce_t = 0.07  # configs/tiny_imagenet_distill.py
    if FLAGS.tiny:
      cfg.dataset.num_classes = TINY["num_classes"]
    cfg.teacher.model = case["teacher"]
    cfg.student.model = case["student"]
    if method != "vanilla":
      cfg.method.name = method
    if with_kd:
      cfg.weights.alpha = 1.0
    cfg.train.batch_size = case["batch"]
    cfg.method.bank_dtype = case["dtype"]
    if FLAGS.nce_k is not None:
      cfg.method.nce_k = FLAGS.nce_k
    elif FLAGS.tiny:
      cfg.method.nce_k = TINY["nce_k"]
  return cfg, method


def synthetic_split(cfg, n_data, seed):
  """A ``Dataset`` of random pixels at the dataset's stored size, balanced labels."""
  from cktf_jax.data import Dataset

  name = cfg.dataset.name
  stored = DATASET_SHAPES.get(name, {}).get("stored_size", cfg.dataset.image_size)
  k = cfg.dataset.num_classes
  n = -(-n_data // k) * k
  images, labels = ref_lib.make_data(n, stored, k, seed)
  return Dataset(images, labels, name, k, "train", "throughput.py synthetic").validate()


def filled_variables(jax, model, image_shape, seed):
  """Variables of ``model`` (shapes from ``jax.eval_shape`` of its init) filled
  on the host: kernels N(0, 2 / fan_in), 1-D 'scale' 1 and other 1-D params 0,
  BatchNorm running 'var' 1 and 'mean' 0."""
  import jax.numpy as jnp
  import numpy as np

  x = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x))
  rng = np.random.default_rng(seed)

  def one(path, leaf):
    name = str(getattr(path[-1], "key", path[-1]))
    collection = str(getattr(path[0], "key", path[0]))
    shape, dtype = tuple(leaf.shape), leaf.dtype
    if collection != "params":
      return np.ones(shape, dtype) if name == "var" else np.zeros(shape, dtype)
    if len(shape) >= 2:
      fan_in = max(1, int(np.prod(shape[:-1])))
      return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(dtype)
    return np.ones(shape, dtype) if name == "scale" else np.zeros(shape, dtype)

  return jax.tree_util.tree_map_with_path(one, shapes)


# ------------------------------------------------------------------ measurement helpers


def cost_of(compiled):
  """``{'flops', 'bytes_accessed'}`` from ``cost_analysis`` (a dict, or a list
  of dicts on some jax versions), NaN when unavailable."""
  out = {"flops": float("nan"), "bytes_accessed": float("nan")}
  try:
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
      ca = ca[0] if ca else {}
    ca = ca or {}
    out["flops"] = float(ca.get("flops", float("nan")))
    out["bytes_accessed"] = float(ca.get("bytes accessed", float("nan")))
  except Exception as e:  # pragma: no cover - backend dependent
    out["cost_error"] = repr(e)
  return out


def memory_analysis_of(compiled):
  try:
    ma = compiled.memory_analysis()
    return {k: int(getattr(ma, f"{k}_size_in_bytes")) for k in
            ("argument", "output", "temp", "alias", "generated_code")}
  except Exception as e:  # pragma: no cover
    return {"error": repr(e)}


def peak_memory(jax):
  peaks = []
  for d in jax.local_devices():
    try:
      s = d.memory_stats()
    except Exception:  # pragma: no cover
      s = None
    if s and "peak_bytes_in_use" in s:
      peaks.append(int(s["peak_bytes_in_use"]))
  return max(peaks) if peaks else None


def is_oom(e):
  msg = f"{type(e).__name__}: {e}"
  return ("RESOURCE_EXHAUSTED" in msg or "out of memory" in msg.lower()
          or "Out of memory" in msg or isinstance(e, MemoryError))


def cpu_peak_estimate():
  """(FLOP/s, how): usable cores x clock x f32 FLOP/cycle (2 FMA pipes: 32 with
  AVX2+FMA, 64 with AVX-512), from /proc/cpuinfo."""
  mhz, flags_line = None, ""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("cpu MHz") and mhz is None:
          mhz = float(line.split(":", 1)[1])
        elif line.startswith("flags") and not flags_line:
          flags_line = line
  except OSError:
    pass
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  per_cycle = 64 if " avx512f" in flags_line else 32 if " fma" in flags_line else 8
  mhz = mhz or 2000.0
  return cores * mhz * 1e6 * per_cycle, (f"estimated: {cores} cores x {mhz:.0f} MHz x "
                                         f"{per_cycle} f32 FLOP/cycle")


def cpu_bandwidth_estimate():
  """(bytes/s, how): best of 5 numpy copies of 256 MiB (read + write counted)."""
  import numpy as np

  a = np.ones(32 * 2**20, np.float64)
  b = np.empty_like(a)
  best = float("inf")
  for _ in range(5):
    t0 = time.perf_counter()
    np.copyto(b, a)
    best = min(best, time.perf_counter() - t0)
  return 2 * a.nbytes / best, "estimated: best of 5 numpy copies of 256 MiB, under the current load"


def device_peaks(jax):
  """Peak FLOP/s and bandwidth for the floor. The models compute in float32 in
  every case (a case's dtype sets only the CRD/CKTF bank dtype), so the floor
  uses the float32-dot peak: TF32 tensor cores on the GPUs of ``PEAKS``
  (XLA's DEFAULT precision may use them), the CPU estimate on a CPU."""
  d = jax.devices()[0]
  kind = d.device_kind.lower()
  out = {"device_kind": d.device_kind, "platform": d.platform}
  table = next((p for key, p in PEAKS if key in kind), None)
  if FLAGS.peak_flops:
    out.update(flops=FLAGS.peak_flops, flops_source="--peak_flops")
  elif table:
    out.update(flops=table["float32"], flops_source=f"table: {d.device_kind} TF32 dense")
  elif d.platform == "cpu":
    out["flops"], out["flops_source"] = cpu_peak_estimate()
  else:
    out.update(flops=None, flops_source=f"unknown device kind {d.device_kind!r}: pass --peak_flops")
  if table:
    out.update(flops_bfloat16=table["bfloat16"], flops_float32_simt=table["float32_simt"])
  if FLAGS.peak_bw:
    out.update(bw=FLAGS.peak_bw, bw_source="--peak_bw")
  elif table:
    out.update(bw=table["bw"], bw_source=f"table: {d.device_kind} HBM")
  elif d.platform == "cpu":
    out["bw"], out["bw_source"] = cpu_bandwidth_estimate()
  else:
    out.update(bw=None, bw_source=f"unknown device kind {d.device_kind!r}: pass --peak_bw")
  return out


def floor_of(flops, nbytes, peaks, measured_s):
  out = {}
  if peaks.get("flops") and math.isfinite(flops):
    out["compute_floor_s"] = flops / peaks["flops"]
  if peaks.get("bw") and math.isfinite(nbytes):
    out["memory_floor_s"] = nbytes / peaks["bw"]
  if out:
    out["floor_s"] = max(out.values())
    if measured_s:
      out["pct_of_floor"] = 100.0 * out["floor_s"] / measured_s
  return out


def time_calls(jax, fn, n, warmup=1):
  """Per-call seconds of ``fn()``, blocking on its result after every call."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(n):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return times


def aot(fn, *args):
  """``(compiled, lower+compile seconds)``."""
  t0 = time.perf_counter()
  compiled = fn.lower(*args).compile()
  return compiled, time.perf_counter() - t0


def find_key(tree, key):
  """The first value under dict key ``key`` (depth first), or None."""
  if isinstance(tree, dict):
    if key in tree:
      return tree[key]
    for v in tree.values():
      found = find_key(v, key)
      if found is not None:
        return found
  return None


def banks_of(tree):
  """Every memory bank (a dict with 'memory_v1') under ``tree``, as {path: bank}."""
  out = {}

  def walk(t, path):
    if isinstance(t, dict):
      if "memory_v1" in t:
        out[path or "bank"] = t
        return
      for k, v in t.items():
        walk(v, f"{path}/{k}" if path else k)

  walk(tree, "")
  return out


# ------------------------------------------------------------------ one case


def run_case(case, base_config, peaks, results_dir_profile):
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P

  from cktf_jax import models, xla_options
  from cktf_jax.data import augment, pipeline
  from cktf_jax.train import loop, step as step_lib

  out = dict(case, case=case_name(case), status="ok", loadavg_start=list(os.getloadavg()))
  t_setup = time.perf_counter()
  shapes = DATASET_SHAPES.get(case["dataset"], {})
  n_data = FLAGS.n_data or (TINY["n_data"] if FLAGS.tiny else shapes.get("n_data", 50000))
  cfg, method_name = case_config(base_config, case, n_data)
  out["config_overrides"] = {"mode": cfg.mode,
                             "method.name": None if method_name == "vanilla" else cfg.method.name,
                             "weights.alpha": cfg.weights.alpha, "method.nce_k": cfg.method.nce_k,
                             "method.bank_dtype": cfg.method.bank_dtype,
                             "dataset.name": cfg.dataset.name,
                             "dataset.num_classes": cfg.dataset.num_classes}
  mesh = pipeline.data_mesh()
  replicated = NamedSharding(mesh, P())
  train_set = synthetic_split(cfg, n_data, cfg.seed)
  out.update(n_data=len(train_set), num_classes=cfg.dataset.num_classes,
             nce_k=cfg.method.nce_k if method_name in CONTRAST_METHODS else None,
             devices=mesh.size)
  num_classes = cfg.dataset.num_classes
  student = models.create_model(cfg.student.model, num_classes)
  teacher = teacher_variables = method = method2 = None
  weights = step_lib.LossWeights(1.0, 0.0, 0.0, float(cfg.method.kd_T))
  loader = pipeline.DeviceLoader(train_set, augment.transform_for(cfg.dataset.name, train=True),
                                 mesh, cfg.train.batch_size, shuffle=True, seed=cfg.seed)

  def batches():
    epoch = 0
    while True:
      for b in loader.epoch(epoch):
        yield b
      epoch += 1

  stream = batches()
  t0 = time.perf_counter()
  first = next(stream)
  jax.block_until_ready(first)
  out["batch_fn_first_call_s"] = time.perf_counter() - t0
  image_shape = tuple(first["image"].shape[1:])
  out["image_shape"] = list(image_shape)
  if method_name == "vanilla":
    out["teacher"] = None
    model_name = cfg.student.model
  else:
    model_name = cfg.student.model
    teacher = models.create_model(cfg.teacher.model, num_classes)
    if FLAGS.init == "fill":
      teacher_variables = filled_variables(jax, teacher, image_shape, cfg.seed + 7)
    else:
      x1 = jnp.zeros((1,) + image_shape, jnp.float32)
      teacher_variables = jax.jit(lambda r: teacher.init(r, x1))(jax.random.PRNGKey(cfg.seed + 7))
    teacher_variables = jax.device_put(teacher_variables, replicated)
    method, weights = loop.create_method(cfg, train_set, mesh)
    method2 = loop.create_method2(cfg, train_set, mesh)
  out["weights"] = {"gamma": weights.gamma, "alpha": weights.alpha, "beta": weights.beta,
                    "kd2": weights.kd2}
  state_options = {}
  if (FLAGS.init == "fill"
      and "student_variables" in inspect.signature(loop.create_state).parameters):
    state_options["student_variables"] = filled_variables(jax, student, image_shape, cfg.seed)
  out["init"] = {"teacher": FLAGS.init if teacher is not None else None,
                 "student": "fill" if state_options else "model"}
  state, tx = loop.create_state(cfg, model_name, student, teacher, teacher_variables, method,
                                image_shape, loader.steps_per_epoch, method2, **state_options)
  state = loop.place_state(state, mesh)
  shardings = jax.tree_util.tree_map(lambda x: x.sharding, state)
  step_options = {}
  if "skip_nonfinite" in inspect.signature(step_lib.make_train_step).parameters:
    step_options["skip_nonfinite"] = bool(cfg.train.skip_nonfinite)
  step_fn = step_lib.make_train_step(student, tx, weights, teacher, method, method2=method2,
                                     **step_options)
  step_jit = xla_options.jit(step_fn, donate_argnums=(0,), out_shardings=(shardings, replicated))
  out["setup_s"] = time.perf_counter() - t_setup

  t0 = time.perf_counter()
  lowered = step_jit.lower(state, first, teacher_variables)
  out["lower_s"] = time.perf_counter() - t0
  compiled = lowered.compile()
  out["compile_s"] = time.perf_counter() - t0  # lower + compile
  step_cost = cost_of(compiled)
  out["memory_analysis"] = memory_analysis_of(compiled)
  # The batch function's own cost (lowered abstractly: no second device copy).
  batch_fn = pipeline.device_batch_fn(augment.transform_for(cfg.dataset.name, train=True), mesh)
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=replicated)  # noqa: E731
  b = cfg.train.batch_size
  bcomp = batch_fn.lower(spec(train_set.images.shape, jnp.uint8),
                         spec(train_set.labels.shape, jnp.int32), spec((1, b), jnp.int32),
                         spec((1, b), jnp.bool_), 0, jax.random.key(0), 0).compile()
  batch_cost = cost_of(bcomp)
  out["flops_step"], out["flops_batch_fn"] = step_cost["flops"], batch_cost["flops"]
  out["flops"] = step_cost["flops"] + batch_cost["flops"]
  out["bytes_accessed"] = step_cost["bytes_accessed"] + batch_cost["bytes_accessed"]

  # Warm-up, then timed steps.
  metrics = None
  for _ in range(FLAGS.warmup):
    state, metrics = compiled(state, next(stream), teacher_variables)
  jax.block_until_ready((state, metrics))
  k = max(1, FLAGS.sync_every)
  times = []
  for _ in range(max(1, FLAGS.steps // k)):
    t0 = time.perf_counter()
    for _ in range(k):
      state, metrics = compiled(state, next(stream), teacher_variables)
    jax.block_until_ready((state, metrics))
    times.append((time.perf_counter() - t0) / k)
  loss = float(jax.device_get(metrics["loss"]))
  out["loss_finite"] = math.isfinite(loss)
  out["step"] = stats(times)
  out["sync_every"] = k
  out["images_per_s"] = b / out["step"]["median_s"]
  out["peak_bytes_in_use"] = peak_memory(jax)
  out["floor"] = floor_of(out["flops"], out["bytes_accessed"], peaks, out["step"]["median_s"])
  print(f"{out['case']}: compile {out['compile_s']:.1f} s, step {fmt_ms(out['step'])} ms, "
        f"{out['images_per_s']:.1f} img/s, {out['flops'] / 1e9:.2f} GFLOP, "
        f"floor {out['floor'].get('pct_of_floor', float('nan')):.1f}%", file=sys.stderr, flush=True)

  spc = int(cfg.train.steps_per_call)
  if spc > 1:
    out["multi_step"], state = time_multi_step(step_lib, loader, step_fn, spc, state,
                                               teacher_variables, shardings, replicated, b)
    print(f"{out['case']}: {spc} steps per call: compile {out['multi_step']['compile_s']:.1f} s, "
          f"step {fmt_ms(out['multi_step']['step'])} ms, "
          f"{out['multi_step']['images_per_s']:.1f} img/s", file=sys.stderr, flush=True)

  if results_dir_profile:
    trace_dir = os.path.join(results_dir_profile, re.sub(r"[^A-Za-z0-9_.+-]", "_", out["case"]))
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    try:
      for _ in range(FLAGS.profile_steps):
        state, metrics = compiled(state, next(stream), teacher_variables)
      jax.block_until_ready((state, metrics))
    finally:
      jax.profiler.stop_trace()
    out["profile"] = sorted(os.path.relpath(os.path.join(d, f), trace_dir)
                            for d, _, fs in os.walk(trace_dir) for f in fs)
    out["profile_dir"] = trace_dir

  if FLAGS.parts:
    out["parts"] = time_parts(cfg, out, state, teacher_variables, stream, student, teacher,
                              method, method2, weights, tx, train_set, mesh, peaks)
  del state, compiled, metrics
  out["loadavg_end"] = list(os.getloadavg())
  return out


def time_multi_step(step_lib, loader, step_fn, steps_per_call, state, teacher_variables,
                    shardings, replicated, batch_size):
  """``config.train.steps_per_call`` steps per host call (``make_multi_step``,
  the batches made on device inside one ``lax.scan``), as the train loop runs
  them: per-step time = call time / steps_per_call. Returns (entry, state)."""
  import jax
  from cktf_jax import xla_options
  multi = xla_options.jit(step_lib.make_multi_step(step_fn, loader.batch_at, steps_per_call),
                          donate_argnums=(0,), out_shardings=(shardings, replicated))
  data = loader.step_data(0)
  firsts = list(range(0, loader.steps_per_epoch - steps_per_call + 1, steps_per_call)) or [0]
  compiled, compile_s = aot(multi, state, teacher_variables, data, 0, 0)
  holder = {"state": state, "metrics": None, "calls": 0}

  def call():
    first = firsts[holder["calls"] % len(firsts)]
    holder["state"], holder["metrics"] = compiled(holder["state"], teacher_variables, data,
                                                  first, 0)
    holder["calls"] += 1
    return holder["state"], holder["metrics"]

  calls = max(1, FLAGS.steps // steps_per_call)
  times = [t / steps_per_call for t in time_calls(jax, call, calls,
                                                  warmup=max(1, FLAGS.warmup // steps_per_call))]
  state, metrics = holder["state"], holder["metrics"]
  entry = {"steps_per_call": steps_per_call, "calls": calls, "compile_s": compile_s,
           "step": stats(times), "images_per_s": batch_size / stats(times)["median_s"],
           "loss_finite": all(math.isfinite(float(x)) for x in jax.device_get(metrics["loss"]))}
  return entry, state


def time_parts(cfg, out, state, teacher_variables, stream, student, teacher, method, method2,
               weights, tx, train_set, mesh, peaks):
  """Each part of the step jitted and timed alone; see the module docstring."""
  import jax
  import jax.numpy as jnp
  import optax

  from cktf_jax import xla_options
  from cktf_jax.data import augment, pipeline
  from cktf_jax.losses.kd import distill_kl
  from cktf_jax.methods.crd import ContrastSetup
  from cktf_jax.train import loop, step as step_lib

  n = FLAGS.part_steps or FLAGS.steps
  parts = {}
  copy_tree = jax.jit(lambda t: jax.tree_util.tree_map(jnp.copy, t))

  def record(name, times, compiled=None, compile_s=None):
    entry = stats(times)
    if compiled is not None:
      entry.update(cost_of(compiled))
      entry["compile_s"] = compile_s
      entry["floor"] = floor_of(entry["flops"], entry["bytes_accessed"], peaks, entry["median_s"])
    entry["share_of_step"] = entry["median_s"] / out["step"]["median_s"]
    parts[name] = entry
    print(f"  {name:15s} {fmt_ms(entry)} ms", file=sys.stderr, flush=True)

  record("augment", time_calls(jax, lambda: next(stream), n))
  batch = next(stream)
  # The same gather + augmentation called directly on a one-step table: the
  # loader's host work per batch (the step scalar's transfer, the Python loop) left out.
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  split = jax.device_put((train_set.images, train_set.labels), rep)
  batch_fn = pipeline.device_batch_fn(augment.transform_for(cfg.dataset.name, train=True), mesh)
  table = jax.device_put((batch["index"][None], batch["mask"][None]), rep)
  kernel_args = (*split, *table, 0, jax.random.key(cfg.seed), 0)
  c, cs = aot(batch_fn, *kernel_args)
  record("augment_kernel", time_calls(jax, lambda: c(*kernel_args), n), c, cs)
  del split, kernel_args
  images, labels, mask = batch["image"], batch["label"], batch["mask"]
  student_vars = {"params": state.params["student"], "batch_stats": state.batch_stats}
  feats_s = xla_options.jit(lambda v, x: student.apply(v, x, train=False))(student_vars, images)

  if teacher is not None:
    fwd = xla_options.jit(lambda v, x: teacher.apply(v, x, train=False))
    c, cs = aot(fwd, teacher_variables, images)
    record("teacher_fwd", time_calls(jax, lambda: c(teacher_variables, images), n), c, cs)
    feats_t = c(teacher_variables, images)

  def student_fwdbwd(params, batch_stats, images, labels, mask):
    def f(p):
      feats, new = student.apply({"params": p, "batch_stats": batch_stats}, images, train=True,
                                 mask=mask, mutable=["batch_stats"])
      return step_lib.cross_entropy(feats.logits, labels, mask), new["batch_stats"]
    return jax.grad(f, has_aux=True)(params)

  sfb = xla_options.jit(student_fwdbwd)
  args = (state.params["student"], state.batch_stats, images, labels, mask)
  c, cs = aot(sfb, *args)
  record("student_fwdbwd", time_calls(jax, lambda: c(*args), n), c, cs)

  # Negative sampling and the memory banks (CRD / CKTF, first or second method).
  methods = [(m, k) for m, k in zip((method, method2), step_lib.method_keys(method2))
             if m is not None]
  contrast_idx = None
  sampler_state = find_key(state.aux_state, "crd_sampler")
  contrast_cfg = next((c for c, (m, _) in zip((cfg.method, cfg.method2), methods)
                       if m.name in CONTRAST_METHODS), None)
  if sampler_state is not None and contrast_cfg is not None:
    hparams = dict(contrast_cfg.to_dict(), **loop.method_context(cfg, train_set, mesh))
    setup = ContrastSetup.from_hparams(hparams)
    sample = xla_options.jit(lambda st, idx: setup.contrast_indices(st, {"index": idx}, True))
    c, cs = aot(sample, sampler_state, batch["index"])
    st_holder = [sampler_state]

    def draw():
      cidx, st_holder[0] = c(st_holder[0], batch["index"])
      return cidx

    record("sampling", time_calls(jax, draw, n), c, cs)
    contrast_idx = draw()
    banks = banks_of(find_key(state.aux_state, "contrast") or {})
    if banks:
      memory = setup.memory
      b = images.shape[0]
      v = jax.random.normal(jax.random.PRNGKey(3), (2, b, memory.feat_dim), jnp.float32)
      v = v / jnp.linalg.norm(v, axis=-1, keepdims=True)

      def score_update(banks, v1, v2, index, cidx):
        new, outs = {}, []
        for name, bank in banks.items():
          o1, o2, new[name] = memory(bank, v1, v2, index, cidx)
          outs.append((o1, o2))
        return new, outs

      mem_jit = xla_options.jit(score_update, donate_argnums=(0,))
      holder = [copy_tree(banks)]
      c, cs = aot(mem_jit, holder[0], v[0], v[1], batch["index"], contrast_idx)

      def mem_call():
        holder[0], outs = c(holder[0], v[0], v[1], batch["index"], contrast_idx)
        return outs, holder[0]

      record("memory", time_calls(jax, mem_call, n), c, cs)
      out["memory_banks"] = len(banks)
      del holder

  # Losses: CE + KD + the methods' losses, fwd + bwd into fixed features and aux params.
  loss_batch = dict(batch)
  if contrast_idx is not None:
    loss_batch["contrast_idx"] = contrast_idx

  def total_loss(aux_params, feats_s, aux_state, feats_t, batch):
    """``(loss, new_aux_state)`` as the train step's loss_fn, on fixed features."""
    mask = batch.get("mask")
    loss = weights.gamma * step_lib.cross_entropy(feats_s.logits, batch["label"], mask)
    new_aux = aux_state
    if teacher is not None:
      loss = loss + weights.alpha * distill_kl(feats_s.logits, feats_t.logits, weights.kd_T, mask)
      for (m, key), w in zip(methods, (weights.beta, weights.kd2)):
        value, _, part = m.loss(step_lib.aux_part(aux_params, key),
                                step_lib.aux_part(new_aux, key), feats_s, feats_t, batch, True)
        new_aux = part if key is None else {**new_aux, key: part}
        loss = loss + w * value
    return loss, new_aux

  def losses(aux_params, aux_state, feats_s, feats_t, batch):
    grads, new_aux = jax.grad(total_loss, argnums=(0, 1), has_aux=True)(
        aux_params, feats_s, aux_state, feats_t, batch)
    return new_aux, grads

  def losses_forward(aux_params, aux_state, feats_s, feats_t, batch):
    loss, new_aux = total_loss(aux_params, feats_s, aux_state, feats_t, batch)
    return new_aux, loss

  loss_jit = xla_options.jit(losses, donate_argnums=(1,))
  aux_holder = [copy_tree(state.aux_state)]
  ft = feats_t if teacher is not None else None
  c, cs = aot(loss_jit, state.params["aux"], aux_holder[0], feats_s, ft, loss_batch)

  def loss_call():
    aux_holder[0], grads = c(state.params["aux"], aux_holder[0], feats_s, ft, loss_batch)
    return grads, aux_holder[0]

  record("losses", time_calls(jax, loss_call, n), c, cs)

  fwd_jit = xla_options.jit(losses_forward, donate_argnums=(1,))
  c, cs = aot(fwd_jit, state.params["aux"], aux_holder[0], feats_s, ft, loss_batch)

  def fwd_call():
    aux_holder[0], value = c(state.params["aux"], aux_holder[0], feats_s, ft, loss_batch)
    return value, aux_holder[0]

  record("losses_fwd", time_calls(jax, fwd_call, n), c, cs)
  del aux_holder

  # Optimizer update on gradients of the params' shapes.
  def opt_update(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  grads = jax.tree_util.tree_map(lambda p: jnp.full_like(p, 1e-3), state.params)
  opt_jit = xla_options.jit(opt_update, donate_argnums=(0, 1))
  holder = [copy_tree(state.params), copy_tree(state.opt_state)]
  c, cs = aot(opt_jit, holder[0], holder[1], grads)

  def opt_call():
    holder[0], holder[1] = c(holder[0], holder[1], grads)
    return holder

  record("optimizer", time_calls(jax, opt_call, n), c, cs)
  del holder
  parts_total = sum(parts[p]["median_s"] for p in PARTS if p in parts)
  out["parts_sum_s"] = parts_total
  return parts


# ------------------------------------------------------------------ reference comparison


def run_reference(case, repo):
  method, _ = split_method(case["method"])
  if case["dataset"] != "cifar100" or method not in ref_lib.REFERENCE_WEIGHTS:
    return {"status": "unsupported", "why": "the reference side runs vanilla/kd/crd/crdst "
            "(+kd) on CIFAR-100 data only"}
  # The reference's CIFAR dataset class hard-codes 100 classes: tiny runs use 200 examples.
  n_data = FLAGS.n_data or (200 if FLAGS.tiny else 50000)
  nce_k = FLAGS.nce_k or (TINY["nce_k"] if FLAGS.tiny else FLAGS.config.method.nce_k)
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "ref.json")
    cmd = [FLAGS.reference_python, os.path.join(HERE, "reference_throughput.py"),
           "--reference_repo", repo, "--method", case["method"], "--teacher", case["teacher"],
           "--student", case["student"], "--batch", str(case["batch"]),
           "--steps", str(FLAGS.reference_steps or FLAGS.steps), "--n_data", str(n_data),
           "--nce_k", str(nce_k), "--json", path]
    if FLAGS.reference_threads:
      cmd += ["--threads", str(FLAGS.reference_threads)]
    if not FLAGS.parts:
      cmd.append("--no_parts")
    print("reference:", " ".join(cmd), file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=FLAGS.reference_timeout_s)
    sys.stderr.write(proc.stdout)
    if proc.returncode != 0:
      return {"status": "error", "returncode": proc.returncode, "stderr_tail": proc.stderr[-4000:],
              "command": cmd}
    with open(path) as f:
      result = json.load(f)
    result.update(status="ok", command=cmd)
    return result


# ------------------------------------------------------------------ output


def _ms(seconds):
  return "-" if seconds is None or not math.isfinite(seconds) else f"{seconds * 1e3:.1f}"


def _num(x):
  return "-" if x is None else f"{x:.1f}"


def _bytes(n):
  return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


def _load(avg):
  return "-" if not avg else "/".join(f"{x:.1f}" for x in avg)


def markdown(result):
  m = result["machine"]
  p = result["peaks"]
  lines = [f"### {result['name']}", "",
           f"{result['date']}; {m['backend']} ({m['device_kind']} x {m['devices']}), jax "
           f"{m['jax']}, {m['cpu_model']} ({m['nproc']} cores); load average "
           f"{_load(m['loadavg_start'])} at start, {_load(m.get('loadavg_end'))} at end. "
           f"Step time: median [p10-p90] over {result['settings']['steps']} steps, blocking "
           f"every {result['settings']['sync_every']} step(s). Floor = max(FLOPs / peak, bytes "
           f"/ bandwidth) with {p.get('flops') or 0:.3g} FLOP/s ({p.get('flops_source')}) and "
           f"{p.get('bw') or 0:.3g} B/s ({p.get('bw_source')}); % of floor = floor / measured.",
           "",
           "| case | status | compile s | step ms | img/s | GFLOP/step | GB accessed/step | "
           "floor ms (compute, memory) | % of floor | peak mem |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for c in result["cases"]:
    if c["status"] != "ok":
      lines.append(f"| {c['case']} | {c['status']} | | | | | | | | |")
      continue
    fl = c.get("floor", {})
    lines.append(
        f"| {c['case']} | ok | {c['compile_s']:.1f} | {fmt_ms(c['step'])} | "
        f"{c['images_per_s']:.1f} | {c['flops'] / 1e9:.2f} | {c['bytes_accessed'] / 1e9:.2f} | "
        f"{_ms(fl.get('floor_s'))} ({_ms(fl.get('compute_floor_s'))}, "
        f"{_ms(fl.get('memory_floor_s'))}) | {fl.get('pct_of_floor', float('nan')):.1f}% | "
        f"{_bytes(c.get('peak_bytes_in_use'))} |")
  multi = [c for c in result["cases"] if c["status"] == "ok" and c.get("multi_step")]
  if multi:
    lines += ["", "Several steps per host call (config.train.steps_per_call, the batches made "
              "on device in one lax.scan); a 240-epoch run = 240 x n_data // batch steps at "
              "this step time:", "",
              "| case | steps/call | compile s | step ms | img/s | 240 epochs |",
              "| --- | --- | --- | --- | --- | --- |"]
    for c in multi:
      e = c["multi_step"]
      run_s = 240 * (c["n_data"] // c["batch"]) * e["step"]["median_s"]
      lines.append(f"| {c['case']} | {e['steps_per_call']} | {e['compile_s']:.1f} | "
                   f"{fmt_ms(e['step'])} | {e['images_per_s']:.1f} | {run_s / 60:.1f} min |")
  if result.get("largest_batch"):
    lines += ["", "Largest batch that ran (--batch_sweep " +
              ",".join(str(b) for b in result["settings"]["batch_sweep"]) + "):", "",
              "| case | batch | img/s | step ms | peak mem | stopped by |",
              "| --- | --- | --- | --- | --- | --- |"]
    for key, e in result["largest_batch"].items():
      lines.append(f"| {key} | {e['batch']} | {_num(e.get('images_per_s'))} | "
                   f"{_ms(e.get('step_median_s'))} | {_bytes(e.get('peak_bytes_in_use'))} | "
                   f"{e['stopped_by']} |")
  for c in result["cases"]:
    if c["status"] != "ok" or not c.get("parts"):
      continue
    lines += ["", f"Parts of {c['case']} (each jitted alone, block per call):", "",
              "| part | ms | GFLOP | compile s | share of step |", "| --- | --- | --- | --- | --- |"]
    for name in PARTS + EXTRA_PARTS:
      p = c["parts"].get(name)
      if p is None:
        continue
      gf, cs = p.get("flops"), p.get("compile_s")
      gf = "-" if gf is None or not math.isfinite(gf) else f"{gf / 1e9:.3f}"
      cs = "-" if cs is None else f"{cs:.1f}"
      lines.append(f"| {PART_TITLES[name]} | {fmt_ms(p)} | {gf} | {cs} | "
                   f"{100 * p['share_of_step']:.0f}% |")
    lines.append(f"| sum of parts / full step | {_ms(c['parts_sum_s'])} / "
                 f"{_ms(c['step']['median_s'])} | | | |")
  for c in result["cases"]:
    r = c.get("reference")
    if not r:
      continue
    lines += ["", f"Ours vs the reference, {c['case']}:", ""]
    if r.get("status") != "ok":
      lines.append(f"reference: {r.get('status')}: {r.get('why') or r.get('stderr_tail', '')[-500:]}")
      continue
    rm = r["machine"]
    lines += [f"Reference: torch {rm['torch']}, {rm['torch_threads']} threads, load "
              f"{rm['loadavg_at_start']} -> {rm.get('loadavg_at_end')}; DataLoader workers "
              f"{r['case']['num_workers']}.", "",
              "| part | ours ms | reference ms | reference / ours |", "| --- | --- | --- | --- |"]
    rows = [("full_step", c["step"], r["full_step"])]
    rows += [(name, c.get("parts", {}).get(name), r["parts"].get(name))
             for name in PARTS + EXTRA_PARTS + ("loader_batch",)]
    for name, ours, theirs in rows:
      if not ours and not theirs:
        continue
      ratio = (f"{theirs['median_s'] / ours['median_s']:.1f}x"
               if ours and theirs and ours.get("count") and theirs.get("count") else "-")
      lines.append(f"| {PART_TITLES[name]} | {fmt_ms(ours)} | {fmt_ms(theirs)} | {ratio} |")
  return "\n".join(lines) + "\n"


def write_outputs(result, final):
  path = FLAGS.json_out or os.path.join(FLAGS.results_dir, f"{result['name']}.json")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  result["complete"] = final
  with open(path + ".tmp", "w") as f:
    json.dump(result, f, indent=1, default=str)
  os.replace(path + ".tmp", path)
  text = markdown(result)
  if FLAGS.markdown_out:
    with open(FLAGS.markdown_out, "w") as f:
      f.write(text)
  return path, text


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  import jax

  # No config.validate: a benchmark config has no teacher checkpoint and (with
  # --tiny) a class count of its own; model and method names are checked when
  # each case builds them.
  base = FLAGS.config
  cases = ([] if FLAGS.sweep_matrix and not FLAGS.matrix
           else expand_matrix(FLAGS.matrix, base.dataset.name, base))
  sweep_cases = ([c for e in FLAGS.sweep_matrix for c in expand_matrix([e], base.dataset.name,
                                                                        base)]
                 if FLAGS.sweep_matrix else [])
  if FLAGS.tiny:
    for c in cases + sweep_cases:
      c["batch"] = TINY["batch"] if c["batch"] == 64 else c["batch"]
  sweep = [int(b) for b in FLAGS.batch_sweep] if FLAGS.batch_sweep else []
  if sweep and not sweep_cases:
    sweep_cases, cases = cases, []  # --batch_sweep alone: sweep the matrix
  start = time.time()
  name = FLAGS.name or f"throughput_{jax.default_backend()}_{time.strftime('%Y%m%d_%H%M%S')}"
  d = jax.devices()[0]
  result = {
      "name": name, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "argv": sys.argv[1:],
      "machine": dict(ref_lib.machine_info(), jax=jax.__version__,
                      backend=jax.default_backend(), device_kind=d.device_kind,
                      devices=len(jax.devices()), xla_flags=os.environ.get("XLA_FLAGS", ""),
                      loadavg_start=list(os.getloadavg())),
      "settings": {"steps": FLAGS.steps, "warmup": FLAGS.warmup, "sync_every": FLAGS.sync_every,
                   "parts": FLAGS.parts, "part_steps": FLAGS.part_steps or FLAGS.steps,
                   "tiny": FLAGS.tiny, "n_data": FLAGS.n_data, "nce_k": FLAGS.nce_k,
                   "batch_sweep": sweep,
                   "config": config_flags.get_config_filename(FLAGS["config"])},
      "peaks": device_peaks(jax), "cases": [], "largest_batch": {},
  }
  try:
    import jaxlib
    result["machine"]["jaxlib"] = jaxlib.__version__
  except Exception:  # pragma: no cover
    pass
  result["machine"].pop("loadavg_at_start", None)

  def attempt(c):
    if FLAGS.time_budget_s and time.time() - start > FLAGS.time_budget_s:
      entry = dict(c, case=case_name(c), status="skipped (time budget)")
    else:
      try:
        entry = run_case(c, base, result["peaks"], FLAGS.profile_dir)
      except Exception as e:  # recorded; the matrix goes on
        entry = dict(c, case=case_name(c), status="oom" if is_oom(e) else "error",
                     error=f"{type(e).__name__}: {str(e)[:2000]}",
                     traceback=traceback.format_exc()[-4000:])
        print(f"{case_name(c)}: {entry['status']}: {entry['error'][:300]}", file=sys.stderr,
              flush=True)
    result["cases"].append(entry)
    gc.collect()
    jax.clear_caches()
    write_outputs(result, final=False)
    return entry

  for case in cases:
    attempt(case)
  done = {case_name(c) for c in result["cases"] if c["status"] == "ok"}
  for case in sweep_cases:
    best = None
    for b in sweep:
      c = dict(case, batch=b)
      entry = (next(e for e in result["cases"] if e["case"] == case_name(c))
               if case_name(c) in done else attempt(c))
      if entry["status"] != "ok":
        break  # larger batches of this case would not fit either
      best = entry
    key = case_name(dict(case, batch="*"))
    result["largest_batch"][key] = (
        {"batch": best["batch"], "images_per_s": best["images_per_s"],
         "step_median_s": best["step"]["median_s"],
         "peak_bytes_in_use": best.get("peak_bytes_in_use"),
         "stopped_by": entry["status"] if entry is not best else "end of --batch_sweep"}
        if best else {"batch": None, "stopped_by": entry["status"]})
  if FLAGS.compare_with_reference:
    for c in result["cases"]:
      if c["status"] == "ok":
        c["reference"] = run_reference(c, FLAGS.compare_with_reference)
        write_outputs(result, final=False)
  result["machine"]["loadavg_end"] = list(os.getloadavg())
  result["elapsed_s"] = time.time() - start
  path, text = write_outputs(result, final=True)
  print(text)
  print(f"wrote {path}", file=sys.stderr)
  if not any(c["status"] == "ok" for c in result["cases"]):
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
