"""Step-size planning and variable-step BDF coefficients (pure Python; no dolfinx).

Steps grow geometrically (``growth`` every ``steps_per_level`` steps, never more than doubling
from one step to the next, which keeps variable-step BDF2 zero-stable: ratio < 1 + sqrt 2),
and are shortened to land exactly on every output time. The set of distinct step sizes stays
small, so a solver can cache one factorised matrix per step size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

from fem_anode.errors import UsageError

__all__ = ["BDFCoefficients", "StepPlan", "bdf_coefficients", "plan_steps"]


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


class StepPlan:
    """Resumable step planner: proposes ``(t_new, dt)``, is told which steps were accepted.

    The proposals of an undisturbed plan are those of :func:`plan_steps`. A failed step is
    retried after :meth:`cut`, which lowers the target step; the remaining steps are then
    planned from there (growing again every ``steps_per_level`` accepted steps). The planner's
    position is a small dict (:meth:`state_dict`), stored in checkpoints.

    Args:
        t_end: final time (s).
        output_times: times (s) that must be step ends; values beyond ``t_end`` are errors.
        dt_initial: first step (s).
        growth: factor by which the target step grows every ``steps_per_level`` steps.
        steps_per_level: steps taken with one target size before it grows.
        dt_max: largest step (s); default ``t_end / 20``.
    """

    def __init__(
        self,
        t_end: float,
        output_times: Sequence[float],
        dt_initial: float,
        *,
        growth: float = 2.0,
        steps_per_level: int = 4,
        dt_max: float | None = None,
    ) -> None:
        if not (t_end > 0 and dt_initial > 0 and growth >= 1 and steps_per_level >= 1):
            raise UsageError("time stepping needs t_end > 0, dt_initial > 0, growth >= 1, steps_per_level >= 1")
        stops = sorted({float(t) for t in output_times} | {float(t_end)})
        if stops[0] <= 0 or stops[-1] > t_end:
            raise UsageError(f"output times must lie in (0, t_end = {t_end}], got {list(output_times)}")
        self.stops = stops
        self.growth = growth
        self.steps_per_level = steps_per_level
        self.dt_max = t_end / 20 if dt_max is None else dt_max
        self.tolerance = 1e-12 * t_end
        self.t = 0.0
        self.target = float(dt_initial)
        self.dt_previous: float | None = None
        self.taken = 0

    def _stop(self) -> float | None:
        for stop in self.stops:
            if stop - self.t > self.tolerance:
                return stop
        return None

    @property
    def done(self) -> bool:
        """True once the last stop (``t_end``) is reached."""
        return self._stop() is None

    def propose(self) -> tuple[float, float]:
        """The next step ``(t_new, dt)`` (nothing changes until :meth:`accept`)."""
        stop = self._stop()
        if stop is None:
            raise UsageError("the time plan is finished")
        dt = min(self.target, self.dt_max, 2.0 * self.dt_previous if self.dt_previous else self.target)
        remaining = stop - self.t
        if dt >= remaining - self.tolerance:
            dt = remaining
        elif 2.0 * dt > remaining:  # split the rest in two equal steps, never a sliver
            dt = 0.5 * remaining
        return (stop if dt == remaining else self.t + dt), dt

    def accept(self, t_new: float, dt: float) -> None:
        """Record an accepted step."""
        self.t = t_new
        self.dt_previous = dt
        self.taken += 1
        if self.taken % self.steps_per_level == 0:
            self.target = min(self.target * self.growth, self.dt_max)

    def cut(self, dt_failed: float, factor: float = 0.5) -> None:
        """After a failed step of size ``dt_failed``: the next proposal is at most ``factor dt_failed``."""
        if not 0 < factor < 1:
            raise UsageError(f"step cut factor must lie in (0, 1), got {factor}")
        self.target = factor * dt_failed

    def state_dict(self) -> dict[str, Any]:
        """The planner's position (JSON-serialisable)."""
        return {"t": self.t, "target": self.target, "dt_previous": self.dt_previous, "taken": self.taken}

    def load_state(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict`."""
        self.t = float(state["t"])
        self.target = float(state["target"])
        self.dt_previous = None if state["dt_previous"] is None else float(state["dt_previous"])
        self.taken = int(state["taken"])


def plan_steps(
    t_end: float,
    output_times: Sequence[float],
    dt_initial: float,
    *,
    growth: float = 2.0,
    steps_per_level: int = 4,
    dt_max: float | None = None,
) -> Iterator[tuple[float, float]]:
    """Yield ``(t_new, dt)`` from t = 0 to ``t_end``, hitting every output time exactly: the
    proposals of an undisturbed :class:`StepPlan` (same arguments)."""
    plan = StepPlan(t_end, output_times, dt_initial, growth=growth, steps_per_level=steps_per_level, dt_max=dt_max)
    while not plan.done:
        t_new, dt = plan.propose()
        yield t_new, dt
        plan.accept(t_new, dt)
