"""Time per 1,000 examples of AutoAttack 'standard' on CPU: ours (JAX) vs the reference (PyTorch).

Same PGD-trained SmallCNN (weights copied to a PyTorch twin) and the same held-out MNIST-5k digits
for both, measured in one process one after the other. Ours is timed twice: the first run includes
XLA compilation, the second reuses the compiled programs. The cost of AutoAttack depends on how
many points stay robust after each attack, so the figure is per 1,000 examples of this model.

    PYTHONPATH=. python benchmarks/autoattack_speed.py --reference-path /tmp/auto-attack \
        --n-examples 200 --output benchmarks/results/autoattack_speed.md
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import autoattack_twin as twin  # noqa: E402

from mmard_jax.attacks.autoattack import run_autoattack  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    twin.add_common_arguments(parser)
    parser.set_defaults(n_examples=200)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/autoattack_speed.md"))
    args = parser.parse_args()

    logits_fn, net, images, labels, _ = twin.setup(args)
    n = len(labels)
    ref_log = args.output.with_suffix(".reference.log")
    ref_acc, _, ref_seconds = twin.run_reference(net, images, labels, eps=args.eps, seed=args.seed,
                                                 batch_size=n, log_path=ref_log)
    ref_steps = [line for line in ref_log.read_text().splitlines() if "robust accuracy after" in line]
    ref_log.unlink()
    our_seconds, results = [], []
    for _ in range(2):
        start = time.time()
        results.append(run_autoattack(logits_fn, images, labels, eps=args.eps, seed=args.seed,
                                      batch_size=n, log=None))
        our_seconds.append(time.time() - start)

    def per_thousand(seconds: float) -> str:
        return f"{seconds * 1000 / n:.0f} s"

    lines = twin.header("AutoAttack speed on CPU: ours (JAX) vs the reference (PyTorch)") + [
        f"- model: SmallCNN (conv16-conv32-fc100-fc10, PGD-trained on MNIST-5k, eps {args.eps}); "
        f"{n} held-out digits, one batch of {n}, scaled to 1,000 examples",
        f"- robust accuracy: reference {ref_acc['square']:.2%}, ours {results[-1].robust_accuracy:.2%} "
        f"(clean {results[-1].clean_accuracy:.2%})", "",
        "| run | wall time | per 1,000 examples | reference / ours |", "|---|---|---|---|",
        f"| reference (PyTorch) | {ref_seconds:.1f} s | {per_thousand(ref_seconds)} | 1.00 |",
        f"| ours, first run (with XLA compilation) | {our_seconds[0]:.1f} s | {per_thousand(our_seconds[0])} "
        f"| {ref_seconds / our_seconds[0]:.2f} |",
        f"| ours, second run (compiled) | {our_seconds[1]:.1f} s | {per_thousand(our_seconds[1])} "
        f"| {ref_seconds / our_seconds[1]:.2f} |", "",
        "Cumulative times after each attack, reference:", "", "```", *ref_steps, "```", "",
        "ours, second run:", "", "```",
        *[line for line in results[-1].log_lines if "robust accuracy after" in line], "```", ""]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
