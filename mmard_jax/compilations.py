"""Which programs XLA compiles inside a block: a check that a change (a new loss, another network of the same
architecture) does not recompile, and where a first run's compile time goes."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def recorded() -> Iterator[list[tuple[str, float]]]:
    """Yields a list that receives (program name, compile seconds) for every backend compilation in the block."""
    compiled: list[tuple[str, float]] = []

    def listener(event: str, duration_secs: float, **kwargs) -> None:
        if event == BACKEND_COMPILE_EVENT:
            compiled.append((kwargs.get("fun_name", "?"), duration_secs))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield compiled
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
