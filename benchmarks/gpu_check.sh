#!/usr/bin/env bash
# One prepared device check: the throughput matrix on a GPU machine that has
# nothing but this repository, every number written to one output folder.
#
#   benchmarks/gpu_check.sh [--dry-run] [OUT_DIR]      (OUT_DIR: $OUT if set)
#   DRY_RUN=1 benchmarks/gpu_check.sh /tmp/gpu_check    (same as --dry-run)
#
# Steps (each phase is one benchmarks/throughput.py process under `timeout`,
# writing its JSON after every case, so a phase cut short keeps what it measured):
#   0. dependencies: python3 must import what throughput.py needs. A bare GPU
#      image has jax, flax, optax, orbax-checkpoint and chex; missing modules
#      (ml_collections, PyYAML, absl-py, Pillow) are installed with `pip install --no-index --find-links DIR`
#      from the first wheel folder found: $WHEELS_DIR, REPO/.whl, REPO/wheels.
#      None (or a failed install): a clear error, exit 3. TFDS is not needed:
#      the data are synthetic.
#   1. env.txt (date, uname, python, jax/jaxlib/flax/optax versions, devices),
#      nvidia-smi.txt (nvidia-smi, its CSV query and -q), pip-freeze.txt;
#   2. phase "cktf":   CKTF resnet32x4 -> resnet8x4 at batch 64, the step, the
#      step run 16 per host call (train.steps_per_call, the 240-epoch estimate),
#      each of its parts, plus a jax.profiler trace (OUT/profile/);
#   3. phase "sweep":  the largest batch that fits, trying 64, 256, 1024, 4096
#      and stopping at the first failure (OOM), for CKTF, KD and vanilla
#      resnet32x4 -> resnet8x4 and CKTF vgg19 -> vgg8 (Tiny-ImageNet shapes);
#   4. phase "matrix": the 'paper' preset at batch 64 (vanilla, KD, CRD, CKTF,
#      CKTF+KD x 4 CIFAR-100 pairs + vgg19 -> vgg8), as far as its time budget goes.
# Each phase leaves PHASE.json, PHASE.md and PHASE.log; summary.md joins the
# markdown, status.txt lists each phase's exit code. On a GPU the whole script
# is sized to finish in under 8 minutes (phase limits 140 + 130 + 170 s).
#
# --dry-run / DRY_RUN=1: the same code path on the CPU (JAX_PLATFORMS=cpu,
# XLA backend optimisation off to compile faster) with tiny models and sizes
# (throughput.py --tiny: resnet5 models, 80 examples, nce_k 16, batch 8; CRD
# for the parts phase), well under a minute on an idle 2-core machine.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
DRY_RUN="${DRY_RUN:-0}"
OUT_ARG=""
for arg in "$@"; do
  case "$arg" in
    --dry-run|--dry_run) DRY_RUN=1 ;;
    -h|--help) sed -n '2,33p' "$0"; exit 0 ;;
    -*) echo "gpu_check.sh: unknown option $arg" >&2; exit 2 ;;
    *) OUT_ARG="$arg" ;;
  esac
done
OUT_DIR="${OUT:-$OUT_ARG}"
if [ -z "$OUT_DIR" ]; then
  echo "gpu_check.sh: no output folder: set \$OUT or pass OUT_DIR" >&2
  exit 2
fi
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
LOG="$OUT_DIR/gpu_check.log"
log() { echo "[gpu_check $(date -u +%H:%M:%S)] $*" | tee -a "$LOG" >&2; }
START=$(date +%s)
log "repo $REPO, out $OUT_DIR, python $PY, dry run $DRY_RUN"

# ---------------------------------------------------------------- 0. dependencies
missing=$("$PY" - <<'EOF'
import importlib.util
need = [("absl", "absl-py"), ("ml_collections", "ml_collections"), ("yaml", "PyYAML"),
        ("PIL", "pillow")]
out = []
for module, dist in need:
  try:
    found = importlib.util.find_spec(module) is not None
  except (ImportError, ValueError):
    found = False
  if not found:
    out.append(dist)
print(" ".join(out))
EOF
)
if [ -n "$missing" ]; then
  wheels=""
  for d in "${WHEELS_DIR:-}" "$REPO/.whl" "$REPO/wheels"; do
    if [ -n "$d" ] && [ -d "$d" ] && ls "$d"/*.whl >/dev/null 2>&1; then wheels="$d"; break; fi
  done
  if [ -z "$wheels" ]; then
    pyver=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    log "error: $PY lacks the packages: $missing. No wheel folder found (looked at"
    log "  \$WHEELS_DIR, $REPO/.whl, $REPO/wheels). On a machine with network, for this"
    log "  machine's python $pyver:"
    log "  pip download --only-binary=:all: --python-version $pyver --platform manylinux2014_x86_64 \\"
    log "      -d $REPO/.whl $missing"
    log "  and carry .whl/ to this machine."
    echo "deps 3" > "$OUT_DIR/status.txt"
    exit 3
  fi
  log "installing from $wheels: $missing"
  if ! "$PY" -m pip install --no-index --find-links "$wheels" $missing >>"$LOG" 2>&1; then
    log "error: pip install --no-index --find-links $wheels $missing failed (see $LOG);"
    log "  the folder needs wheels for these packages and their dependencies for this python"
    echo "deps 3" > "$OUT_DIR/status.txt"
    exit 3
  fi
fi

# ---------------------------------------------------------------- 1. environment
if [ "$DRY_RUN" = "1" ]; then
  export JAX_PLATFORMS=cpu
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
fi
{
  echo "date: $(date -u)"
  echo "uname: $(uname -a)"
  echo "dry_run: $DRY_RUN"
  echo "XLA_FLAGS: ${XLA_FLAGS:-}"
  echo "JAX_PLATFORMS: ${JAX_PLATFORMS:-}"
  echo "git: $(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo none)," \
       "$(git -C "$REPO" status --porcelain 2>/dev/null | wc -l) changed files"
} > "$OUT_DIR/env.txt"
# One python start: the versions, and the check that throughput.py's imports work.
ENV_PY='
import platform
import flax, jax, ml_collections, optax
import cktf_jax.train.loop  # what throughput.py imports
print("python:", platform.python_version())
try:
  import jaxlib
  print("jax:", jax.__version__, "jaxlib:", jaxlib.__version__)
except Exception:
  print("jax:", jax.__version__)
print("flax:", flax.__version__, "optax:", optax.__version__)
print("backend:", jax.default_backend())
print("devices:", jax.devices())
'
if ! (cd "$REPO" && "$PY" -c "$ENV_PY") >> "$OUT_DIR/env.txt" 2>&1; then
  log "error: importing what throughput.py needs failed after the dependency step:"
  tail -5 "$OUT_DIR/env.txt" | sed 's/^/    /' >&2
  echo "deps 3" > "$OUT_DIR/status.txt"
  exit 3
fi
if command -v nvidia-smi >/dev/null 2>&1; then
  { nvidia-smi; echo; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit --format=csv; echo; nvidia-smi -q; } > "$OUT_DIR/nvidia-smi.txt" 2>&1
else
  echo "nvidia-smi: not found on this machine" > "$OUT_DIR/nvidia-smi.txt"
fi
"$PY" -m pip freeze > "$OUT_DIR/pip-freeze.txt" 2>/dev/null || true
log "environment: $(grep -E '^(jax|backend):' "$OUT_DIR/env.txt" | tr '\n' ' ')"

# ---------------------------------------------------------------- 2-4. phases
TP=("$PY" "$REPO/benchmarks/throughput.py" --config "$REPO/configs/cifar100_cktf.py")
if [ "$DRY_RUN" = "1" ]; then
  COMMON=(--tiny --steps 2 --part_steps 2 --warmup 1)
  CKTF=(--matrix=crd:resnet5:resnet5:8 --parts --profile_steps 1 --config.train.steps_per_call=2)
  SWEEP=(--sweep_matrix=vanilla:resnet5:resnet5:8 --batch_sweep=8,16 --noparts)
  MATRIX=(--matrix=kd:resnet5:resnet5:8 --noparts)
  LIMITS=(120 60 60)
else
  COMMON=(--warmup 5 --sync_every 10)
  CKTF=(--matrix=crdst:resnet32x4:resnet8x4:64 --parts --steps 96 --part_steps 30 --profile_steps 5
        --config.train.steps_per_call=16)
  SWEEP=(--sweep_matrix=crdst:resnet32x4:resnet8x4:64,kd:resnet32x4:resnet8x4:64,vanilla:resnet32x4:resnet8x4:64,crdst:vgg19:vgg8:64:float32:tiny_imagenet
         --batch_sweep=64,256,1024,4096 --noparts --steps 50 --time_budget_s 100)
  MATRIX=(--matrix=paper --noparts --steps 50 --time_budget_s 140)
  LIMITS=(140 130 170)
fi

run_phase() {  # name limit_s args...
  local name="$1" limit="$2"; shift 2
  log "phase $name (limit ${limit}s): throughput.py $*"
  (cd "$REPO" && timeout --signal=TERM --kill-after=15 "$limit" "${TP[@]}" "${COMMON[@]}" "$@" \
      --name "$name" --json_out "$OUT_DIR/$name.json" --markdown_out "$OUT_DIR/$name.md" \
      > "$OUT_DIR/$name.stdout" 2> "$OUT_DIR/$name.log")
  local rc=$?
  echo "$name $rc" >> "$OUT_DIR/status.txt"
  log "phase $name: exit $rc after $(( $(date +%s) - START ))s total"
  if [ "$rc" != "0" ]; then tail -5 "$OUT_DIR/$name.log" | sed 's/^/    /' >&2; fi
}

: > "$OUT_DIR/status.txt"
run_phase cktf "${LIMITS[0]}" "${CKTF[@]}" --profile_dir "$OUT_DIR/profile"
run_phase sweep "${LIMITS[1]}" "${SWEEP[@]}"
run_phase matrix "${LIMITS[2]}" "${MATRIX[@]}"

{
  echo "# gpu_check $(date -u) (dry run: $DRY_RUN)"
  echo
  echo '```'; cat "$OUT_DIR/env.txt"; echo '```'
  for name in cktf sweep matrix; do
    echo
    if [ -f "$OUT_DIR/$name.md" ]; then cat "$OUT_DIR/$name.md"; else echo "phase $name: no markdown (see $name.log)"; fi
  done
} > "$OUT_DIR/summary.md"
elapsed=$(( $(date +%s) - START ))
echo "elapsed_s $elapsed" >> "$OUT_DIR/status.txt"
log "done in ${elapsed}s; results in $OUT_DIR (summary.md, *.json)"
if grep -qv -E ' 0$|^elapsed_s' "$OUT_DIR/status.txt"; then exit 1; fi
exit 0
