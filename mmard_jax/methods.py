"""Method registry (docs/method.md §2–§3): a `Method` is data (pure loss functions + which views they read).

The train step reads only the fields of `Method`; it never branches on a method's name. Distillation bases
``ard``, ``iad``, ``rslad``, ``adaad`` compose with the two MMARD parts (``mmard_inner``, ``mmard_outer``) in every
combination; ``mmard`` is the base ``mmard_base`` with the parts ``mmard_parts`` on (mmard_jax.config.method_config
has the shipped choice). ``pgd_at`` and ``trades`` train teachers.

Design choice (the MMARD abstract is silent; see docs/method.md §3.3): ``mmard_inner`` *replaces* the base's
inner loss by MMARD's ``KL(p_T(x') ‖ p_S(x')) + γ · D_T`` (attack in inference mode), while ``mmard_outer``
*adds* the triangle to the base's outer loss.

New methods are added from user code with `register_method` (docs/extending.md); validation and the train step
then accept their names like the built-in ones.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Hashable
from typing import Any

from mmard_jax import checks, losses
from mmard_jax.losses import Views

__all__ = [
    "BUILTIN_METHOD_NAMES",
    "METHOD_NAMES",
    "DISTILLATION_BASES",
    "MMARD_PARTS",
    "VIEW_NAMES",
    "BoundLoss",
    "Method",
    "Views",
    "bind",
    "build_method",
    "register_method",
]

BUILTIN_METHOD_NAMES = ("adaad", "ard", "iad", "mmard", "pgd_at", "rslad", "trades")
# The built-in names, then those added by `register_method` (rebound on registration; read it as
# ``methods.METHOD_NAMES`` at the time of use, not by importing the name once).
METHOD_NAMES = BUILTIN_METHOD_NAMES
DISTILLATION_BASES = ("ard", "iad", "rslad", "adaad")
MMARD_PARTS = {"inner": ("inner",), "outer": ("outer",), "both": ("inner", "outer")}  # method.mmard_parts
VIEW_NAMES = Views._fields
KL_REDUCTIONS = ("mean", "batchmean", "sum")


@dataclasses.dataclass(frozen=True)
class BoundLoss:
    """A loss function with its hyperparameters bound; hashable and equal by value (a valid static jit arg)."""

    fn: Callable[..., Any]
    hyperparameters: tuple[tuple[str, Hashable], ...] = ()

    def __call__(self, *args):
        return self.fn(*args, **dict(self.hyperparameters))


def bind(fn: Callable[..., Any], **hyperparameters: Hashable) -> BoundLoss:
    """``functools.partial(fn, **hyperparameters)`` that compares and hashes by value."""
    return BoundLoss(fn, tuple(sorted(hyperparameters.items())))


@dataclasses.dataclass(frozen=True)
class Method:
    """Everything the train step needs to know about a method.

    inner_loss: ``(views, labels) -> [B]``, maximised by PGD over x'.
    outer_loss: ``(views, labels, epoch int32 scalar) -> (scalar, {term: value})``, minimised over the student.
    inner_views: Views fields ``inner_loss`` reads. ``*_adv`` are computed at the current x' inside the PGD loop,
      ``*_nat`` once before the loop in inference mode and stop-gradiented (constants).
    outer_views: Views fields ``outer_loss`` reads. ``student_*`` in train mode (batch statistics); ``teacher_*``
      stop-gradiented (the teacher is frozen).
    attack_student_train_mode: the student uses batch statistics during the attack (ARD/IAD).
    needs_teacher: False for the teacher-training methods (pgd_at, trades).
    """

    name: str
    inner_loss: Callable[[Views, Any], Any]
    outer_loss: Callable[[Views, Any, Any], tuple[Any, dict]]
    inner_views: frozenset[str]
    outer_views: frozenset[str]
    attack_student_train_mode: bool
    needs_teacher: bool
    attack_init: str = "normal"  # the reference code's PGD start: 'uniform' (x + U(-ε, ε)) or 'normal' (x + 0.001·N)


# ----------------------------------------------------------------------------------------------------------------
# Reading and validating config.method fields
# ----------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Section:
    """A method section and where it sits in the config (``config.method``, ``config.teacher.method``), so that an
    error names the field the user must fix. Attribute access reads the section's fields."""

    cfg: Any
    path: str = "config.method"

    def __getattr__(self, name: str) -> Any:
        if name in ("cfg", "path"):  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.cfg, name)


def _field(cfg: Section, field: str) -> Any:
    try:
        return getattr(cfg.cfg, field)
    except (AttributeError, KeyError):
        checks.fail(f"{cfg.path}.{field}", "is missing; set it (defaults: mmard_jax.config.method_config)")


def _choice(cfg: Section, field: str, options: tuple[str, ...]) -> str:
    return checks.choice(f"{cfg.path}.{field}", _field(cfg, field), options)


def _flag(cfg: Section, field: str) -> bool:
    return checks.boolean(f"{cfg.path}.{field}", _field(cfg, field))


def _real(cfg: Section, field: str, *, low: float = 0.0, high: float = math.inf, low_open: bool = False) -> float:
    """A finite float in [low, high] (or (low, high] when low_open)."""
    return checks.number(f"{cfg.path}.{field}", _field(cfg, field), low=low, high=high, low_open=low_open)


def _count(cfg: Section, field: str) -> int:
    return checks.non_negative_int(f"{cfg.path}.{field}", _field(cfg, field))


def _edge_weights(cfg: Section) -> tuple[float, float, float]:
    value = _field(cfg, "mi_weights")
    try:
        weights = tuple(float(w) for w in value)
    except (TypeError, ValueError):
        weights = ()
    if len(weights) != 3 or not all(math.isfinite(w) and w >= 0 for w in weights):
        checks.fail(f"{cfg.path}.mi_weights", f"{value!r} must be 3 non-negative numbers (w_ab, w_at, w_bt)")
    return weights


# ----------------------------------------------------------------------------------------------------------------
# Builders
# ----------------------------------------------------------------------------------------------------------------
def _teacher_training_method(name: str, cfg: Any) -> Method:
    """PGD-AT or TRADES; TRADES' inner reads student_nat as a constant computed before the loop (inference mode)."""
    if name == "pgd_at":
        inner, outer, inner_views = losses.ce_inner, losses.pgd_at_outer, frozenset({"student_adv"})
        outer_views = frozenset({"student_adv"})
    else:
        inner, inner_views = losses.trades_inner, frozenset({"student_nat", "student_adv"})
        outer = bind(
            losses.trades_outer, beta=_real(cfg, "trades_beta"), reduction=_choice(cfg, "kl_reduction", KL_REDUCTIONS)
        )
        outer_views = frozenset({"student_nat", "student_adv"})
    return Method(
        name=name,
        inner_loss=inner,
        outer_loss=outer,
        inner_views=inner_views,
        outer_views=outer_views,
        attack_student_train_mode=False,
        needs_teacher=False,
        attack_init="uniform" if name == "pgd_at" else "normal",
    )


def _ard_or_iad_outer(base: str, cfg: Any) -> BoundLoss:
    """ARD's outer loss, or IAD-I's; IAD reads its own τ and KL reduction (``iad_temperature``,
    ``iad_kl_reduction``: τ = 1 and sum / B in IAD's public code), ARD the shared ``temperature``/``kl_reduction``."""
    prefix = "iad_" if base == "iad" else ""
    hyper = dict(
        alpha=_real(cfg, "alpha", high=1.0),
        temperature=_real(cfg, f"{prefix}temperature", low_open=True),
        reduction=_choice(cfg, f"{prefix}kl_reduction", KL_REDUCTIONS),
    )
    if base == "ard":
        return bind(losses.ard_outer, **hyper)
    return bind(losses.iad_outer, **hyper, beta=_real(cfg, "iad_beta"), warmup_epochs=_count(cfg, "iad_warmup_epochs"))


def _distillation_method(base: str, cfg: Any) -> Method:
    """One of the distillation baselines, exactly as in docs/method.md §2."""
    if base in ("ard", "iad"):
        outer_views = frozenset({"student_nat", "student_adv", "teacher_nat"})
        if base == "iad":
            outer_views |= frozenset({"teacher_adv"})  # w_i = p_T(x'_i)[y_i]^β
        return Method(
            name=base,
            inner_loss=losses.ce_inner,
            outer_loss=_ard_or_iad_outer(base, cfg),
            inner_views=frozenset({"student_adv"}),
            outer_views=outer_views,
            attack_student_train_mode=True,
            needs_teacher=True,
            attack_init="uniform",
        )
    reduction = _choice(cfg, "kl_reduction", KL_REDUCTIONS)
    if base == "rslad":
        inner, inner_views = losses.rslad_inner, frozenset({"student_adv", "teacher_nat"})
        outer = bind(losses.rslad_outer, adv_weight=_real(cfg, "rslad_adv_weight", high=1.0), reduction=reduction)
        outer_views = frozenset({"student_nat", "student_adv", "teacher_nat"})
    else:
        inner, inner_views = losses.adaad_inner, frozenset({"student_adv", "teacher_adv"})
        outer = bind(losses.adaad_outer, alpha=_real(cfg, "alpha", high=1.0), reduction=reduction)
        outer_views = frozenset({"student_nat", "student_adv", "teacher_nat", "teacher_adv"})
    return Method(
        name=base,
        inner_loss=inner,
        outer_loss=outer,
        inner_views=inner_views,
        outer_views=outer_views,
        attack_student_train_mode=False,
        needs_teacher=True,
    )


def _with_mmard_inner(method: Method, cfg: Any) -> Method:
    """Replace the inner loss by MMARD's teacher-guided boundary alignment (docs/method.md §3.1)."""
    boundary = _choice(cfg, "boundary", losses.BOUNDARY_TERMS)
    inner_views = frozenset({"student_adv", "teacher_adv"}) | (
        frozenset({"teacher_nat"}) if boundary == "kl" else frozenset()
    )
    return dataclasses.replace(
        method,
        name=f"{method.name}+mmard_inner",
        inner_loss=bind(losses.mmard_inner, gamma=_real(cfg, "gamma"), boundary=boundary),
        inner_views=inner_views,
        attack_student_train_mode=False,
        attack_init="normal",
    )


def _with_mmard_outer(method: Method, cfg: Any, axis_name: str | None) -> Method:
    """Add MMARD's natural–robust–teacher triangle to the outer loss (docs/method.md §3.2)."""
    teacher_vertex = _choice(cfg, "teacher_vertex", losses.TEACHER_VERTICES)
    outer = bind(
        losses.mmard_outer,
        base_outer=method.outer_loss,
        beta=_real(cfg, "mi_beta"),
        weights=_edge_weights(cfg),
        tau=_real(cfg, "tau_mi", low_open=True),
        mask_same_class=_flag(cfg, "mask_same_class"),
        teacher_vertex=teacher_vertex,
        axis_name=axis_name,
    )
    teacher_view = "teacher_adv" if teacher_vertex == "adversarial" else "teacher_nat"
    return dataclasses.replace(
        method,
        name=f"{method.name}+mmard_outer",
        outer_loss=outer,
        outer_views=method.outer_views | frozenset({"student_nat", "student_adv", teacher_view}),
    )


def _registered_method(name: str, cfg: Any) -> Method:
    """Call the builder `register_method` stored for ``name``; its views must be Views fields."""
    method = _REGISTERED[name](cfg)
    if not isinstance(method, Method):
        raise TypeError(f"the builder registered for {name!r} returned {type(method).__name__}, not a Method.")
    method = dataclasses.replace(
        method, inner_views=frozenset(method.inner_views), outer_views=frozenset(method.outer_views)
    )  # hashable: a static jit argument
    unknown = (method.inner_views | method.outer_views) - set(VIEW_NAMES)
    if unknown:
        raise ValueError(f"method {name!r} declares unknown views {sorted(unknown)}; use fields of {VIEW_NAMES}.")
    return method


def build_method(cfg: Any, *, axis_name: str | None = None, path: str = "config.method") -> Method:
    """Build the `Method` described by a method section (any object with attribute access) found at ``path``.

    Only the fields the chosen method uses are read; a missing or invalid one raises ValueError naming
    ``<path>.<field>``. ``axis_name``: the data-parallel axis when the losses run per device inside
    ``shard_map``/``pmap``; the MMARD triangle then takes its InfoNCE over the global batch (all-gather), so
    its per-device value is this device's share and the mean over devices is the single-device loss.
    Mean-reduced terms ('mean', 'batchmean', means over examples) need nothing: the step's ``pmean`` makes them
    global; a 'sum' reduction becomes the global sum divided by the device count.
    """
    cfg = cfg if isinstance(cfg, Section) else Section(cfg, path)
    name = _choice(cfg, "name", METHOD_NAMES)
    if name == "mmard":
        base = _choice(cfg, "mmard_base", DISTILLATION_BASES)
        parts = MMARD_PARTS[_choice(cfg, "mmard_parts", tuple(MMARD_PARTS))]
        add_inner, add_outer = "inner" in parts, "outer" in parts
        _real(cfg, "gamma"), _choice(cfg, "boundary", losses.BOUNDARY_TERMS)  # checked even when the inner part is off
    else:
        base = name
        add_inner, add_outer = _flag(cfg, "mmard_inner"), _flag(cfg, "mmard_outer")
    if base in _REGISTERED:
        method = _registered_method(base, cfg)
    elif base in ("pgd_at", "trades"):
        method = _teacher_training_method(base, cfg)
    else:
        method = _distillation_method(base, cfg)
    if (add_inner or add_outer) and not method.needs_teacher:
        field = "mmard_inner" if add_inner else "mmard_outer"
        raise ValueError(
            f"{cfg.path}.{field} must be False for {cfg.path}.name={name!r}: the MMARD parts "
            f"need a teacher; use a method that distils from one, e.g. {DISTILLATION_BASES}."
        )
    if add_inner:
        method = _with_mmard_inner(method, cfg)
    if add_outer:
        method = _with_mmard_outer(method, cfg, axis_name)
    return method


# ----------------------------------------------------------------------------------------------------------------
# Methods added from user code (docs/extending.md)
# ----------------------------------------------------------------------------------------------------------------
_REGISTERED: dict[str, Callable[[Any], Method]] = {}


def register_method(name: str, build: Callable[[Any], Method]) -> None:
    """Add a method: ``config.method.name = name`` (or ``name`` in ``config.baselines``) then trains
    ``build(config.method)``.

    ``build`` reads its hyperparameters from ``config.method`` and returns a `Method`; the train step computes
    only the views the method declares. A method with ``needs_teacher=True`` composes with ``method.mmard_inner``
    and ``method.mmard_outer`` like the built-in distillation bases. Registering a name again replaces its builder
    (a config file may be loaded twice); built-in names cannot be replaced. Registration lasts for the process:
    register in the config file, or in a module it imports, so that every run and process loading it sees it.
    """
    global METHOD_NAMES
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(
            f"register_method: name {name!r} must be a Python identifier (it names the run directory "
            "and is listed in config.baselines)."
        )
    if name in BUILTIN_METHOD_NAMES:
        raise ValueError(f"register_method: {name!r} is a built-in method; choose another name.")
    if not callable(build):
        raise TypeError(f"register_method: build must be callable (config.method -> Method), got {build!r}.")
    _REGISTERED[name] = build
    METHOD_NAMES = BUILTIN_METHOD_NAMES + tuple(_REGISTERED)
