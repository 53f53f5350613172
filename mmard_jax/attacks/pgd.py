"""The one PGD engine (docs/method.md §1, §4): every attack in training and evaluation is a configuration of `pgd`.

``x`` has a leading batch axis (any trailing shape, e.g. NHWC images in [0, 1]); norms are per example over the
trailing axes. `pgd` is a pure function: it works under ``jit``, ``vmap`` (over extra leading axes) and inside a
``shard_map`` body (on the local batch; fold the device index into ``key`` there so devices draw different starts).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from mmard_jax import checks
from mmard_jax.attacks.common import (
    ascent_direction,
    check_non_negative,
    check_start_options,
    project,
    random_start,
)
from mmard_jax.losses import cross_entropy, cw_margin_loss

Array = jax.Array
LossFn = Callable[[Array], Array]


def _check_loop(*, step_size, steps, unroll) -> None:
    """Raise ValueError for loop arguments `pgd` cannot run with."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"pgd: steps={steps!r} must be a non-negative Python int.")
    if not isinstance(unroll, bool) and not (isinstance(unroll, int) and unroll >= 1):
        raise ValueError(f"pgd: unroll={unroll!r} must be a positive int or a bool (True = fully unrolled).")
    check_non_negative("step_size", step_size)


AUTO_UNROLL = 0  # a config's unroll value meaning "what suits the platform"


def platform_unroll(unroll: int, steps: int, backend: str | None = None) -> int:
    """A config's ``unroll``, with 0 (auto) resolved for the backend: fully unrolled on XLA:CPU, whose rolled loops of
    convolutions run several times slower (jax-ml/jax#12868; benchmarks/step_speed.py), rolled (1) on GPU/TPU, where a
    rolled loop compiles faster and runs as fast."""
    if unroll != AUTO_UNROLL:
        return unroll
    return max(steps, 1) if (backend or jax.default_backend()) == "cpu" else 1


@dataclasses.dataclass(frozen=True)
class PGDSpec:
    """One PGD configuration (hashable: a static argument of jitted programs); run it with
    ``pgd(loss_fn, x, key, **spec.kwargs)``. The fields are `pgd`'s keyword arguments, checked when built."""

    eps: float
    step_size: float
    steps: int
    init: str = "uniform"
    init_scale: float = 0.001
    norm: str = "linf"
    unroll: int | bool = 1

    def __post_init__(self):
        check_start_options(**self.start)
        _check_loop(step_size=self.step_size, steps=self.steps, unroll=self.unroll)

    @property
    def kwargs(self) -> dict:
        """The keyword arguments of `pgd`."""
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}

    @property
    def start(self) -> dict:
        """The keyword arguments of `random_start` / `per_example_start`."""
        return dict(eps=self.eps, init=self.init, init_scale=self.init_scale, norm=self.norm)


def pgd(
    loss_fn: LossFn,
    x: Array,
    key: Array | None,
    *,
    eps: float,
    step_size: float,
    steps: int,
    init: str = "uniform",
    init_scale: float = 0.001,
    norm: str = "linf",
    unroll: int | bool = 1,
    x_init: Array | None = None,
) -> Array:
    """Projected gradient ascent on ``loss_fn(x_adv).sum()`` inside the ε-ball around ``x`` and [0, 1].

    Args:
      loss_fn: ``x_adv -> per-example loss [B]`` (closes over labels, models, teacher logits...).
      x: natural batch [B, ...] in [0, 1].
      key: PRNG key for the random inits; may be None with ``init='none'``.
      eps: radius of the ball; step_size: size of each step; steps: number of steps (0 returns the start).
      init: 'none' (x), 'normal' (x + init_scale·N(0, 1)), 'uniform' (uniform in the ε-ball) or 'sphere'
        (on the ε-sphere); see `random_start`.
      norm: 'linf' (step = step_size·sign(g)) or 'l2' (step = step_size·g/‖g‖₂ per example).
      unroll: passed to ``lax.fori_loop``; True unrolls fully (fast convolutions on XLA:CPU).
      x_init: an explicit start (e.g. from `per_example_start`), projected and clipped;
        requires ``init='none'``.

    Returns:
      ``stop_gradient`` of the last iterate; every iterate, the start included, is projected then clipped.
    """
    _check_loop(step_size=step_size, steps=steps, unroll=unroll)
    start = random_start(key, x, eps=eps, init=init, init_scale=init_scale, norm=norm)
    if x_init is not None:
        if init != "none":
            raise ValueError(f"pgd: x_init is given, so init must be 'none' (got init={init!r}).")
        start = project(x_init, x, eps, norm)
    grad_fn = jax.grad(lambda z: jnp.sum(loss_fn(z)))

    def ascend(_, x_adv: Array) -> Array:
        return project(x_adv + step_size * ascent_direction(grad_fn(x_adv), norm), x, eps, norm)

    x_adv = lax.fori_loop(0, steps, ascend, start, unroll=unroll)
    return lax.stop_gradient(x_adv)


def fgsm(loss_fn: LossFn, x: Array, key: Array | None = None, *, eps: float) -> Array:
    """FGSM: one L∞ step of size ε from ``x`` (`pgd` with steps=1, step_size=eps, init='none')."""
    del key  # FGSM is deterministic; the argument keeps the attack signatures uniform.
    return pgd(loss_fn, x, None, eps=eps, step_size=eps, steps=1, init="none")


def ce_attack(logits_fn: Callable[[Array], Array], x: Array, y: Array, key: Array | None, **pgd_options) -> Array:
    """PGD on the cross-entropy of ``logits_fn`` (PGD-20 of docs/method.md §4); ``pgd_options`` go to `pgd`."""
    return pgd(lambda z: cross_entropy(logits_fn(z), y), x, key, **pgd_options)


def cw_linf(
    logits_fn: Callable[[Array], Array],
    x: Array,
    y: Array,
    key: Array | None,
    *,
    kappa: float = 50.0,
    norm: str = "linf",
    **pgd_options,
) -> Array:
    """CW∞: L∞ PGD on the CW margin loss ``−max(z_y − max_{j≠y} z_j + κ, 0)``; ``pgd_options`` go to `pgd`."""
    checks.choice("norm", norm, ("linf",))
    return pgd(lambda z: cw_margin_loss(logits_fn(z), y, kappa), x, key, norm=norm, **pgd_options)
