"""Which forward passes on small grids go to Eigen: the product's threshold against the one before, on CPU.

`mmard_jax.models.convolution` writes a forward pass on a small output grid (<= 16x16) in the row-dilated form that
XLA:CPU gives to Eigen only when a side has more than ``EIGEN_FORWARD_MIN_CHANNELS`` channels (the product: 64).
Before 2026-12-06 every such pass with more than 16 channels went there. This script compiles each workload under
both thresholds in one process, then times them in alternating rounds (a busy spell hits both alike):

- AutoAttack 'standard' on held-out MNIST-5k digits against the PGD-trained SmallCNN of autoattack_twin.py (its
  5x5, 16 -> 32 layer on an 8x8 grid is the one that moves), rounds after the compiling one;
- the MNIST-5k demo's MMARD and RSLAD train steps (configs/mnist5k.py, as benchmarks/step_speed.py builds them; their
  stride-2 16 -> 32 and 32 -> 64 layers move).

    PYTHONPATH=. python benchmarks/conv_forward_routing.py --output benchmarks/results/conv_forward_routing.md

Input gradients and kernel gradients are routed the same way under both thresholds. ``--epochs 0 --tiny`` with small
budgets is the CI smoke run.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_report import cpu_times, format_load, format_steal, load_contention, publish, wait_for_quiet  # noqa: E402

PRODUCT, BEFORE = "product (Eigen above 64 channels)", "before (Eigen above 16 channels)"


def thresholds() -> dict[str, int]:
    from mmard_jax.models import convolution

    return {PRODUCT: convolution.EIGEN_FORWARD_MIN_CHANNELS, BEFORE: convolution.YNNPACK_DECLINES_UP_TO_CHANNELS}


@contextlib.contextmanager
def forward_threshold(threshold: int):
    """Within the block, forward passes on small grids go to Eigen above ``threshold`` channels (the threshold is read
    when a program is traced, so what a block compiles keeps its routing)."""
    from mmard_jax.models import convolution

    kept = convolution.EIGEN_FORWARD_MIN_CHANNELS
    convolution.EIGEN_FORWARD_MIN_CHANNELS = threshold
    try:
        yield
    finally:
        convolution.EIGEN_FORWARD_MIN_CHANNELS = kept


def row_dilated(lowered) -> int:
    """How many convolutions of a lowered program are in the row-dilated (Eigen) form (an input dilation > 1)."""
    dilations = re.findall(r"lhs_dilate = \[(\d+), (\d+)\]", lowered.as_text())
    return sum(max(int(a), int(b)) > 1 for a, b in dilations)


def alternate(runs: dict, rounds: int) -> dict[str, list[float]]:
    """Wall seconds of each (already compiled) run over ``rounds`` rounds in which every run goes once, in turn."""
    from mmard_jax import compilations

    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            with compilations.recorded() as compiled:
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
            if compiled:
                raise RuntimeError(f"{name}: a timed round compiled {[n for n, _ in compiled]}")
    return times


def autoattack_runs(args) -> tuple[dict, list[str], dict[str, float]]:
    """One compiled AutoAttack run per threshold (its own apply_fn, so its own programs); each one's robust
    accuracy."""
    import autoattack_twin as twin
    import jax
    import jax.numpy as jnp

    from mmard_jax.attacks.autoattack import run_autoattack

    images, labels = twin.load_mnist5k()
    apply_fn, variables = twin.benchmark_model(
        args.model_cache, images, labels, eps=args.eps, epochs=args.epochs, seed=args.seed
    )
    test = slice(twin.N_TRAIN, twin.N_TRAIN + args.n_examples)
    budgets = {}
    if args.iterations is not None:
        budgets = {name: dict(n_iter=args.iterations) for name in ("apgd_ce", "apgd_t", "fab_t")}
    if args.square_queries is not None:
        budgets["square"] = dict(n_queries=args.square_queries)

    def input_loss(network, x):  # what an attack differentiates: a loss of the logits, by the input
        return jnp.sum(jax.nn.log_softmax(network(variables, x)))

    runs, notes, results = {}, [], {}
    for name, threshold in thresholds().items():
        network = functools.partial(apply_fn)  # a distinct static argument: programs of its own

        def run(network=network, threshold=threshold):
            with forward_threshold(threshold):
                return run_autoattack(
                    network, variables, images[test], labels[test], eps=args.eps, seed=args.seed,
                    batch_size=args.n_examples, log=None, **budgets,
                )  # fmt: skip

        start = time.perf_counter()
        result = run()
        first_round = time.perf_counter() - start
        runs[name] = run
        with forward_threshold(threshold):
            dilated = row_dilated(jax.jit(jax.grad(functools.partial(input_loss, network))).lower(images[test][:8]))
        notes.append(
            f"- {name}: first (compiling) round {first_round:.1f} s; {dilated} row-dilated "
            "convolutions in the network's input-gradient program; robust accuracy "
            f"{result.robust_accuracy:.2%} ({int(result.robust_mask.sum())} of {args.n_examples})"
        )
        results[name] = dict(result=result.robust_accuracy, row_dilated=dilated)
    return runs, notes, results


def demo_step_runs(args, method: str) -> tuple[dict, list[str], dict[str, float]]:
    """The demo's train step of ``method`` compiled under each threshold, each on its own state copy; the first
    step's loss under each."""
    import jax
    import step_speed

    from mmard_jax import train

    step_args = step_speed.parse_args(["--setting", "mnist", *(["--tiny"] if args.tiny else [])])
    runs, notes, results = {}, [], {}
    for name, threshold in thresholds().items():
        config, shape, _ = step_speed.benchmark_config(step_args, "mnist")
        with forward_threshold(threshold):
            side = step_speed.build_jax_side(config, method, shape, len(jax.devices()))
            compiled = step_speed.compile_step(side)
            step = train.make_train_step(side.spec, side.mesh)
            dilated = row_dilated(step.lower(side.state, side.teacher_vars, side.images, side.labels))
        run = step_speed.jax_runner(side, compiled)
        loss = first_loss(jax.device_get(run()))
        runs[name] = run
        notes.append(
            f"- {name}: compile {compiled.compile_seconds:.1f} s; {dilated} row-dilated convolutions in the step's "
            f"program; first step's loss {loss:.6f}"
        )
        results[name] = dict(result=loss, row_dilated=dilated)
    return runs, notes, results


def first_loss(metrics: dict) -> float:
    """The step's loss from its metrics (the mean over devices)."""
    return float(np.mean(metrics["loss"]))


def table(title: str, times: dict[str, list[float]], repeats: int) -> list[str]:
    product, before = (statistics.median(times[name]) for name in (PRODUCT, BEFORE))
    return [
        f"| {title} | {name} | {statistics.median(ts) / repeats:.4f} | {min(ts) / repeats:.4f} | "
        + ", ".join(f"{t / repeats:.4f}" for t in ts)
        + (f" | {before / product:.2f}x |" if name == PRODUCT else " | |")
        for name, ts in times.items()
    ]


def main(argv: list[str] | None = None) -> dict:
    """Runs the comparison; per workload, each variant's timed rounds (s per run or step) and its result (robust
    accuracy or first loss)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="autoattack,mmard,rslad", help="comma-separated subset")
    parser.add_argument("--rounds", type=int, default=4, help="alternating timed rounds per workload")
    parser.add_argument("--steps", type=int, default=10, help="train steps per timed round")
    parser.add_argument("--n-examples", type=int, default=100)
    parser.add_argument("--eps", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=12, help="PGD training epochs of the SmallCNN (0: untrained)")
    parser.add_argument("--model-cache", type=Path, default=Path("/tmp/autoattack_smallcnn.npz"))
    parser.add_argument("--iterations", type=int, help="APGD / FAB iterations (default: AutoAttack's 100)")
    parser.add_argument("--square-queries", type=int, help="Square queries (default: AutoAttack's 5,000)")
    parser.add_argument("--tiny", action="store_true", help="test-sized demo steps (benchmarks/step_speed.py --tiny)")
    parser.add_argument("--settle", type=float, default=300, help="seconds to wait at most for a quiet machine")
    parser.add_argument("--output", default="benchmarks/results/conv_forward_routing.md", help="'' = print only")
    args = parser.parse_args(argv)
    workloads = [w.strip() for w in args.workloads.split(",")]
    unknown = sorted(set(workloads) - {"autoattack", "mmard", "rslad"})
    if unknown:
        raise SystemExit(f"--workloads: unknown {unknown}; choose among autoattack, mmard, rslad")

    from mmard_jax import host_devices

    host_devices.set_default_host_devices([args.n_examples])  # before JAX's backends start
    import autoattack_twin as twin

    cores = len(os.sched_getaffinity(0))
    wait_for_quiet(cores, args.settle)
    load_before, times_before = os.getloadavg(), cpu_times()
    rows, notes, last, results = [], [], (0.0, 1e-9), {}
    for workload in workloads:
        runs, found, outcome = autoattack_runs(args) if workload == "autoattack" else demo_step_runs(args, workload)
        repeats = 1 if workload == "autoattack" else args.steps
        step = (
            runs if workload == "autoattack" else {n: functools.partial(_repeat, r, repeats) for n, r in runs.items()}
        )
        wall, cpu = time.time(), time.process_time()
        times = alternate(step, args.rounds)
        last = (time.time() - wall, time.process_time() - cpu)
        rows += table("AutoAttack (s per run)" if workload == "autoattack" else f"demo {workload} (s per step)", times,
                      repeats)  # fmt: skip
        notes += [f"{workload}:", *found]
        results[workload] = {name: dict(seconds=[t / repeats for t in times[name]], **outcome[name]) for name in runs}
    load_after, times_after = os.getloadavg(), cpu_times()
    verdict = load_contention(load_before, load_after, last[1] / max(last[0], 1e-9), cores)
    lines = twin.header("Forward passes on small grids: Eigen above 64 channels (product) or above 16 (before)") + [
        f"- AutoAttack 'standard' on {args.n_examples} held-out digits, SmallCNN "
        + ("untrained" if args.epochs == 0 else f"PGD-trained ({args.epochs} epochs, eps {args.eps})")
        + (f", {args.iterations} APGD/FAB iterations" if args.iterations else "")
        + (f", {args.square_queries} Square queries" if args.square_queries else "")
        + f"; demo steps {'tiny' if args.tiny else 'configs/mnist5k.py'}, {args.steps} per round",
        f"- {args.rounds} alternating timed rounds per workload after each variant's compiling run",
        f"- load average before {format_load(load_before)}, after {format_load(load_after)}: "
        + (verdict + ", so the ratios are not to be trusted" if verdict else "quiet")
        + f"; {format_steal(times_before, times_after)}",
        "",
        "| workload | variant | median | min | every round | before / product (medians) |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        *notes,
        "",
    ]
    publish("\n".join(lines), args.output)
    return results


def _repeat(run, times: int) -> None:
    for _ in range(times):
        run()


if __name__ == "__main__":
    main()
