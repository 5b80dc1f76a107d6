"""The 1D detachment model of Müller et al. (2018): Maxwell material, adhesion, SEI growth, disconnection.

Reconstructed from the paper's main text (its Supplementary Note 10 is not available); the
equations and every assumption are in ``docs/detachment.md``. In short, per Si particle of
delithiated radius ``r`` and per cycle:

* lithiation (one half-cycle, ``tau`` in 0..1): the contact surface (Si surface + SEI) moves
  out linearly by ``Delta(r) + delta0`` with ``Delta(r) = r ((1 + dV/V)^(1/3) - 1)``; the SEI
  thickness grows by ``delta0``;
* delithiation: the Si surface moves back in linearly by ``Delta(r)`` (the SEI stays);
* the surrounding effective medium is a Maxwell element with rest position ``s`` and spring
  compression ``x = u - s`` while in contact, ``dx/dtau = du/dtau - alpha0 x``
  (:mod:`~fem_anode.detachment.maxwell`);
* adhesion: in contact, the medium stays attached under tension until ``x = -kappa0``; then it
  detaches, the spring relaxes (the wall jumps to its rest position ``s``) and the gap opens;
  a detached wall does not move (no force, ``ds/dtau = 0``) until the surface touches it again
  on a later lithiation, when contact and adhesion are restored;
* the gap of a delithiated particle, measured from the Si surface, is ``d = s`` when detached
  and ``d = h_SEI`` (only SEI between Si and the medium) when attached;
* after every cycle an active particle disconnects with probability ``p = min(1, zeta0 d)``
  and stops cycling (its gap freezes); the number of active cycles is therefore random and
  gives the spread of gaps at equal radius.

All functions are vectorised: parameters broadcast against the radii, so a batch of parameter
sets (bootstrap replicates) is one array operation per half-cycle.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, cast

import numpy as np
from numpy.typing import ArrayLike

from fem_anode.detachment.maxwell import ramp_compression, relaxation_factor, time_to_tension
from fem_anode.detachment.settings import ModelParameters, SizeDistribution
from fem_anode.errors import InputError, UsageError

__all__ = [
    "gap_trajectories",
    "gap_statistics",
    "cycle_major_trajectories",
    "cycle_major_statistics",
    "capacity_retention",
    "default_radii",
    "SimulationResult",
    "simulate",
    "scenarios",
]

logger = logging.getLogger(__name__)


def gap_trajectories(
    radii: ArrayLike,
    alpha0: ArrayLike,
    kappa0: ArrayLike,
    delta0: ArrayLike,
    cycles: int,
    linear_expansion: float,
) -> np.ndarray:
    """Gap after ``n = 0..cycles`` active cycles of particles that keep cycling (deterministic).

    Args:
        radii: delithiated particle radii (any length unit, broadcast with the parameters).
        alpha0: E/eta times the half-cycle duration (>= 0).
        kappa0: adhesion length (same unit as the radii, >= 0).
        delta0: SEI growth per lithiation (same unit, >= 0).
        cycles: number of cycles N (>= 0).
        linear_expansion: radial strain of full lithiation, ``(1 + dV/V)^(1/3) - 1``.

    Returns:
        Array of shape ``broadcast(...) + (cycles + 1,) + radii.shape[-1:]`` with
        ``d[..., n, i]`` the gap of particle ``i`` at the end of cycle ``n`` (``d[..., 0, :] = 0``).
    """
    out = cycle_major_trajectories(radii, alpha0, kappa0, delta0, cycles, linear_expansion)
    return np.moveaxis(out, 0, -2) if out.ndim > 1 else out


def cycle_major_trajectories(
    radii: ArrayLike,
    alpha0: ArrayLike,
    kappa0: ArrayLike,
    delta0: ArrayLike,
    cycles: int,
    linear_expansion: float,
) -> np.ndarray:
    """As :func:`gap_trajectories` but with the cycle axis first, ``(cycles + 1, ...)`` (contiguous)."""
    r = np.asarray(radii, dtype=float)
    alpha, kappa, delta = (np.asarray(a, dtype=float) for a in (alpha0, kappa0, delta0))
    shape = np.broadcast_shapes(r.shape, alpha.shape, kappa.shape, delta.shape)
    grow = np.broadcast_to(linear_expansion * r, shape)  # Delta(r): radial swing of the Si surface
    alpha, kappa, delta = (np.broadcast_to(a, shape) for a in (alpha, kappa, delta))
    sei = np.zeros(shape)  # SEI thickness h = contact-surface position when delithiated
    rest = np.zeros(shape)  # rest position s of the medium's inner wall (its position when detached)
    comp = np.zeros(shape)  # spring compression x = u - s while attached
    attached = np.ones(shape, dtype=bool)
    decay1 = np.exp(-alpha)  # one full half-cycle of the Maxwell ramp (see maxwell.ramp_compression)
    relax1 = relaxation_factor(alpha, 1.0)
    out = np.empty((cycles + 1, *shape))
    out[0] = 0.0
    for n in range(1, cycles + 1):
        # Lithiation: u goes from h to h + Delta + delta0 at rate v = Delta + delta0.
        rate = grow + delta
        gap0 = rest - sei
        safe_rate = np.where(rate > 0, rate, 1.0)
        touch = attached | ((gap0 < rate) & (rate > 0))
        t_contact = np.where(attached, 0.0, np.clip(gap0 / safe_rate, 0.0, 1.0))
        x_start = np.where(attached, comp, 0.0)
        x_end = ramp_compression(x_start, rate, alpha, 1.0 - t_contact)
        sei = sei + delta
        u_end = sei + grow
        comp = np.where(touch, x_end, 0.0)
        rest = np.where(touch, u_end - x_end, rest)
        attached = touch
        # Delithiation: u goes from h + Delta back to h at rate -Delta.
        t_detach = time_to_tension(comp, grow, alpha, kappa)
        detach = attached & (t_detach <= 1.0)
        stay = attached & ~detach
        x_stay = comp * decay1 - grow * relax1  # = ramp_compression(comp, -grow, alpha, 1)
        # At detachment the spring relaxes: the wall jumps to u(t*) + kappa and stays there.
        wall = sei + grow * (1.0 - np.where(detach, t_detach, 0.0)) + kappa
        rest = np.where(detach, wall, np.where(stay, sei - x_stay, rest))
        comp = np.where(stay, x_stay, 0.0)
        attached = stay
        out[n] = np.where(attached, sei, rest)
    return out


def gap_statistics(gaps: np.ndarray, zeta0: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Survival, mean and standard deviation of the gap over the random number of active cycles.

    After each cycle ``k`` an active particle disconnects with ``p_k = min(1, zeta0 d_k)``; the
    survival is ``S_n = prod_{k<=n} (1 - p_k)``. A particle observed after cycle ``c`` has done
    ``K = k < c`` active cycles with probability ``S_{k-1} p_k`` and all ``c`` with ``S_{c-1}``;
    its gap is ``d_K``.

    Args:
        gaps: ``d[..., n, i]`` from :func:`gap_trajectories` (length unit L).
        zeta0: slope of p(d) in 1/L, broadcast against ``gaps[..., 0, :]``.

    Returns:
        ``(survival, mean, std)``, each shaped like ``gaps``; ``survival[..., n, i]`` is the
        probability that particle ``i`` is still connected after cycle ``n``.
    """
    zeta = np.asarray(zeta0, dtype=float)[..., None, :] if np.ndim(zeta0) else float(np.asarray(zeta0))
    lead = np.moveaxis(gaps, -2, 0)
    zeta_lead = (
        np.moveaxis(np.broadcast_to(zeta, np.broadcast_shapes(np.shape(zeta), gaps.shape)), -2, 0)
        if np.ndim(zeta)
        else zeta
    )
    survival, mean, std = cycle_major_statistics(np.ascontiguousarray(lead), zeta_lead, with_std=True)
    std = cast(np.ndarray, std)  # with_std=True: never None
    return np.moveaxis(survival, 0, -2), np.moveaxis(mean, 0, -2), np.moveaxis(std, 0, -2)


def cycle_major_statistics(
    gaps: np.ndarray, zeta0: ArrayLike, with_std: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """As :func:`gap_statistics` with the cycle axis first (``zeta0`` broadcast against ``gaps``)."""
    p = np.clip(np.asarray(zeta0) * gaps, 0.0, 1.0)
    p[0] = 0.0
    survival = np.cumprod(1.0 - p, axis=0)
    before = np.empty_like(survival)  # S_{n-1}
    before[0] = 1.0
    before[1:] = survival[:-1]
    q = before * p  # probability to disconnect right after cycle k
    first = np.empty_like(q)  # sum over k < c of q_k d_k
    first[0] = 0.0
    np.cumsum((q * gaps)[:-1], axis=0, out=first[1:])
    mean = first + before * gaps
    if not with_std:
        return survival, mean, None
    second = np.empty_like(q)
    second[0] = 0.0
    np.cumsum((q * gaps**2)[:-1], axis=0, out=second[1:])
    var = second + before * gaps**2 - mean**2
    return survival, mean, np.sqrt(np.maximum(var, 0.0))


def capacity_retention(survival: np.ndarray, radii: ArrayLike, counts: ArrayLike | None = None) -> np.ndarray:
    """Volume-weighted fraction of Si still connected after each cycle, shape ``survival.shape[:-1]``.

    ``C_n = sum_i w_i r_i^3 S_n(r_i) / sum_i w_i r_i^3`` with number weights ``w_i`` (``counts``,
    default 1; may carry leading batch axes, e.g. bootstrap resampling counts).
    """
    r3 = np.asarray(radii, dtype=float) ** 3
    w = r3 if counts is None else np.asarray(counts, dtype=float) * r3
    w = np.broadcast_to(w, survival.shape[:-2] + survival.shape[-1:])
    total = w.sum(axis=-1)
    return np.einsum("...ni,...i->...n", survival, w) / total[..., None]


def default_radii(distribution: SizeDistribution | None = None) -> np.ndarray:
    """Radii (m) at the mid-quantiles of the truncated log-normal number distribution.

    ``n_radii`` equally probable radii: ``r_j = median * gsd^Phi^-1(u_j)`` with ``u_j`` the
    mid-points of ``n_radii`` equal slices of the probability between ``min_radius`` and
    ``max_radius``. Deterministic, so results built on it are reproducible.
    """
    from scipy.special import ndtr, ndtri

    dist = distribution or SizeDistribution()
    sigma = np.log(dist.geometric_std)
    if sigma == 0:
        return np.full(dist.n_radii, dist.median_radius)
    lo, hi = (ndtr(np.log(v / dist.median_radius) / sigma) for v in (dist.min_radius, dist.max_radius))
    u = lo + (hi - lo) * (np.arange(dist.n_radii) + 0.5) / dist.n_radii
    return dist.median_radius * np.exp(sigma * ndtri(u))


def check_radii(radii: ArrayLike, what: str = "radii") -> np.ndarray:
    """1D float array of finite positive radii, or an :class:`InputError` naming the problem."""
    r = np.asarray(radii, dtype=float).ravel()
    if r.size == 0:
        raise InputError(f"{what}: no radii given")
    if not np.all(np.isfinite(r)):
        raise InputError(f"{what}: {int(np.count_nonzero(~np.isfinite(r)))} radii are NaN or infinite")
    if np.any(r <= 0):
        raise InputError(
            f"{what}: {int(np.count_nonzero(r <= 0))} radii are zero or negative (smallest {r.min():.3g} m)"
        )
    from fem_anode.units import NUMERIC_LIMITS

    if r.min() < NUMERIC_LIMITS[0] or r.max() > NUMERIC_LIMITS[1]:
        raise InputError(
            f"{what}: radii must lie between {NUMERIC_LIMITS[0]:g} and {NUMERIC_LIMITS[1]:g} m to be computed with, "
            f"got {r.min():.3g} to {r.max():.3g} m"
        )
    return r


@dataclasses.dataclass
class SimulationResult:
    """Model prediction for a particle population (SI units).

    Attributes:
        parameters: the model settings used.
        radii: particle radii (m), sorted ascending.
        capacity_retention: connected Si volume fraction after cycles ``0..N``.
        gap_deterministic: ``[n, i]`` gap (m) after ``n`` active cycles.
        gap_mean: ``[n, i]`` expected gap (m) observed after cycle ``n``.
        gap_std: ``[n, i]`` its standard deviation (m).
        survival: ``[n, i]`` probability that particle ``i`` is connected after cycle ``n``.
    """

    parameters: ModelParameters
    radii: np.ndarray
    capacity_retention: np.ndarray
    gap_deterministic: np.ndarray
    gap_mean: np.ndarray
    gap_std: np.ndarray
    survival: np.ndarray

    @property
    def cycles(self) -> np.ndarray:
        return np.arange(self.capacity_retention.size)

    def detachment_radius(self) -> float:
        """Smallest radius (m) whose medium detaches within the simulated cycles (``inf`` if none)."""
        sei_only = np.isclose(
            self.gap_deterministic[-1], self.parameters.delta0 * self.parameters.cycles, rtol=1e-9, atol=0.0
        )
        detached = ~sei_only
        return float(self.radii[detached].min()) if detached.any() else float("inf")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready results: ``capacity_retention`` per cycle and ``gap`` mean/std per radius and cycle."""
        return {
            "units": {"radius_m": "m", "mean_m": "m", "std_m": "m", "capacity_retention": "fraction of Si volume"},
            "parameters": self.parameters.to_dict(),
            "parameters_paper_units": {
                "alpha0": self.parameters.alpha0,
                "kappa0_um": self.parameters.kappa0 * 1e6,
                "delta0_um": self.parameters.delta0 * 1e6,
                "zeta0_per_um": self.parameters.zeta0 * 1e-6,
                "E_over_eta_per_h": self.parameters.alpha0 / self.parameters.half_cycle_hours,
                "sei_growth_nm_per_h": self.parameters.delta0 * 1e9 / self.parameters.half_cycle_hours,
            },
            "cycles": self.cycles.tolist(),
            "capacity_retention": self.capacity_retention.tolist(),
            "detachment_radius_m": self.detachment_radius(),
            "gap": {
                "radius_m": self.radii.tolist(),
                "cycles": self.cycles.tolist(),
                "mean_m": self.gap_mean.tolist(),
                "std_m": self.gap_std.tolist(),
                "deterministic_m": self.gap_deterministic.tolist(),
            },
        }


def simulate(
    parameters: ModelParameters, radii: ArrayLike | None = None, *, distribution: SizeDistribution | None = None
) -> SimulationResult:
    """Run the model for a particle population.

    Args:
        parameters: model parameters (SI units) and number of cycles.
        radii: particle radii in metres (one entry per particle, number-weighted); default:
            :func:`default_radii` of ``distribution``.
        distribution: size distribution used when ``radii`` is ``None``.

    Raises:
        InputError: radii empty, non-finite or not positive.
        UsageError: invalid parameters.
    """
    parameters.check("model")
    r = default_radii(distribution) if radii is None else check_radii(radii)
    r = np.sort(r)
    if parameters.alpha0 <= 0:
        raise UsageError("model.alpha0 must be positive")
    d = gap_trajectories(
        r, parameters.alpha0, parameters.kappa0, parameters.delta0, parameters.cycles, parameters.linear_expansion
    )
    survival, mean, std = gap_statistics(d, parameters.zeta0)
    capacity = capacity_retention(survival, r)
    logger.debug(
        "simulated %d particles over %d cycles: capacity after last cycle %.3f", r.size, parameters.cycles, capacity[-1]
    )
    return SimulationResult(parameters, r, capacity, d, mean, std, survival)


def scenarios(parameters: ModelParameters) -> dict[str, ModelParameters]:
    """The paper's Fig. 4d scenarios: fitted, -50 % alpha0, +100 % kappa0, -50 % delta0, all three.

    Args:
        parameters: the fitted (or paper) parameters.

    Returns:
        Scenario name -> parameters (the first is ``parameters`` itself).
    """
    p = parameters
    return {
        "fitted": p,
        "alpha0 -50%": p.replace(alpha0=0.5 * p.alpha0),
        "kappa0 +100%": p.replace(kappa0=2.0 * p.kappa0),
        "delta0 -50%": p.replace(delta0=0.5 * p.delta0),
        "all three improved": p.replace(alpha0=0.5 * p.alpha0, kappa0=2.0 * p.kappa0, delta0=0.5 * p.delta0),
    }
