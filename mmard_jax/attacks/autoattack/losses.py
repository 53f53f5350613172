"""Per-example losses of AutoAttack: CE, DLR, targeted DLR and the Square margin.

All functions take logits [B, K] and integer labels [B] and return one value per example [B].
DLR and targeted DLR follow Croce & Hein (2020), "Reliable evaluation of adversarial robustness
with an ensemble of diverse parameter-free attacks", Sec. 4 (eq. 6 and the targeted variant).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

DLR_DENOMINATOR_EPS = 1e-12  # reference: the `+ 1e-12` in dlr_loss / dlr_loss_targeted


def _label_logit(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]


def largest_other_logit(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """max_{j != y} z_j for each example."""
    is_label = jax.nn.one_hot(labels, logits.shape[-1], dtype=bool)
    return jnp.max(jnp.where(is_label, -jnp.inf, logits), axis=-1)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Softmax cross-entropy per example (the loss of APGD-CE)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def dlr_loss(logits: jax.Array, labels: jax.Array,
             denominator_eps: float = DLR_DENOMINATOR_EPS) -> jax.Array:
    """Difference of Logits Ratio: -(z_y - max_{j!=y} z_j) / (z_pi1 - z_pi3 + eps).

    pi sorts the logits in decreasing order (Croce & Hein 2020, Sec. 4, eq. 6). Needs >= 3 classes.
    """
    ordered = jnp.sort(logits, axis=-1)
    margin = _label_logit(logits, labels) - largest_other_logit(logits, labels)
    return -margin / (ordered[:, -1] - ordered[:, -3] + denominator_eps)


def targeted_dlr_loss(logits: jax.Array, labels: jax.Array, targets: jax.Array,
                      denominator_eps: float = DLR_DENOMINATOR_EPS) -> jax.Array:
    """Targeted DLR: -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + eps).

    Croce & Hein (2020), Sec. 4 ("targeted DLR loss"). Needs >= 4 classes.
    """
    ordered = jnp.sort(logits, axis=-1)
    difference = _label_logit(logits, labels) - _label_logit(logits, targets)
    scale = ordered[:, -1] - 0.5 * (ordered[:, -3] + ordered[:, -4]) + denominator_eps
    return -difference / scale


def margin_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """z_y - max_{j!=y} z_j: positive iff correctly classified (the loss Square minimises)."""
    return _label_logit(logits, labels) - largest_other_logit(logits, labels)


def ranked_class(logits: jax.Array, rank: int) -> jax.Array:
    """Class with the `rank`-th largest logit (rank 1 = the prediction); the targets of APGD-T/FAB-T."""
    return jnp.argsort(logits, axis=-1)[:, -rank]
