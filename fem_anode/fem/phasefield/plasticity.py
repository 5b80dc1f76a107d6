r"""Finite-strain J2 plasticity: Hencky elasticity and the radial return in logarithmic strain.

Constitutive choice (documented in ``docs/phasefield.md``). With ``F = Fe Fc Fp`` and the
isotropic chemical stretch ``Fc = s I``, the elastic left Cauchy-Green tensor of a step is

.. math::

    b_e^{trial} = \bar F\, C_p^{-1}\, \bar F^T,\qquad \bar F = F / s,

with the plastic state ``Cp^-1 = Fp^-1 Fp^-T`` of the previous step. The elastic law is linear
(Hooke) in the logarithmic elastic strain ``eps_e = ln(b_e) / 2`` with the Kirchhoff stress
of the stress-free (intermediate) configuration, ``tau = K tr(eps_e) I + 2 G dev(eps_e)``;
the Cauchy stress is ``sigma = tau / J_e``, ``J_e = det Fe = exp(tr eps_e)``. J2 plasticity
is perfectly plastic with the associated flow rule and the yield condition on the Cauchy
stress, ``sqrt(3/2) |dev sigma| <= sigma_Y``. Integrated with the exponential map (Simo
1992), the return is the small-strain radial return in ``eps_e``:

.. math::

    q^{tr} = \sqrt{3/2}\,|2G\,\mathrm{dev}\,\varepsilon^{tr}|,\quad
    f = q^{tr} - \sigma_Y J_e,\quad
    \Delta\gamma = \langle f\rangle / (3G),\quad
    \mathrm{dev}\,\varepsilon_e = \frac{\min(q^{tr}, \sigma_Y J_e)}{q^{tr}}\,\mathrm{dev}\,\varepsilon^{tr},

plastic flow is isochoric (``tr eps_e = tr eps^tr``), and the new state is
``Cp^-1 = Fbar^-1 exp(2 eps_e) Fbar^-T``, ``eq. plastic strain += Delta gamma``. Because
every step above is a closed-form expression, it is written in UFL (with conditionals) and
the consistent tangent is its exact derivative, so Newton converges quadratically.

On the cross-section the tensors are block diagonal (2x2 in-plane block and the zz entry);
the logarithm and exponential of the 2x2 block are in closed form, with a series where the
two eigenvalues coincide. :func:`return_map_numpy` is an independent NumPy implementation
for full 3x3 tensors (eigen-decomposition), used to check the UFL one.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from fem_anode.fem.phasefield.kinematics import lame

__all__ = [
    "ReturnMap",
    "return_map_ufl",
    "return_map_numpy",
    "state_update_ufl",
    "uniaxial_plastic_closed_form",
    "STATE_SIZE",
]

#: Plastic state per quadrature point: Cp^-1 components xx, xy, yy, zz and the eq. plastic strain.
STATE_SIZE = 5
_SERIES = 1e-4  # below this squared relative eigenvalue gap the 2x2 log/exp use series
_TINY = 1e-300
#: Relative yield tolerance: a point on the yield surface (f = 0 to round-off, as every plastic
#: point is at the start of the next step) is elastic until f > YIELD_TOL sigma_Y J_e. Without
#: it the branch, and so the Newton path, would be decided by round-off (and differ between
#: partitions).
YIELD_TOL = 1e-10


def _log_spd2(A: Any) -> Any:
    """Logarithm of a symmetric positive definite 2x2 UFL tensor (closed form)."""
    import ufl

    m = ufl.tr(A) / 2
    D = A - m * ufl.Identity(2)
    d2 = ufl.inner(D, D) / 2  # eigenvalues m +- sqrt(d2)
    x2 = d2 / m**2
    series = (1 + x2 / 3 + x2**2 / 5 + x2**3 / 7 + x2**4 / 9) / m  # atanh(x)/(x m)
    d = ufl.sqrt(ufl.max_value(d2, _TINY))
    x = d / m
    exact = 0.5 * ufl.ln((1 + x) / (1 - x)) / d
    g = ufl.conditional(ufl.lt(x2, _SERIES), series, exact)
    return 0.5 * ufl.ln(m**2 - d2) * ufl.Identity(2) + g * D


def _exp_sym2(E: Any) -> Any:
    """Exponential of a symmetric 2x2 UFL tensor (closed form)."""
    import ufl

    m = ufl.tr(E) / 2
    D = E - m * ufl.Identity(2)
    d2 = ufl.inner(D, D) / 2
    d = ufl.sqrt(ufl.max_value(d2, _TINY))
    small = ufl.lt(d2, _SERIES)
    cosh = ufl.conditional(small, 1 + d2 / 2 + d2**2 / 24 + d2**3 / 720, ufl.cosh(d))
    sinhc = ufl.conditional(small, 1 + d2 / 6 + d2**2 / 120 + d2**3 / 5040, ufl.sinh(d) / d)
    return ufl.exp(m) * (cosh * ufl.Identity(2) + sinhc * D)


@dataclasses.dataclass
class ReturnMap:
    """Result of the return map (UFL expressions; in-plane 2x2 blocks and zz entries).

    Attributes:
        tau, tau_zz: Kirchhoff stress of the intermediate configuration.
        eps, eps_zz: elastic logarithmic strain after the return.
        Je: det Fe.
        dgamma: equivalent plastic strain increment.
        q: von Mises Kirchhoff stress after the return (Cauchy von Mises = q / Je).
        energy: Hencky strain energy per unit intermediate volume.
        Fbar, lam_bar: F / s in-plane block and axial entry.
    """

    tau: Any
    tau_zz: Any
    eps: Any
    eps_zz: Any
    Je: Any
    dgamma: Any
    q: Any
    energy: Any
    Fbar: Any
    lam_bar: Any

    @property
    def pressure(self) -> Any:
        """Kirchhoff mean stress tr(tau) / 3."""
        import ufl

        return (ufl.tr(self.tau) + self.tau_zz) / 3


def return_map_ufl(F2: Any, lam: Any, s: Any, cp: Any, E: Any, nu: float, sigma_y: float, plastic: bool) -> ReturnMap:
    """The elastic predictor and radial return in UFL.

    Args:
        F2: in-plane 2x2 block of F (I + grad u).
        lam: axial stretch.
        s: chemical stretch s(c).
        cp: plastic state vector (UFL, length :data:`STATE_SIZE`) of the previous step.
        E: Young's modulus (UFL scalar), ``nu`` Poisson ratio, ``sigma_y`` yield strength.
        plastic: False for pure (Hencky) elasticity.
    """
    import ufl

    I2 = ufl.Identity(2)
    Cp2 = ufl.as_matrix([[cp[0], cp[1]], [cp[1], cp[2]]])
    Fbar = F2 / s
    lam_bar = lam / s
    be = Fbar * Cp2 * Fbar.T
    be = (be + be.T) / 2
    eps_tr = 0.5 * _log_spd2(be)
    eps_zz_tr = 0.5 * ufl.ln(lam_bar**2 * cp[3])
    trace = ufl.tr(eps_tr) + eps_zz_tr
    dev = eps_tr - trace / 3 * I2
    dev_zz = eps_zz_tr - trace / 3
    K, G = lame(E, nu)
    q_tr = 2 * G * ufl.sqrt(1.5 * (ufl.inner(dev, dev) + dev_zz**2) + 1e-30)
    Je = ufl.exp(trace)
    if plastic:
        f = q_tr - sigma_y * Je
        yielding = ufl.gt(f, YIELD_TOL * sigma_y * Je)
        factor = ufl.conditional(yielding, sigma_y * Je / q_tr, 1.0)
        dgamma = ufl.conditional(yielding, f / (3 * G), 0.0)
    else:
        factor, dgamma = 1.0, 0.0 * trace
    dev, dev_zz = factor * dev, factor * dev_zz
    tau = K * trace * I2 + 2 * G * dev
    tau_zz = K * trace + 2 * G * dev_zz
    energy = K / 2 * trace**2 + G * (ufl.inner(dev, dev) + dev_zz**2)
    q = factor * q_tr
    return ReturnMap(tau, tau_zz, dev + trace / 3 * I2, dev_zz + trace / 3, Je, dgamma, q, energy, Fbar, lam_bar)


def state_update_ufl(rm: ReturnMap, ep_old: Any) -> Any:
    """New plastic state vector ``[Cp^-1 xx, xy, yy, zz, eq. plastic strain]`` (UFL)."""
    import ufl

    be = _exp_sym2(2 * rm.eps)
    Finv = ufl.inv(rm.Fbar)
    cp2 = Finv * be * Finv.T
    cpzz = ufl.exp(2 * rm.eps_zz) / rm.lam_bar**2
    return ufl.as_vector([cp2[0, 0], (cp2[0, 1] + cp2[1, 0]) / 2, cp2[1, 1], cpzz, ep_old + rm.dgamma])


def return_map_numpy(
    F: np.ndarray,
    s: np.ndarray,
    cp_inv: np.ndarray,
    ep: np.ndarray,
    E: np.ndarray,
    nu: float,
    sigma_y: float,
    plastic: bool = True,
) -> dict[str, np.ndarray]:
    """Reference implementation for full 3x3 tensors, vectorised over points.

    Args:
        F: deformation gradients, shape (n, 3, 3).
        s: chemical stretches (n,); ``cp_inv``: Cp^-1 (n, 3, 3); ``ep``: eq. plastic strain (n,);
        E: Young's moduli (n,); ``nu``, ``sigma_y``: Poisson ratio, yield strength.
        plastic: apply the return map.

    Returns:
        ``tau``, ``sigma`` (Cauchy), ``eps`` (elastic log strain), ``cp_inv``, ``ep``,
        ``von_mises`` (Cauchy), ``Je``, ``dgamma``.
    """
    F = np.asarray(F, float)
    s = np.asarray(s, float)[:, None, None]
    Fbar = F / s
    be = Fbar @ cp_inv @ np.swapaxes(Fbar, 1, 2)
    be = 0.5 * (be + np.swapaxes(be, 1, 2))
    w, v = np.linalg.eigh(be)
    eps = np.einsum("nij,nj,nkj->nik", v, 0.5 * np.log(w), v)
    I = np.eye(3)
    trace = np.trace(eps, axis1=1, axis2=2)
    dev = eps - trace[:, None, None] / 3 * I
    K, G = lame(np.asarray(E, float), nu)
    q_tr = 2 * G * np.sqrt(1.5 * np.einsum("nij,nij->n", dev, dev))
    Je = np.exp(trace)
    f = q_tr - sigma_y * Je
    yielding = plastic & (f > YIELD_TOL * sigma_y * Je)
    factor = np.where(yielding, sigma_y * Je / np.where(q_tr > 0, q_tr, 1.0), 1.0)
    dgamma = np.where(yielding, f / (3 * G), 0.0)
    dev = factor[:, None, None] * dev
    eps = dev + trace[:, None, None] / 3 * I
    tau = (K * trace)[:, None, None] * I + 2 * G[:, None, None] * dev
    w, v = np.linalg.eigh(2 * eps)
    be_new = np.einsum("nij,nj,nkj->nik", v, np.exp(w), v)
    Finv = np.linalg.inv(Fbar)
    cp_new = Finv @ be_new @ np.swapaxes(Finv, 1, 2)
    sigma = tau / Je[:, None, None]
    sdev = sigma - np.trace(sigma, axis1=1, axis2=2)[:, None, None] / 3 * I
    von_mises = np.sqrt(1.5 * np.einsum("nij,nij->n", sdev, sdev))
    return {
        "tau": tau,
        "sigma": sigma,
        "eps": eps,
        "cp_inv": cp_new,
        "ep": ep + dgamma,
        "von_mises": von_mises,
        "Je": Je,
        "dgamma": dgamma,
    }


def uniaxial_plastic_closed_form(eps_total: float, E: float, nu: float, sigma_y: float) -> dict[str, float]:
    """Uniaxial stress (only sigma_zz != 0) at total axial log strain ``eps_total``, one monotonic step.

    Elastic: ``tau_zz = E eps_total``. Beyond yield the Cauchy stress is ``-+ sigma_Y``; the
    elastic axial strain ``eps_e`` solves ``E |eps_e| = sigma_Y J_e`` with
    ``J_e = exp((1 - 2 nu) eps_e)``, and the equivalent plastic strain is
    ``|eps_total| - |eps_e|``.

    Returns:
        ``sigma_zz`` (Cauchy), ``Je``, ``eps_elastic``, ``eq_plastic_strain``, ``lateral_elastic``
        (in-plane elastic log strain ``-nu eps_e``).
    """
    sign = np.sign(eps_total)
    eps_e = eps_total
    if abs(E * eps_total) > sigma_y * np.exp((1 - 2 * nu) * eps_total):
        eps_e = sign * sigma_y / E
        for _ in range(100):  # fixed point, contraction factor ~ sigma_y / E
            eps_e = sign * sigma_y * np.exp((1 - 2 * nu) * eps_e) / E
    Je = float(np.exp((1 - 2 * nu) * eps_e))
    return {
        "sigma_zz": float(E * eps_e / Je),
        "Je": Je,
        "eps_elastic": float(eps_e),
        "eq_plastic_strain": float(abs(eps_total) - abs(eps_e)),
        "lateral_elastic": float(-nu * eps_e),
    }
