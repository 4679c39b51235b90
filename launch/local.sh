#!/usr/bin/env bash
# Run N processes of the trainer on this machine, joined by a local coordinator (JAX's multi-controller runtime).
#
#   launch/local.sh N --config configs/gpt2_tiny.py --workdir runs/mp [--config.KEY=VALUE ...]
#
# Environment (all optional):
#   LOCAL_DEVICES_PER_PROCESS=K  give each process K fake CPU devices (CPU-only test of a multi-host run)
#   COORDINATOR_PORT=P           coordinator port (default: a free one)
#   PYTHON=python                the interpreter to run
#   DISPERSION_HEARTBEAT_TIMEOUT_S / DISPERSION_INIT_TIMEOUT_S   see dispersion_jax/parallel/distributed.py
# Output lines are prefixed with the process index. If one process fails, the others are stopped and its exit
# status is returned; re-running the same command resumes from the last checkpoint. Exit 75: preempted (SIGTERM to
# this script or to a process: every process saved the same checkpoint); a scheduler re-queues on it, and
# LOCAL_REQUEUE=K re-runs the processes here up to K times after a preemption of a process (not of this script).
# The processes end with this script, even after a `kill -9` of it (they get SIGTERM: save, exit).
set -uo pipefail

if [[ $# -lt 1 || ! $1 =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 N train-args..." >&2
  exit 2
fi
N=$1
shift
PYTHON=${PYTHON:-python}
free_port='import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
PORT=${COORDINATOR_PORT:-$(python3 -c "$free_port")}

extra_env=()
if [[ -n ${LOCAL_DEVICES_PER_PROCESS:-} ]]; then
  # Last on the line: XLA keeps the last value of a repeated flag.
  extra_env+=(JAX_PLATFORMS=cpu
              "XLA_FLAGS=${XLA_FLAGS:-} --xla_force_host_platform_device_count=$LOCAL_DEVICES_PER_PROCESS")
fi

PREEMPTED=75   # the trainer's exit code after a preemption: checkpoint saved, re-run to resume
declare -A index_of=()   # pid -> process index, of the processes still running
stopping=0     # 1 once this script was told to stop (SIGINT / SIGTERM): no re-queue then
stop_all() {
  for p in "${!index_of[@]}"; do kill -TERM "$p" 2>/dev/null; done
}
trap 'stopping=1; stop_all' INT TERM

run_all() {   # starts the N processes, waits for them; returns the first non-zero exit status (0 if none)
  local i pid rc status=0 killer=
  for ((i = 0; i < N; i++)); do
    # DISPERSION_EXIT_WITH_PARENT: each process ends (SIGTERM: save, exit) when this script does, however it ends.
    env JAX_COORDINATOR_ADDRESS="127.0.0.1:$PORT" JAX_NUM_PROCESSES="$N" JAX_PROCESS_ID="$i" "${extra_env[@]}" \
      DISPERSION_EXIT_WITH_PARENT="$$:TERM" PYTHONUNBUFFERED=1 "$PYTHON" -m dispersion_jax train "$@" \
      > >(sed -u "s/^/[$i] /") 2> >(sed -u "s/^/[$i] /" >&2) &
    index_of[$!]=$i
  done
  while ((${#index_of[@]} > 0)); do
    sleep 0.5
    for pid in "${!index_of[@]}"; do
      kill -0 "$pid" 2>/dev/null && continue
      wait "$pid"
      rc=$?
      i=${index_of[$pid]}
      unset "index_of[$pid]"
      if ((rc != 0 && status == 0)); then
        status=$rc
        if ((rc == PREEMPTED)); then
          echo "local.sh: process $i was preempted (exit $PREEMPTED, checkpoint saved); stopping the others" >&2
        else
          echo "local.sh: process $i exited with status $rc; stopping the others" >&2
        fi
        stop_all
        # A process stuck in a collective may not stop on SIGTERM: SIGKILL what is left after 10 s.
        (sleep 10; for p in "${!index_of[@]}"; do kill -KILL "$p" 2>/dev/null; done) >/dev/null 2>&1 &
        killer=$!
      fi
    done
  done
  [[ -n $killer ]] && kill "$killer" 2>/dev/null
  return $status
}

requeues=0
while true; do
  run_all "$@"
  status=$?
  if ((status == PREEMPTED && stopping == 0 && requeues < ${LOCAL_REQUEUE:-0})); then
    requeues=$((requeues + 1))
    echo "local.sh: re-queued after a preemption ($requeues of ${LOCAL_REQUEUE}): resuming from the checkpoint" >&2
    PORT=${COORDINATOR_PORT:-$(python3 -c "$free_port")}
    continue
  fi
  if ((status == PREEMPTED)); then
    echo "local.sh: preempted: checkpoint saved; run the same command again to resume (exit $PREEMPTED)" >&2
  fi
  exit $status
done
