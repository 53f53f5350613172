"""Robust accuracy of our JAX AutoAttack against the reference PyTorch AutoAttack, same model and data.

A SmallCNN is PGD-trained on MNIST-5k in JAX (eps = 0.3), its weights are copied into a PyTorch
twin, and both AutoAttack 'standard' runs (reference and ours) attack the same held-out examples.
Writes a markdown report with per-attack robust accuracy (cumulative, in the reference order),
the examples on which the two disagree, and wall times.

    PYTHONPATH=. python benchmarks/autoattack_reference.py --reference-path /tmp/auto-attack \
        --n-examples 500 --output benchmarks/results/autoattack_reference.md

`--norm l2 --attack-eps 2.0` attacks the same model in L2; `--attacks square --square-queries 1000` runs a subset
(in the reference order) with a smaller Square budget.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import autoattack_twin as twin  # noqa: E402
from benchmark_report import publish  # noqa: E402

from mmard_jax.attacks.autoattack import STANDARD_ATTACKS, run_autoattack  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    twin.add_common_arguments(parser)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/autoattack_reference.md"))
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument(
        "--norm",
        choices=("linf", "l2"),
        default="linf",
        help="threat model of both runs (the model is always PGD-trained in L-inf)",
    )
    parser.add_argument(
        "--attack-eps", type=float, default=None, help="radius of the evaluation (default: --eps, the training radius)"
    )
    parser.add_argument(
        "--attacks", default="", help="comma-separated subset in the reference order, e.g. 'square' (default: standard)"
    )
    parser.add_argument("--square-queries", type=int, default=None, help="Square's query budget (default 5,000)")
    args = parser.parse_args()
    attacks = tuple(a for a in args.attacks.split(",") if a) or None
    eps = args.eps if args.attack_eps is None else args.attack_eps

    network, net, images, labels, twin_gap = twin.setup(args)
    ref_log = args.output.with_suffix(".reference.log")
    ref_acc, ref_adv, ref_seconds = twin.run_reference(
        net,
        images,
        labels,
        eps=eps,
        seed=args.seed,
        batch_size=args.batch_size,
        log_path=ref_log,
        attacks=attacks,
        norm=args.norm,
        square_queries=args.square_queries,
    )
    overrides = {} if args.square_queries is None else {"square": {"n_queries": args.square_queries}}
    start = time.time()
    ours = run_autoattack(
        *network,
        images,
        labels,
        eps=eps,
        norm=args.norm,
        seed=args.seed,
        batch_size=args.batch_size,
        version="standard" if attacks is None else "custom",
        attacks=attacks,
        **overrides,
    )
    our_seconds = time.time() - start

    import torch

    with torch.no_grad():
        ref_robust = net(twin.to_torch(ref_adv)).argmax(1).numpy() == labels
    n = len(labels)
    title = f"AutoAttack ({args.attacks or 'standard'}, {args.norm}): ours (JAX) vs the reference (PyTorch)"
    lines = twin.header(title) + [
        "- reference: github.com/fra31/auto-attack, run from a local checkout (not vendored)",
        f"- model: SmallCNN (conv16-conv32-fc100-fc10), PGD-5 adversarial training on 4,000 MNIST-5k "
        f"digits for {args.epochs} epochs at eps {args.eps}; evaluated on {n} held-out digits",
        f"- PyTorch twin: max |logit difference| over the evaluated digits = {twin_gap:.2e}",
        f"- {args.norm} eps = {eps}, seed = {args.seed}, batch size {args.batch_size}"
        + ("" if args.square_queries is None else f", Square queries {args.square_queries}"),
        "",
        "| after attack | reference robust acc. | ours robust acc. | difference (examples) |",
        "|---|---|---|---|",
        f"| clean | {ref_acc['clean']:.2%} | {ours.clean_accuracy:.2%} | "
        f"{round((ours.clean_accuracy - ref_acc['clean']) * n):+d} |",
    ]
    for attack in attacks or STANDARD_ATTACKS:
        ref_value, our_value = ref_acc.get(attack, float("nan")), ours.per_attack.get(attack, float("nan"))
        lines.append(f"| {attack} | {ref_value:.2%} | {our_value:.2%} | {round((our_value - ref_value) * n):+d} |")
    both = int(np.sum(ref_robust & ours.robust_mask))
    only_ref, only_ours = int(np.sum(ref_robust & ~ours.robust_mask)), int(np.sum(~ref_robust & ours.robust_mask))
    lines += [
        "",
        f"- final robust accuracy: reference {ref_robust.mean():.2%}, ours {ours.robust_accuracy:.2%}; "
        f"robust under both: {both}, only under the reference: {only_ref}, only under ours: {only_ours}",
        f"- re-check failures (ours): {ours.recheck_failures}",
        f"- wall time on {n} examples (compilation included for ours): reference {ref_seconds:.1f} s, "
        f"ours {our_seconds:.1f} s",
        "",
        "## Reference log",
        "",
        "```",
        ref_log.read_text().strip(),
        "```",
        "",
        "## Our log",
        "",
        "```",
        *ours.log_lines,
        "```",
        "",
    ]
    ref_log.unlink()
    publish("\n".join(lines), args.output)


if __name__ == "__main__":
    main()
