"""The UFL return map (closed-form 2x2 log/exp, conditionals) against the NumPy 3x3 reference."""

from __future__ import annotations

import numpy as np
import pytest

dolfinx = pytest.importorskip("dolfinx")

import ufl  # noqa: E402
from dolfinx import fem  # noqa: E402
from mpi4py import MPI  # noqa: E402

from fem_anode.fem.phasefield.plasticity import return_map_numpy, return_map_ufl, state_update_ufl  # noqa: E402

E, NU, SY = 100.0, 0.22, 1.64


def _ufl_update(mesh, F2, lam, s, cp, plastic=True):
    F2c = fem.Constant(mesh, np.asarray(F2, float))
    lamc, sc = fem.Constant(mesh, float(lam)), fem.Constant(mesh, float(s))
    cpc = fem.Constant(mesh, np.asarray(cp, float))
    rm = return_map_ufl(F2c, lamc, sc, cpc, fem.Constant(mesh, E), NU, SY, plastic)
    expr = ufl.as_vector(
        [rm.tau[0, 0] / rm.Je, rm.tau[1, 1] / rm.Je, rm.tau[0, 1] / rm.Je, rm.tau_zz / rm.Je, rm.q / rm.Je]
    )
    point = np.zeros((1, 2))
    cells = np.zeros(1, dtype=np.int32)
    stress = fem.Expression(expr, point).eval(mesh, cells).ravel()
    state = fem.Expression(state_update_ufl(rm, cpc[4]), point).eval(mesh, cells).ravel()
    return stress, state


def _block(F2, lam):
    F = np.zeros((3, 3))
    F[:2, :2] = F2
    F[2, 2] = lam
    return F


@pytest.mark.parametrize("plastic", [True, False])
def test_ufl_matches_numpy_including_isotropic_and_plastic_states(plastic):
    mesh = dolfinx.mesh.create_unit_square(MPI.COMM_SELF, 1, 1)
    rng = np.random.default_rng(3)
    cases = [
        (np.eye(2) * 1.3, 1.3, 1.3),
        (np.eye(2) * 1.0001, 0.9999, 1.0),
        (np.array([[1.0, 1e-5], [0.0, 1.0]]), 1.0, 1.0),
    ]
    cases += [
        (np.eye(2) + 0.15 * rng.normal(size=(2, 2)), 1 + 0.1 * rng.normal(), 1 + 0.5 * rng.random()) for _ in range(6)
    ]
    for F2, lam, s in cases:
        cp = np.array([1.0, 0.0, 1.0, 1.0, 0.0])
        for _ in range(2):  # second pass starts from the plastic state of the first
            stress, state = _ufl_update(mesh, F2, lam, s, cp, plastic)
            cp3 = np.diag([cp[0], cp[2], cp[3]])
            cp3[0, 1] = cp3[1, 0] = cp[1]
            ref = return_map_numpy(
                _block(F2, lam)[None], np.array([s]), cp3[None], np.array([cp[4]]), np.array([E]), NU, SY, plastic
            )
            sig = ref["sigma"][0]
            expected = np.array([sig[0, 0], sig[1, 1], sig[0, 1], sig[2, 2], ref["von_mises"][0]])
            assert np.allclose(stress, expected, rtol=1e-9, atol=1e-9 * max(1.0, np.abs(expected).max()))
            cpn = ref["cp_inv"][0]
            assert np.allclose(state, [cpn[0, 0], cpn[0, 1], cpn[1, 1], cpn[2, 2], ref["ep"][0]], rtol=1e-9, atol=1e-10)
            if plastic:
                assert stress[4] <= SY * (1 + 1e-12)
            cp = state
            F2, lam = F2 @ (np.eye(2) + 0.05 * rng.normal(size=(2, 2))), lam * 1.02
