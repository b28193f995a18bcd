#!/usr/bin/env bash
# Several processes on one machine joined by jax.distributed (CPU collectives): a rehearsal of a
# multi-host run without a cluster.
#
#   launch/local_multiprocess.sh 2 configs/default.py runs/mp [--config.x=y ...]
set -euo pipefail
N=${1:?number of processes}; CONFIG=${2:?config}; WORKDIR=${3:?workdir}; shift 3
PY=${PY:-.venv/bin/python}
PORT=${PORT:-$((20000 + RANDOM % 20000))}
pids=()
for ((i = 0; i < N; i++)); do
  JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo XLA_FLAGS=--xla_force_host_platform_device_count=2 \
    "$PY" main.py --config="$CONFIG" --workdir="$WORKDIR" --coordinator_address="127.0.0.1:$PORT" \
    --num_processes="$N" --process_id="$i" "$@" &
  pids+=($!)
done
trap 'kill "${pids[@]}" 2>/dev/null' INT TERM
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
