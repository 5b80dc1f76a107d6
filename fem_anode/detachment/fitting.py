"""Least-squares fit of (alpha0, kappa0, delta0, zeta0) to gaps and capacity, with a bootstrap.

Objective (one replicate; ``w_i`` = how often particle ``i`` was drawn, 1 for the main fit)::

    F = 1/2 [ sum_i w_i (g_i - mu_{c_i}(r_i))^2 / (n_g s_g^2)
              + lambda_C sum_j (C_j - C_model(c_j))^2 / (n_C s_C^2) ]

over the particles observed after at least one cycle (``n_g`` of them; pristine particles only
enter the capacity population), with ``mu_c(r)`` the model's expected gap after cycle ``c``
(:func:`~fem_anode.detachment.model.gap_statistics`), ``C_model`` the volume-weighted connected
fraction of the measured particle population (all cycles pooled, resampled with the gaps) or
of a given population, ``s_g``/``s_C`` the residual scales and ``lambda_C`` the capacity weight
of :class:`~fem_anode.detachment.settings.FitSettings`.

The bootstrap resamples particles with replacement within each cycle (multinomial counts) and
refits every replicate. All replicates are fitted *together* by a batched, box-constrained
Levenberg-Marquardt (finite-difference Jacobian): the model of every replicate is one array
operation per half-cycle, evaluated on a log-spaced radius grid and interpolated linearly to
the particles' radii. 68 % ranges are the 16th and 84th percentiles of the replicates.
Internally lengths are in micrometres (for conditioning); inputs and outputs are SI.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import numpy as np

from fem_anode.detachment.data import CapacityData, GapData
from fem_anode.detachment.model import (
    capacity_retention,
    check_radii,
    cycle_major_statistics,
    cycle_major_trajectories,
    gap_statistics,
    gap_trajectories,
)
from fem_anode.detachment.settings import PARAMETER_NAMES, DetachmentSettings, ModelParameters
from fem_anode.errors import InputError, SolverError

__all__ = [
    "FitProblem",
    "FitResult",
    "check_data_identify",
    "diagnose",
    "distinct_observations",
    "fit",
    "levenberg_marquardt",
]

logger = logging.getLogger(__name__)

#: SI -> internal (um-based) factors for (alpha0, kappa0, delta0, zeta0).
_TO_INTERNAL = np.array([1.0, 1e6, 1e6, 1e-6])
#: Typical magnitudes (internal units), used for finite-difference steps.
_TYPICAL = np.array([1.0, 0.05, 0.1, 0.1])


class FitProblem:
    """The data of one fit, and the residuals of a batch of parameter sets (internal units).

    Args:
        gaps: measured gaps (cycle, radius, gap).
        capacity: measured capacity retention, or ``None`` to fit the gaps only.
        settings: model (volume change) and fit settings.
        population: radii (m) of the particle population whose volume-weighted survival is the
            capacity; default the measured particles (all cycles, resampled with them).
    """

    def __init__(
        self,
        gaps: GapData,
        capacity: CapacityData | None,
        settings: DetachmentSettings,
        population: np.ndarray | None = None,
    ) -> None:
        self.settings = settings
        self.gaps = gaps
        self.capacity = capacity
        fit = settings.fit
        obs = gaps.cycle >= 1
        if not obs.any():
            raise InputError(f"{gaps.source}: no particle measured after a cycle (all cycle 0); cannot fit the model")
        self.cycles = int(max(gaps.cycle.max(), capacity.cycle.max() if capacity is not None else 0))
        self.expansion = settings.model.linear_expansion
        self.n_all = gaps.size
        self.obs = np.flatnonzero(obs)
        self.cycle_obs = gaps.cycle[obs]
        self.gap_obs = gaps.gap_m[obs] * 1e6
        self.r_all = gaps.radius_m * 1e6
        self.fixed_population = population is not None
        self.r_pop = (check_radii(population, "capacity population") if population is not None else gaps.radius_m) * 1e6
        lo, hi = min(self.r_all.min(), self.r_pop.min()), max(self.r_all.max(), self.r_pop.max())
        self.grid = (
            np.geomspace(lo, hi * (1 + 1e-12), fit.radius_grid) if hi > lo * (1 + 1e-9) else np.array([lo, lo * 1.001])
        )
        self._idx_obs, self._w_obs = self._interp_weights(self.r_all[self.obs])
        self._idx_pop, self._w_pop = self._interp_weights(self.r_pop)
        self.n_gap = self.obs.size
        self.scale_gap = fit.gap_scale * 1e6
        if capacity is not None and fit.capacity_weight > 0:
            self.cap_cycles = capacity.cycle
            self.cap_values = capacity.capacity_fraction
            self.cap_factor = np.sqrt(fit.capacity_weight / capacity.cycle.size) / fit.capacity_scale
        else:
            self.cap_cycles = np.zeros(0, dtype=np.int64)
            self.cap_values = np.zeros(0)
            self.cap_factor = 0.0
        self.n_residuals = self.n_gap + self.cap_cycles.size

    def _interp_weights(self, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        j = np.clip(np.searchsorted(self.grid, r, side="right") - 1, 0, self.grid.size - 2)
        w = (r - self.grid[j]) / (self.grid[j + 1] - self.grid[j])
        return j, np.clip(w, 0.0, 1.0)

    def resample_counts(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """``(n, n_particles)`` counts: particles drawn with replacement within each cycle."""
        counts = np.zeros((n, self.n_all))
        for c in self.gaps.cycles():
            members = np.flatnonzero(self.gaps.cycle == c)
            draws = rng.integers(0, members.size, size=(n, members.size))
            rows = np.repeat(np.arange(n), members.size)
            np.add.at(counts, (rows, members[draws].ravel()), 1.0)
        return counts

    def predict(self, theta: np.ndarray, counts: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Expected gaps (um) of the observed particles ``(B, n_gap)`` and capacity ``(B, N+1)``."""
        theta = np.atleast_2d(theta)
        a, k, d, z = (theta[:, i : i + 1] for i in range(4))
        traj = cycle_major_trajectories(self.grid, a, k, d, self.cycles, self.expansion)  # (N+1, B, G)
        survival, mean, _ = cycle_major_statistics(traj, z, with_std=False)
        c = self.cycle_obs
        j, w = self._idx_obs, self._w_obs
        gaps = ((1.0 - w)[:, None] * mean[c, :, j] + w[:, None] * mean[c, :, j + 1]).T  # (B, n_gap)
        jp, wp = self._idx_pop, self._w_pop
        s_pop = np.moveaxis((1.0 - wp) * survival[:, :, jp] + wp * survival[:, :, jp + 1], 0, 1)
        if counts is None or self.fixed_population:
            cap = capacity_retention(s_pop, self.r_pop)
        else:
            cap = capacity_retention(s_pop, self.r_pop, counts)
        return gaps, cap

    def residuals(self, theta: np.ndarray, counts: np.ndarray | None = None) -> np.ndarray:
        """Weighted residual vectors ``(B, n_residuals)`` whose half squared norm is the objective."""
        gaps, cap = self.predict(theta, counts)
        w_gap = np.ones((1, self.n_gap)) if counts is None else counts[:, self.obs]
        res_gap = np.sqrt(w_gap / self.n_gap) * (self.gap_obs - gaps) / self.scale_gap
        if self.cap_cycles.size == 0:
            return res_gap
        res_cap = self.cap_factor * (self.cap_values - cap[:, self.cap_cycles])
        return np.concatenate([res_gap, res_cap], axis=1)

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self.settings.fit.bounds()
        return np.asarray(lo) * _TO_INTERNAL, np.asarray(hi) * _TO_INTERNAL


def levenberg_marquardt(
    residuals: Any,
    theta0: np.ndarray,
    lower: np.ndarray,
    upper: np.ndarray,
    *,
    max_iterations: int = 80,
    typical: np.ndarray | None = None,
    ftol: float = 1e-6,
    xtol: float = 1e-6,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Box-constrained Levenberg-Marquardt on a batch of independent least-squares problems.

    Args:
        residuals: ``f(theta_batch, ids) -> (len(ids), M)`` residuals of problems ``ids``.
        theta0: ``(B, P)`` starting points.
        lower, upper: ``(P,)`` bounds; steps are projected onto them.
        max_iterations: iterations per problem.
        typical: ``(P,)`` parameter magnitudes for finite-difference steps.
        ftol, xtol: relative cost decrease and relative step below which a problem stops.

    Returns:
        ``(theta, cost, converged)`` with ``cost = 1/2 |f|^2`` per problem.
    """
    theta = np.clip(np.array(theta0, dtype=float), lower, upper)
    n, p = theta.shape
    typical = np.ones(p) if typical is None else np.asarray(typical, dtype=float)
    ids_all = np.arange(n)
    res = residuals(theta, ids_all)
    cost = 0.5 * np.einsum("bm,bm->b", res, res)
    lam = np.full(n, 0.1)
    active = np.ones(n, dtype=bool)
    converged = np.zeros(n, dtype=bool)
    for _ in range(max_iterations):
        ids = np.flatnonzero(active)
        if ids.size == 0:
            break
        th, r0 = theta[ids], res[ids]
        jac = np.empty((ids.size, r0.shape[1], p))
        for j in range(p):
            h = 1e-4 * np.maximum(np.abs(th[:, j]), typical[j])  # not too small: the model has small kinks
            forward = th[:, j] + h <= upper[j]
            step = np.where(forward, h, -h)
            shifted = th.copy()
            shifted[:, j] += step
            jac[:, :, j] = (residuals(shifted, ids) - r0) / step[:, None]
        grad = np.einsum("bmi,bm->bi", jac, r0)
        # Active set: a parameter on a bound whose gradient points out of the box is frozen.
        span = upper - lower
        blocked = ((th <= lower + 1e-12 * span) & (grad > 0)) | ((th >= upper - 1e-12 * span) & (grad < 0))
        jac *= (~blocked)[:, None, :]
        jtj = np.einsum("bmi,bmj->bij", jac, jac)
        jtr = np.einsum("bmi,bm->bi", jac, r0)
        diag = np.einsum("bii->bi", jtj)
        damped = jtj + (lam[ids, None] * np.maximum(diag, 1e-12) + blocked)[:, :, None] * np.eye(p)
        try:
            delta = -np.linalg.solve(damped, jtr[:, :, None])[:, :, 0]
        except np.linalg.LinAlgError:
            delta = -jtr / np.maximum(diag * (1 + lam[ids, None]), 1e-12)
        # Trust-region-like cap: no parameter moves by more than its magnitude (or typical size) per step.
        cap = np.maximum(np.abs(th), typical)
        delta *= np.minimum(1.0, 1.0 / np.max(np.abs(delta) / cap, axis=1, initial=0.0))[:, None]
        trial = np.clip(th + delta, lower, upper)
        r_trial = residuals(trial, ids)
        c_trial = 0.5 * np.einsum("bm,bm->b", r_trial, r_trial)
        better = np.isfinite(c_trial) & (c_trial < cost[ids])
        decrease = np.where(better, (cost[ids] - c_trial) / np.maximum(cost[ids], 1e-300), 0.0)
        moved = np.abs(trial - th) / np.maximum(np.abs(th), typical)
        acc = ids[better]
        theta[acc], res[acc], cost[acc] = trial[better], r_trial[better], c_trial[better]
        lam[acc] = np.maximum(lam[acc] / 3.0, 1e-9)
        rej = ids[~better]
        lam[rej] *= 4.0
        small_step = moved.max(axis=1) < xtol
        done = (better & ((decrease < ftol) | small_step)) | (lam[ids] > 1e8)
        converged[ids[done]] = True
        active[ids[done]] = False
    return theta, cost, converged


@dataclasses.dataclass
class FitResult:
    """Best-fit parameters (SI), bootstrap ranges and goodness of fit."""

    values: dict[str, float]
    ci: dict[str, tuple[float, float]]
    confidence: float
    bootstrap: np.ndarray
    goodness: dict[str, Any]
    settings: DetachmentSettings
    timing_s: dict[str, float]
    identifiability: dict[str, Any] = dataclasses.field(default_factory=dict)

    def parameters(self) -> ModelParameters:
        """Model parameters with the fitted values (other settings unchanged)."""
        return self.settings.model.replace(**self.values)

    def to_dict(self) -> dict[str, Any]:
        units = {"alpha0": "1", "kappa0": "m", "delta0": "m", "zeta0": "1/m"}
        paper = {"alpha0": 1.0, "kappa0": 1e6, "delta0": 1e6, "zeta0": 1e-6}
        out: dict[str, Any] = {}
        for name in PARAMETER_NAMES:
            out[name] = {
                "value": self.values[name],
                "ci": list(self.ci[name]),
                "unit": units[name],
                "paper_units": {
                    "unit": {"alpha0": "1", "kappa0": "um", "delta0": "um", "zeta0": "1/um"}[name],
                    "value": self.values[name] * paper[name],
                    "ci": [v * paper[name] for v in self.ci[name]],
                },
            }
            flags = self.identifiability.get("parameters", {}).get(name)
            if flags is not None:
                out[name].update(flags)
        hours = self.settings.model.half_cycle_hours
        return {
            "parameters": out,
            "confidence": self.confidence,
            "derived": {
                "E_over_eta_per_h": {
                    "value": self.values["alpha0"] / hours,
                    "ci": [v / hours for v in self.ci["alpha0"]],
                },
                "sei_growth_m_per_h": {
                    "value": self.values["delta0"] / hours,
                    "ci": [v / hours for v in self.ci["delta0"]],
                },
                "half_cycle_hours": hours,
            },
            "goodness_of_fit": self.goodness,
            "identifiability": {k: v for k, v in self.identifiability.items() if k != "parameters"},
            "bootstrap": {"replicates": int(self.bootstrap.shape[0]), "seed": self.settings.fit.seed},
            "timing_s": self.timing_s,
        }


def _starts(problem: FitProblem) -> np.ndarray:
    """A small grid of starting points (internal units), clipped to the bounds."""
    small = problem.r_all[problem.obs] <= np.quantile(problem.r_all[problem.obs], 0.25)
    plateau = np.median(problem.gap_obs[small] / problem.cycle_obs[small]) if small.any() else 0.1
    grid = (
        np.array(np.meshgrid([0.3, 1.0, 3.0], [0.01, 0.1], [0.5 * plateau, plateau], [0.05, 0.2, 0.6], indexing="ij"))
        .reshape(4, -1)
        .T
    )
    lo, hi = problem.bounds()
    return np.clip(grid, lo, hi)


def fit(
    gaps: GapData,
    capacity: CapacityData | None,
    settings: DetachmentSettings | None = None,
    *,
    population: np.ndarray | None = None,
) -> FitResult:
    """Fit the model to measured gaps (and capacity retention) with bootstrap ranges.

    Args:
        gaps: per-particle gaps; particles at cycle 0 only enter the capacity population.
        capacity: measured capacity retention, or ``None``.
        settings: model (volume change), fit and bootstrap settings.
        population: radii (m) for the capacity; default the measured particles.

    Raises:
        InputError: no particle measured after a cycle.
        SolverError: the fit produced non-finite values.
    """
    settings = settings or DetachmentSettings()
    settings.check()
    fs = settings.fit
    t0 = time.perf_counter()
    problem = FitProblem(gaps, capacity, settings, population)
    check_data_identify(problem)
    lo, hi = problem.bounds()

    starts = _starts(problem)
    theta, cost, _ = levenberg_marquardt(
        lambda th, ids: problem.residuals(th), starts, lo, hi, max_iterations=fs.max_iterations, typical=_TYPICAL
    )
    theta_hat, best_cost = _polish(problem, theta, cost, lo, hi)
    if not np.all(np.isfinite(theta_hat)) or not np.isfinite(best_cost):
        raise SolverError("detachment fit produced non-finite parameters")
    t_fit = time.perf_counter() - t0
    logger.info("best fit from %d starts: %s (cost %.4g)", len(starts), _fmt(theta_hat), best_cost)

    t1 = time.perf_counter()
    n_boot = fs.n_bootstrap
    if n_boot > 0:
        rng = np.random.default_rng(fs.seed)
        counts = problem.resample_counts(n_boot, rng)
        boot, _, conv = levenberg_marquardt(
            lambda th, ids: problem.residuals(th, counts[ids]),
            np.repeat(theta_hat[None, :], n_boot, axis=0),
            lo,
            hi,
            max_iterations=fs.max_iterations,
            typical=_TYPICAL,
        )
        logger.info("bootstrap: %d replicates, %d converged", n_boot, int(conv.sum()))
    else:
        boot = theta_hat[None, :]
    t_boot = time.perf_counter() - t1
    tail = 0.5 * (1.0 - fs.confidence)
    low_q, high_q = np.quantile(boot, [tail, 1.0 - tail], axis=0)
    values_si = theta_hat / _TO_INTERNAL
    boot_si = boot / _TO_INTERNAL
    values = {name: float(values_si[i]) for i, name in enumerate(PARAMETER_NAMES)}
    ci = {
        name: (float(low_q[i] / _TO_INTERNAL[i]), float(high_q[i] / _TO_INTERNAL[i]))
        for i, name in enumerate(PARAMETER_NAMES)
    }
    goodness = _goodness(problem, theta_hat, best_cost)
    identifiability = diagnose(problem, theta_hat, boot if n_boot > 0 else None)
    for message in identifiability["flags"]:
        logger.warning("detachment fit: %s", message)
    logger.info("fit %.2f s, bootstrap of %d replicates %.2f s", t_fit, n_boot, t_boot)
    return FitResult(
        values, ci, fs.confidence, boot_si, goodness, settings, {"fit": t_fit, "bootstrap": t_boot}, identifiability
    )


def distinct_observations(problem: FitProblem) -> int:
    """Observations that can differ in the model: distinct (cycle, radius) pairs of the particles
    measured after a cycle (particles alike in both have the same expected gap), plus the cycles
    of the capacity data when it is fitted."""
    pairs = {(int(c), float(r)) for c, r in zip(problem.cycle_obs, problem.r_all[problem.obs])}
    return len(pairs) + len({int(c) for c in problem.cap_cycles})


def check_data_identify(problem: FitProblem) -> None:
    """Refuse data that cannot identify the parameters or support a bootstrap range.

    Raises:
        InputError: fewer distinct observations than free parameters; or (with bootstrap
            replicates asked for) no cycle with two different particles, so that resampling
            within cycles reproduces the data and every range would have zero width.
    """
    n_free = len(PARAMETER_NAMES)
    n_obs = distinct_observations(problem)
    source = problem.gaps.source
    if n_obs < n_free:
        n_cap = len({int(c) for c in problem.cap_cycles})
        raise InputError(
            f"{source}: {n_obs} distinct observation(s) ({n_obs - n_cap} particle gap(s) at distinct cycle and radius "
            f"after a cycle{f', {n_cap} capacity value(s)' if problem.cap_cycles.size else ''}) cannot identify the "
            f"{n_free} free parameters {', '.join(PARAMETER_NAMES)}; measure more particles (several sizes and cycles) "
            "or add capacity data"
        )
    if problem.settings.fit.n_bootstrap > 0:
        gaps = problem.gaps
        varied = [
            c
            for c in gaps.cycles()
            if len({(float(r), float(g)) for r, g in zip(gaps.radius_m[gaps.cycle == c], gaps.gap_m[gaps.cycle == c])})
            > 1
        ]
        if not varied:
            raise InputError(
                f"{source}: no cycle has two different particles, so resampling particles within cycles reproduces the "
                "data and the bootstrap ranges would have zero width; measure more particles per cycle, or fit without "
                "ranges (--bootstrap 0)"
            )


def diagnose(
    problem: FitProblem, theta: np.ndarray, boot: np.ndarray | None, *, rank_tolerance: float = 1e-6
) -> dict[str, Any]:
    """Which parameters the data support at the best fit ``theta`` (internal units).

    * at a bound: within 1e-6 of the search range's width of its lower or upper end;
    * not identifiable: in the null space of the residuals' Jacobian (central finite differences,
      columns scaled by the parameters' magnitudes): a singular value below ``rank_tolerance``
      times the largest marks the parameters with a weight of at least 0.3 in its direction;
    * zero-width range: every bootstrap replicate gave the same value.

    Returns a JSON-ready dict: ``n_observations``, ``n_parameters``, ``jacobian_rank``,
    ``singular_values_relative``, ``flags`` (one message per problem) and, per parameter,
    ``at_bound`` (``None``, ``"lower"``, ``"upper"``), ``identifiable`` and ``ci_zero_width``.
    """
    lo, hi = problem.bounds()
    span = hi - lo
    scale = np.maximum(np.abs(theta), _TYPICAL)
    columns = []
    for j in range(theta.size):
        h = 1e-4 * scale[j]
        up, down = theta.copy(), theta.copy()
        up[j] = min(theta[j] + h, hi[j])
        down[j] = max(theta[j] - h, lo[j])
        r_up, r_down = problem.residuals(np.stack([up, down]))
        columns.append((r_up - r_down) / (up[j] - down[j]) * scale[j])
    jac = np.stack(columns, axis=1)
    if not np.all(np.isfinite(jac)):
        jac = np.nan_to_num(jac, nan=0.0, posinf=0.0, neginf=0.0)
    _, sv, vt = np.linalg.svd(jac, full_matrices=False)
    largest = sv[0] if sv.size and sv[0] > 0 else 1.0
    relative = sv / largest
    small = relative < rank_tolerance
    rank = int(np.count_nonzero(~small)) if sv[0] > 0 else 0
    not_identified: set[int] = set()
    for k in np.flatnonzero(small):
        not_identified.update(int(i) for i in np.flatnonzero(np.abs(vt[k]) >= 0.3))
    if sv[0] <= 0:
        not_identified = set(range(theta.size))
    flags: list[str] = []
    parameters: dict[str, dict[str, Any]] = {}
    for i, name in enumerate(PARAMETER_NAMES):
        at = "lower" if theta[i] <= lo[i] + 1e-6 * span[i] else "upper" if theta[i] >= hi[i] - 1e-6 * span[i] else None
        zero_width = bool(
            boot is not None and boot.shape[0] > 1 and np.ptp(boot[:, i]) <= 1e-12 * max(abs(theta[i]), _TYPICAL[i])
        )
        parameters[name] = {"at_bound": at, "identifiable": i not in not_identified, "ci_zero_width": zero_width}
        bound_si = (lo[i] if at == "lower" else hi[i]) / _TO_INTERNAL[i] if at else None
        if at:
            flags.append(
                f"{name} is at the {at} bound of its search range ({bound_si:.4g}, fit.{name}_bounds): its value and "
                "range are set by the bound, not estimated from the data"
            )
        if i in not_identified:
            flags.append(
                f"{name} is not identifiable from these data (the Jacobian of the residuals has rank {rank} < "
                f"{theta.size}; changing {name} can be compensated by the other parameters or does not change the fit)"
            )
        if zero_width:
            flags.append(f"{name} has a zero-width bootstrap range: resampling the particles never changes it")
    return {
        "n_observations": distinct_observations(problem),
        "n_parameters": int(theta.size),
        "jacobian_rank": rank,
        "singular_values_relative": [float(v) for v in relative],
        "flags": flags,
        "parameters": parameters,
    }


def _polish(
    problem: FitProblem, theta: np.ndarray, cost: np.ndarray, lo: np.ndarray, hi: np.ndarray, n_best: int = 5
) -> tuple[np.ndarray, float]:
    """Refine the best multi-start results with SciPy's trust-region reflective solver; keep the best."""
    from scipy.optimize import least_squares

    order = np.argsort(np.where(np.isfinite(cost), cost, np.inf))[:n_best]
    best_theta, best_cost = theta[order[0]].copy(), float(cost[order[0]])
    for i in order:
        try:
            ref = least_squares(
                lambda th: problem.residuals(th[None, :])[0],
                np.clip(theta[i], lo, hi),
                bounds=(lo, hi),
                x_scale=_TYPICAL,
            )
        except ValueError:  # pragma: no cover - e.g. a start exactly on a bound SciPy rejects
            continue
        if np.isfinite(ref.cost) and ref.cost < best_cost:
            best_theta, best_cost = ref.x.copy(), float(ref.cost)
    return best_theta, best_cost


def _goodness(problem: FitProblem, theta: np.ndarray, cost: float) -> dict[str, Any]:
    alpha0, kappa0, delta0 = theta[:3]
    traj = gap_trajectories(problem.grid, alpha0, kappa0, delta0, problem.cycles, problem.expansion)
    _, mean, std = gap_statistics(traj, theta[3])
    c, j, w = problem.cycle_obs, problem._idx_obs, problem._w_obs
    mu = (1 - w) * mean[c, j] + w * mean[c, j + 1]
    sd = (1 - w) * std[c, j] + w * std[c, j + 1]
    err = problem.gap_obs - mu
    ss_tot = float(np.sum((problem.gap_obs - problem.gap_obs.mean()) ** 2))
    out: dict[str, Any] = {
        "cost": float(cost),
        "n_particles": int(problem.n_all),
        "n_particles_fitted": int(problem.n_gap),
        "gap_rmse_m": float(np.sqrt(np.mean(err**2))) * 1e-6,
        "gap_r2": float(1.0 - np.sum(err**2) / ss_tot) if ss_tot > 0 else None,
        "gap_within_1std_fraction": float(np.mean(np.abs(err) <= sd + 1e-12)),
        "gap_mean_residual_m_per_cycle": {int(cy): float(np.mean(err[c == cy])) * 1e-6 for cy in np.unique(c)},
    }
    if problem.cap_cycles.size:
        _, cap = problem.predict(theta[None, :])
        cerr = problem.cap_values - cap[0, problem.cap_cycles]
        out["capacity_rmse"] = float(np.sqrt(np.mean(cerr**2)))
        out["capacity_model"] = {int(cy): float(v) for cy, v in zip(problem.cap_cycles, cap[0, problem.cap_cycles])}
    return out


def _fmt(theta: np.ndarray) -> str:
    return f"alpha0={theta[0]:.3g}, kappa0={theta[1]:.3g} um, delta0={theta[2]:.3g} um, zeta0={theta[3]:.3g} 1/um"
