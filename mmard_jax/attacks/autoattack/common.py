"""Pieces shared by the AutoAttack attacks: compilation, outputs, batch preparation, target ranks, iteration drivers.

The attack vocabulary (norms, projection, starts, per-example keys) lives in `mmard_jax.attacks.common`.

Compilation is the larger part of a first AutoAttack run on CPU, so every operation of an attack runs inside one of
a few jitted programs (none op by op), each compiled once per architecture (``apply_fn``), batch shape and settings:
the classification of the clean batch, per-example keys, and per attack a start, a step (APGD's first call of its
step evaluates the start, so no separate program repeats the forward and backward pass) and a finish that merges
the new successes.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mmard_jax import compilations
from mmard_jax.attacks.common import (
    ApplyFn,
    check_apply_fn,
    check_non_negative,
    check_norm,
    example_keys,
    fold_keys,
    per_example,
    predicted_correctly,
)

N_TARGET_CLASSES = 9  # AutoAttack 'standard': APGD-T and FAB-T target the classes ranked 2..10

# ----------------------------------------------------------------------------- compilation
# XLA:CPU compiled a whole AutoAttack run's programs in about 60% of the time with its classic elemental emitters as
# with its newer MLIR fusion emitters (7.3 s vs 12.6 s, one core, 100 digits, SmallCNN), and in two thirds of that
# again with LLVM at optimisation level 1 (the product's CPU default, mmard_jax.compilations) instead of XLA's default
# 3 (12.1-12.4 s vs 16.7-18.9 s, compiled rounds within noise; level 0 for every program compiled in 4.6 s but ran
# 2.5x slower: the loops stay at level 1, the once-per-batch programs below compile at level 0).
# benchmarks/autoattack_compile_options.py measures the variants and checked then that they give the same bits (also
# on whole L2 and two-device runs); since reductions stay out of YNNPACK (compilations.YNNPACK_CONVOLUTIONS_AND_DOTS),
# the variants may differ by float32 rounding. The classic emitters do not help the train step (it compiled slower).
CPU_COMPILER_OPTIONS = (("xla_cpu_use_fusion_emitters", False), *compilations.CPU_COMPILER_OPTIONS)


def compiler_options() -> dict | None:
    """The XLA options of the attacks' programs: CPU_COMPILER_OPTIONS on CPU (when this XLA knows them), else None."""
    return compilations.compiler_options(CPU_COMPILER_OPTIONS)


def jit(fun=None, *, static_argnames=()):
    """Decorator: `jax.jit` for the attacks' programs, compiled with `compiler_options` (read at the first call)."""
    return compilations.jit(fun, static_argnames=static_argnames, options=compiler_options)


# The programs that run once per batch (classification, keys, starts, finishes, the re-check), not once per
# iteration, compile with LLVM at optimisation level 0: they are 19 of a standard run's 26 programs (the others: 5
# attack loops and 2 option probes) and half of its compile time, and what they run is a few forward passes (library
# calls at any level) and element-wise bookkeeping. benchmarks/results/autoattack_compile_options.md (100 digits):
# compile time 1.32-1.42x lower than with level 1 everywhere, first rounds 1.05-1.06x faster, compiled rounds within
# noise (median ratio 0.99), the same bits.
ONE_SHOT_COMPILER_OPTIONS = tuple(
    (name, 0) if name == compilations.LLVM_LEVEL_1[0] else (name, value) for name, value in CPU_COMPILER_OPTIONS
)


def one_shot_compiler_options() -> dict | None:
    """ONE_SHOT_COMPILER_OPTIONS on CPU (when this XLA knows them), else None."""
    return compilations.compiler_options(ONE_SHOT_COMPILER_OPTIONS)


def one_shot_jit(fun=None, *, static_argnames=()):
    """Decorator: like `jit`, for a program that runs once per batch (compiled with `one_shot_compiler_options`)."""
    return compilations.jit(fun, static_argnames=static_argnames, options=one_shot_compiler_options)


def derived_keys(key: jax.Array, example_ids: jax.Array, folds: tuple) -> jax.Array:
    """Per-example keys: each example's id folded into the attack's `key` (`example_keys`), then each of `folds` in
    turn (a target rank, a restart). Traced inside the start programs that draw from them: no program of their own
    per batch shape (8 fewer compilations in a standard run)."""
    keys = example_keys(key, example_ids)
    for data in folds:
        keys = fold_keys(keys, data)
    return keys


def fold_values(*values: int) -> tuple:
    """`derived_keys`'s folds as int32 host scalars: traced arguments, so one program serves every rank and restart."""
    return tuple(np.int32(value) for value in values)


class AttackOutput(NamedTuple):
    """adversarial: [B, ...] (the clean input where nothing was found); fooled: bool [B], True iff
    `adversarial` is misclassified (clean-misclassified rows count as fooled with the clean input)."""

    adversarial: jax.Array
    fooled: jax.Array


def check_eps(eps) -> float:
    """eps as a Python float, or ValueError for a negative one."""
    check_non_negative("eps", eps)
    return float(eps)


def as_array(x, dtype) -> jax.Array:
    """x as a jax.Array of `dtype`; an array that already is one is returned as it is (no conversion program)."""
    if isinstance(x, jax.Array):
        return x if x.dtype == dtype else x.astype(dtype)
    return jnp.asarray(np.asarray(x, dtype))


def default_ids_and_mask(images: jax.Array, example_ids, active) -> tuple[jax.Array, jax.Array]:
    """(example ids, active rows) as int32 / bool [N] arrays, split over the devices as ``images`` is."""
    n = images.shape[0]
    ids = as_array(np.arange(n, dtype=np.int32) if example_ids is None else example_ids, jnp.int32)
    mask = as_array(np.ones((n,), bool) if active is None else active, jnp.bool_)
    if ids.shape != (n,) or mask.shape != (n,):
        raise ValueError(f"example_ids and active must have shape ({n},), got {ids.shape} and {mask.shape}")
    sharding = batch_sharding(images)
    if sharding is not None:
        ids, mask = jax.device_put((ids, mask), sharding)
    return ids, mask


def batch_sharding(x) -> NamedSharding | None:
    """x's sharding when a mesh splits its batch axis (as the runner places batches), else None. A static argument
    of the start programs, which constrain the state they create to it (`along_batch`): the step then sees the
    shardings of its own outputs already at its first call, and compiles once, not twice."""
    sharding = split_sharding(x)
    return sharding if sharding is not None and sharding.spec[0] is not None else None


def split_sharding(x) -> NamedSharding | None:
    """x's sharding when a mesh splits any of its axes (the batch axis, wherever it is), else None."""
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, NamedSharding) and any(axis is not None for axis in sharding.spec):
        return sharding
    return None


def along_batch(a: jax.Array, sharding: NamedSharding | None, axis: int = 0) -> jax.Array:
    """Inside a jitted program: `a` split along `axis` as `sharding` splits the batch (unchanged for None)."""
    if sharding is None:
        return a
    spec = [None] * a.ndim
    spec[axis] = sharding.spec[0]
    return jax.lax.with_sharding_constraint(a, NamedSharding(sharding.mesh, P(*spec)))


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


@one_shot_jit(static_argnames=("apply_fn",))
def _classify(apply_fn: ApplyFn, variables, images, labels, mask):
    """(clean logits, mask & correct, mask & ~correct): one program per architecture and batch shape."""
    clean_logits = apply_fn(variables, images)
    correct = predicted_correctly(clean_logits, labels)
    return clean_logits, mask & correct, mask & ~correct


def classified_correctly(apply_fn: ApplyFn, variables, images, labels, mask) -> jax.Array:
    """bool [B]: mask & (the prediction is the label), by the program that `prepare_batch` runs."""
    return _classify(apply_fn, variables, images, labels, mask)[1]


def prepare_batch(
    apply_fn: ApplyFn, variables, images, labels, eps: float, norm: str, example_ids=None, active=None
) -> Batch:
    """Check the arguments shared by every attack and classify the clean inputs once."""
    check_apply_fn(apply_fn)
    check_norm(norm)
    eps = np.float32(check_eps(eps))  # a host scalar: no conversion program
    images = as_array(images, jnp.float32)
    labels = as_array(labels, jnp.int32)
    ids, mask = default_ids_and_mask(images, example_ids, active)
    variables = jax.tree.map(jnp.asarray, variables)  # moved to the device once, not at every iteration
    clean_logits, attack_mask, fooled = _classify(apply_fn, variables, images, labels, mask)
    return Batch(variables, images, labels, ids, eps, clean_logits, attack_mask, AttackOutput(images, fooled))


def merge_success(best: AttackOutput, new: AttackOutput, attacked: jax.Array) -> AttackOutput:
    """Keep the first success: rows attacked in this round and fooled now take the new example (traced inside
    each attack's finishing program)."""
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


def use_host_loop(loop: str) -> bool:
    """'device': the iterations run as one lax.fori_loop / while_loop program, on each device over its own rows.
    'host': Python drives one jitted iteration at a time (same arithmetic, same results; a loop to step through).
    'auto' is 'device' on every platform. (Until 2026-12, APGD stepped from the host on CPU, where XLA:CPU had run
    convolutions inside while loops about 2.5x slower, jax-ml/jax#12868; with the product's convolutions its device
    loop is the faster one there too: benchmarks/results/autoattack_speed.md.)"""
    if loop not in LOOP_MODES:
        raise ValueError(f"loop={loop!r} must be one of {LOOP_MODES}")
    return loop == "host"


@jit(static_argnames=("step",))
def _one_step(step, consts, i, state):
    return step(consts, i, state)


@jit(static_argnames=("condition",))
def _holds(condition, consts, state):
    return condition(consts, state)


@jit(static_argnames=("step", "start", "n", "specs"))
def _device_fori(step, start, n, consts, state, specs):
    def loop(consts, state):
        return jax.lax.fori_loop(start, n, lambda i, st: step(consts, i, st), state)

    return _on_each_device(loop, consts, state, specs)


def _batch_specs(consts, state):
    """(mesh, treedef of (consts, state), a PartitionSpec per leaf): split leaves keep their split, every other leaf
    is replicated; None when no leaf is split. Hashable: a static argument."""
    leaves, treedef = jax.tree.flatten((consts, state))
    shardings = [split_sharding(leaf) for leaf in leaves]
    split = [sharding for sharding in shardings if sharding is not None]
    if not split:
        return None
    return split[0].mesh, treedef, tuple(P() if sharding is None else sharding.spec for sharding in shardings)


def _on_each_device(loop, consts, state, specs):
    """``loop(consts, state)``, run by each device on its own rows (``shard_map``) when ``specs`` (`_batch_specs`)
    says the batch is split. The steps and stop conditions of the attacks are per row, so each device's loop needs
    nothing from the others: no collective runs, and a device whose rows are done stops without waiting."""
    if specs is None:
        return loop(consts, state)
    mesh, treedef, leaf_specs = specs
    const_specs, state_specs = jax.tree.unflatten(treedef, leaf_specs)
    mapped = jax.shard_map(loop, mesh=mesh, in_specs=(const_specs, state_specs), out_specs=state_specs, check_vma=False)
    return mapped(consts, state)


@jit(static_argnames=("step", "condition", "n", "check_every", "specs"))
def _device_while(step, condition, n, consts, state, check_every, specs):
    def loop(consts, state):
        def keep_going(carry):
            i, st = carry
            return (i < n) & condition(consts, st)

        def advance(carry):
            i, st = carry
            stop = jnp.minimum(i + check_every, n)
            return stop, jax.lax.fori_loop(i, stop, lambda j, s: step(consts, j, s), st)

        return jax.lax.while_loop(keep_going, advance, (jnp.int32(0), state))[1]

    return _on_each_device(loop, consts, state, specs)


def run_fori(step, n: int, consts, state, host: bool, start: int = 0):
    """state = step(consts, i, state) for i in start .. n - 1 (one program either way: the host loop calls the
    same jitted step at every i). `step` must be hashable (a frozen dataclass)."""
    if not host:
        return _device_fori(step, start, n, consts, state, _batch_specs(consts, state))
    for i in range(start, n):
        state = _one_step(step, consts, np.int32(i), state)
    return state


def run_while(step, condition, n: int, consts, state, host: bool, check_every: int = 10):
    """Like run_fori but stops once condition(consts, state) is False. Both loops look at the condition every
    `check_every` iterations; a step taken when the condition is False must leave the state unchanged, so the
    result is the same either way. On the device each device looks at its own rows only (`_on_each_device`) and
    stops when they are done. (Taken over the whole split batch, at every one of Square's iterations, the condition
    was a cross-device reduction: it and the wait for the other device took about a quarter of each device's time
    on XLA:CPU, benchmarks/results/autoattack_speed.md.)"""
    if not host:
        return _device_while(step, condition, n, consts, state, check_every, _batch_specs(consts, state))
    for i in range(n):
        if i % check_every == 0 and not bool(_holds(condition, consts, state)):
            break
        state = _one_step(step, consts, np.int32(i), state)
    return state
