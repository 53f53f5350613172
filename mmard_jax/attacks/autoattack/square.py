"""Square Attack (L-inf): score-based random search with square-shaped updates.

Andriushchenko, Croce, Flammarion & Hein (2020), "Square Attack: a query-efficient black-box
adversarial attack via random search", ECCV: Sec. 3 (random search on the margin loss), Sec. 3.1
and Alg. 2 (L-inf: vertical-stripe initialisation, windows of side s set to +-2 eps per channel,
schedule of p, the fraction of pixels changed). AutoAttack 'standard' runs 5,000 queries, 1 restart,
p_init = 0.8 and the un-rescaled schedule (resc_schedule=False).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from mmard_jax.attacks.autoattack import losses
from mmard_jax.attacks.autoattack.common import (
    AttackOutput, LogitsFn, example_keys, fold_keys, merge_success, per_example, predicted_correctly,
    prepare_batch, project, run_while, use_host_loop)

# Reference `p_selection`: p = p_init / divisor once the iteration exceeds the bound (10 < it <= 50: /2, ...).
P_SCHEDULE_BOUNDS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
P_SCHEDULE_DIVISORS = (2, 4, 8, 16, 32, 64, 128, 256, 512)
RESCALE_REFERENCE_QUERIES = 10000  # reference: it = int(it / n_queries * 10000) when rescaling


def square_fraction(iteration: int, p_init: float = 0.8, n_queries: int = 5000,
                    rescale_schedule: bool = False) -> float:
    """Fraction p of pixels a square covers at `iteration` (Square paper Sec. 3.1; reference p_selection)."""
    if rescale_schedule:
        iteration = int(iteration / n_queries * RESCALE_REFERENCE_QUERIES)
    p = p_init
    for bound, divisor in zip(P_SCHEDULE_BOUNDS, P_SCHEDULE_DIVISORS):
        if iteration > bound:
            p = p_init / divisor
    return p


def square_sizes(n_queries: int, height: int, width: int, p_init: float = 0.8,
                 rescale_schedule: bool = False) -> np.ndarray:
    """Side s of the square at each iteration: max(round(sqrt(p * h * w)), 1), at most min(h, w)."""
    sides = [max(int(round(math.sqrt(square_fraction(i, p_init, n_queries, rescale_schedule)
                                     * height * width))), 1) for i in range(n_queries)]
    return np.minimum(np.asarray(sides, np.int32), min(height, width))


@dataclasses.dataclass(frozen=True)
class _Settings:
    n_queries: int
    p_init: float
    rescale_schedule: bool


def _random_signs(key, shape, dtype):
    return jnp.where(jax.random.bernoulli(key, 0.5, shape), 1.0, -1.0).astype(dtype)


def _square_update(key, side, x_shape, eps, dtype):
    """One example's update: a side x side window at a uniform position, +-2 eps per channel."""
    height, width, channels = x_shape
    k_row, k_col, k_sign = jax.random.split(key, 3)
    # Reference random_int(0, h - s): floor(U[0, 1) * (h - s)), so the last position h - s is never drawn.
    row = jnp.floor(jax.random.uniform(k_row) * (height - side)).astype(jnp.int32)
    col = jnp.floor(jax.random.uniform(k_col) * (width - side)).astype(jnp.int32)
    rows = jnp.arange(height)[:, None, None]
    cols = jnp.arange(width)[None, :, None]
    window = (rows >= row) & (rows < row + side) & (cols >= col) & (cols < col + side)
    return window * (2.0 * eps) * _random_signs(k_sign, (1, 1, channels), dtype)


@functools.partial(jax.jit, static_argnames=("logits_fn",))
def _square_init(logits_fn: LogitsFn, x, labels, keys, eps):
    """Vertical stripes: every column of every channel set to x +- eps (Square paper Alg. 2)."""
    _, _, width, channels = x.shape
    stripes = jax.vmap(lambda k: _random_signs(k, (1, width, channels), x.dtype))(keys)
    x_best = jnp.clip(x + eps * stripes, 0.0, 1.0)
    margin = losses.margin_loss(logits_fn(x_best), labels)
    return x_best, margin, margin


def _left_to_fool(attack_mask, margin_min):
    return attack_mask & (margin_min > 0.0)


@dataclasses.dataclass(frozen=True)
class _AnyLeft:
    def __call__(self, consts, state):
        return jnp.any(_left_to_fool(consts[-1], state[1]))


@dataclasses.dataclass(frozen=True)
class _SquareStep:
    """One query: add a random square to x_best, keep it if the margin loss drops or the point is
    misclassified. Rows already fooled (margin <= 0) or masked out are left unchanged."""
    logits_fn: LogitsFn
    settings: _Settings

    def __call__(self, consts, i, state):
        s = self.settings
        x, labels, keys, eps, attack_mask = consts
        x_best, margin_min, loss_min = state
        _, height, width, _ = x.shape
        sides = jnp.asarray(square_sizes(s.n_queries, height, width, s.p_init, s.rescale_schedule))
        active = _left_to_fool(attack_mask, margin_min)
        updates = jax.vmap(_square_update, in_axes=(0, None, None, None, None))(
            fold_keys(keys, i), sides[i], x.shape[1:], eps, x.dtype)
        x_new = project(x_best + updates, x, eps, "linf")
        margin = losses.margin_loss(self.logits_fn(x_new), labels)
        loss = margin
        improved = loss < loss_min
        loss_min = jnp.where(active & improved, loss, loss_min)
        accept = active & (improved | (margin <= 0.0))
        margin_min = jnp.where(accept, margin, margin_min)
        x_best = jnp.where(per_example(accept, x), x_new, x_best)
        return x_best, margin_min, loss_min


@functools.partial(jax.jit, static_argnames=("logits_fn",))
def _square_finish(logits_fn: LogitsFn, x, labels, x_best, attack_mask):
    fooled = attack_mask & ~predicted_correctly(logits_fn(x_best), labels)
    return AttackOutput(jnp.where(per_example(fooled, x), x_best, x), fooled)


def _square_single_run(logits_fn: LogitsFn, settings: _Settings, x, labels, keys, eps,
                       attack_mask, host: bool) -> AttackOutput:
    """One Square run (reference `attack_single_run`, L-inf, margin loss) over a fixed-shape batch.

    Each iteration costs one forward pass; the loop stops once no row is left to fool. Randomness
    is drawn per example.
    """
    state = _square_init(logits_fn, x, labels, fold_keys(keys, settings.n_queries), eps)
    consts = (x, labels, keys, eps, attack_mask)
    x_best, _, _ = run_while(_SquareStep(logits_fn, settings), _AnyLeft(), settings.n_queries, consts,
                             state, host)
    return _square_finish(logits_fn, x, labels, x_best, attack_mask)


def square_attack(logits_fn: LogitsFn, images, labels, key: jax.Array, *, eps: float,
                  norm: str = "linf", n_queries: int = 5000, n_restarts: int = 1, p_init: float = 0.8,
                  rescale_schedule: bool = False, loop: str = "auto", example_ids=None,
                  active=None) -> AttackOutput:
    """Untargeted Square Attack on the margin loss (Square paper Sec. 3, Alg. 2), L-inf only.

    Defaults are AutoAttack's: 5,000 queries per restart, 1 restart, p_init = 0.8, schedule of p
    halving after iterations 10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000 (not rescaled).
    Needs images [B, H, W, C] (NHWC). Unlike the reference, which shares one window position and
    sign per batch and iteration, every example draws its own (the paper's per-image sampling),
    so results do not depend on the batch an example sits in. `loop`: see common.use_host_loop.
    """
    if norm != "linf":
        raise ValueError(f"norm={norm!r}: square_attack supports only 'linf' here")
    if np.ndim(images) != 4:
        raise ValueError(f"images must be NHWC [B, H, W, C], got shape {np.shape(images)}")
    batch = prepare_batch(logits_fn, images, labels, eps, norm, example_ids, active)
    keys, found = example_keys(key, batch.ids), batch.found
    settings = _Settings(n_queries, p_init, rescale_schedule)
    for restart in range(n_restarts):
        attacked = batch.attack_mask & ~found.fooled
        new = _square_single_run(logits_fn, settings, batch.images, batch.labels,
                                 fold_keys(keys, restart), batch.eps, attacked,
                                 use_host_loop(loop, host_on_cpu=False))
        found = merge_success(found, new, attacked)
    return found
