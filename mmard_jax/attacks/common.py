"""The attack vocabulary, shared by the PGD engine and AutoAttack: norms, starts, projection, keys, networks.

Arrays have a leading batch axis [B, ...] (e.g. NHWC images in [0, 1]); norms are per example over the trailing
axes. A network is a pair ``(apply_fn, variables)``: ``apply_fn(variables, x) -> logits`` is a static (hashable)
argument of the jitted programs and ``variables`` a traced pytree, so one compilation serves every network of the
same architecture and shapes (the weights are never baked into a program as constants).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from numbers import Real
from typing import Any

import jax
import jax.numpy as jnp

from mmard_jax import checks

Array = jax.Array
ApplyFn = Callable[[Any, Array], Array]

NORMS = ("linf", "l2")
INITS = ("none", "normal", "uniform", "sphere")
NORMALIZE_EPS = 1e-12  # AutoAttack reference: the `+ 1e-12` in APGDAttack.normalize / SquareAttack.normalize


# ----------------------------------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------------------------------
def check_norm(norm: str) -> str:
    return checks.choice("norm", norm, NORMS)


def check_non_negative(name: str, value) -> None:
    """InvalidValue for a Python number below 0 (or NaN); traced values are not checked."""
    if isinstance(value, Real) and not value >= 0:
        checks.fail(name, f"{value!r} must be >= 0")


def check_apply_fn(apply_fn) -> None:
    """Attacks compile per ``apply_fn`` (a static jit argument), so it must be callable and hashable."""
    try:
        hash(apply_fn)
    except TypeError as error:
        raise ValueError(
            "apply_fn must be hashable (a function, a Flax module's apply or a functools.partial "
            "of hashable arguments), not e.g. a method of an unhashable object"
        ) from error
    if not callable(apply_fn):
        raise ValueError(f"apply_fn must be callable, got {type(apply_fn).__name__}")


# ----------------------------------------------------------------------------------------------------------------
# Per-example norms and projection
# ----------------------------------------------------------------------------------------------------------------
def per_example(values: Array, like: Array) -> Array:
    """Reshape [B] values to broadcast against a [B, ...] array."""
    return values.reshape((-1,) + (1,) * (like.ndim - 1))


def flat(x: Array) -> Array:
    """[B, ...] -> [B, D]."""
    return x.reshape(x.shape[0], -1)


def lp_norm(z: Array, norm: str) -> Array:
    """Per-example L∞ or L2 norm of a [B, ...] array: [B]."""
    if norm == "linf":
        return jnp.max(jnp.abs(flat(z)), axis=1)
    return jnp.sqrt(jnp.sum(flat(z) * flat(z), axis=1))


def normalize(v: Array, norm: str) -> Array:
    """``v / (‖v‖ + 1e-12)`` per example (a zero row stays zero)."""
    return v / per_example(lp_norm(v, norm) + NORMALIZE_EPS, v)


def ascent_direction(grad: Array, norm: str) -> Array:
    """Steepest-ascent direction of unit size: ``sign(g)`` for L∞, ``g / ‖g‖₂`` per example for L2."""
    return jnp.sign(grad) if norm == "linf" else normalize(grad, "l2")


def project(x_adv: Array, x: Array, eps, norm: str) -> Array:
    """Project ``x_adv`` onto the ε-ball around ``x`` (L∞ or L2), then clip to [0, 1] (the identity inside both,
    up to rounding). L∞ clips the perturbation, ``x + clip(x_adv - x, -ε, ε)``: the rounding every training run so
    far was made with (``clip(x_adv, x - ε, x + ε)`` is equal up to an ulp, but would change trajectories)."""
    if norm == "linf":
        inside = x + jnp.clip(x_adv - x, -eps, eps)
    else:
        delta = x_adv - x
        scale = jnp.minimum(1.0, eps / jnp.maximum(lp_norm(delta, "l2"), NORMALIZE_EPS))
        inside = x + delta * per_example(scale, x)
    return jnp.clip(inside, 0.0, 1.0)


# ----------------------------------------------------------------------------------------------------------------
# Random starts and per-example keys
# ----------------------------------------------------------------------------------------------------------------
def _initial_point(x: Array, key: Array | None, init: str, init_scale: float, eps, norm: str) -> Array:
    """The unprojected start of `random_start`."""
    if init == "none":
        return x
    if init == "normal":
        return x + init_scale * jax.random.normal(key, x.shape, x.dtype)
    if init == "sphere":
        noise = (
            jax.random.uniform(key, x.shape, x.dtype, -1.0, 1.0)
            if norm == "linf"
            else jax.random.normal(key, x.shape, x.dtype)
        )
        return x + eps * normalize(noise, norm)
    if norm == "linf":
        return x + jax.random.uniform(key, x.shape, x.dtype, -eps, eps)
    direction_key, radius_key = jax.random.split(key)
    direction = normalize(jax.random.normal(direction_key, x.shape, x.dtype), "l2")
    radius = eps * jax.random.uniform(radius_key, (x.shape[0],), x.dtype) ** (1.0 / x[0].size)
    return x + per_example(radius, x) * direction


def check_start_options(*, eps, init: str, init_scale: float, norm: str) -> None:
    """ValueError for options `random_start` does not support (traced numbers are not checked)."""
    checks.choice("init", init, INITS)
    check_norm(norm)
    check_non_negative("eps", eps)
    check_non_negative("init_scale", init_scale)


def random_start(
    key: Array | None, x: Array, *, eps, init: str = "uniform", init_scale: float = 0.001, norm: str = "linf"
) -> Array:
    """An attack's starting point, projected onto the ε-ball around ``x`` and clipped to [0, 1].

    init: 'none' (``x``); 'normal' (``x + init_scale·N(0, 1)``, the TRADES/RSLAD start); 'uniform' (uniform in
    the ε-ball, Madry's PGD); 'sphere' (``x + ε·t/‖t‖`` with t ~ U[-1, 1]^d for L∞ or N(0, I) for L2: on the
    ε-sphere of the norm, AutoAttack's start of APGD and of FAB's restarts).
    """
    check_start_options(eps=eps, init=init, init_scale=init_scale, norm=norm)
    if init != "none" and key is None:
        raise ValueError(f"init={init!r} is random and needs a PRNG key; pass key or use init='none'.")
    return project(_initial_point(x, key, init, init_scale, eps, norm), x, eps, norm)


def per_example_start(keys: Array, x: Array, **start) -> Array:
    """`random_start` drawn with one key per example (``keys`` [B]), so a start does not depend on the batch."""
    return jax.vmap(lambda k, xi: random_start(k, xi[None], **start)[0])(keys, x)


def example_keys(key: Array, example_ids: Array) -> Array:
    """One key per example, folded from its global index: results do not depend on batching or devices."""
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, example_ids)


def fold_keys(keys: Array, data: int | Array) -> Array:
    """Fold the same integer (a restart, a target rank, an iteration) into every example's key."""
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, data)


# ----------------------------------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------------------------------
def predicted_correctly(logits: Array, labels: Array) -> Array:
    """bool [B]: the arg-max class is the label."""
    return jnp.argmax(logits, axis=-1) == labels


@functools.partial(jax.jit, static_argnames=("apply_fn",))
def logits_of(apply_fn: ApplyFn, variables, x: Array) -> Array:
    """``apply_fn(variables, x)``, jitted once per ``apply_fn`` and shapes (not per network)."""
    return apply_fn(variables, x)
