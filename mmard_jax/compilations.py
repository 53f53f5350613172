"""How the product's programs compile: the XLA options they compile with on CPU, and which programs XLA compiles
inside a block (a check that a change, a new loss or another network of the same architecture, does not recompile,
and where a first run's compile time goes)."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import jax
import numpy as np

# LLVM at optimisation level 1 instead of XLA's default 3: on XLA:CPU the run time of these programs is spent in the
# convolution and matrix library calls, which LLVM does not generate, so it only has the element-wise fusions to
# optimise, and level 1 compiles them faster. benchmarks/step_compile_options.py measures the train step: compile time
# 7-21 % lower on the demo, 0-15 % on CIFAR-shaped ResNet-18 steps, steps within noise, and the same bits in the first
# update at both sizes (at test sizes the two differ by float32 rounding, ~1e-9). Level 0 compiles faster still but
# runs the demo's steps 1.8-2.2x slower. The AutoAttack programs add the classic emitters (mmard_jax.attacks.autoattack),
# which compile the train step slower.
CPU_COMPILER_OPTIONS = (("xla_backend_optimization_level", 1),)


def _identity(x):
    return x


@functools.cache
def compiler_options(cpu_options: tuple[tuple[str, object], ...] = CPU_COMPILER_OPTIONS) -> dict | None:
    """The XLA options to compile a program with: ``cpu_options`` on CPU (when this XLA knows them), else None."""
    if jax.default_backend() != "cpu":
        return None
    options = dict(cpu_options)
    try:  # a tiny program: an XLA without these options refuses them
        jax.jit(_identity, compiler_options=options).lower(np.float32(0)).compile()
    except jax.errors.JaxRuntimeError:
        return None
    return options


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
