"""The losses AutoAttack adds to `mmard_jax.losses` (whose cross-entropy and margin it uses): DLR, targeted DLR.

All functions take logits [B, K] and integer labels [B] and return one value per example [B].
DLR and targeted DLR follow Croce & Hein (2020), "Reliable evaluation of adversarial robustness
with an ensemble of diverse parameter-free attacks", Sec. 4 (eq. 6 and the targeted variant).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mmard_jax.losses import margin

DLR_DENOMINATOR_EPS = 1e-12  # reference: the `+ 1e-12` in dlr_loss / dlr_loss_targeted


def class_logit(logits: jax.Array, classes: jax.Array) -> jax.Array:
    """z_c for each example's class c: [B]."""
    return jnp.take_along_axis(logits, classes[:, None], axis=1)[:, 0]


def dlr_loss(logits: jax.Array, labels: jax.Array, denominator_eps: float = DLR_DENOMINATOR_EPS) -> jax.Array:
    """Difference of Logits Ratio: -(z_y - max_{j!=y} z_j) / (z_pi1 - z_pi3 + eps).

    pi sorts the logits in decreasing order (Croce & Hein 2020, Sec. 4, eq. 6). Needs >= 3 classes.
    """
    ordered = jnp.sort(logits, axis=-1)
    return -margin(logits, labels) / (ordered[:, -1] - ordered[:, -3] + denominator_eps)


def targeted_dlr_loss(
    logits: jax.Array, labels: jax.Array, targets: jax.Array, denominator_eps: float = DLR_DENOMINATOR_EPS
) -> jax.Array:
    """Targeted DLR: -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + eps).

    Croce & Hein (2020), Sec. 4 ("targeted DLR loss"). Needs >= 4 classes.
    """
    ordered = jnp.sort(logits, axis=-1)
    difference = class_logit(logits, labels) - class_logit(logits, targets)
    scale = ordered[:, -1] - 0.5 * (ordered[:, -3] + ordered[:, -4]) + denominator_eps
    return -difference / scale


def ranked_class(logits: jax.Array, rank: int) -> jax.Array:
    """Class with the `rank`-th largest logit (rank 1 = the prediction); the targets of APGD-T/FAB-T."""
    return jnp.argsort(logits, axis=-1)[:, -rank]
