"""The device mesh, shardings, host-to-device batch placement and multi-host initialisation.

Every program runs on a 1-axis mesh named ``'data'``: parameters are replicated (``P()``), batches are split
along their first axis (``P('data')``). Per-device code reduces over the axis with ``lax.pmean(x, DATA_AXIS)``.
"""

from __future__ import annotations

import itertools
import logging
import math
import socket
import time

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mmard_jax import checks, compilations

DATA_AXIS = "data"
BARRIER_TIMEOUT_S = 3600.0  # how long a process waits for the slowest one to finish compiling
COORDINATOR_POLL_S = 0.5  # how often a process retries the coordinator while it waits for process 0 to start
_barrier_ids = itertools.count()

logger = logging.getLogger(__name__)


def make_mesh(devices=None) -> Mesh:
    """A 1-axis ('data',) mesh over ``devices`` (default: all devices of all processes, in the order
    ``jax.make_mesh`` picks for the hardware's topology). Sharding is automatic: the step says what it reduces."""
    devices = jax.devices() if devices is None else list(devices)
    return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=devices)


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
    and SLURM, ``num_processes = -1`` asks JAX to detect them from the environment. Connecting to the coordinator
    and to the other processes takes at most ``initialization_timeout_s`` in all.
    """
    if parallel_cfg.coordinator_address or parallel_cfg.num_processes < 0:
        # CPU processes exchange collectives through gloo (the setting only concerns the CPU client).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    deadline = time.monotonic() + parallel_cfg.initialization_timeout_s
    if parallel_cfg.coordinator_address:
        if parallel_cfg.process_id > 0:  # process 0 starts the coordinator; the others must reach it
            wait_for_coordinator(parallel_cfg.coordinator_address, parallel_cfg.initialization_timeout_s)
        elif parallel_cfg.process_id == 0:  # JAX ends process 0 with a C++ fatal error if a peer never comes
            logger.info(
                "jax.distributed: coordinator at %s, waiting up to %d s for all %s processes to join "
                "(config.parallel.initialization_timeout_s)",
                parallel_cfg.coordinator_address,
                _seconds_left(deadline),
                parallel_cfg.num_processes or "the",
            )
        jax.distributed.initialize(
            coordinator_address=parallel_cfg.coordinator_address,
            num_processes=parallel_cfg.num_processes or None,
            process_id=None if parallel_cfg.process_id < 0 else parallel_cfg.process_id,
            initialization_timeout=_seconds_left(deadline),
        )
    elif parallel_cfg.num_processes < 0:
        jax.distributed.initialize(initialization_timeout=_seconds_left(deadline))
    else:
        return
    logger.info(
        "jax.distributed: process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )


def _seconds_left(deadline: float) -> int:
    """Whole seconds until ``deadline`` (at least 1): jax.distributed takes its timeout in seconds."""
    return max(1, math.ceil(deadline - time.monotonic()))


def wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Returns once ``address`` ('host:port') accepts a TCP connection; an InvalidValue naming
    config.parallel.coordinator_address if it has not within ``timeout_s`` seconds.

    jax.distributed.initialize ends the whole process with a C++ fatal error (no Python exception, no clean exit code)
    when it cannot reach the coordinator in time; a coordinator that is down or an address that is wrong is therefore
    found here, before it is called, and reported as one error.
    """
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=COORDINATOR_POLL_S):
                return
        except OSError as error:
            if time.monotonic() + COORDINATOR_POLL_S > deadline:
                checks.fail(
                    "config.parallel.coordinator_address",
                    f"no coordinator answered at {address} within {timeout_s:g} s ({error}); start process 0 first, "
                    "check the address, or wait longer with config.parallel.initialization_timeout_s",
                )
        time.sleep(COORDINATOR_POLL_S)


def barrier(name: str) -> None:
    """Waits until every process reaches this point (a no-op for one process).

    It uses the coordination service of jax.distributed, not a collective, so a process may arrive up to
    ``BARRIER_TIMEOUT_S`` late (gloo's CPU collectives give up after 30 s). Every process must make the same sequence
    of calls.
    """
    if jax.process_count() == 1:
        return
    from jax._src import distributed  # the client JAX's own multi-host serialization waits on

    barrier_id = f"mmard_jax/{name}/{next(_barrier_ids)}"
    distributed.global_state.client.wait_at_barrier(barrier_id, timeout_in_ms=int(BARRIER_TIMEOUT_S * 1000))


def compile_synchronized(jitted, *args, name: str):
    """``jitted`` compiled ahead of time for ``args`` (static ones included), once every process has compiled it.

    Processes finish compiling at different times; meeting first in the program's collectives would make the early
    ones wait there, and gloo's 30 s timeout on CPU would fail the run. The result is called with the non-static args.
    It compiles with the product's XLA options (`mmard_jax.compilations.compiler_options`).
    """
    compiled = jitted.lower(*args).compile(compiler_options=compilations.compiler_options())
    barrier(name)
    return compiled
