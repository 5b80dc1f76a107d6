"""CSV files of the detachment study: measured gaps, capacity retention and particle radii.

* gaps: columns ``cycle,radius_m,gap_m`` (one row per particle; SI units; more columns allowed);
* capacity: columns ``cycle,capacity_fraction`` (Si capacity still available, 1 = pristine);
* radii: a column ``radius_m`` (a gap CSV works too).

Every reader checks the file and raises :class:`~fem_anode.errors.InputError` with one line
naming the file, the row and the problem (missing column, empty file, NaN, negative radius...).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fem_anode.errors import InputError
from fem_anode.io.output import write_text_atomic

__all__ = [
    "GapData",
    "CapacityData",
    "read_gap_csv",
    "read_capacity_csv",
    "read_radii_csv",
    "write_gap_csv",
    "write_capacity_csv",
]


def _check_limits(values: np.ndarray, name: str, source: str) -> None:
    """Lengths other than zero must lie within :data:`fem_anode.units.NUMERIC_LIMITS` (m)."""
    from fem_anode.units import NUMERIC_LIMITS

    low, high = NUMERIC_LIMITS
    magnitude = np.abs(values)
    bad = (magnitude != 0) & ((magnitude < low) | (magnitude > high))
    if bad.any():
        first = int(np.argmax(bad))
        raise InputError(
            f"{source}: {name} = {values[first]:g} m (particle {first}) is outside what fem_anode can compute with: "
            f"lengths other than 0 must lie between {low:g} and {high:g} m"
        )


@dataclasses.dataclass(frozen=True)
class GapData:
    """Per-particle gaps: ``cycle`` (int), ``radius_m`` and ``gap_m`` (m), equal lengths."""

    cycle: np.ndarray
    radius_m: np.ndarray
    gap_m: np.ndarray
    source: str = "<array>"

    def __post_init__(self) -> None:
        cycle = np.asarray(self.cycle)
        radius = np.asarray(self.radius_m, dtype=float)
        gap = np.asarray(self.gap_m, dtype=float)
        if not (cycle.ndim == radius.ndim == gap.ndim == 1 and cycle.size == radius.size == gap.size):
            raise InputError(f"{self.source}: cycle, radius_m and gap_m must be 1D arrays of equal length")
        if cycle.size == 0:
            raise InputError(f"{self.source}: no particles (empty gap data)")
        for name, values in (("cycle", cycle.astype(float)), ("radius_m", radius), ("gap_m", gap)):
            bad = ~np.isfinite(values)
            if bad.any():
                raise InputError(
                    f"{self.source}: {name} is NaN or infinite in {int(bad.sum())} row(s), first at particle "
                    f"{int(np.argmax(bad))}"
                )
        if np.any(cycle.astype(float) != np.round(cycle.astype(float))) or np.any(cycle < 0):
            raise InputError(f"{self.source}: cycle must be a non-negative integer")
        if np.any(radius <= 0):
            raise InputError(
                f"{self.source}: radius_m must be positive; {int(np.sum(radius <= 0))} value(s) are zero or negative"
            )
        if np.any(gap < 0):
            raise InputError(f"{self.source}: gap_m must be non-negative; {int(np.sum(gap < 0))} value(s) are negative")
        _check_limits(radius, "radius_m", self.source)
        _check_limits(gap, "gap_m", self.source)
        if cycle.max() > 10_000:
            raise InputError(f"{self.source}: cycle {int(cycle.max())} is beyond the model's 10000 cycles")
        object.__setattr__(self, "cycle", cycle.astype(np.int64))
        object.__setattr__(self, "radius_m", radius)
        object.__setattr__(self, "gap_m", gap)

    @property
    def size(self) -> int:
        return int(self.cycle.size)

    def cycles(self) -> list[int]:
        """Distinct cycle numbers, ascending."""
        return sorted({int(c) for c in self.cycle})


@dataclasses.dataclass(frozen=True)
class CapacityData:
    """Measured Si capacity retention: ``cycle`` (int) and ``capacity_fraction`` (1 = pristine)."""

    cycle: np.ndarray
    capacity_fraction: np.ndarray
    source: str = "<array>"

    def __post_init__(self) -> None:
        cycle = np.asarray(self.cycle)
        frac = np.asarray(self.capacity_fraction, dtype=float)
        if cycle.ndim != 1 or cycle.shape != frac.shape:
            raise InputError(f"{self.source}: cycle and capacity_fraction must be 1D arrays of equal length")
        if cycle.size == 0:
            raise InputError(f"{self.source}: no capacity values (empty capacity data)")
        if not np.all(np.isfinite(frac)) or not np.all(np.isfinite(cycle.astype(float))):
            raise InputError(f"{self.source}: capacity data contain NaN or infinite values")
        if np.any(cycle.astype(float) != np.round(cycle.astype(float))) or np.any(cycle < 0):
            raise InputError(f"{self.source}: cycle must be a non-negative integer")
        if np.any(frac < 0) or np.any(frac > 1.5):
            raise InputError(f"{self.source}: capacity_fraction must lie in [0, 1.5] (1 = pristine capacity)")
        if len(set(cycle.tolist())) != cycle.size:
            raise InputError(f"{self.source}: a cycle appears twice in the capacity data")
        object.__setattr__(self, "cycle", cycle.astype(np.int64))
        object.__setattr__(self, "capacity_fraction", frac)


def _read_table(path: str | Path, required: Sequence[str]) -> tuple[dict[str, np.ndarray], str]:
    path = Path(path)
    if not path.exists():
        raise InputError(f"file not found: {path}")
    if path.is_dir():
        raise InputError(f"{path} is a directory, expected a CSV file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"cannot read {path}: {err}") from None
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        raise InputError(f"{path}: empty file; expected a header line with columns {','.join(required)}")
    reader = csv.reader(io.StringIO("\n".join(lines)))
    header = [h.strip() for h in next(reader)]
    missing = [name for name in required if name not in header]
    if missing:
        raise InputError(
            f"{path}: missing column(s) {', '.join(missing)}; found {','.join(header) or '(none)'}, expected "
            f"{','.join(required)}"
        )
    index = {name: header.index(name) for name in required}
    columns: dict[str, list[float]] = {name: [] for name in required}
    for row_no, row in enumerate(reader, start=2):
        if len(row) < len(header):
            raise InputError(f"{path}: row {row_no} has {len(row)} field(s), the header has {len(header)}")
        for name, col in index.items():
            field = row[col].strip()
            try:
                value = float(field)
            except ValueError:
                raise InputError(f"{path}: row {row_no}, column {name}: {field!r} is not a number") from None
            if not math.isfinite(value):
                raise InputError(f"{path}: row {row_no}, column {name} is {field!r}; values must be finite numbers")
            columns[name].append(value)
    if not columns[required[0]]:
        raise InputError(f"{path}: no data rows after the header")
    return {name: np.asarray(values) for name, values in columns.items()}, str(path)


def read_gap_csv(path: str | Path) -> GapData:
    """Read a gap CSV (``cycle,radius_m,gap_m``).

    Raises:
        InputError: missing/empty file, missing columns, non-numeric/NaN values, negative or
            zero radii, negative gaps or non-integer cycles.
    """
    cols, source = _read_table(path, ("cycle", "radius_m", "gap_m"))
    return GapData(cols["cycle"], cols["radius_m"], cols["gap_m"], source=source)


def read_capacity_csv(path: str | Path) -> CapacityData:
    """Read a capacity-retention CSV (``cycle,capacity_fraction``)."""
    cols, source = _read_table(path, ("cycle", "capacity_fraction"))
    return CapacityData(cols["cycle"], cols["capacity_fraction"], source=source)


def read_radii_csv(path: str | Path) -> np.ndarray:
    """Particle radii (m) from the ``radius_m`` column of a CSV; all must be finite and positive."""
    cols, source = _read_table(path, ("radius_m",))
    radii = cols["radius_m"]
    if np.any(radii <= 0):
        raise InputError(
            f"{source}: radius_m must be positive; {int(np.sum(radii <= 0))} value(s) are zero or negative"
        )
    return radii


def write_gap_csv(path: str | Path, data: GapData) -> Path:
    """Write ``cycle,radius_m,gap_m`` atomically."""
    rows = ["cycle,radius_m,gap_m"] + [
        f"{int(c)},{r:.9e},{g:.9e}" for c, r, g in zip(data.cycle, data.radius_m, data.gap_m)
    ]
    return write_text_atomic(path, "\n".join(rows) + "\n")


def write_capacity_csv(path: str | Path, data: CapacityData) -> Path:
    """Write ``cycle,capacity_fraction`` atomically."""
    rows = ["cycle,capacity_fraction"] + [f"{int(c)},{f:.9g}" for c, f in zip(data.cycle, data.capacity_fraction)]
    return write_text_atomic(path, "\n".join(rows) + "\n")
