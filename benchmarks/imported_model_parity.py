"""An imported PyTorch model gives the same numbers in JAX as in PyTorch: clean and PGD-20 accuracy, same examples.

A DeepMind-style WideResNet (Swish, TF-style padding, normalisation inside the model: the architecture of
RobustBench's Gowal/Rebuffi teachers, at a CPU-sized depth and width) is adversarially trained in PyTorch on MNIST-5k,
saved as a plain state dict, imported with ``python -m mmard_jax.import_teacher``, and evaluated by both frameworks on
the same 1,000 test digits: clean accuracy, PGD-20 from the clean image (deterministic, so every example can be
compared one to one) and PGD-20 from a uniform random start (each framework with its own random numbers).

    PYTHONPATH=. python benchmarks/imported_model_parity.py --out benchmarks/results/imported_model_parity.md

Needs PyTorch (``pip install -e ".[torch]"``). ``--train-epochs 0 --n-examples 64`` is a seconds-long smoke run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import jax  # noqa: E402
import torch_twins as twins  # noqa: E402
from benchmark_report import publish  # noqa: E402

from configs.mnist5k import get_config as mnist5k_config  # noqa: E402
from mmard_jax import checkpoint as ckpt_lib  # noqa: E402
from mmard_jax import networks  # noqa: E402
from mmard_jax.attacks.pgd import ce_attack  # noqa: E402
from mmard_jax.config import model_config  # noqa: E402
from mmard_jax.data import load_dataset  # noqa: E402

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
DEPTH, WIDTH = 10, 1


def torch_pgd(model, x, y, *, eps, step_size, steps, random_start, generator=None):
    """L∞ PGD on the cross-entropy, the textbook loop of the PyTorch ARD code bases."""
    x_adv = x.clone()
    if random_start:
        x_adv = (x + torch.empty_like(x).uniform_(-eps, eps, generator=generator)).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        grad = torch.autograd.grad(F.cross_entropy(model(x_adv), y), x_adv)[0]
        x_adv = x_adv.detach() + step_size * grad.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    return x_adv.detach()


def train_torch_model(images, labels, *, epochs, eps, seed):
    """PGD-AT (5 steps) of the DM WideResNet twin; returns the model in eval mode."""
    torch.manual_seed(seed)
    model = twins.DMWideResNet(
        depth=DEPTH, width=WIDTH, activation="swish", mean=MNIST_MEAN, std=MNIST_STD, in_channels=1
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    x_all, y_all = torch.from_numpy(images), torch.from_numpy(labels).long()
    for _ in range(epochs):
        order = torch.randperm(len(y_all))
        for start in range(0, len(order), 128):
            x, y = x_all[order[start : start + 128]], y_all[order[start : start + 128]]
            model.eval()
            x_adv = torch_pgd(model, x, y, eps=eps, step_size=eps / 4, steps=5, random_start=True)
            model.train()
            loss = F.cross_entropy(model(x_adv), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def torch_eval(model, images, labels, *, eps, steps, step_size, batch):
    """(clean logits, predictions under PGD from x, predictions under PGD from a random start)."""
    generator = torch.Generator().manual_seed(0)
    logits, pred_det, pred_rand = [], [], []
    for start in range(0, len(labels), batch):
        x, y = torch.from_numpy(images[start : start + batch]), torch.from_numpy(labels[start : start + batch]).long()
        with torch.no_grad():
            logits.append(model(x).numpy())
        for random_start, out in ((False, pred_det), (True, pred_rand)):
            x_adv = torch_pgd(
                model, x, y, eps=eps, step_size=step_size, steps=steps, random_start=random_start, generator=generator
            )
            with torch.no_grad():
                out.append(model(x_adv).argmax(1).numpy())
    return np.concatenate(logits), np.concatenate(pred_det), np.concatenate(pred_rand)


def jax_eval(network, images, labels, *, eps, steps, step_size, batch):
    """The same three things with our PGD engine (images NHWC)."""
    logits_fn = networks.logits_function(network)

    @jax.jit
    def run(x, y, key):
        attack = {"eps": eps, "step_size": step_size, "steps": steps, "unroll": steps}
        x_det = ce_attack(logits_fn, x, y, None, init="none", **attack)
        x_rand = ce_attack(logits_fn, x, y, key, init="uniform", **attack)
        return logits_fn(x), logits_fn(x_det).argmax(-1), logits_fn(x_rand).argmax(-1)

    outputs = [
        run(images[s : s + batch], labels[s : s + batch], jax.random.PRNGKey(s)) for s in range(0, len(labels), batch)
    ]
    return tuple(np.concatenate([np.asarray(o[i]) for o in outputs]) for i in range(3))


def import_with_the_command(state_dict_path: str, out_dir: str) -> networks.Network:
    """Runs ``python -m mmard_jax.import_teacher`` as a user does and loads what it wrote."""
    command = [
        sys.executable,
        "-m",
        "mmard_jax.import_teacher",
        "--source",
        state_dict_path,
        "--model",
        "dm_wide_resnet",
        "--model-kwargs",
        f"depth={DEPTH},widen_factor={WIDTH},activation=swish",
        "--mean",
        ",".join(map(str, MNIST_MEAN)),
        "--std",
        ",".join(map(str, MNIST_STD)),
        "--num-classes",
        "10",
        "--image-shape",
        "28,28,1",
        "--out",
        out_dir,
    ]
    subprocess.run(command, check=True, cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    variables, meta = ckpt_lib.load_variables(ckpt_lib.checkpoint_dir(out_dir), "best")
    section = model_config(meta["model"]["name"], **meta["model"]["kwargs"])
    section.mean, section.std = tuple(meta["model"]["mean"]), tuple(meta["model"]["std"])
    return networks.Network(networks.build_module(section, 10), variables)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-epochs", type=int, default=4)
    parser.add_argument("--eps", type=float, default=0.1, help="L∞ radius of training and of the PGD evaluation")
    parser.add_argument("--n-examples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    data = load_dataset(mnist5k_config().data)
    train_x = data.train.images.astype(np.float32).transpose(0, 3, 1, 2) / 255.0
    test_nhwc = data.test.images[: args.n_examples].astype(np.float32) / 255.0
    test_y = np.asarray(data.test.labels[: args.n_examples])
    test_nchw = np.ascontiguousarray(test_nhwc.transpose(0, 3, 1, 2))

    started = time.time()
    model = train_torch_model(
        train_x, np.asarray(data.train.labels), epochs=args.train_epochs, eps=args.eps, seed=args.seed
    )
    train_seconds = time.time() - started
    attack = {"eps": args.eps, "steps": 20, "step_size": args.eps / 8, "batch": 200}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "dm_wrn.pt")
        torch.save(model.state_dict(), path)
        network = import_with_the_command(path, os.path.join(tmp, "imported"))
    t_logits, t_det, t_rand = torch_eval(model, test_nchw, test_y, **attack)
    j_logits, j_det, j_rand = jax_eval(network, test_nhwc, test_y, **attack)

    def acc(pred):
        return 100.0 * float(np.mean(pred == test_y))

    n = len(test_y)
    rows = [
        (
            "clean",
            acc(t_logits.argmax(1)),
            acc(j_logits.argmax(1)),
            int(np.sum(t_logits.argmax(1) != j_logits.argmax(1))),
        ),
        ("PGD-20 from x", acc(t_det), acc(j_det), int(np.sum((t_det == test_y) != (j_det == test_y)))),
        ("PGD-20, random start", acc(t_rand), acc(j_rand), int(np.sum((t_rand == test_y) != (j_rand == test_y)))),
    ]
    lines = [
        "# Imported model: the same numbers in JAX and PyTorch",
        "",
        f"`PYTHONPATH=. python benchmarks/imported_model_parity.py --train-epochs {args.train_epochs} --eps {args.eps} "
        f"--n-examples {args.n_examples} --seed {args.seed}`",
        "",
        f"DMWideResNet-{DEPTH}-{WIDTH} (Swish, TF-style padding, normalisation inside the model) PGD-trained in PyTorch "
        f"for {args.train_epochs} epochs on MNIST-5k (ε = {args.eps}, {train_seconds:.0f} s), saved as a state dict, "
        "imported with `python -m mmard_jax.import_teacher`, evaluated on the same "
        f"{n} test digits. PGD-20: ε = {args.eps}, α = {args.eps / 8:g}, cross-entropy.",
        "",
        f"Largest |logit difference| on clean inputs: {np.max(np.abs(t_logits - j_logits)):.2e} "
        f"(logits range {t_logits.min():.1f} to {t_logits.max():.1f}).",
        "",
        "| accuracy (%) | PyTorch | JAX (imported) | examples where they disagree |",
        "|---|---|---|---|",
        *[f"| {name} | {t:.1f} | {j:.1f} | {d} of {n} |" for name, t, j, d in rows],
        "",
        "PGD from x is deterministic in both frameworks, so a disagreement there can only come from float rounding "
        "flipping the sign of a near-zero gradient component; the random-start rows use each framework's own random "
        "numbers and agree up to that noise.",
        f"torch {torch.__version__}, jax {jax.__version__}.",
    ]
    publish("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
