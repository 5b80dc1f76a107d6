r"""Closed-form solutions used to verify the solvers (pure NumPy/SciPy).

Plane sheet with surface evaporation (Crank, *The Mathematics of Diffusion*, 2nd ed., 1975,
section 4.3.2, eqs. 4.53-4.54): a strip ``0 <= x <= l`` initially at c = 0, no flux at
``x = 0`` and a mass-transfer boundary ``-D' dc/dx = alpha' (c - c_bulk)`` at ``x = l``:

.. math::

    \frac{c(x,t)}{c_\mathrm{bulk}} = 1 - \sum_n \frac{2 B \cos(\beta_n x/l)\, e^{-\beta_n^2 T}}
        {(\beta_n^2 + B^2 + B)\cos\beta_n},\qquad
    \frac{\bar c(t)}{c_\mathrm{bulk}} = 1 - \sum_n \frac{2 B^2 e^{-\beta_n^2 T}}{\beta_n^2(\beta_n^2 + B^2 + B)},

with ``beta_n tan beta_n = B``, Biot number ``B = l alpha'/D'`` and ``T = D' t / l^2``. For the
model ``eps dc/dt = D_eff c''`` with inflow ``k_f (c_bulk - c)``: ``D' = D_eff/eps``,
``alpha' = k_f/eps``, so ``B = l k_f / D_eff`` and ``T = D_eff t / (eps l^2)``.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import brentq

__all__ = ["robin_sheet_roots", "robin_sheet_mean", "robin_sheet_profile"]


def robin_sheet_roots(biot: float, n_terms: int = 200) -> np.ndarray:
    """First ``n_terms`` positive roots of ``beta tan beta = biot``."""
    roots = np.empty(n_terms)
    for n in range(n_terms):
        low, high = n * np.pi + 1e-12, n * np.pi + np.pi / 2 - 1e-12
        roots[n] = brentq(lambda b: b * np.sin(b) - biot * np.cos(b), low, high, xtol=1e-15, maxiter=200)
    return roots


def robin_sheet_mean(
    t: np.ndarray | float, length: float, D_eff: float, eps: float, k_f: float, n_terms: int = 200
) -> np.ndarray:
    """Mean c / c_bulk over the strip at times ``t`` (s); lengths in m, D in m^2/s, k_f in m/s."""
    biot = length * k_f / D_eff
    beta = robin_sheet_roots(biot, n_terms)
    T = np.atleast_1d(np.asarray(t, dtype=float)) * D_eff / (eps * length**2)
    terms = 2 * biot**2 / (beta**2 * (beta**2 + biot**2 + biot))
    return 1.0 - (terms[None, :] * np.exp(-np.outer(T, beta**2))).sum(axis=1)


def robin_sheet_profile(
    x: np.ndarray, t: float, length: float, D_eff: float, eps: float, k_f: float, n_terms: int = 200
) -> np.ndarray:
    """c / c_bulk at distances ``x`` (m) from the no-flux end at time ``t`` (s)."""
    biot = length * k_f / D_eff
    beta = robin_sheet_roots(biot, n_terms)
    T = t * D_eff / (eps * length**2)
    coeff = 2 * biot * np.exp(-(beta**2) * T) / ((beta**2 + biot**2 + biot) * np.cos(beta))
    return 1.0 - (coeff[None, :] * np.cos(np.outer(np.asarray(x) / length, beta))).sum(axis=1)
