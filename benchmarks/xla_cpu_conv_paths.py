"""Where XLA:CPU loses to PyTorch in ResNet-18's gradients, and how the product picks a convolution library.

XLA:CPU (jaxlib 0.10) hands convolutions and dots to YNNPACK fusions by default; the compiler option
``xla_cpu_experimental_ynn_fusion_type=""`` sends them all to its Eigen kernels instead. The product's models choose
per convolution (``mmard_jax.models.convolution``: Eigen for kernel gradients and for output grids up to 16x16,
YNNPACK for the rest). In one process, interleaved, this times each of: XLA with YNNPACK (the default), XLA with
Eigen, the product's per-convolution choice (compiled with the product's own CPU options, as the product compiles its
programs; in parts 1-2, whose programs run on one device, without its single-threaded Eigen kernels), and eager
PyTorch on the same shapes and weights:

1. one 3x3 convolution at each of ResNet-18's CIFAR stages: forward, input gradient, weight gradient; and the
   forward pass and input gradient of the one-channel first layers of the MNIST models (batch 64);
2. ResNet-18 on a CIFAR-shaped batch: the input gradient (what each PGD step computes) and the gradient of parameters
   and input together (the outer step), BatchNorm in eval and in train mode;
3. the product's CIFAR-shaped train step (benchmarks/step_speed.py's, RSLAD by default), lowered with XLA's own
   convolutions and compiled both ways, and lowered with the product's (no PyTorch side: step_speed.py measures
   that ratio).

Parts 1-2 also give each XLA path's error: its float32 result against the same program run in float64
(``||float32 - float64|| / ||float64||`` over all outputs).

Usage (``--tiny`` shrinks every size, for the CI smoke test):

    PYTHONPATH=. python benchmarks/xla_cpu_conv_paths.py [--batch 32] [--repeats 10] [--step_method rslad]
        [--parts stages,grayscale,network] [--out benchmarks/results/xla_cpu_conv_paths.md]

``--parts grayscale --step_method ''`` times only the one-channel layers (about a minute).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmark_report import (  # noqa: E402  (JAX when called)
    conv_function,
    model_convolutions,
    options_or_products,
    threaded_eigen,
)

from mmard_jax import host_devices  # noqa: E402  (no JAX import: sets the device count before JAX starts)

EIGEN = {"xla_cpu_experimental_ynn_fusion_type": ""}
PRODUCT = "mmard_jax, per convolution"
# name: (whose convolutions the program is traced with, XLA compiler options; None: the product's own, which
# mmard_jax.compilations.compiler_options gives every program on CPU)
XLA_PATHS = {"XLA, YNNPACK (default)": ("xla", {}), "XLA, Eigen": ("xla", EIGEN), PRODUCT: ("product", None)}


TORCH = "PyTorch"
TINY_CNN = {"widths": (8, 16), "use_bn": True}  # --tiny: a BatchNorm CNN with a PyTorch twin


def median_ms(thunks: dict, repeats: int) -> dict:
    """`benchmark_report.interleaved_medians` in milliseconds."""
    from benchmark_report import interleaved_medians

    return {name: 1e3 * seconds for name, seconds in interleaved_medians(thunks, repeats).items()}


def relative_error(result, reference) -> float:
    """``||result - reference|| / ||reference||`` over all leaves of two pytrees of arrays taken as one vector."""
    import jax
    import numpy as np

    pairs = list(zip(jax.tree.leaves(result), jax.tree.leaves(reference), strict=True))
    error = sum(float(np.sum((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)) for a, b in pairs)
    return (error / sum(float(np.sum(np.asarray(b, np.float64) ** 2)) for _, b in pairs)) ** 0.5


def float64_result(fn, args):
    """``fn(*args)`` with every float argument in float64 and 64-bit JAX (``fn`` must not fix a float32 dtype)."""
    import jax
    import numpy as np

    with jax.enable_x64(True):
        wide = jax.tree.map(lambda leaf: np.asarray(leaf, np.float64), args)
        return jax.tree.map(np.asarray, jax.jit(fn)(*wide))


def lowered_per_kind(make_fn, args) -> dict:
    """``jax.jit(make_fn(kind)).lower(*args)`` for each kind of convolution the paths use, models included (each
    traced afresh: ``model_convolutions`` empties JAX's caches)."""
    import jax

    lowered = {}
    for kind in dict.fromkeys(kind for kind, _ in XLA_PATHS.values()):
        with model_convolutions(kind):
            lowered[kind] = jax.jit(make_fn(kind)).lower(*args)
    return lowered


def one_device_options(options) -> dict:
    """`options_or_products` for a program on one of this process's devices, as in parts 1-2: the product's options
    without their single-threaded Eigen kernels, which the product sets only for programs that give every core a
    device of its own (``compilations.ONE_EIGEN_THREAD_PER_DEVICE``); here Eigen may use every core, as PyTorch does."""
    return threaded_eigen(options_or_products(options))


def compiled_thunks(make_fn, args, reference) -> tuple[dict, dict]:
    """``make_fn(kind)(*args)`` compiled once per XLA path: thunks that wait for the result, and each path's
    `relative_error` against ``reference`` (the same computation in float64)."""
    import jax

    lowered = lowered_per_kind(make_fn, args)
    thunks, errors = {}, {}
    for name, (kind, options) in XLA_PATHS.items():
        executable = lowered[kind].compile(compiler_options=one_device_options(options))
        errors[name] = relative_error(executable(*args), reference)
        thunks[name] = lambda executable=executable: jax.block_until_ready(executable(*args))
    return thunks, errors


@dataclasses.dataclass
class Measurement:
    label: str
    ms: dict  # median milliseconds per side (XLA_PATHS and TORCH)
    errors: dict  # per XLA path: `relative_error` of its float32 result against the float64 one

    def row(self) -> str:
        """``| label | ms per side ... | PyTorch / each XLA path ... | errors |`` (ratios > 1: XLA faster)."""
        torch_ms = self.ms[TORCH]
        cells = " | ".join(f"{self.ms[name]:.1f}" for name in (*XLA_PATHS, TORCH))
        ratios = " | ".join(f"{torch_ms / self.ms[name]:.2f}x" for name in XLA_PATHS)
        errors = " / ".join(f"{self.errors[name]:.1e}" for name in XLA_PATHS)
        return f"| {self.label} | {cells} | {ratios} | {errors} |"


TABLE_HEAD = [
    f"| what | {' (ms) | '.join((*XLA_PATHS, TORCH))} (ms) | PyTorch / XLA default | PyTorch / XLA Eigen "
    "| PyTorch / mmard_jax | error vs float64, default / Eigen / mmard_jax |",
    "|---|---|---|---|---|---|---|---|---|---|",
]


# ----------------------------------------------------------------------------------------------------------------
# 1. Single convolutions
# ----------------------------------------------------------------------------------------------------------------
PARTS = ("stages", "grayscale", "network")  # --parts: ResNet-18's stages, one-channel layers, whole networks (1-2)
PASSES = ("forward", "input gradient", "weight gradient")
# One-channel (grayscale) first layers, (size, out channels, kernel, stride, padding): AutoAttack's benchmark SmallCNN
# (autoattack_twin.py), the TRADES SmallCNN (models/small_cnn.py) and the demo's strided CNNs (configs/mnist5k.py).
GRAYSCALE_LAYERS = ((28, 16, 5, 1, 0), (28, 32, 3, 1, 0), (28, 16, 3, 2, 1), (28, 32, 3, 2, 1))
GRAYSCALE_BATCH = 64  # the demo's batch of 128 over the default two devices


def single_conv_rows(
    batch: int,
    size: int,
    c_in: int,
    c_out: int,
    repeats: int,
    kernel: int = 3,
    stride: int = 1,
    padding: int = 1,
    passes: tuple[str, ...] = PASSES,
) -> list[Measurement]:
    """Each of ``passes`` of one ``kernel x kernel`` convolution ``c_in -> c_out`` on ``size x size``."""
    import jax
    import numpy as np
    import torch

    rng = np.random.default_rng(0)
    out = (size + 2 * padding - kernel) // stride + 1
    x = rng.random((batch, size, size, c_in), np.float32)
    w = (0.1 * rng.standard_normal((kernel, kernel, c_in, c_out))).astype(np.float32)
    dy = rng.standard_normal((batch, out, out, c_out)).astype(np.float32)
    pads = ((padding, padding), (padding, padding))

    def conv_of(kind):
        def conv(x, w):
            return conv_function(kind)(x, w, (stride, stride), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"))

        return conv

    xt, wt = torch.tensor(x.transpose(0, 3, 1, 2).copy()), torch.tensor(w.transpose(3, 2, 0, 1).copy())
    dyt = torch.tensor(dy.transpose(0, 3, 1, 2).copy())
    geometry = {"stride": stride, "padding": padding}
    available = {
        "forward": (conv_of, (x, w), lambda: torch.nn.functional.conv2d(xt, wt, **geometry)),
        "input gradient": (
            lambda kind: lambda x, w, dy: jax.vjp(conv_of(kind), x, w)[1](dy)[0],
            (x, w, dy),
            lambda: torch.nn.grad.conv2d_input(xt.shape, wt, dyt, **geometry),
        ),
        "weight gradient": (
            lambda kind: lambda x, w, dy: jax.vjp(conv_of(kind), x, w)[1](dy)[1],
            (x, w, dy),
            lambda: torch.nn.grad.conv2d_weight(xt, wt.shape, dyt, **geometry),
        ),
    }
    shape = f"conv {kernel}x{kernel}{f' stride {stride}' if stride > 1 else ''}, {size}x{size}, {c_in} -> {c_out}"
    rows = []
    for name in passes:
        make_fn, args, torch_fn = available[name]
        thunks, errors = compiled_thunks(make_fn, args, float64_result(make_fn("xla"), args))
        ms = median_ms({**thunks, TORCH: torch_fn}, repeats)
        rows.append(Measurement(f"{shape}, {name}", ms, errors))
    return rows


GRAYSCALE_PASSES = ("forward", "input gradient")  # what each attack step computes (first and last)


def grayscale_rows(tiny: bool, repeats: int) -> list[Measurement]:
    """The forward pass and input gradient of one-channel first layers, batch 64."""
    batch, layers = (2, [(8, 4, 3, 1, 0)]) if tiny else (GRAYSCALE_BATCH, GRAYSCALE_LAYERS)
    return [
        row
        for size, c_out, kernel, stride, padding in layers
        for row in single_conv_rows(batch, size, 1, c_out, repeats, kernel, stride, padding, GRAYSCALE_PASSES)
    ]


# ----------------------------------------------------------------------------------------------------------------
# 2. ResNet-18 (--tiny: a small BatchNorm CNN)
# ----------------------------------------------------------------------------------------------------------------
def weighted_logits_loss(module, train: bool):
    """``loss(params, x, batch_stats, logit_weights) = sum(logits * logit_weights)``; BatchNorm in train mode or not.

    Each logit is weighed at random: a plain sum of logits has almost no input gradient through train-mode BatchNorm
    (the batch mean cancels it), and rounding noise would be all there is to compare."""

    def loss(params, x, batch_stats, logit_weights):
        variables = {"params": params, "batch_stats": batch_stats}
        if train:
            logits, _ = module.apply(variables, x, train=True, mutable=["batch_stats"])
        else:
            logits = module.apply(variables, x, train=False)
        return (logits * logit_weights).sum()

    return loss


def network_rows(model_name: str, model_kwargs: dict, batch: int, image_size: int, repeats: int) -> list[Measurement]:
    """Input gradient and parameter + input gradient of a network, BatchNorm in eval and train mode."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import step_twin
    import torch

    from mmard_jax.models import create_model

    module = create_model(model_name, 10, **model_kwargs)
    wide_module = create_model(model_name, 10, dtype=jnp.float64, param_dtype=jnp.float64, **model_kwargs)
    rng = np.random.default_rng(0)
    x = rng.random((batch, image_size, image_size, 3), np.float32)
    logit_weights = rng.standard_normal((batch, 10)).astype(np.float32)
    variables = module.init(jax.random.PRNGKey(0), x[:1], train=False)
    args = (variables["params"], x, variables["batch_stats"], logit_weights)
    net = step_twin.load_flax_variables(step_twin.twin_network(module, x.shape[1:]), module, variables)
    x_torch, torch_weights = torch.tensor(x.transpose(0, 3, 1, 2).copy()), torch.tensor(logit_weights)
    rows = []
    for train in (False, True):
        for what, argnums in (("input gradient", 1), ("parameter + input gradient", (0, 1))):

            def torch_pass(with_params=argnums != 1):
                for p in net.parameters():
                    p.requires_grad_(with_params)
                net.zero_grad(set_to_none=True)
                x_in = x_torch.clone().requires_grad_(True)
                (net(x_in) * torch_weights).sum().backward()

            net.train(train)
            with model_convolutions("xla"):
                reference = float64_result(jax.grad(weighted_logits_loss(wide_module, train), argnums=argnums), args)
            gradient = jax.grad(weighted_logits_loss(module, train), argnums=argnums)
            thunks, errors = compiled_thunks(lambda kind, gradient=gradient: gradient, args, reference)
            ms = median_ms({**thunks, TORCH: torch_pass}, repeats)
            mode = "train" if train else "eval"
            rows.append(Measurement(f"{model_name}, batch {batch}, BatchNorm {mode}: {what}", ms, errors))
    return rows


# ----------------------------------------------------------------------------------------------------------------
# 3. The product's train step
# ----------------------------------------------------------------------------------------------------------------
def train_step_row(method: str, tiny: bool, repeats: int) -> str:
    """The step_speed.py CIFAR-shaped step, compiled per XLA path: median ms and how far the first step's metrics
    (loss, accuracies, norms) of the Eigen and the product's path differ from the default's."""
    import jax
    import step_speed

    from mmard_jax import train

    args = step_speed.parse_args(["--setting", "cifar", "--method", method, *(["--tiny"] if tiny else [])])
    config, shape, what = step_speed.benchmark_config(args, "cifar")
    side = step_speed.build_jax_side(config, method, shape, jax.device_count())
    step = train.make_train_step(side.spec, side.mesh)
    lowered = lowered_per_kind(lambda kind: step, (side.state, side.teacher_vars, side.images, side.labels))
    thunks, first_metrics = {}, {}
    for name, (kind, options) in XLA_PATHS.items():
        compiled = step_speed.Compiled(lowered[kind].compile(compiler_options=options_or_products(options)), 0.0, 0.0)
        own_state = jax.tree.map(lambda leaf: leaf.copy(), side.state)  # each path's runner donates its own copy
        thunks[name] = step_speed.jax_runner(dataclasses.replace(side, state=own_state), compiled)
        first_metrics[name] = thunks[name]()
    ms = median_ms(thunks, repeats)
    default, eigen, product = (ms[name] for name in XLA_PATHS)
    reference = first_metrics["XLA, YNNPACK (default)"]
    differences = [relative_error(first_metrics[name], reference) for name in ("XLA, Eigen", PRODUCT)]
    batch = config.optim.batch_size
    return (
        f"| {what}, {method}, batch {batch}, {jax.device_count()} device(s) | {default:.0f} | {eigen:.0f} "
        f"| {product:.0f} | {default / eigen:.2f}x | {default / product:.2f}x "
        f"| {differences[0]:.1e} / {differences[1]:.1e} |"
    )


def main(argv=None) -> list[Measurement]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=10, help="interleaved turns of parts 1 and 2")
    parser.add_argument("--step_repeats", type=int, default=4, help="interleaved turns of part 3")
    parser.add_argument("--step_method", default="rslad", help="train step of part 3: rslad or mmard; '' skips it")
    parser.add_argument(
        "--parts",
        default=",".join(PARTS),
        help=f"comma-separated parts 1-2 to time, of {','.join(PARTS)} (part 3: --step_method)",
    )
    parser.add_argument("--tiny", action="store_true", help="test sizes (CI smoke test)")
    parser.add_argument("--settle", type=float, default=300, help="seconds to wait at most for a quiet machine")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    parts = [part for part in args.parts.split(",") if part]
    if not parts or set(parts) - set(PARTS):
        parser.error(f"--parts {args.parts!r}: choose from {','.join(PARTS)}")
    host_devices.set_default_host_devices([args.batch])  # the product's default device count, for part 3

    import jax
    import torch
    from benchmark_report import cpu_times, format_load, format_steal, load_contention, publish, wait_for_quiet

    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(cores)
    wait_for_quiet(cores, args.settle)
    load_before, times_before = os.getloadavg(), cpu_times()
    stages = ((8, 8), (4, 16)) if args.tiny else ((32, 64), (16, 128), (8, 256), (4, 512))
    batch = 2 if args.tiny else args.batch
    model, model_kwargs, image_size = ("cnn", TINY_CNN, 8) if args.tiny else ("resnet18", {}, 32)
    rows = []
    if "stages" in parts:
        rows += [
            r for size, channels in stages for r in single_conv_rows(batch, size, channels, channels, args.repeats)
        ]
    if "grayscale" in parts:
        rows += grayscale_rows(args.tiny, args.repeats)
    if "network" in parts:
        rows += network_rows(model, model_kwargs, batch, image_size, args.repeats)
    step = [train_step_row(args.step_method, args.tiny, args.step_repeats)] if args.step_method else []
    load_after, times_after = os.getloadavg(), cpu_times()
    contended = load_contention(load_before, load_after, own_after=float(cores), cores=cores)  # all cores were ours
    command = " ".join(["python benchmarks/xla_cpu_conv_paths.py", *(argv if argv is not None else sys.argv[1:])])
    lines = [
        "# XLA:CPU's convolution paths (YNNPACK default, Eigen, the product's per-convolution choice) against PyTorch",
        "",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}; command: `{command.strip()}`",
        f"- machine: {platform.machine()}, {cores} usable CPU cores; jax {jax.__version__} "
        f"({jax.device_count()} device(s)), torch {torch.__version__} ({torch.get_num_threads()} threads)",
        f"- load average before {format_load(load_before)}, after {format_load(load_after)}; "
        f"{format_steal(times_before, times_after)}" + (f"; **{contended}**" if contended else ""),
        f"- median of {args.repeats} interleaved turns (parts 1-2) / {args.step_repeats} (part 3); ratios > 1: "
        "XLA is faster",
        "",
        "## 1-2. Single convolutions and whole-network gradients",
        "",
        *TABLE_HEAD,
        *(measurement.row() for measurement in rows),
    ]
    if step:
        lines += [
            "",
            "## 3. The product's train step: XLA's convolutions compiled both ways, and the product's",
            "",
            "| step | XLA default (ms) | XLA Eigen (ms) | mmard_jax (ms) | default / Eigen | default / mmard_jax "
            "| first step's metrics vs default: relative difference, Eigen / mmard_jax |",
            "|---|---|---|---|---|---|---|",
            *step,
        ]
    publish("\n".join([*lines, ""]), args.out)
    return rows


if __name__ == "__main__":
    main()
