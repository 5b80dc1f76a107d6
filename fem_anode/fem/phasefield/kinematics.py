r"""Kinematics of the cross-section: F = Fe Fc Fp with an isotropic chemical stretch.

The mesh is the reference (unlithiated, stress-free) cross-section in the (x, y) plane. The
3D deformation gradient is block diagonal,

.. math::

    F = \begin{pmatrix} I + \nabla u & 0 \\ 0 & \lambda \end{pmatrix},

with the in-plane displacement ``u`` and a uniform axial stretch ``lambda``: an unknown with
zero net axial force for generalised plane strain, ``lambda = 1`` for plane strain. The
chemical part is ``Fc = s(c) I`` with

.. math::

    s(c) = 1 + \beta\,\frac{c - c_\min}{c_\max - c_\min},

so full lithiation multiplies the volume by ``(1 + beta)^3`` (= 4.0 for beta = 0.5874). The
Young's modulus is interpolated linearly between ``E_max`` (``c = c_min``) and ``E_min``
(``c = c_max``). Functions accept NumPy arrays or UFL expressions.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "lithiation_fraction",
    "chemical_stretch",
    "chemical_stretch_derivative",
    "youngs_modulus",
    "youngs_modulus_derivative",
    "lame",
]


def lithiation_fraction(c: Any, c_min: float, c_max: float) -> Any:
    """(c - c_min) / (c_max - c_min): 0 unlithiated, 1 fully lithiated."""
    return (c - c_min) / (c_max - c_min)


def chemical_stretch(c: Any, beta: float, c_min: float, c_max: float) -> Any:
    """Isotropic chemical stretch s(c), Fc = s I."""
    return 1 + beta * lithiation_fraction(c, c_min, c_max)


def chemical_stretch_derivative(beta: float, c_min: float, c_max: float) -> float:
    """ds/dc (a constant)."""
    return beta / (c_max - c_min)


def youngs_modulus(c: Any, e_max: float, e_min: float, c_min: float, c_max: float) -> Any:
    """Young's modulus, linear in c between e_max at c_min and e_min at c_max (not clipped)."""
    return e_max + (e_min - e_max) * lithiation_fraction(c, c_min, c_max)


def youngs_modulus_derivative(e_max: float, e_min: float, c_min: float, c_max: float) -> float:
    """dE/dc (a constant)."""
    return (e_min - e_max) / (c_max - c_min)


def lame(E: Any, nu: float) -> tuple[Any, Any]:
    """Bulk modulus K and shear modulus G from Young's modulus and Poisson ratio."""
    return E / (3 * (1 - 2 * nu)), E / (2 * (1 + nu))
