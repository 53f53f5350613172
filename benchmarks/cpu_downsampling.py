"""Why the CPU demo's CNNs downsample with stride-2 convs, and what the product's max-pool gradient saves: time of one
input gradient (what each PGD / APGD step costs).

Compares, in one process on MNIST-shaped batches, the `cnn` model family with downsample='max_pool' differentiated
through XLA's reduce-window max-pool (``nn.max_pool``: select-and-scatter in the backward pass, what the product used
before), through the product's ``max_pool_2x2`` (elementwise backward, same values and gradients), and with
downsample='stride'. Usage:

    python benchmarks/cpu_downsampling.py [--batch 128] [--repeats 20] [--out benchmarks/results/cpu_downsampling.md]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform

import flax.linen as nn
import jax
import jax.numpy as jnp
from benchmark_report import cpu_times, format_load, format_steal, interleaved_medians, publish, wait_for_quiet

from mmard_jax.losses import cross_entropy
from mmard_jax.models import create_model, small_cnn


def reduce_window_max_pool(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, window_shape=(2, 2), strides=(2, 2), padding="VALID")


@contextlib.contextmanager
def pooling(function):
    """Models built and traced inside the block pool with ``function``."""
    product = small_cnn.max_pool_2x2
    small_cnn.max_pool_2x2 = function
    try:
        yield
    finally:
        small_cnn.max_pool_2x2 = product


def input_gradient(model, batch: int):
    """A compiled d(CE)/dx over a batch of 28x28x1 images, as a thunk that waits for its result."""
    x = jax.random.uniform(jax.random.PRNGKey(0), (batch, 28, 28, 1))
    y = jnp.arange(batch) % 10
    variables = model.init(jax.random.PRNGKey(1), x[:1], train=False)
    grad = jax.jit(jax.grad(lambda u: cross_entropy(model.apply(variables, u, train=False), y).sum()))
    grad(x).block_until_ready()  # compiled (and traced with whatever pooling was in place) here
    return lambda: grad(x).block_until_ready()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--settle", type=float, default=300, help="seconds to wait at most for a quiet machine")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    wait_for_quiet(len(os.sched_getaffinity(0)), args.settle)
    load_before, times_before = os.getloadavg(), cpu_times()
    rows = []
    for widths in ((16, 32), (32, 64)):
        with pooling(reduce_window_max_pool):
            reduce_window = input_gradient(create_model("cnn", 10, widths=widths, hidden=128), args.batch)
        product = input_gradient(create_model("cnn", 10, widths=widths, hidden=128), args.batch)
        stride = input_gradient(create_model("cnn", 10, widths=widths, hidden=128, downsample="stride"), args.batch)
        median = interleaved_medians(
            {"reduce_window": reduce_window, "product": product, "stride": stride}, args.repeats
        )
        before, pooled, strided = median["reduce_window"], median["product"], median["stride"]
        rows.append(
            f"| {widths} | {1e3 * before:.1f} | {1e3 * pooled:.1f} | {before / pooled:.1f}x | {1e3 * strided:.1f} "
            f"| {pooled / strided:.1f}x |"
        )
    load_after, times_after = os.getloadavg(), cpu_times()
    report = "\n".join(
        [
            "# Input-gradient time of the `cnn` family on XLA:CPU: max-pool (two gradients) vs stride-2 downsampling",
            "",
            f"Command: `python benchmarks/cpu_downsampling.py --batch {args.batch} --repeats {args.repeats}`; "
            f"{datetime.date.today()}, {platform.machine()}, {len(os.sched_getaffinity(0))} usable CPU cores, "
            f"jax {jax.__version__}, {jax.device_count()} device(s). Median of {args.repeats} interleaved runs, batch "
            f"{args.batch}, "
            f"28x28x1. Load average before {format_load(load_before)}, after {format_load(load_after)}; "
            f"{format_steal(times_before, times_after)}.",
            "",
            "| widths | max_pool, reduce-window gradient (ms) | max_pool, product gradient (ms) | speed-up "
            "| stride (ms) | product max_pool / stride |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
        ]
    )
    publish(report, args.out)


if __name__ == "__main__":
    main()
