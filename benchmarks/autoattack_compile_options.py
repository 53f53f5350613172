"""Compile time and speed of a whole AutoAttack run under different XLA:CPU options for the attacks' programs.

The attacks' loops compile with `mmard_jax.attacks.autoattack.common.CPU_COMPILER_OPTIONS` on CPU, their once-per-batch
programs with `ONE_SHOT_COMPILER_OPTIONS` (LLVM level 0); a variant's options replace both, except for "one level for
all", which compiles the once-per-batch programs with the loops' options (as before 2026-12-07). This script runs the same
AutoAttack 'standard' (the PGD-trained SmallCNN of autoattack_twin.py, held-out MNIST-5k digits) in a fresh process per
variant, alternating the variants, two rounds each (the first compiles), and compares every variant's adversarial
examples and robust mask with the product's. A variant that lets YNNPACK run what the product's options give it (LLVM's
level, the emitters) must return the same bits; one that changes YNNPACK's share sums some reductions in another order,
so it may differ by float rounding, and the report says in how many examples the robust mask differs:

    PYTHONPATH=. taskset -c 0 python benchmarks/autoattack_compile_options.py --n-examples 100 --pairs 2 \
        --output benchmarks/results/autoattack_compile_options.md

No reference checkout is needed (ours only). ``--epochs 0`` uses the untrained network (a quick smoke run: with 32
digits or more some are classified correctly, so the attack programs compile and run).

``--revisions`` compares versions of the code instead: each listed git revision is checked out into a temporary
worktree and each variant runs there (this script and its twin stay the caller's; the package is the revision's
committed code, without uncommitted changes), alternating as above; the last revision's product is the one the
others are compared with (list the newest last):

    PYTHONPATH=. python benchmarks/autoattack_compile_options.py --n-examples 100 --pairs 3 --devices 2 \
        --variants product --revisions 9450a0b,a34c37e,HEAD --output /tmp/autoattack_revisions.md
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_report import (  # noqa: E402
    cpu_times,
    format_load,
    format_options,
    format_steal,
    joined,
    load_contention,
    publish,
    wait_for_quiet,
)

CLASSIC_EMITTERS = (("xla_cpu_use_fusion_emitters", False),)
LOOPS_OPTIONS_FOR_ALL = "loops' options"
VARIANTS = {  # name: the options of every attack program, or None for the product's own
    "XLA defaults": (),
    "classic emitters": CLASSIC_EMITTERS,
    "YNNPACK reductions": (*CLASSIC_EMITTERS, ("xla_backend_optimization_level", 1)),  # XLA's default YNNPACK choice
    "one level for all": LOOPS_OPTIONS_FOR_ALL,  # the once-per-batch programs compile as the loops do (LLVM level 1)
    "product": None,
}


def gives_ynnpack_the_products_share(name: str) -> bool:
    """Whether variant ``name`` lets YNNPACK run what the product's options give it (then it must give the same bits)."""
    from mmard_jax import compilations

    option, products_choice = compilations.YNNPACK_CONVOLUTIONS_AND_DOTS
    options = VARIANTS[name]
    return options in (None, LOOPS_OPTIONS_FOR_ALL) or dict(options).get(option) == products_choice


def run_variant(args, options) -> dict:
    """In this (fresh) process: AutoAttack twice under ``options``; compile and wall seconds, outputs saved."""
    from mmard_jax import host_devices

    os.environ[host_devices.CHOICE_VARIABLE] = str(args.devices)
    host_devices.set_default_host_devices([args.n_examples])
    import mmard_jax
    from mmard_jax import compilations
    from mmard_jax.attacks.autoattack import common, run_autoattack

    if options == LOOPS_OPTIONS_FOR_ALL:
        common.ONE_SHOT_COMPILER_OPTIONS = common.CPU_COMPILER_OPTIONS
    elif options is not None:
        common.CPU_COMPILER_OPTIONS = common.ONE_SHOT_COMPILER_OPTIONS = tuple(tuple(option) for option in options)
    import autoattack_twin as twin

    images, labels = twin.load_mnist5k()
    apply_fn, variables = twin.benchmark_model(
        args.model_cache, images, labels, eps=args.eps, epochs=args.epochs, seed=args.seed
    )
    test = slice(twin.N_TRAIN, twin.N_TRAIN + args.n_examples)
    budgets = {} if args.square_queries is None else dict(square=dict(n_queries=args.square_queries))
    rounds = []
    for _ in range(2):
        start = time.time()
        with compilations.recorded() as compiled:
            result = run_autoattack(
                apply_fn, variables, images[test], labels[test], eps=args.eps, seed=args.seed,
                batch_size=args.n_examples, log=None, **budgets,
            )  # fmt: skip
        rounds.append(dict(wall=time.time() - start, compile=sum(s for _, s in compiled), programs=len(compiled)))
    np.savez(args.child_output, adversarial=result.adversarial, robust=result.robust_mask)
    one_shot_options = getattr(common, "one_shot_compiler_options", common.compiler_options)  # older code: none
    return dict(
        options=dict(common.compiler_options() or {}),
        one_shot_options=dict(one_shot_options() or {}),
        rounds=rounds,
        robust=result.robust_accuracy,
        package=str(Path(mmard_jax.__file__).resolve().parent),
    )


def spawn(name: str, folder: Path, argv: list[str], checkout: Path | None = None) -> tuple[dict, dict]:
    """Runs one variant in a fresh process (nothing compiled yet) with this run's arguments ``argv``, importing the
    package from ``checkout`` when given; its report (with the cores it kept busy) and its saved outputs."""
    output = folder / f"{name.replace(' ', '_')}.npz"
    command = [sys.executable, __file__, *argv, "--child-variant", name, "--child-output", str(output)]
    environment = dict(os.environ)
    if checkout is not None:  # ahead of the caller's PYTHONPATH and of an editable install
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(checkout), os.environ.get("PYTHONPATH")]))
    before, start = os.times(), time.time()
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=environment)
    after = os.times()
    if done.returncode != 0:
        raise RuntimeError(f"variant {name!r} failed:\n{done.stdout}\n{done.stderr}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    if checkout is not None and not Path(report["package"]).is_relative_to(checkout.resolve()):
        raise RuntimeError(f"variant {name!r} imported mmard_jax from {report['package']}, not from {checkout}")
    child_cpu = (after.children_user + after.children_system) - (before.children_user + before.children_system)
    report["busy_cores"] = child_cpu / max(time.time() - start, 1e-9)
    return report, dict(np.load(output))


@contextlib.contextmanager
def worktrees(revisions: list[str], folder: Path):
    """Checks each git revision out into a detached worktree under ``folder``; yields {revision: (path, commit)}
    and removes the worktrees afterwards."""
    repository = Path(__file__).resolve().parent.parent
    git = ["git", "-C", str(repository)]
    checkouts = {}
    try:
        for index, revision in enumerate(revisions):
            path = folder / f"revision-{index}"
            found = subprocess.run(
                [*git, "rev-parse", "--verify", f"{revision}^{{commit}}"], capture_output=True, text=True
            )
            if found.returncode != 0:
                raise SystemExit(f"--revisions: {revision!r} is not a commit of {repository}")
            commit = found.stdout.strip()
            subprocess.run([*git, "worktree", "add", "--detach", "--quiet", str(path), commit], check=True)
            checkouts[revision] = (path, commit)
        yield checkouts
    finally:
        for path, _ in checkouts.values():
            subprocess.run([*git, "worktree", "remove", "--force", str(path)], check=False)


def summary_rows(reports: dict[str, list[dict]]) -> list[str]:
    rows = [
        "| variant (options) | compile s per first round | first round wall s | compiled round wall s | programs |",
        "|---|---|---|---|---|",
    ]
    for name, runs in reports.items():
        firsts, seconds = [r["rounds"][0] for r in runs], [r["rounds"][1] for r in runs]
        options, one_shot = (format_options(runs[0][key]) for key in ("options", "one_shot_options"))
        options += "" if one_shot == options else f"; once per batch: {one_shot}"
        compile_s = joined(r["compile"] for r in firsts)
        first_wall, compiled_wall = joined(r["wall"] for r in firsts), joined(r["wall"] for r in seconds)
        rows.append(f"| {name} ({options}) | {compile_s} | {first_wall} | {compiled_wall} | {firsts[0]['programs']} |")
    return rows


def ratios(reports: dict[str, list[dict]], reference: str = "product") -> list[str]:
    """Each variant against the ``reference`` one, pair by pair (the runs of a pair ran back to back)."""
    lines = []
    product = reports[reference]
    for name, runs in reports.items():
        if name == reference:
            continue
        pairs = list(zip(runs, product, strict=True))
        compile_ratio = [r["rounds"][0]["compile"] / p["rounds"][0]["compile"] for r, p in pairs]
        first = [r["rounds"][0]["wall"] / p["rounds"][0]["wall"] for r, p in pairs]
        compiled = [r["rounds"][1]["wall"] / p["rounds"][1]["wall"] for r, p in pairs]
        lines.append(
            f"- {name} ÷ {reference}, per pair: compile time {joined(compile_ratio, 2)}; first round {joined(first, 2)}; "
            f"compiled round {joined(compiled, 2)} (median {statistics.median(compiled):.2f})"
        )
    return lines


def main(argv: list[str] | None = None) -> dict:
    """Runs the variants; returns {"reports": {variant: [report per pair]}, "differing": {variant: examples}}."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-examples", type=int, default=100)
    parser.add_argument("--pairs", type=int, default=2, help="rounds of all variants, alternating")
    parser.add_argument("--devices", type=int, default=1, help="XLA:CPU devices (MMARD_JAX_HOST_DEVICES)")
    parser.add_argument("--eps", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=12, help="PGD training epochs of the network (0: untrained)")
    parser.add_argument("--model-cache", type=Path, default=Path("/tmp/autoattack_smallcnn.npz"))
    parser.add_argument("--square-queries", type=int, help="Square's budget (default: the standard 5,000)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {list(VARIANTS)}")
    parser.add_argument("--settle", type=float, default=300, help="seconds to wait at most for a quiet machine")
    parser.add_argument(
        "--revisions",
        default="",
        help="comma-separated git revisions to run each variant at (temporary worktrees; the last is the reference)",
    )
    parser.add_argument("--output", default="benchmarks/results/autoattack_compile_options.md", help="'' = print only")
    parser.add_argument("--child-variant", help=argparse.SUPPRESS)
    parser.add_argument("--child-output", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_variant is not None:
        print(json.dumps(run_variant(args, VARIANTS[args.child_variant])))
        return {}

    names = [name.strip() for name in args.variants.split(",")]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown or "product" not in names:
        raise SystemExit(f"--variants {args.variants!r}: choose among {list(VARIANTS)}, 'product' included")
    revisions = [revision.strip() for revision in args.revisions.split(",") if revision.strip()]
    if len(set(revisions)) < len(revisions):
        raise SystemExit(f"--revisions {args.revisions!r}: each revision once (HEAD~0 and HEAD may name one commit)")
    runs = {  # label: (variant, revision or None for this checkout)
        (name if revision is None else f"{name} @ {revision}"): (name, revision)
        for revision in (revisions or [None])
        for name in names
    }
    reference = "product" if not revisions else f"product @ {revisions[-1]}"
    cores = len(os.sched_getaffinity(0))
    wait_for_quiet(cores, args.settle)
    load_before, times_before = os.getloadavg(), cpu_times()
    reports: dict[str, list[dict]] = {label: [] for label in runs}
    differing = {}  # label: the most examples whose robust mask differs from the reference's, over the pairs
    with tempfile.TemporaryDirectory() as folder, worktrees(revisions, Path(folder)) as checkouts:
        for _ in range(args.pairs):
            outputs = {}
            for label, (name, revision) in runs.items():
                checkout = None if revision is None else checkouts[revision][0]
                report, outputs[label] = spawn(name, Path(folder), argv, checkout)
                reports[label].append(report)
            for label in runs:
                if not all(np.array_equal(outputs[label][k], outputs[reference][k]) for k in ("adversarial", "robust")):
                    flipped = int(np.sum(outputs[label]["robust"] != outputs[reference]["robust"]))
                    differing[label] = max(differing.get(label, 0), flipped)
    load_after, times_after = os.getloadavg(), cpu_times()
    last = reports[list(runs)[-1]][-1]
    verdict = load_contention(load_before, load_after, min(last["busy_cores"], cores), cores)
    robust = {name: runs[0]["robust"] for name, runs in reports.items()}
    lines = [
        "# AutoAttack compile time and speed under XLA:CPU options (ours only)",
        "",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- command: `PYTHONPATH=. python benchmarks/autoattack_compile_options.py {shlex.join(argv)}`",
        f"- machine: {platform.platform()}, {os.cpu_count()} CPUs ({cores} usable here), Python "
        f"{platform.python_version()}, {args.devices} XLA:CPU device(s)",
        f"- AutoAttack 'standard' on {args.n_examples} held-out MNIST-5k digits, SmallCNN "
        f"({'untrained' if args.epochs == 0 else f'PGD-trained, {args.epochs} epochs'}), eps {args.eps}"
        + ("" if args.square_queries is None else f", Square {args.square_queries} queries"),
        f"- each variant in a fresh process, {args.pairs} pair(s) of runs alternating the variants; a run = 2 rounds, "
        "the first compiling",
        *(
            [f"- code: {', '.join(f'{revision} = {checkouts[revision][1]}' for revision in revisions)} (git worktrees)"]
            if revisions
            else []
        ),
        f"- load average before {format_load(load_before)}, after {format_load(load_after)}: "
        f"{verdict or 'quiet'}; {format_steal(times_before, times_after)}",
        f"- robust accuracy: {', '.join(f'{name} {value:.2%}' for name, value in robust.items())}",
        f"- same bits as {reference} (adversarial examples and robust mask, every pair): "
        + ", ".join(
            f"{label}: "
            + (f"no (robust mask differs in {differing[label]} example(s))" if label in differing else "yes")
            for label in runs
        ),
        "",
        *summary_rows(reports),
        "",
        *(["(no ratios: the machine was not quiet)"] if verdict else ratios(reports, reference)),
        "",
    ]
    publish("\n".join(lines), args.output)
    must_agree = [label for label in differing if gives_ynnpack_the_products_share(runs[label][0])]
    if must_agree:
        raise SystemExit(f"variants {must_agree} changed the results with the product's YNNPACK choice")
    return dict(reports=reports, differing=differing)


if __name__ == "__main__":
    main()
