"""APGD (Auto-PGD) with the CE or DLR loss and APGD-T with the targeted DLR loss.

Croce & Hein (2020), "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks", Sec. 3 (Algorithm 1: momentum step, checkpoints, step-size halving) and
Sec. 4 (DLR losses). Every constant is a named parameter whose default is the reference value.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

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
    ascent_direction,
    per_example,
    per_example_start,
    predicted_correctly,
    project,
)
from mmard_jax.losses import cross_entropy


def apgd_checkpoints(
    n_iter: int, first_fraction: float = 0.22, min_fraction: float = 0.06, decrement_fraction: float = 0.03
) -> tuple[tuple[int, int], ...]:
    """(iteration index, window length) of each step-size check, as the reference counts them.

    Sec. 3.2: p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06); the check after
    w_j = ceil(p_j * n_iter) iterations looks back over the last w_j - w_{j-1} iterations.
    """
    window = max(int(first_fraction * n_iter), 1)
    shortest = max(int(min_fraction * n_iter), 1)
    decrement = max(int(decrement_fraction * n_iter), 1)
    checkpoints, iteration = [], window - 1
    while iteration < n_iter:
        checkpoints.append((iteration, window))
        window = max(window - decrement, shortest)
        iteration += window
    return tuple(checkpoints)


@dataclasses.dataclass(frozen=True)
class _Settings:
    norm: str
    loss: str
    n_iter: int
    rho: float
    momentum: float
    step_size_factor: float
    checkpoints: tuple[tuple[int, int], ...]


def _loss_value_and_grad(apply_fn: ApplyFn, variables, loss: str, x, labels, targets):
    """Per-example loss, logits and d(sum of losses)/dx at x."""

    def total(x_):
        logits = apply_fn(variables, x_)
        if loss == "ce":
            per_ex = cross_entropy(logits, labels)
        elif loss == "dlr":
            per_ex = losses.dlr_loss(logits, labels)
        else:
            per_ex = losses.targeted_dlr_loss(logits, labels, targets)
        return jnp.sum(per_ex), (per_ex, logits)

    (_, (per_ex, logits)), grad = jax.value_and_grad(total, has_aux=True)(x)
    return per_ex, logits, grad


def _oscillation_count(loss_steps, iteration, window):
    """#{j in (iteration - window, iteration]: loss_j > loss_{j-1}}; index -1 wraps to the (still zero)
    last row, exactly as the reference's Python indexing does at the first checkpoint."""
    increased = loss_steps > jnp.roll(loss_steps, 1, axis=0)
    rows = jnp.arange(loss_steps.shape[0])[:, None]
    in_window = (rows > iteration - window) & (rows <= iteration)
    return jnp.sum(increased & in_window, axis=0)


def _checkpoint_tables(settings: _Settings):
    is_checkpoint = np.zeros(settings.n_iter, bool)
    window_at = np.ones(settings.n_iter, np.int32)
    for iteration, window in settings.checkpoints:
        is_checkpoint[iteration], window_at[iteration] = True, window
    return jnp.asarray(is_checkpoint), jnp.asarray(window_at)


@one_shot_jit(static_argnames=("settings", "sharding"))
def _apgd_start(
    settings: _Settings, sharding, x, labels, clean_logits, rank, key, ids, folds, eps, attack_mask, found_fooled
):
    """(targets, rows attacked, state before the first call of `_ApgdStep`): the random start on the eps-sphere
    in x_adv, the initial step size, an empty loss history and placeholders that the first call overwrites, split
    over the devices like the batch (common.batch_sharding); the start draws from ``derived_keys(key, ids, folds)``.
    targets: the classes ranked `rank` by the clean logits for the targeted loss, else the labels (unused)."""
    targets = losses.ranked_class(clean_logits, rank) if settings.loss == "dlr-targeted" else labels
    attacked = attack_mask & ~found_fooled
    x_adv = per_example_start(derived_keys(key, ids, folds), x, eps=eps, init="sphere", norm=settings.norm)
    batch = x.shape[0]
    unset = jnp.zeros((batch,), x.dtype)
    state = dict(
        x_adv=x_adv,
        x_adv_old=x_adv,
        grad=jnp.zeros_like(x),
        x_best=x_adv,
        grad_best=jnp.zeros_like(x),
        loss_best=unset,
        x_best_adv=x_adv,
        robust=jnp.ones((batch,), bool),
        step_size=jnp.full((batch,), settings.step_size_factor, x.dtype) * eps,
        loss_steps=jnp.zeros((settings.n_iter, batch), x.dtype),
        loss_best_last_check=unset,
        reduced_last_check=jnp.ones((batch,), bool),
    )
    state = {name: along_batch(value, sharding, axis=1 if name == "loss_steps" else 0) for name, value in state.items()}
    return targets, attacked, state


@dataclasses.dataclass(frozen=True)
class _ApgdStep:
    """Iteration i of Alg. 1: momentum step, best-point bookkeeping, step-size check at checkpoints.

    i = -1 evaluates the random start st["x_adv"] instead and returns the state the reference has before its first
    iteration: the same program serves both, so the forward and backward pass compile once per attack and shape."""

    apply_fn: ApplyFn
    settings: _Settings

    def __call__(self, consts, i, st):
        s = self.settings
        variables, x, labels, targets, eps = consts
        is_checkpoint, window_at = _checkpoint_tables(s)
        starting = i < 0
        direction = ascent_direction(st["grad"], s.norm)
        a = jnp.where(i > 0, s.momentum, 1.0)
        x_cur = st["x_adv"]
        z = project(x_cur + per_example(st["step_size"], x) * direction, x, eps, s.norm)
        x_new = project(x_cur + (z - x_cur) * a + (x_cur - st["x_adv_old"]) * (1 - a), x, eps, s.norm)
        x_new = jnp.where(starting, x_cur, x_new)

        loss, logits, grad = _loss_value_and_grad(self.apply_fn, variables, s.loss, x_new, labels, targets)
        correct = predicted_correctly(logits, labels)
        x_best_adv = jnp.where(per_example(~correct, x), x_new, st["x_best_adv"])
        loss_steps = st["loss_steps"].at[i].set(loss)
        improved = loss > st["loss_best"]
        x_best = jnp.where(per_example(improved, x), x_new, st["x_best"])
        grad_best = jnp.where(per_example(improved, x), grad, st["grad_best"])
        loss_best = jnp.where(improved, loss, st["loss_best"])

        window = window_at[i]
        oscillating = _oscillation_count(loss_steps, i, window) <= window * s.rho
        stalled = ~st["reduced_last_check"] & (st["loss_best_last_check"] >= loss_best)
        check = is_checkpoint[i]
        halve = check & (oscillating | stalled)
        started = dict(
            x_adv=x_new,
            x_adv_old=x_new,
            grad=grad,
            x_best=x_new,
            grad_best=grad,
            loss_best=loss,
            x_best_adv=x_new,
            robust=correct,
            step_size=st["step_size"],
            loss_steps=st["loss_steps"],
            loss_best_last_check=loss,
            reduced_last_check=jnp.ones_like(st["reduced_last_check"]),
        )
        stepped = dict(
            x_adv=jnp.where(per_example(halve, x), x_best, x_new),
            x_adv_old=x_cur,
            grad=jnp.where(per_example(halve, x), grad_best, grad),
            x_best=x_best,
            grad_best=grad_best,
            loss_best=loss_best,
            x_best_adv=x_best_adv,
            robust=st["robust"] & correct,
            step_size=jnp.where(halve, st["step_size"] / 2.0, st["step_size"]),
            loss_steps=loss_steps,
            loss_best_last_check=jnp.where(check, loss_best, st["loss_best_last_check"]),
            reduced_last_check=jnp.where(check, halve, st["reduced_last_check"]),
        )
        return {name: jnp.where(starting, started[name], stepped[name]) for name in stepped}


@one_shot_jit
def _apgd_finish(x, robust, x_best_adv, attacked, found: AttackOutput) -> AttackOutput:
    """The run's successes (attacked rows misclassified at some iterate) merged into `found`."""
    fooled = attacked & ~robust
    return merge_success(found, AttackOutput(jnp.where(per_example(fooled, x), x_best_adv, x), fooled), attacked)


def _apgd_restarts(apply_fn, settings, batch, rank: int, key, n_restarts, found: AttackOutput, host: bool):
    """Reference `perturb`: each restart (reference `attack_single_run`, over a fixed-shape batch) attacks only the
    rows of `batch` not fooled yet. rank: the target's rank for the targeted loss (else unused; 0); the starts draw
    from `key` folded with each example's id, the rank (targeted loss only) and the restart."""
    targeted = settings.loss == "dlr-targeted"
    step = _ApgdStep(apply_fn, settings)
    for restart in range(n_restarts):
        targets, attacked, state = _apgd_start(
            settings,
            batch_sharding(batch.images),
            batch.images,
            batch.labels,
            batch.clean_logits,
            rank,
            key,
            batch.ids,
            fold_values(rank, restart) if targeted else fold_values(restart),
            batch.eps,
            batch.attack_mask,
            found.fooled,
        )
        consts = (batch.variables, batch.images, batch.labels, targets, batch.eps)
        state = run_fori(step, settings.n_iter, consts, state, host, start=-1)
        found = _apgd_finish(batch.images, state["robust"], state["x_best_adv"], attacked, found)
    return found


def apgd(
    apply_fn: ApplyFn,
    variables,
    images,
    labels,
    key: jax.Array,
    *,
    eps: float,
    norm: str = "linf",
    loss: str = "ce",
    n_iter: int = 100,
    n_restarts: int = 1,
    rho: float = 0.75,
    momentum: float = 0.75,
    step_size_factor: float = 2.0,
    first_checkpoint: float = 0.22,
    min_checkpoint_gap: float = 0.06,
    checkpoint_gap_decrement: float = 0.03,
    loop: str = "auto",
    example_ids=None,
    active=None,
) -> AttackOutput:
    """Untargeted APGD (Croce & Hein 2020, Sec. 3, Alg. 1) with loss 'ce' (APGD-CE) or 'dlr'.

    The network is ``apply_fn(variables, x) -> logits`` (apply_fn static and hashable, variables traced: one
    compilation serves every network of the same architecture).

    Defaults are AutoAttack's: 100 iterations, rho = 0.75 (oscillation threshold), momentum
    alpha = 0.75, initial step size 2 * eps, checkpoints p_1 = 0.22 / gap decrement 0.03 / minimum gap 0.06.
    The 'standard' version uses n_restarts = 1. `key` seeds the random starts; each example's key is
    folded from `example_ids` (default arange), so results do not depend on the batch it sits in.
    Rows with active=False are returned unchanged and never fooled. `loop` picks how iterations are
    driven (common.use_host_loop: 'auto', 'device' or 'host'; same results).
    """
    if loss not in ("ce", "dlr"):
        raise ValueError(
            f"loss={loss!r} is not supported by apgd; use 'ce' or 'dlr' (apgd_targeted runs the targeted DLR loss)"
        )
    batch = prepare_batch(apply_fn, variables, images, labels, eps, norm, example_ids, active)
    settings = _Settings(
        norm,
        loss,
        n_iter,
        rho,
        momentum,
        step_size_factor,
        apgd_checkpoints(n_iter, first_checkpoint, min_checkpoint_gap, checkpoint_gap_decrement),
    )
    return _apgd_restarts(
        apply_fn,
        settings,
        batch,
        0,
        key,
        n_restarts,
        batch.found,
        use_host_loop(loop),
    )


def apgd_targeted(
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
    rho: float = 0.75,
    momentum: float = 0.75,
    step_size_factor: float = 2.0,
    first_checkpoint: float = 0.22,
    min_checkpoint_gap: float = 0.06,
    checkpoint_gap_decrement: float = 0.03,
    target_ranks=None,
    loop: str = "auto",
    example_ids=None,
    active=None,
) -> AttackOutput:
    """APGD-T: APGD on the targeted DLR loss (Croce & Hein 2020, Sec. 4), run once per target.

    The targets are the classes ranked 2 .. n_target_classes + 1 by the clean logits (AutoAttack
    'standard': 9 targets, 1 restart each, 100 iterations); each target attacks only rows not fooled yet.
    `target_ranks` runs only the given ranks instead (the runner passes one at a time so that each
    target attacks only the points still robust). Needs more classes than the largest rank and >= 4.
    """
    ranks = resolve_target_ranks(n_target_classes, target_ranks)
    batch = prepare_batch(apply_fn, variables, images, labels, eps, norm, example_ids, active)
    check_target_ranks(ranks, batch.clean_logits.shape[-1], min_classes=4)  # targeted DLR uses z_pi4
    settings = _Settings(
        norm,
        "dlr-targeted",
        n_iter,
        rho,
        momentum,
        step_size_factor,
        apgd_checkpoints(n_iter, first_checkpoint, min_checkpoint_gap, checkpoint_gap_decrement),
    )
    host, found = use_host_loop(loop), batch.found
    for rank in ranks:
        found = _apgd_restarts(apply_fn, settings, batch, rank, key, n_restarts, found, host)
    return found
