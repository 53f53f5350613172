"""Time per 1,000 examples of AutoAttack 'standard' on CPU: ours (JAX) vs the reference (PyTorch).

Same PGD-trained SmallCNN (weights copied to a PyTorch twin) and the same held-out MNIST-5k digits
for both, measured in one process, alternating reference and ours. Our first round includes XLA
compilation, later rounds reuse the compiled programs. The cost of AutoAttack depends on how
many points stay robust after each attack, so the figure is per 1,000 examples of this model.

    PYTHONPATH=. python benchmarks/autoattack_speed.py --reference-path /tmp/auto-attack \
        --n-examples 100 --output benchmarks/results/autoattack_speed.md

Ours runs with the product's XLA:CPU device count (one per usable core, `mmard_jax/host_devices.py`) unless
``--devices`` says otherwise; pin both sides with ``taskset`` and give the reference as many threads.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import autoattack_twin as twin  # noqa: E402
from benchmark_report import cpu_times, format_load, format_steal, load_contention, publish, wait_for_quiet  # noqa: E402

from mmard_jax import compilations, host_devices, parallel  # noqa: E402
from mmard_jax.attacks.autoattack import run_autoattack  # noqa: E402


def compile_summary(compiled: list[tuple[str, float]]) -> list[str]:
    """One line per program name: how many times it was compiled and for how long in all, longest first."""
    counts, seconds = collections.Counter(), collections.Counter()
    for name, secs in compiled:
        counts[name] += 1
        seconds[name] += secs
    return [f"{seconds[name]:7.1f} s  {counts[name]:3d} x  {name}" for name, _ in seconds.most_common()]


def median_ms(run, repeats: int = 30) -> float:
    """Median wall milliseconds of ``run()`` (which must wait for its result), after two warm-up calls."""
    run(), run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def pass_timings(network, net, images, labels) -> dict[str, tuple[float, float]]:
    """(ours, reference) milliseconds of a forward pass and of a forward pass plus the input gradient of the summed
    cross-entropy (what every APGD iteration computes) on the whole batch, ours split over the devices as
    AutoAttack splits it."""
    import torch

    apply_fn, variables = network
    mesh = parallel.make_mesh()
    x, y = (jax.device_put(np.asarray(a), parallel.batch_sharded(mesh)) for a in (images, labels))
    variables = parallel.replicate(variables, mesh)

    def total_loss(x_):
        logits = apply_fn(variables, x_)
        return -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))

    forward, gradient = jax.jit(lambda x_: apply_fn(variables, x_)), jax.jit(jax.grad(total_loss))
    x_torch = twin.to_torch(np.asarray(images)).requires_grad_(True)
    y_torch = torch.as_tensor(np.asarray(labels)).long()

    def torch_gradient():
        loss = torch.nn.functional.cross_entropy(net(x_torch), y_torch, reduction="sum")
        return torch.autograd.grad(loss, x_torch)

    def torch_forward():
        with torch.no_grad():
            return net(x_torch)

    return {
        "forward": (median_ms(lambda: forward(x).block_until_ready()), median_ms(torch_forward)),
        "forward + input gradient": (median_ms(lambda: gradient(x).block_until_ready()), median_ms(torch_gradient)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    twin.add_common_arguments(parser)
    parser.set_defaults(n_examples=100)
    parser.add_argument("--rounds", type=int, default=2, help="alternating reference / ours rounds")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/autoattack_speed.md"))
    parser.add_argument("--settle", type=float, default=300, help="seconds to wait at most for a quiet machine")
    parser.add_argument(
        "--devices",
        type=int,
        help="XLA:CPU devices for ours (default: the product's, one per core; MMARD_JAX_HOST_DEVICES chooses)",
    )
    args = parser.parse_args()
    if args.devices is not None:
        os.environ[host_devices.CHOICE_VARIABLE] = str(args.devices)
    if host_devices.set_default_host_devices([args.n_examples]) is None:  # before JAX's backends start
        print("XLA_FLAGS sets the device count; --devices / MMARD_JAX_HOST_DEVICES are not used", file=sys.stderr)
    cores = len(os.sched_getaffinity(0))
    wait_for_quiet(cores, args.settle)
    load_before, times_before = os.getloadavg(), cpu_times()

    network, net, images, labels, _ = twin.setup(args)
    n = len(labels)
    ref_log = args.output.with_suffix(".reference.log")
    timings = {"reference": [], "ours": []}  # (wall s, process CPU s) per round
    compiled_per_round = []  # per round of ours: (program, compile seconds)
    for _ in range(args.rounds):  # alternate, so that a busy spell on the machine hits both
        wall, cpu = time.time(), time.process_time()
        ref_acc, _, _ = twin.run_reference(
            net, images, labels, eps=args.eps, seed=args.seed, batch_size=n, log_path=ref_log
        )
        timings["reference"].append((time.time() - wall, time.process_time() - cpu))
        ref_steps = [line for line in ref_log.read_text().splitlines() if "robust accuracy after" in line]
        wall, cpu = time.time(), time.process_time()
        with compilations.recorded() as compiled:
            ours = run_autoattack(*network, images, labels, eps=args.eps, seed=args.seed, batch_size=n, log=None)
        timings["ours"].append((time.time() - wall, time.process_time() - cpu))
        compiled_per_round.append(compiled)
    ref_log.unlink()
    passes = pass_timings(network, net, images, labels)
    load_after, times_after = os.getloadavg(), cpu_times()
    last_wall, last_cpu = timings["ours"][-1]
    verdict = load_contention(load_before, load_after, last_cpu / max(last_wall, 1e-9), cores)

    def row(name: str, rounds: list[tuple[float, float]]) -> str:
        walls = ", ".join(f"{w:.1f}" for w, _ in rounds)
        best_wall, best_cpu = min(w for w, _ in rounds), min(c for _, c in rounds)
        return f"| {name} | {walls} | {best_wall:.1f} s | {best_wall * 1000 / n:.0f} s | {best_cpu * 1000 / n:.0f} s |"

    best_ref = min(w for w, _ in timings["reference"])
    best_ours_warm = min(w for w, _ in timings["ours"][1:]) if args.rounds > 1 else float("nan")
    lines = twin.header("AutoAttack speed on CPU: ours (JAX) vs the reference (PyTorch)") + [
        f"- model: SmallCNN (conv16-conv32-fc100-fc10, PGD-trained on MNIST-5k, eps {args.eps}); "
        f"{n} held-out digits in one batch, AutoAttack 'standard' (all four attacks, full budgets)",
        f"- robust accuracy: reference {ref_acc['square']:.2%}, ours {ours.robust_accuracy:.2%} "
        f"(clean {ours.clean_accuracy:.2%})",
        f"- {args.rounds} rounds, reference and ours alternating; our first round includes XLA "
        "compilation. Wall times vary between rounds, so the best round counts.",
        f"- load average before {format_load(load_before)}, after {format_load(load_after)}: "
        + (verdict + ", so no speed-up is reported" if verdict else "quiet")
        + f"; {format_steal(times_before, times_after)}",
        f"- our programs compiled per round: {', '.join(str(len(c)) for c in compiled_per_round)} "
        f"({', '.join(f'{sum(s for _, s in c):.1f} s' for c in compiled_per_round)} of compile time)",
        "",
        "| run | wall time per round (s) | best wall | best wall per 1,000 ex. | best CPU time per 1,000 ex. |",
        "|---|---|---|---|---|",
        row("reference (PyTorch)", timings["reference"]),
        row("ours, all rounds", timings["ours"]),
        "",
        *(
            []
            if verdict
            else [
                f"- speed-up, best reference round / best compiled round of ours: {best_ref / best_ours_warm:.2f}x",
                f"- speed-up including our compilation (first round): {best_ref / timings['ours'][0][0]:.2f}x",
            ]
        ),
        "",
        f"Where the time goes: one pass of the network over the {n} digits (median ms; the gradient is what each APGD",
        "iteration computes):",
        "",
        "| pass | ours | reference | reference / ours |",
        "|---|---|---|---|",
        *[f"| {name} | {ours:.1f} | {ref:.1f} | {ref / ours:.2f}x |" for name, (ours, ref) in passes.items()],
        "",
        "Programs our first round compiled (compile time, count, name):",
        "",
        "```",
        *compile_summary(compiled_per_round[0]),
        "```",
        "",
        "Cumulative times after each attack (last round), reference:",
        "",
        "```",
        *ref_steps,
        "```",
        "",
        "ours:",
        "",
        "```",
        *[line for line in ours.log_lines if "robust accuracy after" in line],
        "```",
        "",
    ]
    publish("\n".join(lines), args.output)


if __name__ == "__main__":
    main()
