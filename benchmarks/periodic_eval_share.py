"""How much of an epoch's wall time the periodic evaluation takes, per run of a finished workdir.

Reads ``train_seconds`` (the epoch's steps) and ``eval_seconds`` (the periodic clean + PGD evaluation that picks the
best checkpoint) from every run's ``metrics.jsonl``. The first epoch's evaluation includes compiling its programs, so it
is reported apart from the later epochs.

    python -m mmard_jax.main --config configs/mnist5k.py --workdir runs/mnist5k --config.log.progress=False
    PYTHONPATH=. python benchmarks/periodic_eval_share.py --workdir runs/mnist5k --out benchmarks/results/periodic_eval_share.md
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ml_collections  # noqa: E402
from benchmark_report import publish  # noqa: E402

from mmard_jax import main as main_module  # noqa: E402
from mmard_jax import reporting  # noqa: E402


def share(records: list[dict]) -> tuple[float, float, float]:
    """(first epoch's eval share, later epochs' eval share, later epochs' mean eval seconds); shares of eval + train."""
    timed = [r for r in records if "eval_seconds" in r and "train_seconds" in r]
    if not timed:
        raise ValueError("no epoch record with train_seconds and eval_seconds: run the demo with this version first")
    first, later = timed[0], timed[1:] or timed[:1]
    first_share = first["eval_seconds"] / (first["eval_seconds"] + first["train_seconds"])
    eval_s, train_s = sum(r["eval_seconds"] for r in later), sum(r["train_seconds"] for r in later)
    return first_share, eval_s / (eval_s + train_s), eval_s / len(later)


def evaluated_examples(workdir: str) -> str:
    """What the workdir's periodic evaluation read, from the config its results.json records."""
    path = os.path.join(workdir, "results.json")
    if not os.path.exists(path):
        return "its results.json is missing, so the evaluated examples are not known."
    eval_cfg = json.loads(Path(path).read_text(encoding="utf-8"))["config"]["eval"]
    # A results.json written before the field existed: that run read eval.num_examples, as 0 does now.
    eval_cfg.setdefault("periodic_examples", 0)
    count = main_module.periodic_examples(ml_collections.ConfigDict(eval_cfg))
    return (
        f"the periodic evaluation read {f'the first {count}' if count else 'all'} examples of its split "
        f"(eval.periodic_examples = {eval_cfg['periodic_examples']}, eval.num_examples = {eval_cfg['num_examples']})."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    runs = ["teacher"] + [
        os.path.join("students", d) for d in sorted(os.listdir(os.path.join(args.workdir, "students")))
    ]
    lines = [
        "# Periodic evaluation: share of each epoch's wall time",
        "",
        f"`PYTHONPATH=. python benchmarks/periodic_eval_share.py --workdir {args.workdir}` over the runs of "
        f"`{args.workdir}`: {evaluated_examples(args.workdir)}",
        "",
        "| run | epoch 1 (with compilation) | epochs 2+ | eval seconds per epoch (2+) |",
        "|---|---|---|---|",
    ]
    for run in runs:
        records = reporting.read_metrics(os.path.join(args.workdir, run, reporting.METRICS_FILE), "epoch")
        first, later, seconds = share(records)
        lines.append(f"| {run} | {100 * first:.1f} % | {100 * later:.1f} % | {seconds:.2f} |")
    publish("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
