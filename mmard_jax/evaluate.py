"""The robustness evaluation suite: clean, FGSM, PGD and CW∞ accuracy (docs/method.md §4), data-parallel.

Each attack is a configuration of the one PGD engine. Evaluation batches are padded with a mask so every example of
the split counts exactly once; batches are split over the mesh and the counts reduced by XLA.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmard_jax import checks, parallel, reporting
from mmard_jax.attacks.common import predicted_correctly
from mmard_jax.attacks.pgd import PGDSpec, ce_attack, cw_linf, platform_unroll
from mmard_jax.data import augment, pipeline
from mmard_jax.networks import Network, inference_logits

LOSSES = ("ce", "cw")


@dataclasses.dataclass(frozen=True)
class AttackSpec:
    """One evaluation attack (hashable: a static argument of the jitted evaluation): PGD on a loss, or none."""

    name: str  # the result's key: 'clean', 'fgsm', 'pgd' or 'cw'
    pgd: PGDSpec | None = None  # None: the clean input
    loss: str = "ce"  # one of LOSSES: cross-entropy, or the CW margin loss with kappa
    kappa: float = 50.0

    def __post_init__(self):
        checks.choice("loss", self.loss, LOSSES)


def adversarial(spec: AttackSpec, logits_fn: Callable, x, y, key):
    """The attacked batch: ``x`` itself for the clean spec, else PGD on the spec's loss."""
    if spec.pgd is None:
        return x
    if spec.loss == "cw":
        return cw_linf(logits_fn, x, y, key, kappa=spec.kappa, **spec.pgd.kwargs)
    return ce_attack(logits_fn, x, y, key, **spec.pgd.kwargs)


def final_attacks(eval_cfg) -> tuple[AttackSpec, ...]:
    """The final suite of docs/method.md §4 as configured: clean, FGSM, PGD-k and CW∞ (AutoAttack runs separately)."""
    eps = eval_cfg.eps
    specs = [AttackSpec("clean")]
    if eval_cfg.fgsm:
        specs.append(AttackSpec("fgsm", PGDSpec(eps, step_size=eps, steps=1, init="none")))
    if eval_cfg.pgd_steps > 0:
        unroll = platform_unroll(eval_cfg.unroll, eval_cfg.pgd_steps)
        specs.append(AttackSpec("pgd", PGDSpec(eps, eval_cfg.pgd_step_size, eval_cfg.pgd_steps, unroll=unroll)))
    if eval_cfg.cw_steps > 0:
        cw = PGDSpec(
            eps, eval_cfg.cw_step_size, eval_cfg.cw_steps, unroll=platform_unroll(eval_cfg.unroll, eval_cfg.cw_steps)
        )
        specs.append(AttackSpec("cw", cw, loss="cw", kappa=eval_cfg.cw_kappa))
    return tuple(specs)


def periodic_attacks(eval_cfg) -> tuple[AttackSpec, ...]:
    """The cheap evaluation run during training to pick the best checkpoint: clean and PGD."""
    steps = eval_cfg.periodic_pgd_steps
    pgd = PGDSpec(
        eval_cfg.eps, eval_cfg.periodic_pgd_step_size, steps, unroll=min(platform_unroll(eval_cfg.unroll, steps), steps)
    )
    return AttackSpec("clean"), AttackSpec("pgd", pgd)


def attack_key(seed: int, attack_name: str):
    """The PRNG key of one attack: the same in every process (no Python string hashing, which PYTHONHASHSEED salts)."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), zlib.crc32(attack_name.encode()))


@functools.partial(jax.jit, static_argnames=("module", "spec"))
def correct_count(module: nn.Module, spec: AttackSpec, variables, images_uint8, labels, mask, key):
    """How many real (mask=True) examples the model still classifies correctly under the attack."""
    logits_fn = functools.partial(inference_logits, module, variables)
    x = augment.to_float(images_uint8)
    x_adv = adversarial(spec, logits_fn, x, labels, key)
    return jnp.sum(predicted_correctly(logits_fn(x_adv), labels) & mask)


_COMPILED_COUNTS: dict = {}


def _compiled_count(module: nn.Module, spec: AttackSpec, args: tuple):
    """:func:`correct_count` compiled for these argument shapes, once per process (see parallel.compile_synchronized)."""
    leaves = jax.tree.leaves(args)
    signature = (module, spec, jax.tree.structure(args), tuple((x.shape, x.dtype, x.sharding) for x in leaves))
    if signature not in _COMPILED_COUNTS:
        _COMPILED_COUNTS[signature] = parallel.compile_synchronized(
            correct_count, module, spec, *args, name=f"eval/{spec.name}"
        )
    return _COMPILED_COUNTS[signature]


def accuracy(
    network: Network,
    source,
    specs: tuple[AttackSpec, ...],
    mesh,
    *,
    batch_size: int,
    num_examples: int = 0,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, float]:
    """{attack name: accuracy} over the first ``num_examples`` (0 = all) examples of ``source``."""
    count = evaluation_count(source, num_examples)
    variables = parallel.replicate(network.variables, mesh)
    results = {}
    for spec in specs:
        key = attack_key(seed, spec.name)
        correct = jnp.zeros((), jnp.int32)  # summed on the device: no host round trip per batch
        batches = pipeline.eval_batches(
            source,
            global_batch_size=batch_size,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            num_examples=count,
        )
        bar = reporting.progress_bar(-(-count // batch_size), 0, f"eval {spec.name}", enabled=progress)
        for index, batch in enumerate(batches):
            args = (variables, *parallel.global_batch(batch, mesh), jax.random.fold_in(key, index))
            correct = correct + _compiled_count(network.module, spec, args)(*args)
            bar.update(1)
        bar.close()
        results[spec.name] = int(correct) / count  # the one read of this attack's count
    return results


def evaluation_count(source, num_examples: int = 0) -> int:
    """How many examples an evaluation reads: the first ``num_examples``, or all when it is 0."""
    return source.num_examples if num_examples <= 0 else min(num_examples, source.num_examples)


def evaluation_arrays(source, num_examples: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The first ``num_examples`` (0 = all) examples as float images in [0, 1] and labels (for AutoAttack)."""
    count = evaluation_count(source, num_examples)
    return source.images[:count].astype(np.float32) / 255.0, np.asarray(source.labels[:count])
