"""The Maxwell element (spring E in series with damper eta) under a prescribed displacement ramp.

A spring of stiffness ``k`` in series with a damper of viscosity ``c`` carries one force
``F = k (u - s)`` where ``u`` is the imposed end displacement and ``s`` the damper position (the
element's *rest position*: where its end would sit without force). The damper obeys
``c ds/dt = F``, so with the spring compression ``x = u - s``::

    dx/dt = du/dt - (k/c) x            (Maxwell ODE; k/c = E/eta for a bar of unit length)

In the time of one half-cycle, ``tau = t / t_half``, and with ``alpha0 = (E/eta) t_half`` and a
linear ramp ``u = u_a + v tau``::

    dx/dtau = v - alpha0 x   =>   x(tau) = x0 exp(-alpha0 tau) + v (1 - exp(-alpha0 tau)) / alpha0

Everything here is written with ``expm1``/``log1p`` so that ``alpha0 -> 0`` (a pure spring)
is exact and stable. Arrays broadcast; lengths are in any consistent unit.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["ramp_compression", "relaxation_factor", "time_to_tension", "maxwell_ode_rhs"]


def relaxation_factor(alpha: ArrayLike, tau: ArrayLike) -> np.ndarray:
    """``(1 - exp(-alpha tau)) / alpha``, with its limit ``tau`` at ``alpha = 0``."""
    alpha = np.asarray(alpha, dtype=float)
    tau = np.asarray(tau, dtype=float)
    safe = np.where(alpha > 0, alpha, 1.0)
    return np.where(alpha > 0, -np.expm1(-safe * tau) / safe, tau)


def ramp_compression(x0: ArrayLike, rate: ArrayLike, alpha: ArrayLike, tau: ArrayLike) -> np.ndarray:
    """Spring compression ``x(tau)`` of a Maxwell element under ``du/dtau = rate`` from ``x(0) = x0``.

    Args:
        x0: initial spring compression (positive = compression, negative = tension).
        rate: displacement rate of the driven end per half-cycle (length).
        alpha: ``alpha0 = (E/eta) t_half`` (dimensionless, >= 0).
        tau: time in half-cycles since the start of the ramp.
    """
    alpha = np.asarray(alpha, dtype=float)
    tau = np.asarray(tau, dtype=float)
    return np.asarray(x0) * np.exp(-alpha * tau) + np.asarray(rate) * relaxation_factor(alpha, tau)


def time_to_tension(x0: ArrayLike, shrink: ArrayLike, alpha: ArrayLike, kappa: ArrayLike) -> np.ndarray:
    """Time (half-cycles) at which an unloading ramp brings the compression to ``-kappa``.

    Solves ``ramp_compression(x0, -shrink, alpha, tau) = -kappa`` for ``tau``:
    ``tau* = log1p(alpha (x0 + kappa) / (shrink - alpha kappa)) / alpha`` (limit
    ``(x0 + kappa) / shrink`` at ``alpha = 0``). Returns ``inf`` where the tension never reaches
    ``kappa`` (``shrink <= alpha kappa``: creep relaxes the tension faster than it builds).

    Args:
        x0: compression at the start of the unloading (> -kappa).
        shrink: magnitude of the (negative) displacement rate, >= 0.
        alpha: ``alpha0`` (>= 0).
        kappa: adhesion length, >= 0.
    """
    x0, shrink, alpha, kappa = np.broadcast_arrays(*(np.asarray(a, dtype=float) for a in (x0, shrink, alpha, kappa)))
    denom = shrink - alpha * kappa
    reachable = denom > 0
    safe_denom = np.where(reachable, denom, 1.0)
    arg = np.maximum(x0 + kappa, 0.0) / safe_denom
    safe_alpha = np.where(alpha > 0, alpha, 1.0)
    tau = np.where(alpha > 0, np.log1p(safe_alpha * arg) / safe_alpha, arg)
    return np.where(reachable, tau, np.inf)


def maxwell_ode_rhs(x: float, rate: float, alpha: float) -> float:
    """Right-hand side ``dx/dtau = rate - alpha x`` of the Maxwell ODE (for reference integrators)."""
    return rate - alpha * x
