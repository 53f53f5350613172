"""Start-up costs of a run, before its first step: the product's way against the plain one, each in a fresh process.

Three things every run does once, each timed in a new Python process (nothing imported or compiled yet, JAX's CPU
backend already started), ``--pairs`` times with the two ways alternating:

- init: a network's first variables. ``op by op`` runs Flax's ``module.init`` eagerly, as `networks.initial_variables`
  does outside jit (each initialiser op compiles a small program at XLA's default level); ``one program`` is
  `networks.init_variables`, the product's. The two are compared bit for bit.
- tensorboardx: the import of tensorboardX. ``plain import`` is ``import tensorboardX``, which imports PyTorch when it
  is installed; ``product`` is `reporting.import_tensorboardx`, which keeps it out.
- digits: scikit-learn's digits. ``load_digits`` imports scikit-learn (and SciPy, pandas); ``product`` is
  `data.sources._digits_arrays`, which reads the same CSV file. Compared for equality.

    PYTHONPATH=. python benchmarks/start_up.py --settle 300 --output benchmarks/results/start_up.md
    PYTHONPATH=. python benchmarks/start_up.py --cases init --models cnn --pairs 1 --output ''   # the CI smoke test

The ratio is plain ÷ product seconds per pair (> 1: the product starts faster); it is refused (not printed) when the
machine's load shows other work.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_report import cpu_times, format_load, format_steal, joined, load_contention, publish, wait_for_quiet  # noqa: E402

MODELS = {  # name: (model_config arguments, image shape)
    "cnn": (("cnn", dict(widths=(32, 64), hidden=128, downsample="stride", use_bn=False)), (28, 28, 1)),
    "resnet18": (("resnet18", {}), (32, 32, 3)),
    "wrn-34-10": (("wrn-34-10", {}), (32, 32, 3)),
}
CASES = {  # name: (what, (plain way, product's way))
    "init": ("initialise {model}", ("op by op", "one program")),
    "tensorboardx": ("import tensorboardX", ("plain import", "product")),
    "digits": ("load scikit-learn's digits", ("load_digits", "product")),
}


def _child_init(way: str, model: str) -> tuple[float, object]:
    import jax
    import numpy as np

    from mmard_jax import networks
    from mmard_jax.config import model_config

    (name, kwargs), shape = MODELS[model]
    module = networks.build_module(model_config(name, **kwargs), 10)
    key = jax.random.PRNGKey(0)
    jax.block_until_ready(jax.numpy.zeros(()) + 1)  # the backend is up before the clock starts
    start = time.perf_counter()
    if way == "op by op":
        variables = networks.initial_variables(module, key, shape)
    else:
        variables = networks.init_variables(module, key, shape)
    jax.block_until_ready(variables)
    seconds = time.perf_counter() - start
    leaves = [np.asarray(leaf) for leaf in jax.tree.leaves(variables)]
    return seconds, leaves


def _child_tensorboardx(way: str) -> tuple[float, object]:
    from mmard_jax import reporting  # JAX, NumPy...: before the clock either way, as a run has them already

    start = time.perf_counter()
    if way == "plain import":
        import tensorboardX  # noqa: F401
    else:
        reporting.import_tensorboardx()
    return time.perf_counter() - start, []  # nothing to compare; whether torch came along is reported


def _child_digits(way: str) -> tuple[float, object]:
    from mmard_jax.data import sources

    start = time.perf_counter()
    if way == "load_digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        arrays = [digits.images, digits.target]
    else:
        arrays = list(sources._digits_arrays())
    return time.perf_counter() - start, arrays


def run_child(case: str, way: str, model: str | None, output: str) -> None:
    """In this fresh process: one timed start-up piece; its seconds printed, its values saved for the comparison."""
    import numpy as np

    if case == "init":
        seconds, values = _child_init(way, model)
    elif case == "tensorboardx":
        seconds, values = _child_tensorboardx(way)
    else:
        seconds, values = _child_digits(way)
    np.savez(output, *[np.asarray(v) for v in values])
    print(json.dumps({"seconds": seconds, "torch_imported": "torch" in sys.modules}))


def spawn(case: str, way: str, model: str | None, folder: Path) -> tuple[dict, list]:
    import numpy as np

    output = folder / "values.npz"
    command = [sys.executable, __file__, "--child", case, way, model or "-", str(output)]
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{case} / {way} failed:\n{done.stdout}\n{done.stderr}")
    with np.load(output) as saved:
        values = [saved[f"arr_{i}"] for i in range(len(saved.files))]
    return json.loads(done.stdout.strip().splitlines()[-1]), values


def same_values(a: list, b: list) -> str:
    """'same bits', or the largest absolute difference (for values of equal shapes), or what differs; '-' for none."""
    import numpy as np

    if not a and not b:
        return "-"

    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b, strict=True)):
        return "different shapes"
    if all(np.array_equal(x, y) for x, y in zip(a, b, strict=True)):
        return "same bits"
    diffs = [float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))) for x, y in zip(a, b, strict=True)]
    return f"largest difference {max(diffs):.1e}"


def measure(case: str, model: str | None, pairs: int, folder: Path) -> dict:
    """Both ways ``pairs`` times, alternating which goes first; seconds per way, ratios per pair, the comparison."""
    plain, product = CASES[case][1]
    seconds = {plain: [], product: []}
    torch = {plain: False, product: False}
    values = {}
    for pair in range(pairs):
        for way in (plain, product) if pair % 2 == 0 else (product, plain):
            report, values[way] = spawn(case, way, model, folder)
            seconds[way].append(report["seconds"])
            torch[way] = torch[way] or report["torch_imported"]
    ratios = [a / b for a, b in zip(seconds[plain], seconds[product], strict=True)]
    return dict(seconds=seconds, ratios=ratios, torch=torch, comparison=same_values(values[plain], values[product]))


def report_row(what: str, result: dict, contended: bool) -> str:
    plain, product = result["ways"]
    ratio = "refused (contended)" if contended else f"{statistics.median(result['ratios']):.2f}x"
    extra = {"import tensorboardX": f"; torch imported: {result['torch'][plain]} / {result['torch'][product]}"}
    return (
        f"| {what} | {joined(result['seconds'][plain], 2)} | {joined(result['seconds'][product], 2)} | {ratio} | "
        f"{result['comparison']}{extra.get(what, '')} |"
    )


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {list(CASES)}")
    parser.add_argument("--models", default=",".join(MODELS), help=f"networks of the init case, of {list(MODELS)}")
    parser.add_argument("--pairs", type=int, default=3, help="runs of both ways, alternating which goes first")
    parser.add_argument("--settle", type=float, default=0.0, help="wait up to this many seconds for a quiet machine")
    parser.add_argument("--output", default="benchmarks/results/start_up.md", help="report path ('' = print only)")
    args = parser.parse_args(argv)
    args.cases = [c.strip() for c in args.cases.split(",")]
    args.models = [m.strip() for m in args.models.split(",")]
    unknown = sorted(set(args.cases) - set(CASES)) + sorted(set(args.models) - set(MODELS))
    if unknown or args.pairs < 1:
        parser.error(f"unknown case or model {unknown}, or --pairs < 1; cases: {list(CASES)}, models: {list(MODELS)}")
    return args


def main(argv: list[str] | None = None) -> dict[str, dict]:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--child"]:
        case, way, model, output = argv[1:5]
        run_child(case, way, None if model == "-" else model, output)
        return {}
    args = parse_args(argv)
    import tempfile

    cores = os.cpu_count() or 1
    wait_for_quiet(cores, args.settle)
    load_before, times_before, start = os.getloadavg(), cpu_times(), time.time()
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for case in args.cases:
            for model in args.models if case == "init" else [None]:
                what, ways = CASES[case][0].format(model=model), CASES[case][1]
                results[what] = dict(ways=ways, **measure(case, model, args.pairs, Path(folder)))
    load_after, times_after = os.getloadavg(), cpu_times()
    children = os.times()
    busy_cores = (children.children_user + children.children_system) / max(time.time() - start, 1e-9)
    verdict = load_contention(load_before, load_after, min(busy_cores, cores), cores)
    rows = [report_row(what, result, bool(verdict)) for what, result in results.items()]
    lines = [
        "# Start-up costs: the product's way against the plain one (fresh process each)",
        "",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- command: `PYTHONPATH=. python benchmarks/start_up.py {' '.join(argv)}`",
        f"- machine: {platform.platform()}, {cores} CPUs, Python {platform.python_version()}",
        f"- load average before {format_load(load_before)}, after {format_load(load_after)}: {verdict or 'quiet'}; "
        f"{format_steal(times_before, times_after)}",
        f"- {args.pairs} pair(s) per row, the two ways alternating which runs first; seconds per run in run order",
        "",
        "| start-up piece | plain way (s) | product (s) | plain ÷ product, median | values |",
        "|---|---|---|---|---|",
        *rows,
        "",
        "Ways (plain / product): init = op by op (`module.init` eagerly) / one program (`networks.init_variables`); "
        "tensorboardX = `import tensorboardX` / `reporting.import_tensorboardx()`; digits = "
        "`sklearn.datasets.load_digits()` with its import / `sources._digits_arrays()`.",
    ]
    publish("\n".join(lines) + "\n", args.output)
    return results


if __name__ == "__main__":
    main()
