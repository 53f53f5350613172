"""Pure loss functions on logits (docs/method.md §2–§3).

Building blocks: cross-entropy, KL with temperature and reduction, entropy, margin, the CW margin loss and the
symmetric InfoNCE. Then every method's inner loss (per example, maximised by PGD over x') and outer loss
(``(scalar, metrics)``, minimised over the student). Method losses read the logits they need from a `Views`;
they never stop gradients on their inputs except where docs/method.md writes ``sg`` (the MMARD teacher vertex), so
which network a gradient reaches is decided by how the train step computes the views.

All functions take logits, not probabilities, and compute in float32.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
Metrics = dict[str, Array]
OuterLoss = Callable[["Views", Array, Array], tuple[Array, Metrics]]

KL_REDUCTIONS = ("none", "mean", "batchmean", "sum")
BOUNDARY_TERMS = ("kl", "entropy", "margin", "hinge")
TEACHER_VERTICES = ("adversarial", "natural")
_NORM_FLOOR = 1e-12


class Views(NamedTuple):
    """Logits of each view of a batch; ``None`` where a method does not need the view."""

    student_nat: Array | None = None  # S(x)
    student_adv: Array | None = None  # S(x')
    teacher_nat: Array | None = None  # T(x)
    teacher_adv: Array | None = None  # T(x')


def _check_choice(name: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ValueError(f"{name}={value!r} is not supported; use one of {options}.")


def log_probs(logits: Array, temperature: float = 1.0) -> Array:
    """``log softmax(logits / temperature)`` over the last axis, in float32."""
    return jax.nn.log_softmax(jnp.asarray(logits, jnp.float32) / temperature, axis=-1)


# ----------------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------------
def cross_entropy(logits: Array, labels: Array) -> Array:
    """Per-example cross-entropy ``-log softmax(logits)[label]``: [B, C], [B] -> [B]."""
    return -jnp.take_along_axis(log_probs(logits), labels[..., None], axis=-1)[..., 0]


def reduce_per_example(per_example: Array, reduction: str, num_classes: int) -> Array:
    """Reduce per-example KL values (already summed over classes) like PyTorch's ``KLDivLoss``.

    'none' keeps [B]; 'mean' is the mean over B·C elements (PyTorch's default); 'batchmean' is sum / B; 'sum'.
    """
    _check_choice("reduction", reduction, KL_REDUCTIONS)
    if reduction == "none":
        return per_example
    total = jnp.sum(per_example)
    if reduction == "sum":
        return total
    if reduction == "batchmean":
        return total / per_example.shape[0]
    return total / (per_example.size * num_classes)


def kl_div(p_logits: Array, q_logits: Array, *, temperature: float = 1.0, reduction: str = "none") -> Array:
    """``KL(softmax(p/τ) ‖ softmax(q/τ))`` summed over classes, then reduced (see `reduce_per_example`).

    No τ² factor: callers that want Hinton's scaling multiply by it. Gradients flow into both arguments.
    """
    _check_choice("reduction", reduction, KL_REDUCTIONS)
    log_p = log_probs(p_logits, temperature)
    log_q = log_probs(q_logits, temperature)
    per_example = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
    return reduce_per_example(per_example, reduction, num_classes=log_p.shape[-1])


def entropy(logits: Array) -> Array:
    """Per-example Shannon entropy of ``softmax(logits)`` in nats: [B, C] -> [B]."""
    log_p = log_probs(logits)
    return -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)


def margin(logits: Array, labels: Array) -> Array:
    """Per-example logit margin ``z_y − max_{j≠y} z_j``: positive iff correctly classified."""
    logits = jnp.asarray(logits, jnp.float32)
    is_label = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.bool_)
    label_logit = jnp.sum(jnp.where(is_label, logits, 0.0), axis=-1)
    best_other = jnp.max(jnp.where(is_label, -jnp.inf, logits), axis=-1)
    return label_logit - best_other


def cw_margin_loss(logits: Array, labels: Array, kappa: float = 50.0) -> Array:
    """Carlini–Wagner margin loss ``−max(margin + κ, 0)`` per example; maximising it pushes the margin to −κ."""
    return -jax.nn.relu(margin(logits, labels) + kappa)


def _centred_unit(z: Array) -> Array:
    """Subtract each row's mean over classes, then scale the row to unit L2 norm (a zero row stays zero)."""
    z = jnp.asarray(z, jnp.float32)
    z = z - jnp.mean(z, axis=-1, keepdims=True)
    squared_norm = jnp.sum(z * z, axis=-1, keepdims=True)
    return z * lax.rsqrt(jnp.maximum(squared_norm, _NORM_FLOOR**2))


def same_class_mask(labels: Array) -> Array:
    """[B, B] bool, True for the off-diagonal pairs (i, j) with ``labels[i] == labels[j]``."""
    return _same_class_negatives(labels, labels, jnp.arange(labels.shape[0]))


def _same_class_negatives(row_labels: Array, column_labels: Array, positives: Array) -> Array:
    """True where column j has row i's label but is not row i's positive ``positives[i]``."""
    same = row_labels[:, None] == column_labels[None, :]
    return same & (jnp.arange(column_labels.shape[0])[None, :] != positives[:, None])


def info_nce(
    u: Array,
    v: Array,
    labels: Array | None = None,
    *,
    tau: float = 0.5,
    mask_same_class: bool = True,
    axis_name: str | None = None,
) -> Array:
    """Symmetric InfoNCE ``N(u, v)`` over the batch (docs/method.md §3.2); ``I(u; v) ≥ log B − N(u, v)``.

    Rows are centred over classes and L2-normalised, ``s_ij = ũ_i · ṽ_j / tau``, and
    ``N = ½ [CE(s, diag) + CE(sᵀ, diag)]`` (each a mean over the batch). With ``mask_same_class`` the
    off-diagonal pairs of the same label are removed from every denominator, so two images of one class are
    never pushed apart; this needs ``labels``.

    ``axis_name`` (inside ``shard_map``/``pmap``): the batch is the global one, gathered over that axis; this
    device's rows are scored against every device's rows and the result is the mean over this device's rows,
    so the mean over devices equals the single-device value on the whole batch (gradients flow back through
    the gather).
    """
    if mask_same_class and labels is None:
        raise ValueError("info_nce: mask_same_class=True needs labels; pass labels or mask_same_class=False.")
    u, v = _centred_unit(u), _centred_unit(v)
    all_u, all_v, all_labels, offset = u, v, labels, 0
    if axis_name is not None:
        gather = functools.partial(lax.all_gather, axis_name=axis_name, tiled=True)
        all_u, all_v = gather(u), gather(v)
        all_labels = None if labels is None else gather(labels)
        offset = lax.axis_index(axis_name) * u.shape[0]
    positives = offset + jnp.arange(u.shape[0])
    total = 0.0
    for rows, columns in ((u, all_v), (v, all_u)):  # s and sᵀ, restricted to this device's rows
        similarity = jnp.matmul(rows, columns.T, precision=lax.Precision.HIGHEST) / tau
        if mask_same_class:
            similarity = jnp.where(_same_class_negatives(labels, all_labels, positives), -jnp.inf, similarity)
        total = total + jnp.mean(cross_entropy(similarity, positives))
    return 0.5 * total


# ----------------------------------------------------------------------------------------------------------------
# Inner losses: (views, labels) -> per-example [B], maximised over x' by PGD
# ----------------------------------------------------------------------------------------------------------------
def ce_inner(views: Views, labels: Array) -> Array:
    """PGD-AT / ARD / IAD: ``CE(S(x'), y)``."""
    return cross_entropy(views.student_adv, labels)


def trades_inner(views: Views, labels: Array) -> Array:
    """TRADES: ``KL(p_S(x) ‖ p_S(x'))``; ``student_nat`` is a constant computed before the attack."""
    del labels
    return kl_div(views.student_nat, views.student_adv)


def rslad_inner(views: Views, labels: Array) -> Array:
    """RSLAD: ``KL(p_T(x) ‖ p_S(x'))``, the teacher on the natural input (no teacher forward in the loop)."""
    del labels
    return kl_div(views.teacher_nat, views.student_adv)


def adaad_inner(views: Views, labels: Array) -> Array:
    """AdaAD: ``KL(p_T(x') ‖ p_S(x'))``; the gradient w.r.t. x' flows through both networks."""
    del labels
    return kl_div(views.teacher_adv, views.student_adv)


def boundary_term(views: Views, labels: Array, kind: str) -> Array:
    """MMARD's teacher-boundary term ``D_T(x, x')`` per example (docs/method.md §3.1).

    'kl': ``KL(p_T(x) ‖ p_T(x'))``; 'entropy': ``H(p_T(x'))``; 'margin': ``−|z_T,y(x') − max_{j≠y} z_T,j(x')|``;
    'hinge': ``−max(z_T,y(x') − max_{j≠y} z_T,j(x'), 0)``, the teacher's margin clipped at its boundary (largest, 0,
    on or past it).
    """
    _check_choice("boundary", kind, BOUNDARY_TERMS)
    if kind == "kl":
        return kl_div(views.teacher_nat, views.teacher_adv)
    if kind == "entropy":
        return entropy(views.teacher_adv)
    if kind == "hinge":
        return cw_margin_loss(views.teacher_adv, labels, kappa=0.0)
    return -jnp.abs(margin(views.teacher_adv, labels))


def mmard_inner(views: Views, labels: Array, *, gamma: float, boundary: str) -> Array:
    """MMARD inner: ``KL(p_T(x') ‖ p_S(x')) + γ · D_T(x, x')``; γ = 0 is AdaAD's inner loss."""
    return adaad_inner(views, labels) + gamma * boundary_term(views, labels, boundary)


# ----------------------------------------------------------------------------------------------------------------
# Outer losses: (views, labels, epoch) -> (scalar, {term name: unweighted term value})
# ----------------------------------------------------------------------------------------------------------------
def pgd_at_outer(views: Views, labels: Array, epoch: Array) -> tuple[Array, Metrics]:
    """PGD-AT (Madry): ``mean CE(S(x'), y)``."""
    del epoch
    ce_adv = jnp.mean(cross_entropy(views.student_adv, labels))
    return ce_adv, {"ce_adv": ce_adv}


def trades_outer(views: Views, labels: Array, epoch: Array, *, beta: float, reduction: str) -> tuple[Array, Metrics]:
    """TRADES: ``mean CE(S(x), y) + β · KL(p_S(x) ‖ p_S(x'))`` (reference: KL summed / B = 'batchmean')."""
    del epoch
    ce_nat = jnp.mean(cross_entropy(views.student_nat, labels))
    kl_adv = kl_div(views.student_nat, views.student_adv, reduction=reduction)
    return ce_nat + beta * kl_adv, {"ce_nat": ce_nat, "kl_adv": kl_adv}


def ard_outer(
    views: Views, labels: Array, epoch: Array, *, alpha: float, temperature: float, reduction: str
) -> tuple[Array, Metrics]:
    """ARD: ``a · τ² · KL(p_T(x; τ) ‖ p_S(x'; τ)) + (1 − a) · mean CE(S(x), y)``; metric 'kl_adv' includes τ²."""
    del epoch
    kl_adv = temperature**2 * kl_div(views.teacher_nat, views.student_adv, temperature=temperature, reduction=reduction)
    ce_nat = jnp.mean(cross_entropy(views.student_nat, labels))
    return alpha * kl_adv + (1.0 - alpha) * ce_nat, {"kl_adv": kl_adv, "ce_nat": ce_nat}


def iad_outer(
    views: Views,
    labels: Array,
    epoch: Array,
    *,
    alpha: float,
    temperature: float,
    reduction: str,
    beta: float,
    warmup_epochs: int,
) -> tuple[Array, Metrics]:
    """IAD-I: ARD's loss ``+ a · reduce_i[(1 − w_i) · KL(p_S(x_i) ‖ p_S(x'_i))]``, ``w_i = p_T(x'_i)[y_i]^β``.

    The extra term is on from ``epoch >= warmup_epochs`` (``epoch`` may be traced); it is reduced like the
    other KL terms ('batchmean' = the mean over examples, IAD's reference).
    """
    ard_loss, metrics = ard_outer(views, labels, epoch, alpha=alpha, temperature=temperature, reduction=reduction)
    teacher_log_confidence = -cross_entropy(views.teacher_adv, labels)
    reliability = jnp.exp(beta * teacher_log_confidence)
    self_kl = kl_div(views.student_nat, views.student_adv)
    kl_self = reduce_per_example((1.0 - reliability) * self_kl, reduction, views.student_nat.shape[-1])
    kl_self = jnp.where(epoch >= warmup_epochs, kl_self, 0.0)
    return ard_loss + alpha * kl_self, {**metrics, "kl_self": kl_self}


def _adv_nat_kl(teacher_for_adv: Array, views: Views, *, adv_weight: float, reduction: str) -> tuple[Array, Metrics]:
    """``w · KL(teacher_for_adv ‖ p_S(x')) + (1 − w) · KL(p_T(x) ‖ p_S(x))``."""
    kl_adv = kl_div(teacher_for_adv, views.student_adv, reduction=reduction)
    kl_nat = kl_div(views.teacher_nat, views.student_nat, reduction=reduction)
    return adv_weight * kl_adv + (1.0 - adv_weight) * kl_nat, {"kl_adv": kl_adv, "kl_nat": kl_nat}


def rslad_outer(
    views: Views, labels: Array, epoch: Array, *, adv_weight: float, reduction: str
) -> tuple[Array, Metrics]:
    """RSLAD: ``w · KL(p_T(x) ‖ p_S(x')) + (1 − w) · KL(p_T(x) ‖ p_S(x))``, w = 5/6."""
    del labels, epoch
    return _adv_nat_kl(views.teacher_nat, views, adv_weight=adv_weight, reduction=reduction)


def adaad_outer(views: Views, labels: Array, epoch: Array, *, alpha: float, reduction: str) -> tuple[Array, Metrics]:
    """AdaAD: ``a · KL(p_T(x') ‖ p_S(x')) + (1 − a) · KL(p_T(x) ‖ p_S(x))``."""
    del labels, epoch
    return _adv_nat_kl(views.teacher_adv, views, adv_weight=alpha, reduction=reduction)


def triangle_mi(
    views: Views,
    labels: Array,
    *,
    weights: tuple[float, float, float],
    tau: float,
    mask_same_class: bool,
    teacher_vertex: str,
    axis_name: str | None = None,
) -> tuple[Array, Metrics]:
    """MMARD triangle ``w_ab·N(a, b) + w_at·N(a, t) + w_bt·N(b, t)`` (docs/method.md §3.2).

    ``a = S(x)``, ``b = S(x')``, ``t = sg(T(x'))`` for teacher_vertex 'adversarial' or ``sg(T(x))`` for 'natural'.
    ``axis_name``: see `info_nce` (the InfoNCE batch is the global batch).
    """
    _check_choice("teacher_vertex", teacher_vertex, TEACHER_VERTICES)
    teacher = views.teacher_adv if teacher_vertex == "adversarial" else views.teacher_nat
    vertex_a, vertex_b, vertex_t = views.student_nat, views.student_adv, lax.stop_gradient(teacher)
    edges = {"mi_ab": (vertex_a, vertex_b), "mi_at": (vertex_a, vertex_t), "mi_bt": (vertex_b, vertex_t)}
    metrics = {
        name: info_nce(u, v, labels, tau=tau, mask_same_class=mask_same_class, axis_name=axis_name)
        for name, (u, v) in edges.items()
    }
    total = sum(weight * value for weight, value in zip(weights, metrics.values(), strict=True))
    return total, metrics


def mmard_outer(
    views: Views,
    labels: Array,
    epoch: Array,
    *,
    base_outer: OuterLoss,
    beta: float,
    weights: tuple[float, float, float],
    tau: float,
    mask_same_class: bool,
    teacher_vertex: str,
    axis_name: str | None = None,
) -> tuple[Array, Metrics]:
    """MMARD outer: ``base_outer + β · triangle_mi``; β = 0 is the base loss."""
    base_loss, metrics = base_outer(views, labels, epoch)
    mi, mi_metrics = triangle_mi(
        views,
        labels,
        weights=weights,
        tau=tau,
        mask_same_class=mask_same_class,
        teacher_vertex=teacher_vertex,
        axis_name=axis_name,
    )
    return base_loss + beta * mi, {**metrics, **mi_metrics}
