"""The device mesh, shardings, host-to-device batch placement and multi-host initialisation.

Every program runs on a 1-axis mesh named ``'data'``: parameters are replicated (``P()``), batches are split
along their first axis (``P('data')``). Per-device code reduces over the axis with ``lax.pmean(x, DATA_AXIS)``.
"""

from __future__ import annotations

import logging

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"

logger = logging.getLogger(__name__)


def make_mesh(devices=None) -> Mesh:
    """A 1-axis ('data',) mesh over ``devices`` (default: all devices of all processes)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def replicate(tree, mesh: Mesh):
    """Places a host pytree on every device of ``mesh``."""
    return jax.device_put(tree, replicated(mesh))


def global_batch(local_batch, mesh: Mesh):
    """Assembles each process's local slice of a batch into one global array sharded over 'data'."""
    sharding = batch_sharded(mesh)
    return jax.tree.map(lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a)), local_batch)


def initialize_distributed(parallel_cfg) -> None:
    """Starts jax.distributed for multi-host runs; a no-op for one process.

    With ``coordinator_address`` set, the address/num_processes/process_id fields are used as given; on Cloud TPU
    and SLURM, ``num_processes = -1`` asks JAX to detect them from the environment.
    """
    if parallel_cfg.coordinator_address or parallel_cfg.num_processes < 0:
        # CPU processes exchange collectives through gloo (the setting only concerns the CPU client).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if parallel_cfg.coordinator_address:
        jax.distributed.initialize(
            coordinator_address=parallel_cfg.coordinator_address,
            num_processes=parallel_cfg.num_processes or None,
            process_id=None if parallel_cfg.process_id < 0 else parallel_cfg.process_id,
        )
    elif parallel_cfg.num_processes < 0:
        jax.distributed.initialize()
    else:
        return
    logger.info(
        "jax.distributed: process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
