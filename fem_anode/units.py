"""Lengths with unit suffixes: ``"20nm"``, ``"0.65um"``, ``"1e-6"`` (a bare number is metres),
and the ranges every dimensional value is checked against.

Every length inside fem_anode is in metres; these helpers convert at the CLI/config boundary.

Two ranges guard every length, time and material value, from the command line, a TOML file or
Python (settings objects, :class:`~fem_anode.io.images.VoxelImage`):

* **numerical limits** (:data:`NUMERIC_LIMITS`, an error, exit 2): a value that is not zero must
  have a magnitude between 1e-30 and 1e30 (SI units). The package forms products and quotients
  of several such values (areas and volumes of voxels, their squares in variances, D t / h^2);
  within these limits ten of them multiplied still give a normal float64 number, outside them
  results overflow to inf or underflow to 0 deep inside NumPy/PETSc.
* **plausible ranges** (:data:`QUANTITIES`, a warning, the run goes on): what a battery
  electrode model can mean, per SI unit, e.g. a length between 0.01 nm and 10 cm. A value
  outside is most likely a unit mistake (``--voxel-size 20`` is 20 m; ``20nm`` was meant).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re

from fem_anode.errors import UsageError

__all__ = [
    "LENGTH_UNITS",
    "NUMERIC_LIMITS",
    "QUANTITIES",
    "Quantity",
    "check_length",
    "check_value",
    "parse_length",
    "parse_lengths",
    "format_length",
]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Quantity:
    """A kind of physical value and the range (SI) in which values of it are plausible."""

    name: str
    unit: str
    plausible: tuple[float, float]


#: Magnitudes a value other than zero must lie within (SI units): an error outside.
NUMERIC_LIMITS: tuple[float, float] = (1e-30, 1e30)

#: Plausible ranges by SI unit string (as in the settings' ``unit=``): a warning outside.
QUANTITIES: dict[str, Quantity] = {
    "m": Quantity("length", "m", (1e-11, 0.1)),
    "s": Quantity("time", "s", (1e-12, 1e9)),
    "h": Quantity("time", "h", (1e-6, 1e5)),
    "m^2/s": Quantity("diffusivity", "m^2/s", (1e-25, 1e-6)),
    "m/s": Quantity("rate constant", "m/s", (1e-20, 1e3)),
    "mol/m^3": Quantity("concentration", "mol/m^3", (1e-6, 1e6)),
    "1/m": Quantity("inverse length", "1/m", (1.0, 1e11)),
}


def check_value(value: float, unit: str | None, where: str) -> float:
    """Check a finite value against :data:`NUMERIC_LIMITS` (UsageError) and, for a unit in
    :data:`QUANTITIES`, log a warning when it is outside the plausible range. Returns ``value``.

    Zero passes (whether zero is allowed is the caller's constraint).
    """
    magnitude = abs(value)
    if magnitude == 0.0:
        return value
    low, high = NUMERIC_LIMITS
    unit_text = f" {unit}" if unit else ""
    if not low <= magnitude <= high:
        raise UsageError(
            f"{where} = {value:g}{unit_text} is outside what fem_anode can compute with: values other than 0 must "
            f"lie between {low:g} and {high:g} in magnitude (SI units)"
        )
    quantity = QUANTITIES.get(unit or "")
    if quantity is not None and not quantity.plausible[0] <= magnitude <= quantity.plausible[1]:
        p_low, p_high = quantity.plausible
        logger.warning(
            "%s = %g %s is outside the plausible range of a %s (%g to %g %s); check its unit%s",
            where,
            value,
            unit,
            quantity.name,
            p_low,
            p_high,
            unit,
            " (a bare number is metres: 20nm, 0.65um)" if unit == "m" else "",
        )
    return value


def check_length(value: float, where: str) -> float:
    """A length in metres that must be positive, finite, within the numerical limits (UsageError)
    and plausible (else a warning). Returns ``value``."""
    if not math.isfinite(value) or value <= 0:
        raise UsageError(f"{where} must be positive and finite, got {value!r}")
    return check_value(value, "m", where)


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
        raise UsageError(
            f"cannot read length {text!r}: expected a number with an optional unit, e.g. 20nm, 0.65um, 1e-6"
        )
    value, unit = float(match.group(1)), match.group(2)
    if unit is not None and unit not in LENGTH_UNITS:
        raise UsageError(f"unknown length unit {unit!r} in {text!r}; use one of {', '.join(LENGTH_UNITS)}")
    return value, unit


def _check_positive(value: float, text: str) -> float:
    if not math.isfinite(value) or value <= 0:
        raise UsageError(f"length {text!r} must be positive and finite")
    return check_value(value, "m", f"length {text!r}")


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
        if any(u is not None for (u,) in [(s[1],) for s in split[:-1]]) and any(s[1] is None for s in split):
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
