"""Argument checks shared by every public class.

Each check raises ``ValueError`` (or ``TypeError``) with one line that names the argument, the
value it got and what is allowed, so a bad YAML value is fixed without reading our source.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from lightning_tricks.errors import ConfigError, DataNotFoundError, InvalidArgumentError  # noqa: F401  (re-exported)


def _fail(name: str, value: Any, allowed: str) -> InvalidArgumentError:
    return InvalidArgumentError(f"`{name}`={value!r} is invalid: expected {allowed}.")


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    choices = list(choices)
    if value not in choices:
        raise _fail(name, value, "one of " + ", ".join(repr(c) for c in choices))
    return value


def check_range(
    name: str,
    value: float,
    low: float | None = None,
    high: float | None = None,
    *,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> float:
    """Check ``low <= value <= high`` (bounds optional, inclusiveness configurable)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise _fail(name, value, "a number")
    ok = True
    if low is not None:
        ok &= value >= low if low_inclusive else value > low
    if high is not None:
        ok &= value <= high if high_inclusive else value < high
    if not ok:
        lo = "-inf" if low is None else f"{low}"
        hi = "inf" if high is None else f"{high}"
        interval = ("[" if low_inclusive and low is not None else "(") + f"{lo}, {hi}"
        interval += "]" if high_inclusive and high is not None else ")"
        raise _fail(name, value, f"a number in {interval}")
    return value


def check_probability(name: str, value: float, *, allow_one: bool = True) -> float:
    return check_range(name, value, 0.0, 1.0, high_inclusive=allow_one)


def check_positive(name: str, value: float) -> float:
    return check_range(name, value, 0.0, None, low_inclusive=False)


def check_non_negative(name: str, value: float) -> float:
    return check_range(name, value, 0.0, None)


def check_int(name: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(name, value, "an integer")
    if (low is not None and value < low) or (high is not None and value > high):
        lo = "-inf" if low is None else str(low)
        hi = "inf" if high is None else str(high)
        raise _fail(name, value, f"an integer in [{lo}, {hi}]")
    return value


def check_bool(name: str, value: Any) -> bool:
    """``value`` must be True or False (not 0, 1 or a string: YAML's ``yes`` arrives as a string)."""
    if not isinstance(value, bool):
        raise _fail(name, value, "true or false")
    return value


def check_optional_number(name: str, value: Any) -> float | None:
    """``value`` must be None or a finite number."""
    if value is None:
        return None
    check_range(name, value)
    if math.isinf(value):
        raise _fail(name, value, "a finite number or null")
    return value


def check_optional_int(name: str, value: Any, low: int | None = None, high: int | None = None) -> int | None:
    """``value`` must be None or an integer in ``[low, high]``."""
    return None if value is None else check_int(name, value, low, high)
