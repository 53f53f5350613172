"""Time per 1,000 examples of AutoAttack 'standard' on CPU: ours (JAX) vs the reference (PyTorch).

Same PGD-trained SmallCNN (weights copied to a PyTorch twin) and the same held-out MNIST-5k digits
for both, measured in one process, alternating reference and ours. Our first round includes XLA
compilation, later rounds reuse the compiled programs. The cost of AutoAttack depends on how
many points stay robust after each attack, so the figure is per 1,000 examples of this model.

    PYTHONPATH=. python benchmarks/autoattack_speed.py --reference-path /tmp/auto-attack \
        --n-examples 100 --output benchmarks/results/autoattack_speed.md
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import autoattack_twin as twin  # noqa: E402
from benchmark_report import publish  # noqa: E402

from mmard_jax.attacks.autoattack import run_autoattack  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    twin.add_common_arguments(parser)
    parser.set_defaults(n_examples=100)
    parser.add_argument("--rounds", type=int, default=2, help="alternating reference / ours rounds")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/autoattack_speed.md"))
    args = parser.parse_args()

    network, net, images, labels, _ = twin.setup(args)
    n = len(labels)
    ref_log = args.output.with_suffix(".reference.log")
    timings = {"reference": [], "ours": []}  # (wall s, process CPU s) per round
    for _ in range(args.rounds):  # alternate, so that a busy spell on the machine hits both
        wall, cpu = time.time(), time.process_time()
        ref_acc, _, _ = twin.run_reference(
            net, images, labels, eps=args.eps, seed=args.seed, batch_size=n, log_path=ref_log
        )
        timings["reference"].append((time.time() - wall, time.process_time() - cpu))
        ref_steps = [line for line in ref_log.read_text().splitlines() if "robust accuracy after" in line]
        wall, cpu = time.time(), time.process_time()
        ours = run_autoattack(*network, images, labels, eps=args.eps, seed=args.seed, batch_size=n, log=None)
        timings["ours"].append((time.time() - wall, time.process_time() - cpu))
    ref_log.unlink()

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
        "compilation. The machine is shared: wall times vary between rounds, so the best round counts.",
        "",
        "| run | wall time per round (s) | best wall | best wall per 1,000 ex. | best CPU time per 1,000 ex. |",
        "|---|---|---|---|---|",
        row("reference (PyTorch)", timings["reference"]),
        row("ours, all rounds", timings["ours"]),
        "",
        f"- speed-up, best reference round / best compiled round of ours: {best_ref / best_ours_warm:.2f}x",
        f"- speed-up including our compilation (first round): {best_ref / timings['ours'][0][0]:.2f}x",
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
