"""Pieces shared by the AutoAttack attacks: outputs, batch preparation, target ranks, iteration drivers.

The attack vocabulary (norms, projection, starts, per-example keys) lives in `mmard_jax.attacks.common`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mmard_jax.attacks.common import (
    ApplyFn,
    check_apply_fn,
    check_non_negative,
    check_norm,
    logits_of,
    per_example,
    predicted_correctly,
)

N_TARGET_CLASSES = 9  # AutoAttack 'standard': APGD-T and FAB-T target the classes ranked 2..10


class AttackOutput(NamedTuple):
    """adversarial: [B, ...] (the clean input where nothing was found); fooled: bool [B], True iff
    `adversarial` is misclassified (clean-misclassified rows count as fooled with the clean input)."""

    adversarial: jax.Array
    fooled: jax.Array


def check_eps(eps) -> float:
    """eps as a Python float, or ValueError for a negative one."""
    check_non_negative("eps", eps)
    return float(eps)


def default_ids_and_mask(images: jax.Array, example_ids, active) -> tuple[jax.Array, jax.Array]:
    n = images.shape[0]
    ids = jnp.arange(n, dtype=jnp.int32) if example_ids is None else jnp.asarray(example_ids, jnp.int32)
    mask = jnp.ones((n,), bool) if active is None else jnp.asarray(active, bool)
    if ids.shape != (n,) or mask.shape != (n,):
        raise ValueError(f"example_ids and active must have shape ({n},), got {ids.shape} and {mask.shape}")
    return ids, mask


class Batch(NamedTuple):
    """An attack's validated inputs. variables: the network's, on device; attack_mask: active rows classified
    correctly (the ones to attack); found: the starting output, where misclassified active rows already count as
    fooled."""

    variables: object
    images: jax.Array
    labels: jax.Array
    ids: jax.Array
    eps: jax.Array
    clean_logits: jax.Array
    attack_mask: jax.Array
    found: AttackOutput


def prepare_batch(
    apply_fn: ApplyFn, variables, images, labels, eps: float, norm: str, example_ids=None, active=None
) -> Batch:
    """Check the arguments shared by every attack and classify the clean inputs once."""
    check_apply_fn(apply_fn)
    check_norm(norm)
    eps = jnp.float32(check_eps(eps))
    images = jnp.asarray(images, jnp.float32)
    labels = jnp.asarray(labels, jnp.int32)
    ids, mask = default_ids_and_mask(images, example_ids, active)
    variables = jax.tree.map(jnp.asarray, variables)  # moved to the device once, not at every iteration
    clean_logits = logits_of(apply_fn, variables, images)
    correct = predicted_correctly(clean_logits, labels)
    return Batch(
        variables, images, labels, ids, eps, clean_logits, mask & correct, AttackOutput(images, mask & ~correct)
    )


def merge_success(best: AttackOutput, new: AttackOutput, attacked: jax.Array) -> AttackOutput:
    """Keep the first success: rows attacked in this round and fooled now take the new example."""
    take = attacked & new.fooled & ~best.fooled
    adversarial = jnp.where(per_example(take, best.adversarial), new.adversarial, best.adversarial)
    return AttackOutput(adversarial, best.fooled | take)


def resolve_target_ranks(n_target_classes: int, ranks=None) -> tuple[int, ...]:
    """Ranks (by clean logit, 1 = prediction) of the target classes; 2 .. n_target_classes + 1 by default."""
    ranks = tuple(range(2, n_target_classes + 2)) if ranks is None else tuple(int(r) for r in ranks)
    if not ranks or min(ranks) < 2:
        raise ValueError(f"target_ranks={ranks!r} must be non-empty ranks >= 2 (rank 1 is the prediction)")
    return ranks


def check_target_ranks(ranks: tuple[int, ...], n_classes: int, min_classes: int = 2) -> None:
    if n_classes < min_classes or max(ranks) > n_classes:
        raise ValueError(
            f"n_target_classes / target_ranks {ranks}: the model has {n_classes} classes, so "
            f"at most {n_classes - 1} targets (rank <= {n_classes}); this attack needs at "
            f"least {min_classes} classes"
        )


# ----------------------------------------------------------------------------- iteration drivers
LOOP_MODES = ("auto", "device", "host")


def use_host_loop(loop: str, host_on_cpu: bool = True) -> bool:
    """'device': the iterations run as one lax.fori_loop / while_loop program. 'host': Python drives
    one jitted iteration at a time (same arithmetic, same results). 'auto' picks 'device' on
    accelerators and, on CPU, `host_on_cpu`: XLA:CPU runs convolutions inside while loops about 2.5x
    slower (jax-ml/jax#12868; measured here on a small CNN), which outweighs one dispatch per
    iteration for the gradient attacks but not for Square's single forward pass per iteration."""
    if loop not in LOOP_MODES:
        raise ValueError(f"loop={loop!r} must be one of {LOOP_MODES}")
    if loop == "auto":
        return host_on_cpu and jax.default_backend() == "cpu"
    return loop == "host"


@functools.partial(jax.jit, static_argnames=("step",))
def _one_step(step, consts, i, state):
    return step(consts, i, state)


@functools.partial(jax.jit, static_argnames=("condition",))
def _holds(condition, consts, state):
    return condition(consts, state)


@functools.partial(jax.jit, static_argnames=("step", "n"))
def _device_fori(step, n, consts, state):
    return jax.lax.fori_loop(0, n, lambda i, st: step(consts, i, st), state)


@functools.partial(jax.jit, static_argnames=("step", "condition", "n"))
def _device_while(step, condition, n, consts, state):
    def keep_going(carry):
        i, st = carry
        return (i < n) & condition(consts, st)

    def advance(carry):
        i, st = carry
        return i + 1, step(consts, i, st)

    return jax.lax.while_loop(keep_going, advance, (jnp.int32(0), state))[1]


def run_fori(step, n: int, consts, state, host: bool):
    """state = step(consts, i, state) for i in 0 .. n - 1. `step` must be hashable (a frozen dataclass)."""
    if not host:
        return _device_fori(step, n, consts, state)
    for i in range(n):
        state = _one_step(step, consts, np.int32(i), state)
    return state


def run_while(step, condition, n: int, consts, state, host: bool, check_every: int = 10):
    """Like run_fori but stops once condition(consts, state) is False. The host loop looks at the
    condition every `check_every` iterations; a step taken when the condition is False must leave the
    state unchanged, so the result is the same either way."""
    if not host:
        return _device_while(step, condition, n, consts, state)
    for i in range(n):
        if i % check_every == 0 and not bool(_holds(condition, consts, state)):
            break
        state = _one_step(step, consts, np.int32(i), state)
    return state
