"""Benchmark of the contrast part of CRD/CKTF alone: sampling + scoring + update.

One jitted step does what the reference's data loader (negative sampling) and
``ContrastMemory.forward`` do for one batch, for one pair of banks
(``memory_v1``, ``memory_v2``):

1. draw ``contrast_idx`` ``[B, K+1]`` on device (``NegativeSampler.sample``,
   CIFAR-100 semantics: K negatives of the other classes, without
   replacement, exact positives);
2. score ``v1`` against ``memory_v2`` and ``v2`` against ``memory_v1``
   (``'gather'`` or ``'dense'`` path), normalise by Z (fixed on the first step);
3. momentum-update rows ``index`` of both banks.

The banks (and the sampler state) are inputs and donated outputs of the step,
so they stay on device and are updated in place. Each timed step blocks on
its outputs (``jax.block_until_ready``). The inputs (labels, ``v1``, ``v2``,
``index``) come from ``make_inputs``, numpy only, which
``reference_contrast_bench.py`` imports too, so both sides see the same data.

This is a benchmark, not a test. Usage (see benchmarks/README.md)::

    python benchmarks/contrast_bench.py --scoring both --json /tmp/ours.json
    python benchmarks/contrast_bench.py --n 1000000 --devices 8 --scoring auto

``--devices N`` sets ``XLA_FLAGS=--xla_force_host_platform_device_count=N``
before jax is imported (N simulated CPU devices; they share the same cores).
``--sampling fixed`` passes a host-drawn ``contrast_idx`` into the step
instead (scoring + update only), for the n = 1,000,000 scaling runs where the
on-device sampler, replicated on every simulated device, would dominate.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

NUM_CLASSES = 100  # CIFAR-100


def make_inputs(n, batch, dim, steps, num_classes=NUM_CLASSES, seed=0):
  """Host inputs shared by both benchmarks (numpy only, deterministic).

  Returns a dict: ``labels`` ``[n]`` int64 (``num_classes`` balanced classes
  in shuffled order, like CIFAR-100's 500 per class at n=50000); per step
  ``index`` ``[steps, batch]`` int64 (distinct dataset indices), ``v1``,
  ``v2`` ``[steps, batch, dim]`` float32 unit vectors (the embeddings).
  """
  rng = np.random.default_rng(seed)
  per_class = -(-int(n) // num_classes)
  labels = rng.permutation(np.repeat(np.arange(num_classes), per_class)[:n]).astype(np.int64)
  index = np.stack([rng.choice(n, batch, replace=False) for _ in range(steps)]).astype(np.int64)

  def unit(shape):
    x = rng.standard_normal(shape).astype(np.float32)
    return x / np.sqrt(np.sum(x * x, axis=-1, keepdims=True))

  return {"labels": labels, "index": index, "v1": unit((steps, batch, dim)),
          "v2": unit((steps, batch, dim))}


def host_contrast_idx(inputs, k, seed=0):
  """``--sampling fixed``: per input batch a ``[B, K+1]`` int32 ``contrast_idx``
  drawn on the host, cheaply (exact positive, K negatives of the other
  classes uniformly WITH replacement). Only its shape and spread matter to the
  scoring + update timing, not the exact law of the reference's draw."""
  rng = np.random.default_rng(seed)
  labels = inputs["labels"]
  order = np.argsort(labels, kind="stable")
  _, start, count = np.unique(labels[order], return_index=True, return_counts=True)
  out = []
  for index in inputs["index"]:
    c = labels[index]
    pos = (rng.random((index.shape[0], k)) * (labels.shape[0] - count[c])[:, None]).astype(np.int64)
    pos = np.where(pos < start[c][:, None], pos, pos + count[c][:, None])
    out.append(np.concatenate([index[:, None], order[pos]], axis=1).astype(np.int32))
  return out


def summarize(times):
  """Median and spread (seconds) of a list of per-step times."""
  t = np.asarray(times, np.float64)
  return {"median_s": float(np.median(t)), "min_s": float(t.min()), "max_s": float(t.max()),
          "p25_s": float(np.percentile(t, 25)), "p75_s": float(np.percentile(t, 75)),
          "mean_s": float(t.mean()), "count": int(t.size)}


def repeat_medians(times, steps):
  """Median per repeat (blocks of ``steps`` consecutive steps)."""
  return [float(statistics.median(times[i:i + steps])) for i in range(0, len(times), steps)]


def cpu_model():
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def machine_info():
  load = os.getloadavg() if hasattr(os, "getloadavg") else None
  return {"nproc": os.cpu_count(), "cpu_model": cpu_model(), "python": platform.python_version(),
          "numpy": np.__version__, "platform": platform.platform(),
          "loadavg_at_start": list(load) if load else None}


def write_json(path, result, indent=2) -> None:
  """``result`` as JSON at ``path`` (nothing when ``path`` is empty)."""
  if path:
    with open(path, "w") as f:
      json.dump(result, f, indent=indent)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--n", type=int, default=50000, help="dataset size = memory rows (50000: CIFAR-100)")
  p.add_argument("--k", type=int, default=16384, help="negatives per example (nce_k)")
  p.add_argument("--batch", type=int, default=64, help="batch size B")
  p.add_argument("--dim", type=int, default=128, help="embedding size d (feat_dim)")
  p.add_argument("--scoring", choices=("gather", "dense", "both", "auto"), default="both",
                 help="scoring path(s) to time; 'auto' = the cost model's choice")
  p.add_argument("--devices", type=int, default=None,
                 help="simulated host devices (sets XLA_FLAGS before jax is imported); "
                      "the banks are row-sharded over all devices")
  p.add_argument("--steps", type=int, default=10, help="timed steps per repeat")
  p.add_argument("--repeats", type=int, default=3, help="repeats (blocks of --steps timed steps)")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
  p.add_argument("--bank-dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--sampling", choices=("device", "fixed"), default="device",
                 help="'device' (default): negatives drawn inside the timed step; 'fixed': "
                      "contrast_idx drawn once per input batch before timing and passed in, "
                      "so the step is scoring + update only")
  p.add_argument("--no-breakdown", action="store_true",
                 help="skip the extra timing of the sampling step alone")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", default=None, metavar="OUT", help="write the results as JSON to OUT")
  return p.parse_args(argv)


def _set_device_count(n):
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  flags.append(f"--xla_force_host_platform_device_count={int(n)}")
  os.environ["XLA_FLAGS"] = " ".join(flags)


def _cost(compiled):
  """(bytes accessed, flops, temp bytes) from XLA's cost/memory analysis."""
  out = {}
  try:
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
      ca = ca[0] if ca else {}
    out["xla_bytes_accessed"] = float(ca.get("bytes accessed", float("nan")))
    out["xla_flops"] = float(ca.get("flops", float("nan")))
  except Exception as e:  # pragma: no cover - depends on the backend
    out["xla_cost_error"] = repr(e)
  try:
    ma = compiled.memory_analysis()
    out["xla_temp_bytes"] = int(ma.temp_size_in_bytes)
    out["xla_argument_bytes"] = int(ma.argument_size_in_bytes)
    out["xla_output_bytes"] = int(ma.output_size_in_bytes)
    out["xla_alias_bytes"] = int(ma.alias_size_in_bytes)
  except Exception as e:  # pragma: no cover
    out["xla_memory_error"] = repr(e)
  return out


def main(argv=None):
  args = parse_args(argv)
  if args.devices is not None:
    _set_device_count(args.devices)

  import jax  # noqa: E402  (after XLA_FLAGS)
  import jax.numpy as jnp

  sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
  from cktf_jax.contrast.memory import ContrastMemory, default_mesh
  from cktf_jax.contrast.sampling import build_sampler, next_prime

  n, k, b, d = args.n, args.k, args.batch, args.dim
  n_inputs = args.steps  # distinct batches, cycled through
  inputs = make_inputs(n, b, d, n_inputs, seed=args.seed)
  mesh = default_mesh("data")
  sampler = build_sampler(n_data=n, nce_k=k, labels=inputs["labels"], dataset="cifar100")
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  idx_dev = [jax.device_put(jnp.asarray(inputs["index"][i], jnp.int32), rep) for i in range(n_inputs)]
  v1_dev = [jax.device_put(jnp.asarray(inputs["v1"][i]), rep) for i in range(n_inputs)]
  v2_dev = [jax.device_put(jnp.asarray(inputs["v2"][i]), rep) for i in range(n_inputs)]

  probe = ContrastMemory(n, d, mesh=mesh, dtype=args.bank_dtype)
  auto_path = probe.resolve_scoring(b, k + 1)
  if args.scoring == "both":
    paths = ["gather", "dense"]
  elif args.scoring == "auto":
    paths = [auto_path]
  else:
    paths = [args.scoring]

  result = {
      "side": "cktf_jax", "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
      "argv": sys.argv[1:] if argv is None else list(argv),
      "config": {"n": n, "k": k, "batch": b, "dim": d, "steps": args.steps,
                 "repeats": args.repeats, "warmup": args.warmup, "bank_dtype": args.bank_dtype,
                 "sampling": args.sampling,
                 "walk_prime_p": next_prime(n)},
      "machine": dict(machine_info(), jax=jax.__version__, backend=jax.default_backend(),
                      devices=len(jax.devices()), xla_flags=os.environ.get("XLA_FLAGS", "")),
      "auto_path": auto_path, "paths": {},
  }

  # Sampling alone (for the breakdown): the same sampler and state handling.
  if not args.no_breakdown:
    sample_only = jax.jit(sampler.sample, donate_argnums=0)
    state = jax.device_put(sampler.init_state(jax.random.PRNGKey(args.seed + 1)), rep)
    compiled = sample_only.lower(state, idx_dev[0]).compile()
    for i in range(args.warmup):
      cidx, state = compiled(state, idx_dev[i % n_inputs])
      jax.block_until_ready(cidx)
    times = []
    for r in range(args.repeats):
      for i in range(args.steps):
        t0 = time.perf_counter()
        cidx, state = compiled(state, idx_dev[i % n_inputs])
        jax.block_until_ready(cidx)
        times.append(time.perf_counter() - t0)
    result["sampling_only"] = dict(summarize(times), **_cost(compiled))
    del cidx
    print(f"sampling only: median {np.median(times) * 1e3:.1f} ms", flush=True)

  for path in paths:
    memory = ContrastMemory(n, d, nce_t=0.07, nce_m=0.5, mesh=mesh, dtype=args.bank_dtype,
                            scoring=path)

    def step(bank, state, fixed_cidx, v1, v2, index, memory=memory, path=path):
      if args.sampling == "fixed":
        contrast_idx = fixed_cidx  # pre-drawn [B, K+1]; the sampler state is passed through
      else:
        contrast_idx, state = sampler.sample(state, index)
      out_v1, out_v2, bank = memory(bank, v1, v2, index, contrast_idx, path=path)
      return bank, state, out_v1, out_v2

    step_jit = jax.jit(step, donate_argnums=(0, 1))
    bank = memory.init(jax.random.PRNGKey(args.seed))
    state = jax.device_put(sampler.init_state(jax.random.PRNGKey(args.seed + 1)), rep)
    jax.block_until_ready(bank)
    shard_bytes = sorted({int(s.data.nbytes) for s in bank["memory_v1"].addressable_shards})
    per_device = {}
    for name in ("memory_v1", "memory_v2"):
      for s in bank[name].addressable_shards:
        per_device[str(s.device)] = per_device.get(str(s.device), 0) + int(s.data.nbytes)

    if args.sampling == "fixed":
      fourth = [jax.device_put(jnp.asarray(c), rep)
                for c in host_contrast_idx(inputs, k, seed=args.seed + 2)]
    else:
      fourth = [None] * n_inputs
    t0 = time.perf_counter()
    compiled = step_jit.lower(bank, state, fourth[0], v1_dev[0], v2_dev[0], idx_dev[0]).compile()
    compile_s = time.perf_counter() - t0
    for i in range(args.warmup):
      j = i % n_inputs
      bank, state, o1, o2 = compiled(bank, state, fourth[j], v1_dev[j], v2_dev[j], idx_dev[j])
      jax.block_until_ready((bank, o1, o2))
    times = []
    for r in range(args.repeats):
      for i in range(args.steps):
        t0 = time.perf_counter()
        bank, state, o1, o2 = compiled(bank, state, fourth[i], v1_dev[i], v2_dev[i], idx_dev[i])
        jax.block_until_ready((bank, o1, o2))
        times.append(time.perf_counter() - t0)
    finite = bool(np.isfinite(np.asarray(o1)).all() and np.isfinite(np.asarray(o2)).all())

    itemsize = jnp.dtype(memory.dtype).itemsize
    ns = memory.rows_per_shard
    model_rows = b * (k + 1) if path == "gather" else ns
    entry = dict(summarize(times), repeat_medians_s=repeat_medians(times, args.steps),
                 compile_s=compile_s, outputs_finite=finite,
                 num_devices=memory.num_shards, rows_per_shard=ns,
                 bank_bytes_per_shard=shard_bytes, bank_bytes_per_device=per_device,
                 bank_bytes_per_device_max=max(per_device.values()),
                 # shared/DESIGN.md cost model: scoring reads per device, both banks.
                 cost_model_scoring_read_bytes_per_device=2 * model_rows * d * itemsize,
                 **_cost(compiled))
    result["paths"][path] = entry
    print(f"{path}: median {entry['median_s'] * 1e3:.1f} ms  "
          f"[{entry['min_s'] * 1e3:.1f}, {entry['max_s'] * 1e3:.1f}] over {len(times)} steps; "
          f"repeat medians {[round(x * 1e3, 1) for x in entry['repeat_medians_s']]} ms; "
          f"devices {memory.num_shards}, bank bytes/device {entry['bank_bytes_per_device_max']}; "
          f"cost-model scoring read {entry['cost_model_scoring_read_bytes_per_device'] / 2**20:.1f} MiB; "
          f"XLA bytes accessed {entry.get('xla_bytes_accessed', float('nan')) / 2**20:.1f} MiB; "
          f"compile {compile_s:.1f} s", flush=True)
    del bank, o1, o2, compiled, fourth

  result["machine"]["loadavg_at_end"] = list(os.getloadavg())
  write_json(args.json, result)
  return result


if __name__ == "__main__":
  main()
