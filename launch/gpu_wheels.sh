#!/usr/bin/env bash
# Download (here, where PyPI is reachable) the wheels that launch/gpu_check.sh installs on a bare GPU machine.
#
#   launch/gpu_wheels.sh [DIR] [--python-version 3.12]
#
# DIR defaults to .whl in the repository root (add `/.whl/` to .git/info/exclude, then carry `.whl`).
# The list is what `dispersion_jax.cli.bench`, `cli.bench_dispersion` and the GPU tests import beyond the GPU
# image's own packages (JAX with CUDA, flax, optax, orbax-checkpoint, chex, numpy, absl-py, etils, cloudpickle,
# protobuf, pyyaml, psutil, safetensors, tiktoken, torch, transformers, pytest): found by importing those modules
# with the image's package list blocked (docs/benchmarks.md, "GPU check"). The versions are this repository's
# tested ones; every one of their own requirements is in that image. About 6 MB in all.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
DIR=".whl"
PYV="3.12"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --python-version) PYV="$2"; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    -*) echo "gpu_wheels.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    *) DIR="$1"; shift ;;
  esac
done

WHEELS=(
  grain==0.2.18          # the data layer's Grain iterators (dispersion_jax.data.loader)
  array_record==0.8.6    # grain's and the cache's record files
  ml_collections==1.1.0  # run configs (dispersion_jax.config)
  portpicker==1.6.0      # grain's multiprocessing
  importlib_resources==7.1.0  # etils.epath on older etils
)
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done
mkdir -p "$DIR"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
  "${PLATFORMS[@]}" -d "$DIR" "${WHEELS[@]}"
ls -la "$DIR"
