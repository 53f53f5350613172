#!/usr/bin/env bash
# N processes on one machine, talking through jax.distributed on localhost (CPU: each process gets
# DEVICES_PER_PROCESS host devices). What a multi-host run does, small enough for a laptop.
#
#   launch/local_multiprocess.sh 2 configs/tiny.py runs/multiprocess [--config.x=y ...]
#
# Environment: PORT (coordinator port, default 12355), DEVICES_PER_PROCESS (default 2), PYTHON (default python).
# Tested by tests/test_train.py::test_two_processes_train_exactly_like_one_process_with_two_devices.
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
    "${PYTHON:-python}" -m mmard_jax.main --config "$config" --workdir "$workdir" \
    --config.parallel.coordinator_address="localhost:$port" \
    --config.parallel.num_processes="$n" --config.parallel.process_id="$i" "$@" &
  pids+=($!)
done
# One process failing would leave the others waiting in a collective: stop them all. A process that exits 75 was
# preempted: SIGTERM to any one process makes all of them save the same step and exit 75 together (JAX's preemption
# sync point), so the others are left to finish. TERM / Ctrl-C to this script is passed on to every process.
trap 'kill "${pids[@]}" 2>/dev/null || true' INT TERM
status=0
for ((i = 0; i < n; i++)); do
  wait -n && continue
  rc=$?
  [[ $status -ne 0 ]] || status=$rc  # the first failure's code (75: preempted, resumable)
  [[ $rc -eq 75 ]] || kill "${pids[@]}" 2>/dev/null || true
done
wait || true  # a wait interrupted by a signal ends early: let every process finish saving
exit $status
