"""Why the CPU demo's CNNs downsample with stride-2 convs: time of one input-gradient (what each PGD step costs).

Compares the `cnn` model family with downsample='max_pool' against downsample='stride' in the same process,
on MNIST-shaped batches, and prints the ratio. Usage:

    python benchmarks/cpu_downsampling.py [--batch 128] [--repeats 20] [--out benchmarks/results/cpu_downsampling.md]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time

import jax
import jax.numpy as jnp
from benchmark_report import publish

from mmard_jax.losses import cross_entropy
from mmard_jax.models import create_model


def input_gradient_time(model, batch: int, repeats: int) -> float:
    """Median seconds of one jitted d(CE)/dx over a batch of 28x28x1 images."""
    x = jax.random.uniform(jax.random.PRNGKey(0), (batch, 28, 28, 1))
    y = jnp.arange(batch) % 10
    variables = model.init(jax.random.PRNGKey(1), x[:1], train=False)
    grad = jax.jit(jax.grad(lambda u: cross_entropy(model.apply(variables, u, train=False), y).sum()))
    grad(x).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        grad(x).block_until_ready()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    rows = []
    for widths in ((16, 32), (32, 64)):
        pooled = input_gradient_time(create_model("cnn", 10, widths=widths, hidden=128), args.batch, args.repeats)
        strided = input_gradient_time(
            create_model("cnn", 10, widths=widths, hidden=128, downsample="stride"), args.batch, args.repeats
        )
        rows.append(f"| {widths} | {1e3 * pooled:.1f} | {1e3 * strided:.1f} | {pooled / strided:.1f}x |")
    report = "\n".join(
        [
            "# Input-gradient time of the `cnn` family on XLA:CPU: max-pool vs stride-2 downsampling",
            "",
            f"Command: `python benchmarks/cpu_downsampling.py --batch {args.batch} --repeats {args.repeats}`; "
            f"{datetime.date.today()}, {platform.machine()}, {os.cpu_count()} CPU cores, jax {jax.__version__}, "
            f"{jax.device_count()} device(s). Median of {args.repeats} runs, batch {args.batch}, 28x28x1.",
            "",
            "| widths | max_pool (ms) | stride (ms) | ratio |",
            "|---|---|---|---|",
            *rows,
            "",
        ]
    )
    publish(report, args.out)


if __name__ == "__main__":
    main()
