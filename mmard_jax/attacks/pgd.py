"""The one PGD engine (docs/method.md §1, §4): every attack in training and evaluation is a configuration of `pgd`.

``x`` has a leading batch axis (any trailing shape, e.g. NHWC images in [0, 1]); norms are per example over the
trailing axes. `pgd` is a pure function: it works under ``jit``, ``vmap`` (over extra leading axes) and inside a
``shard_map`` body (on the local batch; fold the device index into ``key`` there so devices draw different starts).
"""

from __future__ import annotations

from collections.abc import Callable
from numbers import Real

import jax
import jax.numpy as jnp
from jax import lax

from mmard_jax.losses import cross_entropy, cw_margin_loss

Array = jax.Array
LossFn = Callable[[Array], Array]

INITS = ('none', 'normal', 'uniform')
NORMS = ('linf', 'l2')
_NORM_FLOOR = 1e-12


def _per_example_l2(z: Array) -> Array:
    """L2 norm of each example over its trailing axes, shaped to broadcast against ``z``."""
    axes = tuple(range(1, z.ndim))
    return jnp.sqrt(jnp.sum(z * z, axis=axes, keepdims=True))


def _project(x: Array, x_adv: Array, eps: float, norm: str) -> Array:
    """Project ``x_adv`` onto the ε-ball around ``x`` (L∞ or L2), then clip to [0, 1]."""
    delta = x_adv - x
    if norm == 'linf':
        delta = jnp.clip(delta, -eps, eps)
    else:
        delta = delta * jnp.minimum(1.0, eps / jnp.maximum(_per_example_l2(delta), _NORM_FLOOR))
    return jnp.clip(x + delta, 0.0, 1.0)


def _ascent_step(grad: Array, norm: str) -> Array:
    """Steepest-ascent direction of unit size: ``sign(g)`` for L∞, ``g / ‖g‖₂`` per example for L2."""
    if norm == 'linf':
        return jnp.sign(grad)
    return grad / jnp.maximum(_per_example_l2(grad), _NORM_FLOOR)


def _initial_point(x: Array, key: Array | None, init: str, init_scale: float, eps: float, norm: str) -> Array:
    """The unprojected start: ``x``, ``x + init_scale·N(0, 1)``, or a uniform point of the ε-ball."""
    if init == 'none':
        return x
    if init == 'normal':
        return x + init_scale * jax.random.normal(key, x.shape, x.dtype)
    if norm == 'linf':
        return x + jax.random.uniform(key, x.shape, x.dtype, -eps, eps)
    direction_key, radius_key = jax.random.split(key)
    direction = jax.random.normal(direction_key, x.shape, x.dtype)
    direction = direction / jnp.maximum(_per_example_l2(direction), _NORM_FLOOR)
    dims = x[0].size
    radius_shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    radius = eps * jax.random.uniform(radius_key, radius_shape, x.dtype) ** (1.0 / dims)
    return x + radius * direction


def _check_start(key, *, init, init_scale, norm, eps) -> None:
    """Raise ValueError for a start `random_start` cannot draw (traced numbers are not checked)."""
    if init not in INITS:
        raise ValueError(f'pgd: init={init!r} is not supported; use one of {INITS}.')
    if norm not in NORMS:
        raise ValueError(f'pgd: norm={norm!r} is not supported; use one of {NORMS}.')
    if init != 'none' and key is None:
        raise ValueError(f"pgd: init={init!r} is random and needs a PRNG key; pass key or use init='none'.")
    for name, value in (('eps', eps), ('init_scale', init_scale)):
        if isinstance(value, Real) and not value >= 0:
            raise ValueError(f'pgd: {name}={value!r} must be >= 0.')


def _check_loop(*, step_size, steps, unroll) -> None:
    """Raise ValueError for loop arguments `pgd` cannot run with."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f'pgd: steps={steps!r} must be a non-negative Python int.')
    if not isinstance(unroll, bool) and not (isinstance(unroll, int) and unroll >= 1):
        raise ValueError(f'pgd: unroll={unroll!r} must be a positive int or a bool (True = fully unrolled).')
    if isinstance(step_size, Real) and not step_size >= 0:
        raise ValueError(f'pgd: step_size={step_size!r} must be >= 0.')


def random_start(key: Array | None, x: Array, *, eps: float, init: str = 'uniform', init_scale: float = 0.001,
                 norm: str = 'linf') -> Array:
    """PGD's starting point: the chosen init (see `pgd`), projected onto the ε-ball and clipped to [0, 1].

    Exposed so a caller can draw starts with its own keys (e.g. one key per example, vmapped) and pass them to
    `pgd` as ``x_init``.
    """
    _check_start(key, init=init, init_scale=init_scale, norm=norm, eps=eps)
    return _project(x, _initial_point(x, key, init, init_scale, eps, norm), eps, norm)


def pgd(loss_fn: LossFn, x: Array, key: Array | None, *, eps: float, step_size: float, steps: int,
        init: str = 'uniform', init_scale: float = 0.001, norm: str = 'linf', unroll: int | bool = 1,
        x_init: Array | None = None) -> Array:
    """Projected gradient ascent on ``loss_fn(x_adv).sum()`` inside the ε-ball around ``x`` and [0, 1].

    Args:
      loss_fn: ``x_adv -> per-example loss [B]`` (closes over labels, models, teacher logits...).
      x: natural batch [B, ...] in [0, 1].
      key: PRNG key for the random inits; may be None with ``init='none'``.
      eps: radius of the ball; step_size: size of each step; steps: number of steps (0 returns the start).
      init: 'none' (x), 'normal' (x + init_scale·N(0, 1)) or 'uniform' (uniform in the ε-ball).
      norm: 'linf' (step = step_size·sign(g)) or 'l2' (step = step_size·g/‖g‖₂ per example).
      unroll: passed to ``lax.fori_loop``; True unrolls fully (fast convolutions on XLA:CPU).
      x_init: an explicit start (e.g. from `random_start` with per-example keys), projected and clipped;
        requires ``init='none'``.

    Returns:
      ``stop_gradient`` of the last iterate; every iterate, the start included, is projected then clipped.
    """
    _check_loop(step_size=step_size, steps=steps, unroll=unroll)
    start = random_start(key, x, eps=eps, init=init, init_scale=init_scale, norm=norm)
    if x_init is not None:
        if init != 'none':
            raise ValueError(f"pgd: x_init is given, so init must be 'none' (got init={init!r}).")
        start = _project(x, x_init, eps, norm)
    grad_fn = jax.grad(lambda z: jnp.sum(loss_fn(z)))

    def ascend(_, x_adv: Array) -> Array:
        return _project(x, x_adv + step_size * _ascent_step(grad_fn(x_adv), norm), eps, norm)

    x_adv = lax.fori_loop(0, steps, ascend, start, unroll=unroll)
    return lax.stop_gradient(x_adv)


def fgsm(loss_fn: LossFn, x: Array, key: Array | None = None, *, eps: float) -> Array:
    """FGSM: one L∞ step of size ε from ``x`` (`pgd` with steps=1, step_size=eps, init='none')."""
    del key  # FGSM is deterministic; the argument keeps the attack signatures uniform.
    return pgd(loss_fn, x, None, eps=eps, step_size=eps, steps=1, init='none')


def ce_attack(logits_fn: Callable[[Array], Array], x: Array, y: Array, key: Array | None, *, eps: float,
              step_size: float, steps: int, init: str = 'uniform', unroll: int | bool = 1, **pgd_options) -> Array:
    """PGD on the cross-entropy of ``logits_fn`` (PGD-20 of docs/method.md §4); ``pgd_options`` go to `pgd`."""
    return pgd(lambda z: cross_entropy(logits_fn(z), y), x, key, eps=eps, step_size=step_size, steps=steps,
               init=init, unroll=unroll, **pgd_options)


def cw_linf(logits_fn: Callable[[Array], Array], x: Array, y: Array, key: Array | None, *, eps: float,
            step_size: float, steps: int, kappa: float = 50.0, init: str = 'uniform', unroll: int | bool = 1,
            **pgd_options) -> Array:
    """CW∞: L∞ PGD on the CW margin loss ``−max(z_y − max_{j≠y} z_j + κ, 0)``; ``pgd_options`` go to `pgd`."""
    return pgd(lambda z: cw_margin_loss(logits_fn(z), y, kappa), x, key, eps=eps, step_size=step_size,
               steps=steps, init=init, norm='linf', unroll=unroll, **pgd_options)
