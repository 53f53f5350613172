"""Opt-in (``MMARD_JAX_HOST_DEVICES=auto``): one XLA:CPU device per core (up to 8), so the data-parallel step keeps every
core busy. With one device XLA:CPU leaves about a quarter of 2 cores idle inside a step; two host devices on 2 cores
made the demo's MMARD and RSLAD steps 1.5-1.6x faster than PyTorch (benchmarks/results/step_speed.md). Results do not
depend on the device count (tests/test_train.py), and the flag only shapes the CPU platform.

Not the default: in a study run on 2 cores with 2 host devices, an all-gather inside AutoAttack's host-driven APGD-T
loop once waited 40 s for the second device and XLA:CPU aborted the process (rendezvous termination timeout), after 10
runs that went through. That all-gather (from writing APGD's loss history) is gone: the attacks' state is split over
the devices like the batch, and an APGD iteration compiles without any collective (tests/test_autoattack.py). One
device stays the default until a long 2-device run confirms that this was the cause.

This module must not import JAX: the count is fixed by ``XLA_FLAGS`` before JAX's backends start.
"""

from __future__ import annotations

import os

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
OPT_IN_VARIABLE = "MMARD_JAX_HOST_DEVICES"
MAX_HOST_DEVICES = 8


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, e.g. under taskset or a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_host_devices(batch_sizes, cores: int | None = None) -> int:
    """The largest power of two <= min(cores, 8) that divides every batch size (each is split over the devices)."""
    count = 1
    limit = min(cores or usable_cores(), MAX_HOST_DEVICES)
    while count * 2 <= limit and all(int(size) % (count * 2) == 0 for size in batch_sizes):
        count *= 2
    return count


def set_default_host_devices(batch_sizes, environ=os.environ) -> int | None:
    """Adds the device-count flag to XLA_FLAGS unless the user set one; returns the count set (None: left alone)."""
    flags = environ.get("XLA_FLAGS", "")
    if DEVICE_COUNT_FLAG in flags:
        return None
    count = default_host_devices(batch_sizes)
    environ["XLA_FLAGS"] = f"{flags} {DEVICE_COUNT_FLAG}={count}".strip()
    return count
