"""benchmarks/gpu_check.sh --dry-run end to end: the device check's code path on the CPU.

One run of the dry run (module fixture, a subprocess as on the GPU machine,
tiny sizes) serves both tests: its phases are ``benchmarks/throughput.py``
processes, the first with ``--profile_dir``. The subprocess gets one CPU
device (the GPU machine has one; the suite's four simulated devices would
only slow the compiles down).
"""

import glob
import json
import math
import os
import pathlib
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PARTS = ("augment", "sampling", "memory", "losses", "optimizer", "teacher_fwd", "student_fwdbwd")
PHASES = ("cktf", "sweep", "matrix")


def _positive(value) -> bool:
  return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("gpu_check")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_PLATFORMS="cpu")
  env.pop("OUT", None)
  proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", str(out)],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, (proc.stderr[-3000:], (out / "status.txt").read_text()
                                if (out / "status.txt").exists() else "")
  return out


def test_dry_run_writes_every_number(dry_run):
  status = dict(line.split() for line in (dry_run / "status.txt").read_text().splitlines())
  assert all(status[p] == "0" for p in PHASES), status
  assert "jax:" in (dry_run / "env.txt").read_text()
  assert (dry_run / "nvidia-smi.txt").exists()
  summary = (dry_run / "summary.md").read_text()
  for phase in PHASES:
    result = json.loads((dry_run / f"{phase}.json").read_text())
    assert result["complete"] is True
    assert result["machine"]["jax"] and result["machine"]["backend"] == "cpu"
    assert _positive(result["peaks"]["flops"]) and _positive(result["peaks"]["bw"])
    assert result["cases"], phase
    for case in result["cases"]:
      assert case["status"] == "ok", (phase, case.get("error"))
      assert case["loss_finite"] is True
      for key in ("compile_s", "images_per_s", "flops", "bytes_accessed"):
        assert _positive(case[key]), (phase, key, case[key])
      for key in ("median_s", "p10_s", "p90_s"):
        assert _positive(case["step"][key]), (phase, key)
      assert _positive(case["floor"]["floor_s"]) and _positive(case["floor"]["pct_of_floor"])
      assert case["case"] in summary
  cktf = json.loads((dry_run / "cktf.json").read_text())["cases"][0]
  assert set(PARTS) <= set(cktf["parts"]), sorted(cktf["parts"])
  for name in PARTS:
    assert _positive(cktf["parts"][name]["median_s"]), name
  multi = cktf["multi_step"]                                   # --config.train.steps_per_call=2
  assert multi["steps_per_call"] == 2 and multi["loss_finite"] is True
  assert _positive(multi["step"]["median_s"]) and _positive(multi["images_per_s"])
  assert "Several steps per host call" in summary
  sweep = json.loads((dry_run / "sweep.json").read_text())
  assert [c["batch"] for c in sweep["cases"]] == [8, 16]
  (largest,) = sweep["largest_batch"].values()
  assert largest["batch"] == 16 and _positive(largest["images_per_s"])


def test_profile_trace_written(dry_run):
  traces = glob.glob(str(dry_run / "profile" / "**" / "*.xplane.pb"), recursive=True)
  assert traces and all(os.path.getsize(t) > 0 for t in traces), os.listdir(dry_run / "profile")
  case = json.loads((dry_run / "cktf.json").read_text())["cases"][0]
  assert any(p.endswith(".xplane.pb") for p in case["profile"])


def test_trace_top_lists_the_traced_ops(dry_run):
  """benchmarks/trace_top.py on that trace: the step's XLA ops, by time."""
  proc = subprocess.run(["python", str(ROOT / "benchmarks" / "trace_top.py"),
                         str(dry_run / "profile"), "--top", "3"],
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  assert "op events" in lines[0] and lines[1].startswith("by kind: ")
  assert len([line for line in lines if line.startswith("  ") and " ms  x" in line]) == 3
