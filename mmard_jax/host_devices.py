"""How many XLA:CPU devices a single-process run gets: by default one per core (up to 8), so the data-parallel step
keeps every core busy. With one device XLA:CPU leaves about a quarter of 2 cores idle inside a step; two host devices
on 2 cores made the demo's MMARD and RSLAD steps 1.5-1.6x faster than PyTorch (benchmarks/results/step_speed.md).

``MMARD_JAX_HOST_DEVICES`` chooses: ``auto`` (the default) or a device count (``1`` = one device, as plain JAX).
``XLA_FLAGS`` naming a count wins over both. On a GPU/TPU host the flag shapes only the (unused) CPU platform.

A step's result does not depend on the device count beyond floating-point summation order (tests/test_train.py), but
a whole training run's digits do move with it (reproduce a run with the device count it recorded).

History: this was opt-in after one study run on 2 cores aborted inside XLA:CPU (an all-gather rendezvous in
AutoAttack's host-driven APGD-T loop waited 40 s for the second device). That all-gather is gone: the attacks' state
is split over the devices like the batch, and an APGD iteration compiles without any collective
(tests/test_autoattack.py); the same study workload then ran through with two devices
(benchmarks/results/host_devices_validation.md).

This module must not import JAX: the count is fixed by ``XLA_FLAGS`` before JAX's backends start.
"""

from __future__ import annotations

import os

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
CHOICE_VARIABLE = "MMARD_JAX_HOST_DEVICES"
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


def requested_host_devices(environ=os.environ) -> int | None:
    """The count ``MMARD_JAX_HOST_DEVICES`` asks for: None for ``auto`` (or unset), else a positive integer."""
    value = environ.get(CHOICE_VARIABLE, "auto").strip()
    if value in ("", "auto"):
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{CHOICE_VARIABLE}={value!r}: use 'auto' (one XLA:CPU device per core) or a count >= 1")
    return int(value)


def set_default_host_devices(batch_sizes, environ=os.environ) -> int | None:
    """Adds the device-count flag to XLA_FLAGS unless the user set one; returns the count set (None: left alone)."""
    requested = requested_host_devices(environ)  # checked even when XLA_FLAGS wins
    flags = environ.get("XLA_FLAGS", "")
    if DEVICE_COUNT_FLAG in flags:
        return None
    count = requested or default_host_devices(batch_sizes)
    environ["XLA_FLAGS"] = f"{flags} {DEVICE_COUNT_FLAG}={count}".strip()
    return count
