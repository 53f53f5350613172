"""How the product's programs compile: the XLA options they compile with on CPU, and which programs XLA compiles
inside a block (a check that a change, a new loss or another network of the same architecture, does not recompile,
and where a first run's compile time goes)."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import jax
import numpy as np

from mmard_jax import host_devices

# LLVM at optimisation level 1 instead of XLA's default 3: on XLA:CPU the run time of these programs is spent in the
# convolution and matrix library calls, which LLVM does not generate, so it only has the element-wise fusions to
# optimise, and level 1 compiles them faster. benchmarks/step_compile_options.py measures the train step: compile time
# 7-21 % lower on the demo, 0-15 % on CIFAR-shaped ResNet-18 steps, steps within noise, and the same bits in the first
# update at both sizes (at test sizes the two differ by float32 rounding, ~1e-9). Reductions that XLA emits itself
# (below) may sum in another order at level 1 than at 3: float32 rounding. Level 0 compiles faster still but
# runs the demo's steps 1.8-2.2x slower. The AutoAttack programs add the classic emitters (mmard_jax.attacks.autoattack),
# which compile the train step slower.
LLVM_LEVEL_1 = ("xla_backend_optimization_level", 1)
# YNNPACK, XLA:CPU's library for convolutions and matrix products, by default also takes over reductions fused with
# their element-wise producers. Here those stay with XLA. The sum over output channels of a one-channel layer's input
# gradient (models/convolution.py: scattered_input_gradient) ran as one YNNPACK fusion per PGD iteration, 6 ms each:
# with XLA's default the demo's steps are 1.9x (MMARD) and 1.5x (RSLAD) slower
# (benchmarks/results/step_compile_options_ynnpack.md, the "YNNPACK reductions" variant). CIFAR-shaped steps: within
# noise (ad hoc). The results change by float32 rounding only (a reduction's summation order).
YNNPACK_CONVOLUTIONS_AND_DOTS = (
    "xla_cpu_experimental_ynn_fusion_type",
    "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION",
)
CPU_COMPILER_OPTIONS = (LLVM_LEVEL_1, YNNPACK_CONVOLUTIONS_AND_DOTS)
# Matrix products left to Eigen, only convolutions to YNNPACK (see ONE_EIGEN_THREAD_PER_DEVICE below for why):
# benchmarks/step_compile_options.py's "YNNPACK convolutions only" variant.
YNNPACK_CONVOLUTIONS_ONLY = (YNNPACK_CONVOLUTIONS_AND_DOTS[0], "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION")
# With one XLA:CPU device per core (mmard_jax.host_devices' default), Eigen's kernels run single-threaded inside each
# device: as fast as multi-threaded ones there (CIFAR-shaped steps 1.00x / 0.98x, RSLAD / MMARD, batch 32, 2 devices
# on 2 cores: benchmarks/results/step_compile_options_cifar.md, "threaded Eigen"), and Eigen then cannot take the
# other device's core. It was first set for bit-reproducible reruns, which it does not give: in that record the RSLAD
# step reran identically with either setting (4 of 4), the MMARD step with neither. Keeping matrix products out of
# YNNPACK (YNNPACK_CONVOLUTIONS_ONLY) does not give them either: on a later host both steps' reruns differed with and
# without it, and it made the steps 4-7 % slower (benchmarks/results/step_compile_options_products.md), so the
# product keeps products in YNNPACK. Root cause not found; PGD's sign steps amplify float32 rounding.
ONE_EIGEN_THREAD_PER_DEVICE = ("xla_cpu_multi_thread_eigen", False)


def _identity(x):
    return x


@functools.cache
def compiler_options(cpu_options: tuple[tuple[str, object], ...] = CPU_COMPILER_OPTIONS) -> dict | None:
    """The XLA options to compile a program with: ``cpu_options`` on CPU (when this XLA knows them), and single-threaded
    Eigen kernels when every core has its own device (ONE_EIGEN_THREAD_PER_DEVICE); None elsewhere."""
    if jax.default_backend() != "cpu":
        return None
    options = dict(cpu_options)
    if jax.local_device_count() >= host_devices.usable_cores():
        options.update([ONE_EIGEN_THREAD_PER_DEVICE])
    try:  # a tiny program: an XLA without these options refuses them
        jax.jit(_identity, compiler_options=options).lower(np.float32(0)).compile()
    except jax.errors.JaxRuntimeError:
        return None
    return options


class LazyJit:
    """``jax.jit(fun, static_argnames=...)`` compiled with ``options()`` (default `compiler_options`), built at the
    first call: the backend is only looked at then (importing a module must not start JAX's backends, e.g. before
    jax.distributed). Called inside another transformation (jit, vmap, eval_shape: a traced argument), it is a plain
    nested jit, compiled as part of the outer program (JAX takes compiler options at the top level only)."""

    def __init__(self, fun, static_argnames: tuple[str, ...], options: Callable[[], dict | None] = compiler_options):
        self._fun, self._static_argnames, self._options, self._jitted = fun, static_argnames, options, None
        self._nested = jax.jit(fun, static_argnames=static_argnames)
        functools.update_wrapper(self, fun)

    def _get(self):
        if self._jitted is None:
            self._jitted = jax.jit(self._fun, static_argnames=self._static_argnames, compiler_options=self._options())
        return self._jitted

    def __call__(self, *args, **kwargs):
        if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves((args, kwargs))):
            return self._nested(*args, **kwargs)
        return self._get()(*args, **kwargs)

    def lower(self, *args, **kwargs):
        """The program for these arguments, as `jax.jit(...).lower` gives it (e.g. to read its compiled HLO)."""
        return self._get().lower(*args, **kwargs)


def jit(fun=None, *, static_argnames=(), options: Callable[[], dict | None] = compiler_options):
    """Decorator: `jax.jit` compiled with ``options()`` (see `LazyJit`); the product's CPU options by default."""
    if fun is None:
        return functools.partial(jit, static_argnames=static_argnames, options=options)
    return LazyJit(fun, tuple(static_argnames), options)


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
