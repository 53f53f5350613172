"""Compile time and speed of the train step under XLA:CPU options: the product's against XLA's defaults (ours only).

The train step and the evaluation programs compile with `mmard_jax.compilations.compiler_options()` on CPU (through
``parallel.compile_synchronized``). This script takes the step that training runs, built by step_speed.py's builders
(the shipped configs, a synthetic batch, a random teacher), lowers it once per setting and method, and compiles it
under every variant, ``--pairs`` times in alternating order (``jax.clear_caches()`` before each compilation, so nothing
is reused). The compiled programs then run interleaved timed rounds from the same state, and each variant's first
update (parameters, BatchNorm statistics, metrics) is compared with the product's, bit for bit, and with itself over
``--reruns`` runs of the same program from the same state (is the variant reproducible?).

Two variants change the product in other ways than XLA's options: "threaded Eigen" drops the product's
single-threaded Eigen kernels (``compilations.ONE_EIGEN_THREAD_PER_DEVICE``), and "no Winograd" traces the step with
every convolution left to XLA's libraries (``convolution.winograd_applies`` never true), so what each of those
choices of the product gains or costs is measured here: step time, compile time and whether reruns agree.

    PYTHONPATH=. python benchmarks/step_compile_options.py --settle 300 \
        --output benchmarks/results/step_compile_options.md
    PYTHONPATH=. python benchmarks/step_compile_options.py --setting cifar --method rslad --steps 2 --output ''
    PYTHONPATH=. python benchmarks/step_compile_options.py --setting cifar --variants "threaded Eigen,no Winograd,product" \
        --pairs 1 --reruns 4 --settle 300 --output benchmarks/results/step_compile_options_cifar.md

Like step_speed.py it pins itself to ``--cores`` and starts JAX with the product's host device count.
``--tiny``: test sizes (the CI smoke test).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_speed  # noqa: E402
from benchmark_report import (  # noqa: E402
    cpu_times,
    format_load,
    format_options,
    format_steal,
    joined,
    load_contention,
    options_or_products,
    publish,
    threaded_eigen,
    wait_for_quiet,
)

from mmard_jax import compilations, parallel, train  # noqa: E402
from mmard_jax.attacks.autoattack import common as attack_common  # noqa: E402
from mmard_jax.models import convolution  # noqa: E402


@contextlib.contextmanager
def without_winograd():
    """Traces with no convolution taken for Winograd's (its channel threshold out of reach), JAX's caches emptied
    on entry and exit so that no trace crosses the switch."""
    saved = convolution.WINOGRAD_MIN_CHANNELS
    jax.clear_caches()
    convolution.WINOGRAD_MIN_CHANNELS = sys.maxsize
    try:
        yield
    finally:
        convolution.WINOGRAD_MIN_CHANNELS = saved
        jax.clear_caches()


@dataclasses.dataclass(frozen=True)
class Variant:
    """How a variant departs from the product: XLA options (a tuple of pairs; None: the product's own,
    ``compilations.compiler_options()``; a function: a change of the product's) and, where set, a context manager
    under which the step is traced instead of as shipped."""

    options: tuple | Callable[[dict], dict] | None = None
    tracing: Callable[[], contextlib.AbstractContextManager] | None = None


PRODUCT = "product"
VARIANTS = {
    "XLA defaults": Variant(()),
    "LLVM level 0": Variant((("xla_backend_optimization_level", 0),)),
    "attack options": Variant(attack_common.CPU_COMPILER_OPTIONS),
    # the product's options, but XLA's default of what YNNPACK runs
    "YNNPACK reductions": Variant((compilations.LLVM_LEVEL_1,)),
    "threaded Eigen": Variant(threaded_eigen),
    # matrix products (Winograd's among them) to Eigen, convolutions still to YNNPACK
    "YNNPACK convolutions only": Variant(lambda options: options | dict([compilations.YNNPACK_CONVOLUTIONS_ONLY])),
    "no Winograd": Variant(tracing=without_winograd),
    PRODUCT: Variant(),
}
DEFAULT_VARIANTS = ("XLA defaults", "attack options", PRODUCT)
DEFAULT_STEPS = {"mnist": 10, "cifar": 2}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", default="mnist", help="comma-separated: mnist, cifar (step_speed.py's settings)")
    parser.add_argument("--method", default="mmard,rslad", help="comma-separated: mmard, rslad")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma-separated, of {list(VARIANTS)}")
    parser.add_argument("--pairs", type=int, default=3, help="compilations of every variant, alternating")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timed rounds of every variant")
    parser.add_argument("--reruns", type=int, default=2, help="runs of every variant's first update, compared bitwise")
    parser.add_argument("--steps", type=int, help="timed steps per round (default: mnist 10, cifar 2)")
    parser.add_argument("--cores", help="CPU cores to pin to, e.g. '0,1' (default: this process's)")
    parser.add_argument("--tiny", action="store_true", help="test sizes (step_speed.py's --tiny)")
    parser.add_argument("--settle", type=float, default=0, help="seconds to wait at most for a quiet machine first")
    parser.add_argument("--output", default="benchmarks/results/step_compile_options.md", help="'' = print only")
    args = parser.parse_args(argv)
    args.variant_names = [name.strip() for name in args.variants.split(",") if name.strip()]
    unknown = sorted(set(args.variant_names) - set(VARIANTS))
    if unknown or PRODUCT not in args.variant_names:
        parser.error(f"--variants {args.variants!r}: choose among {list(VARIANTS)}, {PRODUCT!r} included")
    if min(args.pairs, args.rounds, args.reruns) < 1 or (args.steps is not None and args.steps < 1):
        parser.error("--pairs, --rounds, --reruns and --steps must be at least 1")
    return args


def variant_options(name: str) -> dict:
    options = VARIANTS[name].options
    return options(options_or_products(None)) if callable(options) else options_or_products(options)


def lower_step(side, name: str):
    """The train step lowered as variant ``name`` traces it."""
    tracing = VARIANTS[name].tracing or contextlib.nullcontext
    with tracing():
        step = train.make_train_step(side.spec, side.mesh)
        return step.lower(side.state, side.teacher_vars, side.images, side.labels)


def compile_fresh(lowered, options: dict) -> tuple[object, float]:
    """``lowered`` compiled under ``options`` with JAX's in-memory caches emptied first; (executable, seconds)."""
    jax.clear_caches()
    start = time.perf_counter()
    executable = lowered.compile(compiler_options=options)
    return executable, time.perf_counter() - start


@dataclasses.dataclass
class VariantResult:
    options: dict
    compile_seconds: list[float] = dataclasses.field(default_factory=list)
    rounds: list = dataclasses.field(default_factory=list)  # step_speed.Round
    first_update: list = dataclasses.field(default_factory=list)  # host leaves
    rerun_updates: list = dataclasses.field(default_factory=list)  # the first update's later reruns (host leaves)

    @property
    def step_seconds(self) -> list[float]:
        return [s for r in self.rounds for s in r.step_seconds]


def measure(side, names: list[str], args, steps: int) -> dict[str, VariantResult]:
    """Compile times (alternating), the first update from one start state (``--reruns`` times), then interleaved
    timed rounds."""
    product_lowering = lower_step(side, PRODUCT)
    lowered = {name: lower_step(side, name) if VARIANTS[name].tracing else product_lowering for name in names}
    results = {name: VariantResult(variant_options(name)) for name in names}
    executables = {}
    for pair in range(args.pairs):
        for name in names if pair % 2 == 0 else names[::-1]:
            executables[name], seconds = compile_fresh(lowered[name], results[name].options)
            results[name].compile_seconds.append(seconds)
    start_state = jax.device_get(side.state)
    states = {}
    for rerun in range(args.reruns):  # the first call is also the warm-up
        for name, executable in executables.items():
            states[name], metrics = executable(
                parallel.replicate(start_state, side.mesh), side.teacher_vars, side.images, side.labels
            )
            updated = (states[name].params, states[name].batch_stats, metrics)
            leaves = [np.asarray(leaf) for leaf in jax.tree.leaves(jax.device_get(updated))]
            if rerun == 0:
                results[name].first_update = leaves
            else:
                results[name].rerun_updates.append(leaves)
    for _ in range(args.rounds):
        for name, executable in executables.items():

            def run_step(name=name, executable=executable):
                states[name], metrics = executable(states[name], side.teacher_vars, side.images, side.labels)
                jax.block_until_ready((states[name], metrics))

            results[name].rounds.append(step_speed.timed_round(run_step, steps))
    return results


def largest_difference(leaves, reference) -> float:
    """The largest absolute difference between two lists of arrays (0.0: the same values)."""
    return max(float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)), initial=0.0)) for a, b in zip(
        leaves, reference, strict=True
    ))  # fmt: skip


def same_bits(leaves, reference) -> bool:
    return all(np.array_equal(a, b) for a, b in zip(leaves, reference, strict=True))


def agreement(leaves, reference) -> str:
    if same_bits(leaves, reference):
        return "same bits"
    return f"differs, max abs {largest_difference(leaves, reference):.1e}"


def reruns_agreement(result: VariantResult) -> str:
    """Whether every rerun of the first update gave the first run's bits ("n/a" with one run)."""
    if not result.rerun_updates:
        return "n/a"
    differing = [
        largest_difference(r, result.first_update)
        for r in result.rerun_updates
        if not same_bits(r, result.first_update)
    ]
    runs = len(result.rerun_updates) + 1
    if not differing:
        return f"{runs} of {runs} identical"
    return f"{len(differing)} of {runs - 1} reruns differ, max abs {max(differing):.1e}"


def report_rows(results: dict[str, VariantResult]) -> list[str]:
    product = results[PRODUCT]
    rows = [
        "| variant (options) | compile s (each pair) | median s/step | min s/step | first update vs product | "
        "reruns of the first update |",
        "|---|---|---|---|---|---|",
    ]
    for name, result in results.items():
        options = format_options(result.options)
        traced = " (traced without Winograd)" if VARIANTS[name].tracing is without_winograd else ""
        rows.append(
            f"| {name} ({options}){traced} | {joined(result.compile_seconds, 2)} | "
            f"{statistics.median(result.step_seconds):.4g} | {min(result.step_seconds):.4g} | "
            f"{agreement(result.first_update, product.first_update)} | {reruns_agreement(result)} |"
        )
    rows.append("")
    for name, result in results.items():
        if name == PRODUCT:
            continue
        compile_ratio = [a / b for a, b in zip(result.compile_seconds, product.compile_seconds, strict=True)]
        step_ratio = statistics.median(result.step_seconds) / statistics.median(product.step_seconds)
        rows.append(
            f"- {name} ÷ product: compile time {joined(compile_ratio, 2)} (each pair); median step {step_ratio:.2f}"
        )
    return rows


def main(argv: list[str] | None = None, *, may_reexec: bool = False) -> dict[str, dict[str, VariantResult]]:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    speed_args = step_speed.parse_args(
        ["--setting", args.setting, "--method", args.method, *(["--tiny"] if args.tiny else [])]
        + (["--cores", args.cores] if args.cores else [])
    )
    step_speed.prepare_process(speed_args, may_reexec=may_reexec)
    cores = len(os.sched_getaffinity(0))
    wait_for_quiet(cores, args.settle)
    load_before, times_before = os.getloadavg(), cpu_times()
    lines, everything = [], {}
    for setting in (s.strip() for s in args.setting.split(",")):
        for method in speed_args.methods:
            config, shape, what = step_speed.benchmark_config(speed_args, setting)
            side = step_speed.build_jax_side(config, method, shape, speed_args.devices)
            steps = args.steps or DEFAULT_STEPS[setting]
            results = measure(side, args.variant_names, args, steps)
            everything[f"{setting}/{method}"] = results
            attack = side.spec.attack
            lines += [
                f"## {what}: {method}",
                "",
                f"- batch {config.optim.batch_size}, PGD-{attack.steps} (unroll {attack.unroll}), "
                f"{speed_args.devices} JAX device(s); {args.rounds} interleaved rounds of {steps} steps after the "
                "first (warm-up) step",
                "",
                *report_rows(results),
                "",
            ]
    load_after, times_after = os.getloadavg(), cpu_times()
    last_rounds = [r for result in results.values() for r in result.rounds]  # what the 1-minute load last saw of us
    verdict = load_contention(load_before, load_after, min(step_speed.recent_busy_cores(last_rounds), cores), cores)
    header = [
        "# Train-step compile time and speed under XLA:CPU options (ours only)",
        "",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- command: `PYTHONPATH=. python benchmarks/step_compile_options.py {' '.join(argv)}`",
        f"- machine: {platform.platform()}, {os.cpu_count()} CPUs, pinned to cores {sorted(os.sched_getaffinity(0))}; "
        f"Python {platform.python_version()}, jax {jax.__version__} ({jax.device_count()} devices)",
        f"- load average before {format_load(load_before)}, after {format_load(load_after)}: {verdict or 'quiet'}; "
        f"{format_steal(times_before, times_after)}",
        f"- every variant compiled {args.pairs} time(s), alternating the order, JAX's caches emptied before each",
        "",
    ]
    publish("\n".join(header + lines), args.output)
    return everything


if __name__ == "__main__":
    main(may_reexec=True)
