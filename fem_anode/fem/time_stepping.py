"""Step-size planning and variable-step BDF coefficients (pure Python; no dolfinx).

Steps grow geometrically (``growth`` every ``steps_per_level`` steps, never more than doubling
from one step to the next, which keeps variable-step BDF2 zero-stable: ratio < 1 + sqrt 2),
and are shortened to land exactly on every output time. The set of distinct step sizes stays
small, so a solver can cache one factorised matrix per step size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

from fem_anode.errors import UsageError

__all__ = ["BDFCoefficients", "bdf_coefficients", "plan_steps"]


@dataclasses.dataclass(frozen=True)
class BDFCoefficients:
    """``a0 u^{n+1} + a1 u^n + a2 u^{n-1}`` approximates du/dt at t^{n+1} (units 1/s)."""

    a0: float
    a1: float
    a2: float


def bdf_coefficients(dt: float, dt_previous: float | None, order: int) -> BDFCoefficients:
    """Backward Euler (order 1, or the first step) or variable-step BDF2 coefficients.

    BDF2 with ratio ``w = dt / dt_previous``:
    ``[(1 + 2w)/(1 + w) u^{n+1} - (1 + w) u^n + w^2/(1 + w) u^{n-1}] / dt``.
    """
    if dt <= 0:
        raise UsageError(f"time step must be positive, got {dt}")
    if order == 1 or dt_previous is None:
        return BDFCoefficients(1.0 / dt, -1.0 / dt, 0.0)
    if order != 2:
        raise UsageError(f"BDF order must be 1 or 2, got {order}")
    w = dt / dt_previous
    return BDFCoefficients((1 + 2 * w) / ((1 + w) * dt), -(1 + w) / dt, w * w / ((1 + w) * dt))


def plan_steps(
    t_end: float,
    output_times: Sequence[float],
    dt_initial: float,
    *,
    growth: float = 2.0,
    steps_per_level: int = 4,
    dt_max: float | None = None,
) -> Iterator[tuple[float, float]]:
    """Yield ``(t_new, dt)`` from t = 0 to ``t_end``, hitting every output time exactly.

    Args:
        t_end: final time (s).
        output_times: times (s) that must be step ends; values beyond ``t_end`` are errors.
        dt_initial: first step (s).
        growth: factor by which the target step grows every ``steps_per_level`` steps.
        steps_per_level: steps taken with one target size before it grows.
        dt_max: largest step (s); default ``t_end / 20``.
    """
    if not (t_end > 0 and dt_initial > 0 and growth >= 1 and steps_per_level >= 1):
        raise UsageError("time stepping needs t_end > 0, dt_initial > 0, growth >= 1, steps_per_level >= 1")
    stops = sorted({float(t) for t in output_times} | {float(t_end)})
    if stops[0] <= 0 or stops[-1] > t_end:
        raise UsageError(f"output times must lie in (0, t_end = {t_end}], got {list(output_times)}")
    dt_max = t_end / 20 if dt_max is None else dt_max
    t, target, dt_previous, taken = 0.0, dt_initial, None, 0
    tolerance = 1e-12 * t_end
    for stop in stops:
        while stop - t > tolerance:
            dt = min(target, dt_max, 2.0 * dt_previous if dt_previous else target)
            remaining = stop - t
            if dt >= remaining - tolerance:
                dt = remaining
            elif 2.0 * dt > remaining:  # split the rest in two equal steps, never a sliver
                dt = 0.5 * remaining
            t = stop if dt == remaining else t + dt
            yield t, dt
            dt_previous = dt
            taken += 1
            if taken % steps_per_level == 0:
                target = min(target * growth, dt_max)
