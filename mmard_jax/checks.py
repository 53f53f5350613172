"""Checks of user-facing values, in one dialect: every failure is an :class:`InvalidValue` (a ValueError) whose message
is ``"<field>: <value> <what it must be>"``, the field named as the user sets it (``config.optim.lr``,
``widen_factor``, ``global_batch_size``). The config, the method registry, the attacks, the models and the data
pipeline all check through these helpers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NoReturn


class InvalidValue(ValueError):
    """A setting or argument the code cannot use; the message names it and says what it must be."""


def fail(field: str, message: str) -> NoReturn:
    raise InvalidValue(f"{field}: {message}")


def choice(field: str, value: Any, options: Sequence[Any]) -> Any:
    if value not in options:
        fail(field, f"{value!r} is not one of {', '.join(map(str, options))}")
    return value


def boolean(field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        fail(field, f"{value!r} must be True or False")
    return value


def is_int(value: Any) -> bool:
    """An int, and not a bool (which Python counts as one)."""
    return isinstance(value, int) and not isinstance(value, bool)


def positive_int(field: str, value: Any) -> int:
    if not is_int(value) or value < 1:
        fail(field, f"{value!r} must be a positive int")
    return value


def non_negative_int(field: str, value: Any) -> int:
    if not is_int(value) or value < 0:
        fail(field, f"{value!r} must be a non-negative int")
    return value


def number(field: str, value: Any, *, low: float = -math.inf, high: float = math.inf, low_open: bool = False) -> float:
    """A finite float in [low, high] ((low, high] when ``low_open``); a string or bool is not a number."""
    try:
        if isinstance(value, (str, bytes, bool)):
            raise TypeError
        result = float(value)
    except (TypeError, ValueError):
        fail(field, f"{value!r} must be a number")
    too_low = result <= low if low_open else result < low
    if not math.isfinite(result) or too_low or result > high:
        fail(field, f"{value!r} must be a finite number in {'(' if low_open else '['}{low:g}, {high:g}]")
    return result


def number_tuple(field: str, value: Any, **bounds: Any) -> tuple[float, ...]:
    """A sequence of numbers, each as :func:`number` takes it with ``bounds``, as a tuple."""
    if not isinstance(value, Sequence) or isinstance(value, str):
        fail(field, f"{value!r} must be a tuple of numbers")
    for item in value:
        number(field, item, **bounds)
    return tuple(value)


def int_tuple(field: str, value: Any, *, allow_empty: bool) -> tuple[int, ...]:
    """A sequence of positive ints, as a tuple."""
    if not isinstance(value, Sequence) or isinstance(value, str) or not all(is_int(v) and v > 0 for v in value):
        fail(field, f"{value!r} must be a tuple of positive ints")
    if not value and not allow_empty:
        fail(field, "must not be empty")
    return tuple(value)
