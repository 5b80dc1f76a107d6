"""Lengths with unit suffixes: ``"20nm"``, ``"0.65um"``, ``"1e-6"`` (a bare number is metres).

Every length inside fem_anode is in metres; these helpers convert at the CLI/config boundary.
"""

from __future__ import annotations

import math
import re

from fem_anode.errors import UsageError

__all__ = ["LENGTH_UNITS", "parse_length", "parse_lengths", "format_length"]

#: Length units accepted in suffixes, in metres.
LENGTH_UNITS: dict[str, float] = {
    "m": 1.0,
    "cm": 1e-2,
    "mm": 1e-3,
    "um": 1e-6,
    "µm": 1e-6,
    "μm": 1e-6,
    "nm": 1e-9,
    "pm": 1e-12,
    "A": 1e-10,
}

_NUMBER_UNIT = re.compile(r"^\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*([^\d\s.+-][^\s]*)?\s*$")


def _split(text: str) -> tuple[float, str | None]:
    match = _NUMBER_UNIT.match(text)
    if match is None:
        raise UsageError(f"cannot read length {text!r}: expected a number with an optional unit, e.g. 20nm, 0.65um, 1e-6")
    value, unit = float(match.group(1)), match.group(2)
    if unit is not None and unit not in LENGTH_UNITS:
        raise UsageError(f"unknown length unit {unit!r} in {text!r}; use one of {', '.join(LENGTH_UNITS)}")
    return value, unit


def _check_positive(value: float, text: str) -> float:
    if not math.isfinite(value) or value <= 0:
        raise UsageError(f"length {text!r} must be positive and finite")
    return value


def parse_length(text: str | float) -> float:
    """Length in metres from ``"20nm"``, ``"0.65 um"``, ``"1e-6"`` (metres) or a number (metres).

    Raises:
        UsageError: unreadable text, unknown unit, or a non-positive/non-finite length.
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return _check_positive(float(text), str(text))
    value, unit = _split(str(text))
    return _check_positive(value * LENGTH_UNITS[unit or "m"], str(text))


def parse_lengths(text: str | float | list | tuple, ndim: int | None = None) -> tuple[float, ...]:
    """A voxel size: one length for all axes or one per axis (axis order z, y, x), in metres.

    Accepts ``"20nm"``, ``"40nm,20nm,20nm"``, ``"40,20,20nm"`` and ``"40x20x20nm"`` (a unit on the
    last entry applies to the entries without one), or a list of numbers in metres. With ``ndim``
    a single value is repeated ``ndim`` times and any other count than 1 or ``ndim`` is an error.
    """
    if isinstance(text, (list, tuple)):
        values = tuple(parse_length(v) for v in text)
    elif isinstance(text, (int, float)) and not isinstance(text, bool):
        values = (parse_length(text),)
    else:
        parts = [p for p in re.split(r"[,x×]", str(text).strip()) if p.strip()]
        if not parts:
            raise UsageError(f"cannot read voxel size {text!r}")
        split = [_split(p) for p in parts]
        last_unit = split[-1][1]
        if any(u is not None for u, in [(s[1],) for s in split[:-1]]) and any(s[1] is None for s in split):
            raise UsageError(f"voxel size {text!r} mixes entries with and without units")
        values = tuple(_check_positive(v * LENGTH_UNITS[u or last_unit or "m"], str(text)) for v, u in split)
    if ndim is not None:
        if len(values) == 1:
            values = values * ndim
        elif len(values) != ndim:
            raise UsageError(f"voxel size has {len(values)} entries but the image has {ndim} axes")
    return values


def format_length(metres: float) -> str:
    """Short human-readable length, e.g. ``format_length(2e-8) == '20 nm'``."""
    for unit, scale in (("m", 1.0), ("mm", 1e-3), ("um", 1e-6), ("nm", 1e-9)):
        if abs(metres) >= scale:
            return f"{metres / scale:.4g} {unit}"
    return f"{metres / 1e-12:.4g} pm"
