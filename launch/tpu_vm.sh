#!/usr/bin/env bash
# Runs mmard_jax on every worker of a Cloud TPU VM slice. JAX discovers the other hosts itself on TPU
# (config.parallel.num_processes=-1 calls jax.distributed.initialize() with no arguments).
#
#   launch/tpu_vm.sh TPU_NAME ZONE configs/cifar10_tpu.py gs://bucket/runs/cifar10 [--config.x=y ...]
#
# The workdir must be shared by all hosts (a GCS path or an NFS mount): Orbax writes one checkpoint from all of them.
# Each worker needs the package installed with the gcs extra (pip install -e ".[gcs]" "jax[tpu]"). On preemption every
# worker saves the same step and exits 75: run this command again to resume.
set -euo pipefail
if [ $# -lt 4 ]; then
  echo "usage: $0 TPU_NAME ZONE CONFIG WORKDIR [--config.field=value ...]" >&2
  exit 2
fi
tpu=$1 zone=$2 config=$3 workdir=$4
shift 4
repo=${MMARD_REPO:-"$HOME/mmard_jax"}   # the checkout on each worker
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command "
  cd $repo && . .venv/bin/activate &&
  python -m mmard_jax.main --config $config --workdir $workdir \
    --config.parallel.num_processes=-1 --config.attack.unroll=1 $*"
