"""What benchmark scripts share: publishing the markdown report, and telling a quiet machine from a shared one."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path


def publish(report: str, path: str | Path | None) -> None:
    """Prints ``report``; writes it to ``path`` too (parent folders created) unless ``path`` is empty."""
    print(report)
    if path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(report, encoding="utf-8")


def joined(values, digits: int = 1) -> str:
    """``values`` as '1.2, 3.4' with ``digits`` decimals (one number per run or pair in a table cell)."""
    return ", ".join(f"{value:.{digits}f}" for value in values)


def format_options(options: dict) -> str:
    """XLA compiler options as 'name=value, ...' ('none' for XLA's defaults)."""
    return ", ".join(f"{name}={value}" for name, value in options.items()) or "none"


def options_or_products(options) -> dict:
    """XLA compiler options as a dict: ``options``, or for None the product's own CPU options
    (``mmard_jax.compilations.compiler_options``, what the product compiles its programs with)."""
    from mmard_jax import compilations

    return dict(compilations.compiler_options() or {}) if options is None else dict(options)


def threaded_eigen(options: dict) -> dict:
    """XLA compiler options without the product's single-threaded Eigen kernels
    (``compilations.ONE_EIGEN_THREAD_PER_DEVICE``): Eigen multi-threaded, XLA's default."""
    from mmard_jax import compilations

    return {k: v for k, v in options.items() if k != compilations.ONE_EIGEN_THREAD_PER_DEVICE[0]}


def interleaved_medians(thunks: dict, repeats: int) -> dict:
    """Median seconds of each thunk over ``repeats`` turns in which every thunk runs once (interleaved: a busy spell
    hits all of them alike), after one warm-up call each."""
    for thunk in thunks.values():
        thunk()
    times = {name: [] for name in thunks}
    for _ in range(repeats):
        for name, thunk in thunks.items():
            start = time.perf_counter()
            thunk()
            times[name].append(time.perf_counter() - start)
    return {name: sorted(values)[len(values) // 2] for name, values in times.items()}


def load_threshold(cores: int) -> float:
    """The 1-minute load that other processes may put on a machine whose ``cores`` a benchmark uses."""
    return (os.cpu_count() or cores) - cores + 0.5


def wait_for_quiet(cores: int, limit: float) -> None:
    """Waits (at most ``limit`` seconds) until the 1-minute load falls to `load_threshold`: a run started right after
    another one (or a build) would otherwise be refused for that one's load, which takes minutes to decay."""
    deadline = time.monotonic() + limit
    while os.getloadavg()[0] > load_threshold(cores) and time.monotonic() < deadline:
        time.sleep(5)


def load_contention(load_before, load_after, own_after: float, cores: int) -> str | None:
    """Why the machine was not quiet enough to trust a timing ratio, or None.

    A load average counts runnable threads, the benchmark's own included, so (1) the 1-minute load *before* it started
    must fit in the cores it does not use, with half a core to spare (threshold = CPUs - pinned cores + 0.5), and
    (2) so must the 1-minute load *after* minus ``own_after``, the cores the benchmark kept busy in its last minute.
    """
    threshold = load_threshold(cores)
    if load_before[0] > threshold:
        return f"contended: 1-minute load before {load_before[0]:.2f} > {threshold:.1f} (CPUs - pinned cores + 0.5)"
    if load_after[0] - own_after > threshold:
        return (
            f"contended: 1-minute load after {load_after[0]:.2f} minus this process's {own_after:.2f} busy cores "
            f"= {load_after[0] - own_after:.2f} > {threshold:.1f}"
        )
    return None


def format_load(load) -> str:
    return " / ".join(f"{value:.2f}" for value in load) + " (1 / 5 / 15 min)"


STEAL_FIELD = 7  # /proc/stat's first line: user nice system idle iowait irq softirq steal ...


def cpu_times() -> tuple[int, ...] | None:
    """The machine's cumulative CPU times (/proc/stat, clock ticks), or None where there is no /proc/stat."""
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            fields = stat.readline().split()
    except OSError:
        return None
    return tuple(int(value) for value in fields[1:])


def steal_share(before, after) -> float | None:
    """Share of CPU time between two `cpu_times` readings that the hypervisor gave to other virtual machines.

    A load average cannot see them: on a shared host a benchmark can run 20 % slower with a load of 0.3. Interleaved
    rounds spread such spells over both sides of a ratio; the share says how noisy the absolute times are.
    """
    if before is None or after is None or len(before) <= STEAL_FIELD:
        return None
    elapsed = [b - a for a, b in zip(before, after, strict=True)]
    total = sum(elapsed[: STEAL_FIELD + 1])  # guest time is already counted in user time
    return elapsed[STEAL_FIELD] / total if total > 0 else None


def format_steal(before, after) -> str:
    share = steal_share(before, after)
    if share is None:
        return "CPU steal: unknown (no /proc/stat)"
    return f"CPU steal (time the hypervisor gave other virtual machines) {100 * share:.1f} %"


def conv_function(kind: str):
    """The convolution a path traces with: ``lax.conv_general_dilated`` ('xla') or the product's ('product')."""
    import jax

    from mmard_jax.models import convolution

    return {"xla": jax.lax.conv_general_dilated, "product": convolution.conv_general_dilated}[kind]


@contextlib.contextmanager
def model_convolutions(kind: str):
    """The product's models trace with ``conv_function(kind)`` inside this block. JAX's caches are emptied on entry
    and exit: a model's convolution is a class attribute, which JAX's trace caches do not see, so a function traced
    on one side of the switch would otherwise come back from the cache on the other."""
    import jax

    from mmard_jax.models import layers

    saved = layers.ImageClassifier.conv_op
    jax.clear_caches()
    layers.ImageClassifier.conv_op = conv_function(kind)
    try:
        yield
    finally:
        layers.ImageClassifier.conv_op = saved
        jax.clear_caches()
