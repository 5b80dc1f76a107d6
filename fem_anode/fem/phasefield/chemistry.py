r"""Regular-solution chemistry of Li in Si (eq. 3 of the paper, normalised by ``c_max R T``).

.. math::

    f(c) = c\ln c + (1-c)\ln(1-c) + \Omega\,c(1-c),\qquad
    f'(c) = \ln\frac{c}{1-c} + \Omega(1-2c).

For ``Omega > 2`` the double well separates Li-poor and Li-rich phases; with ``Omega = 2.6`` the
binodal compositions are 0.124 and 0.876, near the paper's ``c_min = 0.14`` and
``c_max = 0.86``. The functions accept NumPy arrays or UFL expressions. In the UFL forms the
logarithms see ``c`` clipped to ``[CLIP, 1 - CLIP]`` so that a Newton iterate outside (0, 1)
gives a large finite residual (and a backtracking line search) rather than NaN.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["free_energy", "chemical_potential", "binodal", "CLIP"]

#: Clipping of c inside the logarithms of the UFL forms.
CLIP = 1e-12


def _log(x: Any) -> Any:
    if isinstance(x, (float, int, np.ndarray, np.floating)):
        return np.log(x)
    import ufl

    return ufl.ln(x)


def _clip(c: Any) -> Any:
    if isinstance(c, (float, int, np.ndarray, np.floating)):
        return np.clip(c, CLIP, 1 - CLIP)
    import ufl

    return ufl.max_value(ufl.min_value(c, 1 - CLIP), CLIP)


def free_energy(c: Any, omega: float) -> Any:
    """Normalised regular-solution free energy density f(c) (NumPy or UFL)."""
    cc = _clip(c)
    return cc * _log(cc) + (1 - cc) * _log(1 - cc) + omega * c * (1 - c)


def chemical_potential(c: Any, omega: float) -> Any:
    """Homogeneous part f'(c) = ln(c/(1-c)) + Omega (1 - 2c) of the chemical potential."""
    cc = _clip(c)
    return _log(cc) - _log(1 - cc) + omega * (1 - 2 * c)


def binodal(omega: float) -> tuple[float, float]:
    """The two coexisting compositions (common tangent) of the symmetric double well, Omega > 2.

    Solves ``ln(c/(1-c)) = Omega (2c - 1)`` for ``c < 1/2`` by bisection; the other root is
    ``1 - c`` by symmetry.

    Raises:
        ValueError: ``omega <= 2`` (no miscibility gap).
    """
    if omega <= 2:
        raise ValueError(f"no miscibility gap for Omega = {omega} <= 2")
    low, high = 1e-15, 0.5 - 1e-15
    # g(c) = ln(c/(1-c)) - Omega(2c - 1): < 0 near 0, > 0 just below the spinodal, root between
    spinodal = 0.5 * (1 - np.sqrt(1 - 2 / omega))
    high = spinodal
    for _ in range(200):
        mid = 0.5 * (low + high)
        g = np.log(mid / (1 - mid)) - omega * (2 * mid - 1)
        if g > 0:
            high = mid
        else:
            low = mid
    c = 0.5 * (low + high)
    return float(c), float(1 - c)
