"""Closed-form checks of the chemistry and the J2 return map at a single material point."""

from __future__ import annotations

import numpy as np
import pytest

from fem_anode.fem.phasefield import chemistry, kinematics
from fem_anode.fem.phasefield.plasticity import return_map_numpy, uniaxial_plastic_closed_form

E, NU, SY = 43.75, 0.22, 1.64


def _identity(n: int) -> np.ndarray:
    return np.broadcast_to(np.eye(3), (n, 3, 3)).copy()


def test_chemical_potential_is_the_derivative_and_binodal_is_common_tangent():
    c = np.linspace(0.05, 0.95, 19)
    h = 1e-6
    numeric = (chemistry.free_energy(c + h, 2.6) - chemistry.free_energy(c - h, 2.6)) / (2 * h)
    assert np.allclose(chemistry.chemical_potential(c, 2.6), numeric, rtol=0, atol=1e-7)
    a, b = chemistry.binodal(2.6)
    assert abs(a + b - 1) < 1e-12 and 0.12 < a < 0.13
    assert abs(chemistry.chemical_potential(a, 2.6)) < 1e-10  # symmetric well: coexistence at mu = 0
    with pytest.raises(ValueError):
        chemistry.binodal(1.5)


def test_full_lithiation_quadruples_volume():
    s = kinematics.chemical_stretch(0.86, 0.5874, 0.14, 0.86)
    assert s**3 == pytest.approx(4.0, rel=1e-3)
    assert kinematics.youngs_modulus(np.array([0.14, 0.86]), 175.0, 43.75, 0.14, 0.86) == pytest.approx([175.0, 43.75])


def test_free_chemical_swelling_is_stress_free():
    s = np.array([1.0, 1.2, 1.5874])
    out = return_map_numpy(s[:, None, None] * _identity(3), s, _identity(3), np.zeros(3), np.full(3, E), NU, SY)
    assert np.abs(out["sigma"]).max() < 1e-12
    assert np.abs(out["ep"]).max() == 0.0


def test_isochoric_shear_beyond_yield_follows_radial_return():
    a = np.array([1.001, 1.05, 1.3])  # the first stays elastic
    F = np.zeros((3, 3, 3))
    F[:, 0, 0], F[:, 1, 1], F[:, 2, 2] = a, 1 / a, 1.0
    s = np.full(3, 1.2)
    out = return_map_numpy(F * 1.2, s, _identity(3), np.zeros(3), np.full(3, E), NU, SY)
    G = E / (2 * (1 + NU))
    q_trial = 2 * G * np.sqrt(3) * np.log(a)
    expected_ep = np.maximum(q_trial - SY, 0) / (3 * G)
    assert out["ep"] == pytest.approx(expected_ep, abs=1e-12)
    assert out["von_mises"] == pytest.approx(np.minimum(q_trial, SY), rel=1e-12)
    assert out["ep"][0] == 0 and out["ep"][2] > 0.2
    # plastic flow is isochoric: det(Cp^-1) stays 1
    assert np.linalg.det(out["cp_inv"]) == pytest.approx(np.ones(3), rel=1e-12)


def test_uniaxial_closed_form_is_on_the_yield_surface_and_reduces_to_hooke():
    cf = uniaxial_plastic_closed_form(-0.46, E, NU, SY)
    assert abs(cf["sigma_zz"]) == pytest.approx(SY, rel=1e-12)
    assert cf["eq_plastic_strain"] == pytest.approx(0.46 - SY * cf["Je"] / E, rel=1e-12)
    elastic = uniaxial_plastic_closed_form(-1e-3, E, NU, SY)
    assert elastic["eq_plastic_strain"] == 0
    assert elastic["sigma_zz"] == pytest.approx(-E * 1e-3, rel=2e-3)
