#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice (v4 / v5e / v5p, several hosts): ship this checkout to every worker, install,
# then run the same command on all workers at once. jax.distributed finds the slice's workers from the TPU VM
# metadata (dispersion_jax/parallel/distributed.py calls it on any TPU VM); one process per host drives its local chips.
#
#   launch/tpu_pod.sh setup                       # once per TPU VM: copy the code, install, build the dataset
#   launch/tpu_pod.sh train [--config.KEY=VALUE ...]   # train; re-queued on exit 75 (preempted, saved)
#   launch/tpu_pod.sh sync                        # copy the code again after a change (then `train`)
#   launch/tpu_pod.sh stop                        # kill the trainer on every worker (e.g. after a failure)
set -euo pipefail

# ---- change these ---------------------------------------------------------------------------------------------
TPU_NAME=my-tpu-v4-64                # gcloud compute tpus tpu-vm list
ZONE=us-central2-b
PROJECT=my-gcp-project
CONFIG=configs/gpt2_xl.py
# Every worker writes its shards of each checkpoint into WORKDIR: one place all workers see. A bucket (gs://, the
# default: docs/runs-in-a-bucket.md) or a shared mount (Filestore/NFS, gcsfuse); never a worker's local disk (the
# trainer refuses one at start-up, in one line).
WORKDIR=gs://my-bucket/runs/gpt2_xl
REMOTE_DIR=dispersion_jax            # where the code goes on each worker (relative to $HOME)
JAX_INSTALL='jax[tpu]>=0.10,<0.12'   # the TPU build of jax (pulls libtpu)
PYTHON=python3.11                    # jax 0.10 needs Python >= 3.11 (installed with apt if missing)
# Training reads a built dataset (only the embedded corpus is built on first use) from DATA_CACHE, a bucket prefix
# every worker reads in place (docs/runs-in-a-bucket.md, "The prepared dataset in a bucket"; a gcsfuse mount's
# local path is the faster option for reading). `setup` builds it once, on worker 0 (the others would find it
# published and do nothing); the build stages its files on worker 0's disk and uploads them, marker last.
DATA_CACHE=gs://my-bucket/data
PREPARE="python -m dispersion_jax data-build --config $CONFIG --config.data.cache_dir=$DATA_CACHE"
# A trainer that was preempted (SIGTERM, e.g. a maintenance event) saves a checkpoint and exits 75: `train` then
# runs again (resuming from it) up to MAX_REQUEUES times, REQUEUE_DELAY_S apart. A deleted VM (a spot TPU taken
# back) is not re-created here: create it again, `setup`, then `train`.
MAX_REQUEUES=${MAX_REQUEUES:-20}
REQUEUE_DELAY_S=${REQUEUE_DELAY_S:-60}
# ----------------------------------------------------------------------------------------------------------------

ROOT=$(cd "$(dirname "$0")/.." && pwd)
on_all() {   # run a shell command on every worker of the slice, at the same time
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" --worker=all --command="$1"
}

sync_code() {
  # The committed tree only: every worker must run the same code (the trainer compares a code+config hash).
  local tarball=/tmp/dispersion_jax_$$.tgz
  git -C "$ROOT" archive --format=tar.gz -o "$tarball" HEAD
  gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:/tmp/dispersion_jax.tgz" --zone="$ZONE" --project="$PROJECT" \
    --worker=all
  rm -f "$tarball"
  on_all "rm -rf ~/$REMOTE_DIR && mkdir -p ~/$REMOTE_DIR && tar xzf /tmp/dispersion_jax.tgz -C ~/$REMOTE_DIR"
}

case ${1:-} in
  setup)
    sync_code
    on_all "(command -v $PYTHON >/dev/null || (sudo apt-get update -q && sudo apt-get install -y -q $PYTHON \
            $PYTHON-venv)) && cd ~/$REMOTE_DIR && $PYTHON -m venv ~/venv && source ~/venv/bin/activate && \
            pip install -q -U pip && pip install -q '$JAX_INSTALL' -r requirements.txt"
    gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" --worker=0 \
      --command="cd ~/$REMOTE_DIR && source ~/venv/bin/activate && $PREPARE"
    ;;
  sync)
    sync_code
    ;;
  train)
    shift
    args=$(printf ' %q' --config "$CONFIG" --workdir "$WORKDIR" "--config.data.cache_dir=$DATA_CACHE" "$@")
    log=$(mktemp)
    trap 'rm -f "$log"' EXIT
    for ((attempt = 0; ; attempt++)); do
      # The same command on every worker; each prints its own log lines (gcloud prefixes them with the worker).
      # Each worker also prints its trainer's exit status: gcloud's own status does not say which one it was.
      status=0
      on_all "cd ~/$REMOTE_DIR && source ~/venv/bin/activate && python -m dispersion_jax train$args; \
              rc=\$?; echo dispersion-train-exit=\$rc; exit \$rc" 2>&1 | tee "$log" || status=$?
      codes=$(grep -o 'dispersion-train-exit=[0-9]*' "$log" | cut -d= -f2 | sort -u || true)
      if [[ $codes == 75 ]] && ((attempt < MAX_REQUEUES)); then   # every worker: preempted
        echo "tpu_pod.sh: preempted (exit 75, checkpoint saved); re-queued in ${REQUEUE_DELAY_S}s" \
          "($((attempt + 1)) of $MAX_REQUEUES)" >&2
        sleep "$REQUEUE_DELAY_S"
        continue
      fi
      exit "$status"
    done
    ;;
  stop)
    on_all "pkill -f 'python -m dispersion_jax train' || true"
    ;;
  *)
    echo "usage: $0 setup | sync | train [--config.KEY=VALUE ...] | stop" >&2
    exit 2
    ;;
esac
