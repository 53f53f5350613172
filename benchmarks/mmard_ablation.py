"""Ablation of MMARD's parts and hyperparameters on the bundled MNIST-5k demo (how the shipped defaults were chosen).

Every variant distils the same student from the same cached demo teacher with the demo's budget, then runs the
demo's final evaluation. Train the teacher first (the demo command does), then:

    python benchmarks/mmard_ablation.py --teacher runs/mnist5k/teacher --workdir runs/ablation \
        --out benchmarks/results/mmard_ablation.md

Variants are resumable: an interrupted ablation picks up where it stopped.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import sys
import time

from benchmark_report import publish

VARIANTS = {
    # name: overrides of config.method (γ = gamma, β = mi_beta)
    "adaad (γ=0, β=0)": {"gamma": 0.0, "mi_beta": 0.0},
    "inner only (γ=1, β=0)": {"gamma": 1.0, "mi_beta": 0.0},
    "outer only (γ=0, β=1)": {"gamma": 0.0, "mi_beta": 1.0},
    "both, kl boundary (γ=1, β=1)": {"gamma": 1.0, "mi_beta": 1.0, "boundary": "kl"},
    "both, entropy boundary": {"gamma": 1.0, "mi_beta": 1.0, "boundary": "entropy"},
    "both, margin boundary": {"gamma": 1.0, "mi_beta": 1.0, "boundary": "margin"},
    "both, β=0.25": {"gamma": 1.0, "mi_beta": 0.25},
    "both, τ_mi=0.1": {"gamma": 1.0, "mi_beta": 1.0, "tau_mi": 0.1},
    "both, γ=4": {"gamma": 4.0, "mi_beta": 1.0},
}


def demo_config():
    path = os.path.join(os.path.dirname(__file__), "..", "configs", "mnist5k.py")
    spec = importlib.util.spec_from_file_location("mnist5k", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def main() -> None:
    from mmard_jax import main as entry

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True, help="the demo's teacher run directory (WORKDIR/teacher)")
    parser.add_argument("--workdir", default="runs/ablation")
    parser.add_argument("--out", default="")
    parser.add_argument("--only", default="", help="comma-separated variant numbers (1-based) to run")
    parser.add_argument(
        "--seed", type=int, default=0, help="config.seed of every variant (student init, data order, attacks)"
    )
    args = parser.parse_args()
    entry.configure_logging()
    chosen = {int(i) for i in args.only.split(",") if i} or set(range(1, len(VARIANTS) + 1))
    rows = []
    for index, (name, overrides) in enumerate(VARIANTS.items(), start=1):
        if index not in chosen:
            continue
        config = demo_config()
        config.stages = "distill,eval"
        config.baselines = ""
        config.log.progress = False
        config.teacher.checkpoint = os.path.abspath(args.teacher)
        config.seed = args.seed
        for field, value in overrides.items():
            setattr(config.method, field, value)
        start = time.perf_counter()
        run_name = slug(name) + (f"__seed_{args.seed}" if args.seed else "")
        summary = entry.run(config, os.path.join(args.workdir, run_name))
        accuracy = summary["results"]["mmard"]["accuracy"]
        rows.append((index, name, overrides, accuracy, time.perf_counter() - start))
        print(f"{name}: {json.dumps(accuracy)}", flush=True)
    lines = [
        f"# MMARD ablation on MNIST-5k (demo budget, seed {args.seed})",
        "",
        f"Command: `python benchmarks/mmard_ablation.py {' '.join(sys.argv[1:])}`; "
        f"{datetime.date.today()}. Student `cnn` (16, 32), the demo's TRADES teacher, 1,000 test examples, ε = 0.3; "
        "accuracy (%) of the best-by-PGD checkpoint; other fields as in configs/mnist5k.py.",
        "",
        "| # | variant | Clean | FGSM | PGD-40 | CW∞ | wall (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for index, name, _, acc, seconds in rows:
        cells = " | ".join(f"{100 * acc[k]:.1f}" for k in ("clean", "fgsm", "pgd", "cw"))
        lines.append(f"| {index} | {name} | {cells} | {seconds:.0f} |")
    report = "\n".join(lines) + "\n"
    publish(report, args.out)


if __name__ == "__main__":
    main()
