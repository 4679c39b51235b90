#!/usr/bin/env bash
# One GPU check on a bare CUDA machine, in one call: install the carried wheels, run the fast-path and kernel tests
# on the GPU, time the whole train step (GPT-2 124M and 355M, Qwen3 width_256; no dispersion vs all-token
# angular_spread with each impl; cuDNN vs XLA attention; the PyTorch baseline in the same run) and the dispersion
# term alone, and write the JSON and one table to OUT.
#
#   launch/gpu_wheels.sh                       # here, where PyPI is reachable: .whl/ (about 6 MB)
#   launch/gpu_check.sh --wheels .whl          # there (device run: carry .whl; OUT is set)
#   launch/gpu_check.sh --smoke                # anywhere, CPU too: the same steps at toy sizes (checks the script)
#
#   --wheels DIR  pip-install every wheel in DIR first (offline: --no-index, into a private --target)
#   --out DIR     where logs and JSON go (default: $OUT if set, else ./gpu_check_out)
#   --smoke       toy model sizes and 2 timing rounds: the script's own test, minutes on a CPU
#   --skip_tests  leave out step 1 (tests/test_gpu_check.py runs the script so; the suite runs those tests itself)
# Environment: PYTHON (default python3); DEADLINE seconds for the whole check (default 540: a device call may run
# 600 s); a step that would start with under 30 s left is skipped, and each step's timeout is cut to what is left.
# TIMEOUT_SCALE (default 1) multiplies each step's timeout and DEADLINE (a slower machine); 0 = no step timeouts
# and no deadline, for a caller that bounds the whole check itself (tests/test_gpu_check.py).
# Exit status: 0 if every step passed, 1 otherwise (later steps still run; see OUT/steps.log).
# Output (a device call returns at most 8 files, 2 folders down): env.txt, steps.log (every step's output),
# tests.xml, bench.json (every run's rows, machine and settings), report.md (the table against the targets),
# summary.txt (each step's status and seconds).
# The machine must have JAX with CUDA, flax, optax, orbax-checkpoint, chex, numpy, torch + transformers (the
# baseline; left out with a note if absent); what our code imports beyond those is what gpu_wheels.sh fetches.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
WHEELS=""
OUTDIR="${OUT:-$PWD/gpu_check_out}"
SMOKE=0
SKIP_TESTS=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --wheels) WHEELS="$2"; shift 2 ;;
    --out) OUTDIR="$2"; shift 2 ;;
    --smoke) SMOKE=1; shift ;;
    --skip_tests) SKIP_TESTS=1; shift ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUTDIR"
: >"$OUTDIR/steps.log"
PY="${PYTHON:-python3}"
DEADLINE="${DEADLINE:-540}"
TIMEOUT_SCALE="${TIMEOUT_SCALE:-1}"
scale() { awk -v s="$1" -v f="$TIMEOUT_SCALE" 'BEGIN { printf "%d", s * f }'; }  # whole seconds; 0 = none
DEADLINE=$(scale "$DEADLINE")
export PYTHONUNBUFFERED=1
# One compilation cache for all steps: the coeff-0 twins and the tests' shapes compile once.
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-/tmp/gpu_check_jax_cache}"
# JAX and the PyTorch baseline share the GPU in one process: leave PyTorch room.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.6}"

if [[ -n "$WHEELS" ]]; then
  shopt -s nullglob
  wheels=("$WHEELS"/*.whl)
  [[ ${#wheels[@]} -gt 0 ]] || { echo "gpu_check.sh: no wheels in $WHEELS (run launch/gpu_wheels.sh)" >&2; exit 1; }
  SITE=/tmp/gpu_check_site
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "${wheels[@]}" || { echo "gpu_check.sh: installing the wheels from $WHEELS failed" >&2; exit 1; }
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1 || true
  "$PY" -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__); print(jax.devices())"
  "$PY" -m pip list 2>/dev/null | grep -iE '^(jax|jaxlib|jax-cuda.*|flax|optax|orbax-checkpoint|chex|numpy|torch|transformers|grain|ml.collections) '
  lscpu 2>/dev/null | grep -E '^(Model name|CPU\(s\))'
} >"$OUTDIR/env.txt" 2>&1
cat "$OUTDIR/env.txt"

START=$SECONDS
STATUS=0
SUMMARY=()
step() {  # step NAME TIMEOUT CMD...: run within what is left of DEADLINE, log to OUT/steps.log, keep the status
  local name="$1" limit; limit=$(scale "$2"); shift 2
  if [[ $DEADLINE -gt 0 ]]; then
    local left=$((DEADLINE - (SECONDS - START)))
    if [[ $left -lt 30 ]]; then
      echo "=== $name: skipped, ${left}s of the ${DEADLINE}s deadline left" | tee -a "$OUTDIR/steps.log"
      SUMMARY+=("$name skipped (deadline)"); STATUS=1; return
    fi
    [[ $limit -le $left ]] || limit=$left
  fi
  echo "=== $name (timeout ${limit}s; 0 = none): $*" | tee -a "$OUTDIR/steps.log"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$OUTDIR/steps.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: rc=$rc in $((SECONDS - t0))s" | tee -a "$OUTDIR/steps.log"
  SUMMARY+=("$name rc=$rc $((SECONDS - t0))s")
  [[ $rc -eq 0 ]] || STATUS=1
}

TORCH=(--torch_baseline)
if ! "$PY" -c "import torch, transformers" >/dev/null 2>&1; then
  TORCH=()
  SUMMARY+=("torch baseline left out: torch/transformers not importable")
fi
if [[ $SMOKE -eq 1 ]]; then
  # Toy sizes (the same flags as the real run, so the script's commands are checked end to end).
  G124=(--preset gpt2 --layers 2 --dim 64 --heads 2 --vocab 512 --seq 128 --batch 2)
  G355=(--preset gpt2-medium --layers 2 --dim 64 --heads 2 --vocab 512 --seq 128 --batch 2)
  Q3=(--config.model.n_layer=2 --config.model.n_embd=64 --config.model.n_head=2 --config.model.vocab_size=512
      --seq 128 --batch 2)
  TIMING=(--repeats 2 --warmup 1)
  DISP=(--preset cpu_small --repeats 2 --inner 1)
  ATT=auto  # cuDNN needs a GPU; the cudnn,xla comparison below still shows a failed point's row
else
  G124=(--preset gpt2 --seq 1024 --batch 16)
  G355=(--preset gpt2-medium --seq 1024 --batch 8)
  Q3=(--config.model.n_layer=None --config.model.n_embd=None --config.model.n_head=None --seq 1024 --batch 16)
  TIMING=(--repeats 10 --warmup 2 --steps_per_repeat 3)
  DISP=(--preset gpt2 --repeats 10)
  ATT=cudnn
fi
RAW="$(mktemp -d)"  # per-step JSON, merged into OUT/bench.json at the end (a device call returns 8 files)
mkdir -p "$RAW"
STEPCFG=(--config configs/bench.py --config.model.dtype=bfloat16 "${TIMING[@]}")

# In order of what the issue needs most, each with its share of the deadline.
# 1. Tests on the GPU: the reformulation, the kernel on hardware (test_pallas_on_gpu_equals_xla), its CUDA
#    lowering, the blocked-vs-dense fast path. The interpret-mode tests are for CPU machines: left out.
[[ $SKIP_TESTS -eq 1 ]] || step tests 120 "$PY" -m pytest -q -p no:cacheprovider -rs --junitxml="$OUTDIR/tests.xml" \
  tests/test_dispersion_fused.py tests/test_fast_paths.py::test_blocked_dispersion_equals_dense_float32 \
  -k "not interpret"

# 2. The whole train step, GPT-2 124M (seq 1024, batch 16, bf16, cuDNN attention, angular_spread on all tokens of
#    all 12 block outputs): no dispersion, then each impl (reference = the old path, xla = the reformulation,
#    pallas = the kernel), and the PyTorch baseline (HF GPT-2 + the same dispersion), all in one run.
step bench_train_gpt2 200 "$PY" -m dispersion_jax bench "${STEPCFG[@]}" "${G124[@]}" --attention "$ATT" \
  --config.dispersion.impl=reference,xla,pallas "${TORCH[@]}" --json "$RAW/bench_train_gpt2.json"

# 3. The dispersion term alone (value+grad, GPT-2 124M sizes, per layer): reference vs xla vs pallas, kernel tiles.
step bench_dispersion 60 "$PY" -m dispersion_jax bench-dispersion "${DISP[@]}" \
  --variants angular_spread,orthogonalization --block_size none,512 --pallas_tile_n 64,128 \
  --json "$RAW/bench_dispersion.json"

# 4. cuDNN vs XLA attention, same model and batch, with and without dispersion (impl xla), in one run.
step bench_attention 90 "$PY" -m dispersion_jax bench "${STEPCFG[@]}" "${G124[@]}" --attention cudnn,xla \
  --config.dispersion.impl=xla --json "$RAW/bench_attention.json"

# 5. GPT-2 355M (batch 8) and the paper's Qwen3 pre-training size (width_256, batch 16): xla vs pallas.
step bench_train_355m 90 "$PY" -m dispersion_jax bench "${STEPCFG[@]}" "${G355[@]}" --attention "$ATT" \
  --config.dispersion.impl=xla,pallas --json "$RAW/bench_train_355m.json"
step bench_train_qwen3 90 "$PY" -m dispersion_jax bench "${STEPCFG[@]}" --config.model.family=qwen3 \
  --config.model.preset=qwen3-width_256 "${Q3[@]}" --attention "$ATT" --config.dispersion.impl=xla,pallas \
  --json "$RAW/bench_train_qwen3.json"

# 6. One JSON of every run and the table against the targets (docs/benchmarks.md, "GPU check").
"$PY" -m dispersion_jax gpu-report "$RAW" --json "$OUTDIR/bench.json" 2>&1 | tee "$OUTDIR/report.md" \
  || STATUS=1
printf '%s\n' "${SUMMARY[@]}" | tee "$OUTDIR/summary.txt"
exit $STATUS
