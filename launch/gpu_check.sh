#!/usr/bin/env bash
# One GPU check on a bare CUDA machine (JAX with CUDA, flax/optax/orbax/chex/torch/transformers present; no
# tensorflow-datasets/array_record/grain needed): install carried wheels, run the fast-path and kernel tests on the
# GPU, time the dispersion term (reference vs the XLA reformulation vs the Pallas kernel), write everything to OUT.
#
#   launch/gpu_check.sh [--wheels DIR] [--out DIR] [--quick]
#
#   --wheels DIR  pip-install every wheel in DIR first (offline: --no-index --find-links DIR, into a private target)
#   --out DIR     where logs and JSON go (default: $OUT if set, else ./gpu_check_out)
#   --quick       smaller benchmark (B=8 instead of 16, fewer rounds)
# Environment: PYTHON (default python3), STEP_TIMEOUT seconds per step (default 300).
# Exit status: 0 if every step passed, 1 otherwise (each step still runs; see OUT/steps.log).
# Output files (8, the most a device call returns from $OUT): env.txt, steps.log (every step's output), tests.xml,
# bench_dispersion.json, bench_train_gpt2.json, bench_train_355m.json, bench_train_qwen3.json, summary.txt.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
WHEELS=""
OUTDIR="${OUT:-$PWD/gpu_check_out}"
QUICK=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --wheels) WHEELS="$2"; shift 2 ;;
    --out) OUTDIR="$2"; shift 2 ;;
    --quick) QUICK=1; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUTDIR"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1

if [[ -n "$WHEELS" ]]; then
  shopt -s nullglob
  wheels=("$WHEELS"/*.whl)
  if [[ ${#wheels[@]} -gt 0 ]]; then
    SITE=/tmp/gpu_check_site
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --find-links "$WHEELS" \
      --target "$SITE" "${wheels[@]}" || { echo "gpu_check.sh: wheel install failed" >&2; exit 1; }
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1
  "$PY" -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__); print(jax.devices())"
  "$PY" -m pip list 2>/dev/null | grep -iE '^(jax|jaxlib|jax-cuda|flax|optax|chex|numpy) '
} >"$OUTDIR/env.txt" 2>&1
cat "$OUTDIR/env.txt"

STATUS=0
SUMMARY=()
step() {  # step NAME CMD...: run with a timeout, log to OUT/steps.log, remember the exit status
  local name="$1"; shift
  echo "=== $name: $*" | tee -a "$OUTDIR/steps.log"
  timeout "${STEP_TIMEOUT:-300}" "$@" 2>&1 | tee -a "$OUTDIR/steps.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: rc=$rc" | tee -a "$OUTDIR/steps.log"
  SUMMARY+=("$name rc=$rc")
  [[ $rc -eq 0 ]] || STATUS=1
}

# 1. Tests on the GPU: the reformulation, the kernel on hardware (test_pallas_on_gpu_equals_xla), its CUDA lowering,
#    and the blocked-vs-dense fast path. The GPU-interpret-mode tests are for CPU machines and are left out here.
step tests "$PY" -m pytest -q -p no:cacheprovider -rs --junitxml="$OUTDIR/tests.xml" \
  tests/test_dispersion_fused.py tests/test_fast_paths.py::test_blocked_dispersion_equals_dense_float32 \
  -k "not interpret"

# 2. The dispersion term alone (value+grad), GPT-2 124M per layer: reference vs xla vs pallas.
if [[ $QUICK -eq 1 ]]; then BENCH=(--preset gpt2_b8 --repeats 5); else BENCH=(--preset gpt2 --repeats 10); fi
step bench_dispersion "$PY" -m dispersion_jax.cli.bench_dispersion "${BENCH[@]}" \
  --variants angular_spread,orthogonalization --block_size none,512 --pallas_tile_n 64,128 \
  --json "$OUTDIR/bench_dispersion.json"
# Every variant once: python -m dispersion_jax.cli.bench_dispersion --preset gpt2_b8 --variants all (not run here).

# 3. The whole train step (python -m dispersion_jax.bench; each point against its coeff-0 twin, in one run):
#    GPT-2 124M (seq 1024, batch 16, bf16, angular_spread on all tokens of all layers) with each dispersion impl
#    and the PyTorch baseline (HF GPT-2 + torch dispersion) in the same run; cuDNN vs XLA attention; GPT-2 355M
#    (batch 8); the paper's Qwen3 pre-training size (width_256, seq 1024, batch 16).
TRAIN=(--config configs/bench.py --config.model.dtype=bfloat16 --seq 1024 --repeats 10)
step bench_train_gpt2 "$PY" -m dispersion_jax.bench "${TRAIN[@]}" --preset gpt2 --batch 16 --attention cudnn,xla \
  --config.dispersion.impl=xla,pallas --torch_baseline --json "$OUTDIR/bench_train_gpt2.json"
step bench_train_355m "$PY" -m dispersion_jax.bench "${TRAIN[@]}" --preset gpt2-medium --batch 8 --attention cudnn \
  --config.dispersion.impl=xla,pallas --json "$OUTDIR/bench_train_355m.json"
step bench_train_qwen3 "$PY" -m dispersion_jax.bench "${TRAIN[@]}" --config.model.family=qwen3 \
  --config.model.preset=qwen3-width_256 --config.model.n_layer=None --config.model.n_embd=None \
  --config.model.n_head=None --batch 16 --attention cudnn --config.dispersion.impl=xla,pallas \
  --json "$OUTDIR/bench_train_qwen3.json"

printf '%s\n' "${SUMMARY[@]}" | tee "$OUTDIR/summary.txt"
exit $STATUS
