"""Square Attack (L-inf and L2): score-based random search with square-shaped updates.

Andriushchenko, Croce, Flammarion & Hein (2020), "Square Attack: a query-efficient black-box
adversarial attack via random search", ECCV: Sec. 3 (random search on the margin loss), Sec. 3.1
and Alg. 2 (L-inf: vertical-stripe initialisation, windows of side s set to +-2 eps per channel,
schedule of p, the fraction of pixels changed), Sec. 3.2 and Alg. 3 (L2: a grid of "pseudo-Gaussian"
tiles as initialisation; each query moves the mass of a second window into a first one, redrawn
as old direction + a fresh tile, so the perturbation keeps norm eps). AutoAttack 'standard' runs
5,000 queries, 1 restart, p_init = 0.8 and the un-rescaled schedule (resc_schedule=False).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from mmard_jax.attacks.autoattack.common import (
    AttackOutput,
    along_batch,
    batch_sharding,
    derived_keys,
    fold_values,
    merge_success,
    one_shot_jit,
    prepare_batch,
    run_while,
    use_host_loop,
)
from mmard_jax.attacks.common import (
    NORMALIZE_EPS,
    ApplyFn,
    fold_keys,
    per_example,
    predicted_correctly,
    project,
)
from mmard_jax.losses import margin

# Reference `p_selection`: p = p_init / divisor once the iteration exceeds the bound (10 < it <= 50: /2, ...).
P_SCHEDULE_BOUNDS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
P_SCHEDULE_DIVISORS = (2, 4, 8, 16, 32, 64, 128, 256, 512)
RESCALE_REFERENCE_QUERIES = 10000  # reference: it = int(it / n_queries * 10000) when rescaling


def square_fraction(
    iteration: int, p_init: float = 0.8, n_queries: int = 5000, rescale_schedule: bool = False
) -> float:
    """Fraction p of pixels a square covers at `iteration` (Square paper Sec. 3.1; reference p_selection)."""
    if rescale_schedule:
        iteration = int(iteration / n_queries * RESCALE_REFERENCE_QUERIES)
    p = p_init
    for bound, divisor in zip(P_SCHEDULE_BOUNDS, P_SCHEDULE_DIVISORS, strict=True):
        if iteration > bound:
            p = p_init / divisor
    return p


def square_sizes(
    n_queries: int, height: int, width: int, p_init: float = 0.8, rescale_schedule: bool = False, norm: str = "linf"
) -> np.ndarray:
    """Side s of the square at each iteration, at most min(h, w).

    L-inf: max(round(sqrt(p * h * w)), 1). L2: max(round(sqrt(p * h * w)), 3), made odd (+1 if even),
    so the pseudo-Gaussian tile has a centre row (reference `attack_single_run`).
    """
    smallest = 3 if norm == "l2" else 1
    sides = []
    for i in range(n_queries):
        p = square_fraction(i, p_init, n_queries, rescale_schedule)
        side = max(int(round(math.sqrt(p * height * width))), smallest)
        sides.append(side + 1 if norm == "l2" and side % 2 == 0 else side)
    return np.minimum(np.asarray(sides, np.int32), min(height, width))


def nested_rectangles(rows: int, cols: int) -> np.ndarray:
    """Concentric rectangles about the centre (rows // 2, cols // 2), unit L2 norm (Square paper Sec. 3.2).

    Ring r (Chebyshev distance from the centre) accumulates 1 / (k + 1)^2 for every k >= r up to
    max(rows // 2, cols // 2), so values fall off from the centre like a Gaussian bump.
    """
    pattern = np.zeros((rows, cols))
    if rows == 0 or cols == 0:
        return pattern
    n_rings = max(rows // 2, cols // 2) + 1
    ring = np.maximum(np.abs(np.arange(rows)[:, None] - rows // 2), np.abs(np.arange(cols)[None, :] - cols // 2))
    tail = np.cumsum((1.0 / np.arange(1, n_rings + 1) ** 2)[::-1])[::-1]  # tail[r] = sum_{k >= r} 1/(k+1)^2
    pattern = tail[ring]
    return pattern / np.sqrt(np.sum(pattern**2))


def pseudo_gaussian_tile(side: int) -> np.ndarray:
    """The L2 update tile eta(s): top half +, bottom half - nested rectangles, unit L2 norm."""
    top = side // 2
    tile = np.concatenate([nested_rectangles(top, side), -nested_rectangles(side - top, side)], axis=0)
    return tile / np.sqrt(np.sum(tile**2))


def l2_init_tiles(height: int, width: int) -> np.ndarray:
    """Tiles of the L2 initialisation, each placed on its own [H, W] canvas: [n_tiles, 2, H, W]
    (axis 1: the tile as drawn and transposed). Side h // 5, a grid of (h // s) x (w // s) starting
    at (h - 5 s) // 2 in both directions (reference); tiles reaching past the border are cut off."""
    side = height // 5
    if side < 1 or width < side:
        raise ValueError(f"L2 Square needs images at least 5 pixels high, got {height}x{width}")
    tile = pseudo_gaussian_tile(side)
    start = (height - 5 * side) // 2
    canvases = []
    for a in range(height // side):
        for b in range(width // side):
            row, col = start + a * side, start + b * side
            canvas = np.zeros((2, height + side, width + side))
            canvas[0, row : row + side, col : col + side] = tile
            canvas[1, row : row + side, col : col + side] = tile.T
            canvases.append(canvas[:, :height, :width])
    return np.stack(canvases).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class _Settings:
    n_queries: int
    p_init: float
    rescale_schedule: bool
    norm: str


def _random_signs(key, shape, dtype):
    return jnp.where(jax.random.bernoulli(key, 0.5, shape), 1.0, -1.0).astype(dtype)


def _window_origin(key, side, height, width):
    """Top-left corner of a side x side window. Reference random_int(0, h - s): floor(U[0, 1) * (h - s)),
    so the last position h - s is never drawn."""
    k_row, k_col = jax.random.split(key)
    row = jnp.floor(jax.random.uniform(k_row) * (height - side)).astype(jnp.int32)
    col = jnp.floor(jax.random.uniform(k_col) * (width - side)).astype(jnp.int32)
    return row, col


def _window(row, col, side, height, width):
    """[H, W, 1] boolean mask of the side x side window at (row, col)."""
    rows = jnp.arange(height)[:, None, None]
    cols = jnp.arange(width)[None, :, None]
    return (rows >= row) & (rows < row + side) & (cols >= col) & (cols < col + side)


def _linf_update(key, side, x_shape, eps, dtype):
    """One example's L-inf update: a side x side window at a uniform position, +-2 eps per channel."""
    height, width, channels = x_shape
    k_origin, k_sign = jax.random.split(key)
    row, col = _window_origin(k_origin, side, height, width)
    return _window(row, col, side, height, width) * (2.0 * eps) * _random_signs(k_sign, (1, 1, channels), dtype)


def _place(tile, row, col, height, width):
    """A [S, S] tile (zero-padded beyond its side) on an [H, W] canvas at (row, col)."""
    size = tile.shape[0]
    canvas = jnp.zeros((height + size, width + size), tile.dtype)
    return jax.lax.dynamic_update_slice(canvas, tile, (row, col))[:height, :width]


def _channel_norm(v, mask):
    """L2 norm over the window `mask` of each channel of an [H, W, C] array: [C]."""
    return jnp.sqrt(jnp.sum(jnp.where(mask, v, 0.0) ** 2, axis=(0, 1)))


def _l2_proposal(key, side, tile, x, x_best, eps):
    """One example's L2 query (Square paper Alg. 3; reference `attack_single_run`, L2).

    A first window W1 gets its old direction plus a fresh tile (random sign per channel), rescaled per
    channel to hold the norm of W1 and a second window W2, plus an equal share of the budget left; W2
    is cleared; the whole perturbation is then rescaled to norm eps and the image clipped to [0, 1].
    """
    height, width, channels = x.shape
    k_first, k_second, k_flip, k_sign = jax.random.split(key, 4)
    origin = _window_origin(k_first, side, height, width)
    first = _window(*origin, side, height, width)
    second = _window(*_window_origin(k_second, side, height, width), side, height, width)
    delta = x_best - x
    tile = jnp.where(jax.random.bernoulli(k_flip), tile.T, tile)
    fresh = _place(tile, *origin, height, width)[..., None]
    old_direction = jnp.where(first, delta, 0.0) / (NORMALIZE_EPS + _channel_norm(delta, first))
    proposal = fresh * _random_signs(k_sign, (channels,), x.dtype) + old_direction
    budget_left = jnp.maximum(eps**2 - jnp.sum(delta**2), 0.0) / channels
    target = jnp.sqrt(budget_left + _channel_norm(delta, first | second) ** 2)
    proposal = proposal / (NORMALIZE_EPS + _channel_norm(proposal, first)) * target
    delta = jnp.where(first, proposal, jnp.where(second, 0.0, delta))
    scale = eps / (jnp.sqrt(jnp.sum(delta**2)) + NORMALIZE_EPS)
    return jnp.clip(x + delta * scale, 0.0, 1.0)


def _linf_init(key, x, eps):
    """Vertical stripes: every column of every channel set to x +- eps (Square paper Alg. 2)."""
    _, width, channels = x.shape
    return jnp.clip(x + eps * _random_signs(key, (1, width, channels), x.dtype), 0.0, 1.0)


def _l2_init(key, x, eps):
    """A grid of pseudo-Gaussian tiles, each transposed or not and signed per channel at random,
    rescaled to norm eps (Square paper Alg. 3)."""
    height, width, channels = x.shape
    tiles = jnp.asarray(l2_init_tiles(height, width))
    k_flip, k_sign = jax.random.split(key)
    flips = jax.random.bernoulli(k_flip, 0.5, (tiles.shape[0],)).astype(jnp.int32)
    chosen = jnp.take_along_axis(tiles, flips[:, None, None, None], axis=1)[:, 0]
    delta = jnp.einsum("thw,tc->hwc", chosen, _random_signs(k_sign, (tiles.shape[0], channels), x.dtype))
    return jnp.clip(x + delta * eps / (jnp.sqrt(jnp.sum(delta**2)) + NORMALIZE_EPS), 0.0, 1.0)


@one_shot_jit(static_argnames=("apply_fn", "norm", "n_queries", "sharding"))
def _square_start(
    apply_fn: ApplyFn, norm: str, n_queries: int, sharding, variables, x, labels, key, ids, folds, eps, attack_mask,
    found_fooled
):  # fmt: skip
    """(rows attacked, the run's keys, state): the keys are ``derived_keys(key, ids, folds)``, which the queries draw
    from (each folds its iteration in); the initial perturbation (Alg. 2 / Alg. 3) draws from them with `n_queries`
    folded in; its margin; all split like the batch (common.batch_sharding)."""
    keys = derived_keys(key, ids, folds)
    init = _linf_init if norm == "linf" else _l2_init
    x_best = jax.vmap(init, in_axes=(0, 0, None))(fold_keys(keys, n_queries), x, eps)
    margin_min = margin(apply_fn(variables, x_best), labels)
    attacked, state = attack_mask & ~found_fooled, (x_best, margin_min, margin_min)
    return jax.tree.map(lambda a: along_batch(a, sharding), (attacked, keys, state))


def _left_to_fool(attack_mask, margin_min):
    return attack_mask & (margin_min > 0.0)


@dataclasses.dataclass(frozen=True)
class _AnyLeft:
    def __call__(self, consts, state):
        return jnp.any(_left_to_fool(consts[-1], state[1]))


@dataclasses.dataclass(frozen=True)
class _SquareStep:
    """One query: a random square-shaped change of x_best, kept if the margin loss drops or the point is
    misclassified. Rows already fooled (margin <= 0) or masked out are left unchanged."""

    apply_fn: ApplyFn
    settings: _Settings

    def __call__(self, consts, i, state):
        variables, x, labels, keys, eps, attack_mask = consts
        x_best, margin_min, loss_min = state
        active = _left_to_fool(attack_mask, margin_min)
        x_new = self.propose(fold_keys(keys, i), i, x, x_best, eps)
        new_margin = margin(self.apply_fn(variables, x_new), labels)
        loss = new_margin
        improved = loss < loss_min
        loss_min = jnp.where(active & improved, loss, loss_min)
        accept = active & (improved | (new_margin <= 0.0))
        margin_min = jnp.where(accept, new_margin, margin_min)
        x_best = jnp.where(per_example(accept, x), x_new, x_best)
        return x_best, margin_min, loss_min

    def propose(self, keys, i, x, x_best, eps):
        """Every example's candidate for query i."""
        s = self.settings
        _, height, width, _ = x.shape
        sides = square_sizes(s.n_queries, height, width, s.p_init, s.rescale_schedule, s.norm)
        if s.norm == "linf":
            updates = jax.vmap(_linf_update, in_axes=(0, None, None, None, None))(
                keys, jnp.asarray(sides)[i], x.shape[1:], eps, x.dtype
            )
            return project(x_best + updates, x, eps, "linf")
        distinct, index = np.unique(sides, return_inverse=True)
        largest = int(distinct.max())
        tiles = np.zeros((len(distinct), largest, largest), np.float32)  # eta(s), zero-padded
        for k, side in enumerate(distinct):
            tiles[k, :side, :side] = pseudo_gaussian_tile(int(side))
        k = jnp.asarray(index)[i]
        return jax.vmap(_l2_proposal, in_axes=(0, None, None, 0, 0, None))(
            keys, jnp.asarray(distinct)[k], jnp.asarray(tiles)[k], x, x_best, eps
        )


@one_shot_jit(static_argnames=("apply_fn",))
def _square_finish(apply_fn: ApplyFn, variables, x, labels, x_best, attacked, found: AttackOutput) -> AttackOutput:
    fooled = attacked & ~predicted_correctly(apply_fn(variables, x_best), labels)
    return merge_success(found, AttackOutput(jnp.where(per_example(fooled, x), x_best, x), fooled), attacked)


def _square_single_run(apply_fn: ApplyFn, settings: _Settings, batch, key, restart: int, found, host: bool):
    """One Square run (reference `attack_single_run`, margin loss) over a fixed-shape batch, on the rows not fooled
    yet, drawing from `key` folded with each example's id and the restart; its successes merged into `found`.

    Each iteration costs one forward pass; the loop stops once no row is left to fool. Randomness
    is drawn per example.
    """
    variables, x, labels, eps = batch.variables, batch.images, batch.labels, batch.eps
    attacked, keys, state = _square_start(
        apply_fn,
        settings.norm,
        settings.n_queries,
        batch_sharding(x),
        variables,
        x,
        labels,
        key,
        batch.ids,
        fold_values(restart),
        eps,
        batch.attack_mask,
        found.fooled,
    )
    consts = (variables, x, labels, keys, eps, attacked)
    x_best, _, _ = run_while(_SquareStep(apply_fn, settings), _AnyLeft(), settings.n_queries, consts, state, host)
    return _square_finish(apply_fn, variables, x, labels, x_best, attacked, found)


def square_attack(
    apply_fn: ApplyFn,
    variables,
    images,
    labels,
    key: jax.Array,
    *,
    eps: float,
    norm: str = "linf",
    n_queries: int = 5000,
    n_restarts: int = 1,
    p_init: float = 0.8,
    rescale_schedule: bool = False,
    loop: str = "auto",
    example_ids=None,
    active=None,
) -> AttackOutput:
    """Untargeted Square Attack on the margin loss (Square paper Sec. 3; Alg. 2 for L-inf, Alg. 3 for L2).

    Defaults are AutoAttack's: 5,000 queries per restart, 1 restart, p_init = 0.8, schedule of p
    halving after iterations 10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000 (not rescaled).
    Needs images [B, H, W, C] (NHWC), at least 5 pixels high for L2. Unlike the reference, which
    shares one window position, tile orientation and sign per batch and iteration (L2: one
    orientation per tile), every example draws its own (the paper's per-image sampling), so results
    do not depend on the batch an example sits in. `loop`: see common.use_host_loop. The network is
    ``apply_fn(variables, x) -> logits`` (see `apgd`).
    """
    if np.ndim(images) != 4:
        raise ValueError(f"images must be NHWC [B, H, W, C], got shape {np.shape(images)}")
    batch = prepare_batch(apply_fn, variables, images, labels, eps, norm, example_ids, active)
    found = batch.found
    settings = _Settings(n_queries, p_init, rescale_schedule, norm)
    if norm == "l2":
        l2_init_tiles(*np.shape(images)[1:3])  # fails early on images too small for the L2 grid
    host = use_host_loop(loop)
    for restart in range(n_restarts):
        found = _square_single_run(apply_fn, settings, batch, key, restart, found, host)
    return found
