"""The XLA ops that took the most time in a jax.profiler trace, from the shell.

Reads the ``perfetto_trace.json.gz`` that ``throughput.py --profile_dir`` (or
``launch.py --config.profile.*``) writes, sums the duration of every complete
event by name, and prints the top ones, the runtime's own wrappers
(``ThunkExecutor``, Python ``$...`` frames) left out, plus the totals per op
kind (the name without its ``.N`` suffix: ``ynn_fusion``, ``wrapped_reduce-window``,
...). Match a name to its HLO with ``XLA_FLAGS=--xla_dump_to=DIR
--xla_dump_hlo_as_text`` and ``grep '%NAME = ' DIR/*after_optimizations.txt``.
This is a benchmark helper, not a test::

    python benchmarks/throughput.py --matrix=crdst:resnet32x4:resnet8x4:64 --noparts \\
        --steps 2 --profile_dir /tmp/trace --profile_steps 1
    python benchmarks/trace_top.py /tmp/trace --top 20
"""

import argparse
import collections
import glob
import gzip
import json
import os
import sys

RUNTIME_PREFIXES = ("ThunkExecutor", "$", "SlinkyThreadPool")


def op_times(path):
  """``(total_us, count)`` Counters by event name of one trace file."""
  with gzip.open(path) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  total, count = collections.Counter(), collections.Counter()
  for e in events:
    if e.get("ph") == "X" and not e["name"].startswith(RUNTIME_PREFIXES):
      total[e["name"]] += e.get("dur", 0)
      count[e["name"]] += 1
  return total, count


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("trace", help="a perfetto_trace.json.gz, or a folder searched for them")
  p.add_argument("--top", type=int, default=25)
  args = p.parse_args(argv)
  paths = ([args.trace] if os.path.isfile(args.trace) else
           sorted(glob.glob(os.path.join(args.trace, "**", "perfetto_trace.json.gz"),
                            recursive=True)))
  if not paths:
    sys.exit(f"error: no perfetto_trace.json.gz under {args.trace}")
  for path in paths:
    total, count = op_times(path)
    kinds = collections.Counter()
    for name, us in total.items():
      kinds[name.rsplit(".", 1)[0]] += us
    print(f"{path}: {sum(total.values()) / 1e3:.1f} ms in {sum(count.values())} op events")
    print("by kind: " + ", ".join(f"{k} {us / 1e3:.0f} ms" for k, us in kinds.most_common(8)))
    for name, us in total.most_common(args.top):
      print(f"  {us / 1e3:9.1f} ms  x{count[name]:<4d} {name}")


if __name__ == "__main__":
  main()
