"""FAB-T: the targeted Fast Adaptive Boundary attack, L-inf and L2.

Croce & Hein (2020), "Minimally distorted adversarial examples with a fast adaptive boundary
attack", ICML: Sec. 3.1 (projection onto the linearised decision hyperplane within the box
[0, 1]^d), Sec. 3.2 (the step: extrapolation eta, biased combination with the projection of the
original point, alpha_max) and Sec. 3.3 (backward step beta after each success). The targeted
version (AutoAttack, Croce & Hein 2020, Sec. 4) linearises z_t - z_y for the classes ranked
2 .. n_target_classes + 1 at the clean input.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from mmard_jax.attacks.autoattack import losses
from mmard_jax.attacks.autoattack.common import (
    N_TARGET_CLASSES,
    AttackOutput,
    along_batch,
    batch_sharding,
    check_target_ranks,
    derived_keys,
    fold_values,
    merge_success,
    one_shot_jit,
    prepare_batch,
    resolve_target_ranks,
    run_fori,
    use_host_loop,
)
from mmard_jax.attacks.common import (
    ApplyFn,
    flat,
    lp_norm,
    per_example,
    per_example_start,
    predicted_correctly,
)

NO_DISTANCE = 1e10  # reference: res2 = 1e10 * ones ("nothing found yet")
MIN_STEP_NORM = 1e-8  # reference: a0 = max(a0, 1e-8)
L2_TINY_WEIGHT = 1e-8  # reference projection_l2: |w| < 1e-8 counts as zero
L2_RATIO_CLAMP = 1e12  # reference projection_l2: clamp of the breakpoints t / w


def _safe_div(num, den):
    return num / jnp.where(den == 0, 1.0, den)


def _binary_search(n_features: int, go_right) -> jax.Array:
    """Reference bisection: ceil(log2 d) halvings of [0, d - 1], moving lb up where go_right(mid). A rolled loop:
    unrolled, its ten halvings (MNIST) made FAB's step program compile in 1.5 s instead of 0.7 s (one core), for the
    same bits (a whole AutoAttack run compared)."""

    def halve(_, bounds):
        lb, ub = bounds
        mid = (lb + ub) // 2
        right = go_right(mid)
        return jnp.where(right, mid, lb), jnp.where(right, ub, mid)

    bounds = (jnp.int32(0), jnp.int32(n_features - 1))
    return jax.lax.fori_loop(0, math.ceil(math.log2(n_features)), halve, bounds)[0]


def _largest_unsaturating_move(room: jax.Array, weight: jax.Array, total: jax.Array) -> jax.Array:
    """The largest float32 ``lam`` >= 0 with ``sum_i weight_i * min(lam, room_i) <= total`` (weights >= 0, rooms in
    [0, 1]), to float32 resolution: a bisection on the bit patterns of [0, max room] (non-negative float32s order like
    their int32 bits), 31 halvings whatever d is. It replaces the reference's sort of the rooms, XLA:CPU's sort being
    slow: FAB-T's share of the AutoAttack benchmark fell from 9.5 to 5.7 s (benchmarks/results/autoattack_speed.md)."""

    def moved(lam):
        return jnp.sum(weight * jnp.minimum(lam, room))

    def halve(_, bounds):
        low, high = bounds
        mid = low + (high - low) // 2
        fits = moved(jax.lax.bitcast_convert_type(mid, room.dtype)) <= total
        return jnp.where(fits, mid, low), jnp.where(fits, high, mid)

    high = jax.lax.bitcast_convert_type(jnp.maximum(jnp.max(room), 0.0).astype(room.dtype), jnp.int32)
    low = jax.lax.fori_loop(0, 31, halve, (jnp.int32(0), high))[0]
    return jax.lax.bitcast_convert_type(low, room.dtype)


def project_hyperplane_linf(point: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
    """Smallest-L-inf d with <w, point + d> = b and point + d in [0, 1]^d (one example, flat vectors).

    Every coordinate moves towards the box face that decreases <w, .> by ``min(lam, room_i)`` (room: its distance
    to that face); ``<w, d>`` is then piecewise linear in ``lam``. The rooms below the solution are used up, and the
    rest move by the ``lam`` that closes the remaining gap. When the hyperplane cannot be reached inside the box, d
    moves every coordinate to its face (FAB, Sec. 3.1). The same d as the reference's sort-based search, found by
    bisection instead (``_largest_unsaturating_move``).
    """
    sign = jnp.where(jnp.dot(w, point) - b >= 0, 1.0, -1.0)
    w, b = w * sign, b * sign
    towards_one = (w < 0).astype(point.dtype)
    used = (w != 0).astype(point.dtype)
    d_box = (towards_one - point) * used  # furthest move within the box
    room = towards_one - point * (2 * towards_one - 1)  # |d_box| where used
    weight = jnp.abs(w)
    gap = jnp.dot(w, point) - b  # sum_i |w_i| min(lam, room_i) must equal this (>= 0)
    total_weight = jnp.sum(weight)
    within_smallest_room = gap < total_weight * jnp.min(room)  # no coordinate reaches its face
    reachable = gap < jnp.dot(weight, room * used)

    below = _largest_unsaturating_move(room, weight, gap)
    used_up = room <= below
    remaining = gap - jnp.sum(jnp.where(used_up, weight * room, 0.0))
    lam = jnp.maximum(_safe_div(remaining, jnp.sum(jnp.where(used_up, 0.0, weight))), 0.0)
    lam_small = jnp.maximum(_safe_div(gap, total_weight), 0.0)
    d_small = (2 * towards_one - 1) * lam_small
    d_clipped = jnp.minimum(lam, d_box) * towards_one + jnp.maximum(-lam, d_box) * (1 - towards_one)
    d = jnp.where(within_smallest_room, d_small, jnp.where(reachable, d_clipped, d_box))
    return d * used


def project_hyperplane_l2(point: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
    """Smallest-L2 d with <w, point + d> = b and point + d in [0, 1]^d (one example, flat vectors)."""
    gap = jnp.dot(w, point) - b
    sign = jnp.where(gap >= 0, 1.0, -1.0)
    w, gap = w * sign, gap * sign
    used = jnp.abs(w) > L2_TINY_WEIGHT
    safe_w = jnp.where(used, w, 1.0)
    ratio = jnp.clip(jnp.maximum(point / safe_w, (point - 1) / safe_w), -L2_RATIO_CLAMP, L2_RATIO_CLAMP)
    ratio = jnp.where(used, ratio, L2_RATIO_CLAMP)
    ratio = jnp.where(ratio == -L2_RATIO_CLAMP, L2_RATIO_CLAMP, ratio)
    order = jnp.argsort(ratio)
    r_sorted = ratio[order]
    r_next = jnp.concatenate([r_sorted[1:], jnp.zeros((1,), r_sorted.dtype)])
    r_sorted = jnp.where(r_sorted == L2_RATIO_CLAMP, 0.0, r_sorted)
    r_next = jnp.where(r_next == L2_RATIO_CLAMP, 0.0, r_next)
    w2_sorted = (w**2)[order]
    w2_total = jnp.sum(w2_sorted)
    w2_rest = w2_total - jnp.cumsum(w2_sorted)
    d_box = -(ratio * w) * used
    first = -w2_total * r_sorted[0]
    s = jnp.concatenate([first[None], jnp.cumsum((r_sorted - r_next) * w2_rest) + first])
    unclipped = s[0] + gap < 0
    unreachable = jnp.dot(d_box, w) + gap > 0
    between = ~(unclipped | unreachable)
    lb = _binary_search(point.shape[0], lambda mid: s[mid] + gap > 0)
    d_unclipped = -_safe_div(gap, w2_total) * w
    alpha = jnp.where(w2_rest[lb] == 0, 0.0, _safe_div(s[lb] + gap, w2_rest[lb]) + r_sorted[lb])
    saturated = (alpha > ratio).astype(point.dtype)
    d_between = d_box * saturated - alpha * w * (1 - saturated)
    d = jnp.where(unclipped, d_unclipped, jnp.where(between, d_between, d_box))
    return d * used


_PROJECTIONS = {"linf": project_hyperplane_linf, "l2": project_hyperplane_l2}


@dataclasses.dataclass(frozen=True)
class _Settings:
    norm: str
    n_iter: int
    alpha_max: float
    eta: float
    beta: float


def _targeted_difference_and_grad(logits_fn, x, labels, targets):
    """z_t - z_y per example (the reference's -(y[la] - y[la_target])) and its input gradient."""

    def total(x_):
        logits = logits_fn(x_)
        diff = losses.class_logit(logits, targets) - losses.class_logit(logits, labels)
        return jnp.sum(diff), diff

    (_, diff), grad = jax.value_and_grad(total, has_aux=True)(x)
    return diff, grad


@one_shot_jit(static_argnames=("norm", "start_randomly", "sharding"))
def _fab_start(
    norm: str,
    start_randomly: bool,
    sharding,
    x,
    clean_logits,
    rank,
    key,
    ids,
    folds,
    eps,
    random_start_scale,
    attack_mask,
    found_fooled,
):
    """(targets: the classes ranked `rank` by the clean logits, rows attacked, state): start at x, or (restarts after
    the first) on the sphere of radius scale * eps around x, clipped to [0, 1], drawn from ``derived_keys(key, ids,
    folds)``; split like the batch (common.batch_sharding)."""
    targets = losses.ranked_class(clean_logits, rank)
    attacked = attack_mask & ~found_fooled
    radius = random_start_scale * eps
    keys = derived_keys(key, ids, folds)
    x1 = per_example_start(keys, x, eps=radius, init="sphere", norm=norm) if start_randomly else x
    return targets, attacked, (x1, x, along_batch(jnp.full((x.shape[0],), NO_DISTANCE, x.dtype), sharding))


@dataclasses.dataclass(frozen=True)
class _FabStep:
    """One FAB iteration: linearise z_t - z_y at x1, project x1 and x onto that hyperplane, take the
    biased extrapolated step, keep the closest adversarial point and step back towards x after a success."""

    apply_fn: ApplyFn
    settings: _Settings

    def __call__(self, consts, _, carry):
        s = self.settings
        variables, x, labels, targets = consts
        logits_fn = functools.partial(self.apply_fn, variables)
        project = jax.vmap(_PROJECTIONS[s.norm])
        x1, best, best_distance = carry
        x0 = flat(x)
        diff, grad = _targeted_difference_and_grad(logits_fn, x1, labels, targets)
        w = flat(grad)
        b = -diff + jnp.sum(w * flat(x1), axis=1)
        # x1 and x projected by one traced copy of the projection (a loop of two), which halves this program's compile
        # time; each runs on the same [B, D] shapes as two separate calls would, so the numbers are the same.
        d1, d2 = jax.lax.map(lambda point: project(point, w, b), jnp.stack([flat(x1), x0]))
        a1 = jnp.maximum(lp_norm(d1, s.norm), MIN_STEP_NORM)
        a2 = jnp.maximum(lp_norm(d2, s.norm), MIN_STEP_NORM)
        alpha = jnp.clip(a1 / (a1 + a2), 0.0, s.alpha_max)[:, None]
        x1_flat = jnp.clip((flat(x1) + s.eta * d1) * (1 - alpha) + (x0 + s.eta * d2) * alpha, 0.0, 1.0)
        x1 = x1_flat.reshape(x.shape)
        is_adv = ~predicted_correctly(logits_fn(x1), labels)
        distance = lp_norm(x1 - x, s.norm)
        closer = is_adv & (distance < best_distance)
        best = jnp.where(per_example(closer, x), x1, best)
        best_distance = jnp.where(closer, distance, best_distance)
        x1 = jnp.where(per_example(is_adv, x), x + (x1 - x) * s.beta, x1)
        return x1, best, best_distance


@one_shot_jit(static_argnames=("apply_fn", "norm"))
def _fab_finish(
    apply_fn: ApplyFn, norm: str, variables, x, labels, best, best_distance, eps, attacked, found: AttackOutput
) -> AttackOutput:
    """Reference `perturb`: a success must be misclassified and within eps; merged into `found`."""
    candidate = jnp.where(per_example(best_distance < NO_DISTANCE, x), best, x)
    fooled = (
        attacked & ~predicted_correctly(apply_fn(variables, candidate), labels) & (lp_norm(candidate - x, norm) <= eps)
    )
    return merge_success(found, AttackOutput(jnp.where(per_example(fooled, x), candidate, x), fooled), attacked)


def fab_targeted(
    apply_fn: ApplyFn,
    variables,
    images,
    labels,
    key: jax.Array,
    *,
    eps: float,
    norm: str = "linf",
    n_target_classes: int = N_TARGET_CLASSES,
    n_iter: int = 100,
    n_restarts: int = 1,
    alpha_max: float = 0.1,
    eta: float = 1.05,
    beta: float = 0.9,
    random_start_scale: float = 0.5,
    target_ranks=None,
    loop: str = "auto",
    example_ids=None,
    active=None,
) -> AttackOutput:
    """FAB-T (FAB paper Sec. 3; AutoAttack Sec. 4) with AutoAttack's 'standard' settings as defaults.

    alpha_max = 0.1 (largest weight of the original point's projection), eta = 1.05 (overshoot),
    beta = 0.9 (backward step), 100 iterations, 9 targets (ranks 2..10 of the clean logits), 1 restart.
    Restarts after the first start at x + random_start_scale * eps * t / ||t|| (reference: 0.5).
    Only examples found within eps count as fooled. `target_ranks` runs only the given ranks instead.
    Needs more classes than the largest target rank. `loop`: see common.use_host_loop. The network is
    ``apply_fn(variables, x) -> logits`` (see `apgd`).
    """
    ranks = resolve_target_ranks(n_target_classes, target_ranks)
    batch = prepare_batch(apply_fn, variables, images, labels, eps, norm, example_ids, active)
    check_target_ranks(ranks, batch.clean_logits.shape[-1])
    found = batch.found
    settings = _Settings(norm, n_iter, alpha_max, eta, beta)
    step, host = _FabStep(apply_fn, settings), use_host_loop(loop)
    for rank in ranks:
        for restart in range(n_restarts):  # reference `attack_single_run` (is_targeted=True), fixed-shape batch
            targets, attacked, state = _fab_start(
                norm,
                restart > 0,
                batch_sharding(batch.images),
                batch.images,
                batch.clean_logits,
                rank,
                key,
                batch.ids,
                fold_values(rank, restart),
                batch.eps,
                random_start_scale,
                batch.attack_mask,
                found.fooled,
            )
            consts = (batch.variables, batch.images, batch.labels, targets)
            _, best, best_distance = run_fori(step, n_iter, consts, state, host)
            found = _fab_finish(
                apply_fn,
                norm,
                batch.variables,
                batch.images,
                batch.labels,
                best,
                best_distance,
                batch.eps,
                attacked,
                found,
            )
    return found
