#!/usr/bin/env bash
# N processes on one machine, talking through jax.distributed on localhost (CPU: each process gets
# DEVICES_PER_PROCESS host devices). What a multi-host run does, small enough for a laptop.
#
#   launch/local_multiprocess.sh 2 configs/tiny.py runs/multiprocess [--config.x=y ...]
set -euo pipefail
n=${1:?usage: $0 NUM_PROCESSES CONFIG WORKDIR [--config.field=value ...]}
config=${2:?}
workdir=${3:?}
shift 3
port=${PORT:-12355}
devices=${DEVICES_PER_PROCESS:-2}
pids=()
for ((i = 0; i < n; i++)); do
  XLA_FLAGS="--xla_force_host_platform_device_count=$devices" JAX_PLATFORMS=cpu \
    python -m mmard_jax.main --config "$config" --workdir "$workdir" \
    --config.parallel.coordinator_address="localhost:$port" \
    --config.parallel.num_processes="$n" --config.parallel.process_id="$i" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
