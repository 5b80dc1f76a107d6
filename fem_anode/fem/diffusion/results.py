"""The records of a diffusion run: time series of region and domain means, counters, t90."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from fem_anode.errors import UsageError

__all__ = ["DiffusionResult"]


@dataclasses.dataclass
class DiffusionResult:
    """Time series of a run (SI units), gathered on every rank.

    Attributes:
        times: step end times (s), starting with 0.
        region_means: region name -> mean c (mol/m^3) at ``times``.
        domain_mean: mean c over the domain (mol/m^3) at ``times``.
        output_times: the requested output times (s).
        mass_balance_rel_error: sum over steps of |discrete balance residual| dt relative to the
            total Li taken up.
        ndofs, ncells: global sizes.
        steps, factorisations: time steps taken; factorisations and multigrid set-ups (the
            shifted multigrid ``"mg"`` counts once per run, SSOR none).
        retries: failed steps retried with a halved step.
        status: "completed", or "interrupted" for the partial result of a stopped run.
        resumed_from_step: the checkpoint's step when the run was resumed, else None.
        c_bulk: the run's bulk concentration (mol/m^3), the level of :meth:`t90`.
        c_extremes: the lowest c / c_bulk of any accepted step, its time (s), the highest, its
            time. The exact solution stays in [0, 1] (c = 0 at t = 0, the bulk at the pores), so
            values outside are the discretisation's over- and undershoots (:meth:`excursion`).
    """

    times: list[float]
    region_means: dict[str, list[float]]
    domain_mean: list[float]
    output_times: list[float]
    mass_balance_rel_error: float
    ndofs: int
    ncells: int
    steps: int
    factorisations: int
    retries: int = 0
    status: str = "completed"
    resumed_from_step: int | None = None
    c_bulk: float | None = None
    c_extremes: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)

    def excursion(self) -> float:
        """How far c left [0, c_bulk] at any accepted step, relative to c_bulk (0 if never)."""
        low, _, high, _ = self.c_extremes
        return max(-low, high - 1.0, 0.0)

    def t90(self, c_bulk: float | None = None) -> dict[str, float | None]:
        """Time (s) at which each region's mean first reaches 0.9 c_bulk (linear in time), or None.

        ``c_bulk`` (mol/m^3): the run's own ``physics.c_bulk`` unless given.
        """
        level = c_bulk if c_bulk is not None else self.c_bulk
        if level is None:
            raise UsageError("t90 needs c_bulk: this result does not know its run's physics.c_bulk")
        out: dict[str, float | None] = {}
        for name, values in {**self.region_means, "domain": self.domain_mean}.items():
            out[name] = _first_crossing(self.times, values, 0.9 * level)
        return out

    def at_output_times(self) -> dict[str, Any]:
        """Region means at the output times only."""
        index = [int(np.argmin(np.abs(np.asarray(self.times) - t))) for t in self.output_times]
        return {
            "times": [self.times[i] for i in index],
            "regions": {k: [v[i] for i in index] for k, v in self.region_means.items()},
            "domain_mean": [self.domain_mean[i] for i in index],
        }


def _first_crossing(times: list[float], values: list[float], level: float) -> float | None:
    for i in range(1, len(values)):
        if values[i] >= level > values[i - 1]:
            fraction = (level - values[i - 1]) / (values[i] - values[i - 1])
            return times[i - 1] + fraction * (times[i] - times[i - 1])
        if values[i] >= level and i == 1 and values[0] >= level:
            return times[0]
    return None
