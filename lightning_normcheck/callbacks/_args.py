"""Argument checks shared by the callbacks: each error names the class, the argument, the value and what is
allowed (the style of Lightning's EarlyStopping messages).

Example:
    >>> _check_int("NormCheck", "clip_window", 0, 1)
    Traceback (most recent call last):
    ...
    ValueError: NormCheck: `clip_window` must be an int >= 1, got 0
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any


def _check_int(owner: str, name: str, value: Any, minimum: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        allowed = f"an int >= {minimum}" + (" or None" if allow_none else "")
        raise ValueError(f"{owner}: `{name}` must be {allowed}, got {value!r}")


def _check_float(
    owner: str,
    name: str,
    value: Any,
    low: float = 0.0,
    high: float = math.inf,
    allow_none: bool = False,
    low_inclusive: bool = False,
) -> None:
    if value is None and allow_none:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    if ok:
        ok = (value >= low if low_inclusive else value > low) and value <= high
    if not ok:
        bracket = "[" if low_inclusive else "("
        allowed = f"a number in {bracket}{low}, {high}]" + (" or None" if allow_none else "")
        raise ValueError(f"{owner}: `{name}` must be {allowed}, got {value!r}")


def _check_bool(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{owner}: `{name}` must be True or False, got {value!r}")


def _check_str_list(owner: str, name: str, value: Any, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"{owner}: `{name}` must be a list of strings{' or None' if allow_none else ''}, got {value!r}")


def _check_choice(owner: str, name: str, value: Any, choices: Iterable[Any]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{owner}: `{name}` must be one of {choices}, got {value!r}")


def _check_type(owner: str, name: str, value: Any, kind: type, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, kind):
        allowed = f"a {kind.__name__}" + (" or None" if allow_none else "")
        raise TypeError(f"{owner}: `{name}` must be {allowed}, got {value!r}")
