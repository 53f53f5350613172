"""The AutoAttack runner: the reference order of attacks, each run only on the points still robust.

Croce & Hein (2020), Sec. 5: AutoAttack 'standard' = APGD-CE, APGD-T, FAB-T, Square; a point counts
as robust only if every attack fails. Every example an attack claims is re-checked with a fresh
forward pass (inside the eps-ball up to a tolerance, inside [0, 1], misclassified); a rejected claim is
logged, counted in `recheck_failures` and the point stays robust.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from mmard_jax import parallel
from mmard_jax.attacks.autoattack.apgd import apgd, apgd_targeted
from mmard_jax.attacks.autoattack.common import (
    N_TARGET_CLASSES,
    AttackOutput,
    check_eps,
    classified_correctly,
    one_shot_jit,
    resolve_target_ranks,
)
from mmard_jax.attacks.autoattack.fab import fab_targeted
from mmard_jax.attacks.autoattack.square import square_attack
from mmard_jax.attacks.common import ApplyFn, check_apply_fn, check_norm, lp_norm, predicted_correctly

STANDARD_ATTACKS = ("apgd-ce", "apgd-t", "fab-t", "square")  # reference set_version('standard')
RECHECK_TOLERANCE = 1e-6  # slack on ||x_adv - x|| <= eps for float32 rounding
SQUARE_WARNING_MARGIN = 0.002  # reference checks.check_square_sr: alpha = .002
# A target pass of APGD-T / FAB-T runs in a batch shape its attack has compiled already if that one pads at most 1.5x
# the rows of the best-fitting shape. In the AutoAttack benchmark (benchmarks/results/autoattack_speed.md), sizes
# fitted to each pass alone compiled 43 programs (powers of two: 29); with reuse, 33 (the 4 more were the 12-row
# shape's classification, re-check and keys), while FAB-T and Square run 12 rows instead of 16 for 11 robust digits.
# Since the starts derive their keys themselves (common.derived_keys), a standard run compiles 26.
REUSE_PADDING = 1.5
_RESERVED_OVERRIDES = ("eps", "norm", "example_ids", "active")


@dataclasses.dataclass
class AutoAttackResult:
    """Outcome of `run_autoattack`; accuracies are fractions in [0, 1] over all N examples."""

    clean_accuracy: float
    robust_accuracy: float
    per_attack: dict[str, float]
    adversarial: np.ndarray
    robust_mask: np.ndarray
    recheck_failures: int
    log_lines: list[str]


def _apgd_ce(apply_fn, variables, images, labels, key, **kwargs) -> AttackOutput:
    return apgd(apply_fn, variables, images, labels, key, loss="ce", **kwargs)


_ATTACK_FUNCTIONS: dict[str, Callable[..., AttackOutput]] = {
    "apgd-ce": _apgd_ce,
    "apgd-t": apgd_targeted,
    "fab-t": fab_targeted,
    "square": square_attack,
}


_TARGETED = ("apgd-t", "fab-t")


def _passes(attack: str, settings: dict) -> list[tuple[str, dict]]:
    """(log label, keyword arguments) of each pass: one per target rank for the targeted attacks, so
    that, as in the reference, each target attacks only the points still robust."""
    if attack not in _TARGETED:
        return [(attack, settings)]
    ranks = resolve_target_ranks(settings.get("n_target_classes", N_TARGET_CLASSES), settings.get("target_ranks"))
    return [(f"{attack} (target rank {rank})", {**settings, "target_ranks": (rank,)}) for rank in ranks]


def _override_name(attack: str) -> str:
    return attack.replace("-", "_")


@one_shot_jit
def _attack_keys(seed) -> list[jax.Array]:
    """The key of each attack in STANDARD_ATTACKS: the seed's key with the attack's index folded in (one program)."""
    root = jax.random.key(seed)
    return [jax.random.fold_in(root, index) for index in range(len(STANDARD_ATTACKS))]


@one_shot_jit(static_argnames=("apply_fn", "norm"))
def _valid_adversarial(apply_fn: ApplyFn, norm: str, variables, images, adversarial, labels, eps, tolerance):
    in_ball = lp_norm(adversarial - images, norm) <= eps + tolerance
    axes = tuple(range(1, images.ndim))
    in_box = jnp.all((adversarial >= 0.0) & (adversarial <= 1.0), axis=axes)
    finite = jnp.all(jnp.isfinite(adversarial), axis=axes)
    return in_ball & in_box & finite & ~predicted_correctly(apply_fn(variables, adversarial), labels)


def verify_adversarial(
    apply_fn: ApplyFn,
    variables,
    images,
    adversarial,
    labels,
    *,
    eps: float,
    norm: str = "linf",
    tolerance: float = RECHECK_TOLERANCE,
) -> np.ndarray:
    """bool [N]: adversarial[i] is within eps (+ tolerance) of images[i], in [0, 1] and misclassified by
    ``apply_fn(variables, .)``."""
    check_apply_fn(apply_fn)
    check_norm(norm)
    valid = _valid_adversarial(
        apply_fn,
        norm,
        variables,
        jnp.asarray(images, jnp.float32),
        jnp.asarray(adversarial, jnp.float32),
        jnp.asarray(labels, jnp.int32),
        jnp.float32(check_eps(eps)),
        jnp.float32(tolerance),
    )
    return np.asarray(valid)


def _rows_per_device(needed: int) -> int:
    """The smallest of 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (the powers of two and 1.5 times them) holding ``needed``."""
    size = 1
    while size < needed:
        size = size + 1 if size < 2 else (size * 3 // 2 if size & (size - 1) == 0 else size * 4 // 3)
    return size


def _padded_size(n: int, batch_size: int, n_devices: int, compiled: frozenset[int] = frozenset()) -> int:
    """Rows of the batch that holds n rows: `_rows_per_device` per device, capped at batch_size, so at most a third
    padding (powers of two alone waste up to half). A size in ``compiled`` (the attack's shapes so far in this run)
    that holds n rows and is at most REUSE_PADDING times that one is taken instead: a new shape costs the attack's
    programs a compilation (APGD's: 1.4-1.7 s on 2 cores)."""
    fitted = min(_rows_per_device(-(-n // n_devices)) * n_devices, batch_size)
    return min((size for size in compiled if n <= size <= REUSE_PADDING * fitted), default=fitted)


class _Batches:
    """Fixed-shape batches of chosen rows, split over the mesh's data axis; padded rows are masked out by `active`."""

    def __init__(self, batch_size: int, mesh: Mesh):
        self.n_devices = mesh.shape[parallel.DATA_AXIS]
        self.batch_size = -(-batch_size // self.n_devices) * self.n_devices
        self.sharding = parallel.batch_sharded(mesh)

    def split(self, rows: np.ndarray) -> list[np.ndarray]:
        return [rows[i : i + self.batch_size] for i in range(0, rows.size, self.batch_size)]

    def size(self, n: int, compiled: frozenset[int] = frozenset()) -> int:
        return _padded_size(n, self.batch_size, self.n_devices, compiled)

    def place(self, rows: np.ndarray, *arrays: np.ndarray, size: int | None = None):
        """Pad `rows` (to ``size``, default `_padded_size`) by repeating its first entry, gather each array and shard
        it along the batch."""
        size = self.size(rows.size) if size is None else size
        padded = np.concatenate([rows, np.full(size - rows.size, rows[0], rows.dtype)])
        active = np.arange(size) < rows.size
        placed = [jax.device_put(a[padded], self.sharding) for a in arrays]
        return placed, jax.device_put(padded.astype(np.int32), self.sharding), jax.device_put(active, self.sharding)


def _attack_plan(version: str, attacks) -> tuple[str, ...]:
    if version not in ("standard", "custom"):
        raise ValueError(f"version={version!r} is not supported; use 'standard' or 'custom' (with `attacks`)")
    if attacks is None:
        if version == "custom":
            raise ValueError("version='custom' needs `attacks`, e.g. ('apgd-ce', 'square')")
        attacks = STANDARD_ATTACKS
    attacks = tuple(attacks)
    unknown = [a for a in attacks if a not in _ATTACK_FUNCTIONS]
    if unknown or not attacks:
        raise ValueError(f"attacks={attacks!r}: choose from {STANDARD_ATTACKS}")
    return attacks


def _attack_settings(attacks: tuple[str, ...], overrides: dict) -> dict[str, dict]:
    allowed = {_override_name(a): a for a in STANDARD_ATTACKS}
    settings = {a: {} for a in attacks}
    for name, values in overrides.items():
        if name not in allowed or not isinstance(values, dict):
            raise ValueError(
                f"unknown override {name}={values!r}: pass a dict of parameters as one "
                f"of {tuple(allowed)}, e.g. apgd_ce=dict(n_iter=10)"
            )
        reserved = [k for k in values if k in _RESERVED_OVERRIDES]
        if reserved:
            raise ValueError(f"override {name} may not set {reserved}: the runner sets them")
        if allowed[name] in settings:
            settings[allowed[name]] = dict(values)
    return settings


def _check_inputs(images: np.ndarray, labels: np.ndarray, batch_size: int) -> None:
    if images.ndim < 2 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty batch [N, ...], got shape {images.shape}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must have shape ({images.shape[0]},), got {labels.shape}")
    if not (np.isfinite(images).all() and images.min() >= 0.0 and images.max() <= 1.0):
        raise ValueError("images must be finite and scaled to [0, 1]")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be a positive integer")


def run_autoattack(
    apply_fn: ApplyFn,
    variables,
    images,
    labels,
    *,
    eps: float,
    norm: str = "linf",
    version: str = "standard",
    seed: int = 0,
    batch_size: int = 500,
    attacks: tuple[str, ...] | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = print,
    mesh: Mesh | None = None,
    **attack_overrides: dict,
) -> AutoAttackResult:
    """Run AutoAttack ('standard': APGD-CE, APGD-T, FAB-T, Square) on (images, labels).

    The network is ``apply_fn(variables, x) -> logits`` on float NHWC images in [0, 1], e.g.
    `networks.inference_apply(module)` and a Flax module's variables. ``apply_fn`` is a static argument of the
    compiled programs (hashable; equal ones share them, so pass the same object, or objects equal by value, for
    every network of an architecture) and ``variables`` a traced one, replicated over ``mesh``: one compilation
    serves every network of the same architecture and shapes. Each attack runs
    only on the points still robust, in batches of `batch_size` (rounded up to a multiple of the
    mesh's data axis) split over ``mesh`` (default `parallel.make_mesh()`: all devices). `attacks` picks and
    orders a subset; per-attack parameters are overridden with e.g. apgd_ce=dict(n_iter=10),
    square=dict(n_queries=500). Same seed, same result: every example's random numbers come from the seed
    and its index.
    """
    check_apply_fn(apply_fn)
    norm = check_norm(norm)
    eps = check_eps(eps)
    images_np = np.asarray(images, np.float32)
    labels_np = np.asarray(labels).astype(np.int32)
    _check_inputs(images_np, labels_np, batch_size)
    plan = _attack_plan(version, attacks)
    settings = _attack_settings(plan, attack_overrides)
    mesh = parallel.make_mesh() if mesh is None else mesh
    batches = _Batches(batch_size, mesh)
    variables = parallel.replicate(variables, mesh)
    lines: list[str] = []

    def emit(message: str) -> None:
        lines.append(message)
        if log is not None:
            log(message)

    emit(f"using {version} version including {', '.join(plan)}.")
    n = images_np.shape[0]
    robust = np.zeros(n, bool)
    for rows in batches.split(np.arange(n)):
        (x, y), _, active = batches.place(rows, images_np, labels_np)
        robust[rows] = np.asarray(classified_correctly(apply_fn, variables, x, y, active))[: rows.size]
    clean_accuracy = float(robust.mean())
    emit(f"initial accuracy: {clean_accuracy:.2%}")

    adversarial = images_np.copy()
    per_attack: dict[str, float] = collections.OrderedDict()
    recheck_failures = 0
    attack_keys = _attack_keys(np.int64(seed))  # as jax.random.key(seed) takes it
    start = time.time()
    for attack in plan:
        key = attack_keys[STANDARD_ATTACKS.index(attack)]
        compiled_sizes: set[int] = set()  # the attack's batch shapes so far
        for label, kwargs in _passes(attack, settings[attack]):
            chunks = batches.split(np.flatnonzero(robust))
            if progress:
                import tqdm

                chunks = tqdm.tqdm(chunks, desc=label)
            for index, rows in enumerate(chunks):
                size = batches.size(rows.size, frozenset(compiled_sizes))
                compiled_sizes.add(size)
                (x, y), ids, active = batches.place(rows, images_np, labels_np, size=size)
                out = _ATTACK_FUNCTIONS[attack](
                    apply_fn, variables, x, y, key, eps=eps, norm=norm, example_ids=ids, active=active, **kwargs
                )
                claimed = np.asarray(out.fooled)[: rows.size]
                valid = np.asarray(
                    _valid_adversarial(
                        apply_fn,
                        norm,
                        variables,
                        x,
                        out.adversarial,
                        y,
                        np.float32(eps),
                        np.float32(RECHECK_TOLERANCE),
                    )
                )
                accepted = claimed & valid[: rows.size]
                rejected = int(np.sum(claimed & ~accepted))
                robust[rows[accepted]] = False
                adversarial[rows[accepted]] = np.asarray(out.adversarial)[: rows.size][accepted]
                where = f"{label} - {index + 1}/{len(chunks)}"
                emit(f"{where} - {int(accepted.sum())} out of {rows.size} successfully perturbed")
                if rejected:
                    recheck_failures += rejected
                    emit(
                        f"Warning: {where} - the re-check rejected {rejected} claimed adversarial "
                        "examples (outside the eps-ball or [0, 1], or classified correctly); they count "
                        "as robust"
                    )
        per_attack[attack] = float(robust.mean())
        emit(
            f"robust accuracy after {attack.upper()}: {per_attack[attack]:.2%} (total time {time.time() - start:.1f} s)"
        )

    _warn_if_square_helped(per_attack, emit)
    _log_final_check(images_np, adversarial, norm, float(robust.mean()), emit)
    return AutoAttackResult(
        clean_accuracy=clean_accuracy,
        robust_accuracy=float(robust.mean()),
        per_attack=per_attack,
        adversarial=adversarial,
        robust_mask=robust,
        recheck_failures=recheck_failures,
        log_lines=lines,
    )


def _warn_if_square_helped(per_attack: dict[str, float], emit) -> None:
    """Reference checks.check_square_sr: Square beating the gradient attacks hints at masked gradients."""
    others = [v for k, v in per_attack.items() if k != "square"]
    if "square" in per_attack and others:
        best_other = min(others)
        if per_attack["square"] < best_other - SQUARE_WARNING_MARGIN:
            emit(
                f"Warning: Square Attack has decreased the robust accuracy of "
                f"{best_other - per_attack['square']:.2%}. This might indicate that the robustness "
                "evaluation using AutoAttack is unreliable (e.g. masked gradients)."
            )


def _log_final_check(images: np.ndarray, adversarial: np.ndarray, norm: str, robust_accuracy: float, emit) -> None:
    delta = (adversarial - images).reshape(images.shape[0], -1)
    sizes = np.abs(delta).max(1) if norm == "linf" else np.sqrt((delta**2).sum(1))
    emit(
        f"max {norm} perturbation: {sizes.max():.5f}, nan in tensor: {int(np.isnan(adversarial).sum())}, "
        f"max: {adversarial.max():.5f}, min: {adversarial.min():.5f}"
    )
    emit(f"robust accuracy: {robust_accuracy:.2%}")
