"""Cahn-Hilliard with no-flux boundaries: Li conserved to round-off, free energy decreasing."""

from __future__ import annotations

import numpy as np
import pytest

dolfinx = pytest.importorskip("dolfinx")

from mpi4py import MPI  # noqa: E402

from fem_anode.fem.phasefield.geometry import disk_mesh  # noqa: E402
from fem_anode.fem.phasefield.problem import PhaseFieldProblem  # noqa: E402
from fem_anode.fem.phasefield.settings import (  # noqa: E402
    CyclingSettings,
    InitialSettings,
    MaterialSettings,
    MeshSettings,
    ModelSettings,
    PhaseFieldSettings,
)


@pytest.mark.parametrize("coupling", [False, True])
def test_spinodal_decomposition_conserves_li_and_decreases_energy(coupling):
    """Elastic mechanics; with coupling the Lyapunov functional is chemical + elastic energy."""
    settings = PhaseFieldSettings(
        model=ModelSettings(coupling=coupling, plasticity=False),
        material=MaterialSettings(kappa_li=2e-3, beta=0.05 if coupling else 0.5874),
        mesh=MeshSettings(size=2.5e-9),
        cycling=CyclingSettings(surface_bc="no_flux"),
        initial=InitialSettings(c=0.5, perturbation=0.05, seed=7),
    )
    problem = PhaseFieldProblem(disk_mesh(20e-9, 2.5e-9, MPI.COMM_WORLD), settings)
    assert problem.equilibrate(increments=4).ok
    mass0 = problem.scalar("mass")
    energies = []
    for _ in range(12):
        result = problem.step(2e-4)
        assert result.ok, result.reason
        energy = problem.free_energy()
        energies.append(energy["total"] if coupling else energy["chemical"])
        assert abs(problem.scalar("mass") - mass0) <= 1e-11 * abs(mass0)
    drops = np.diff(energies)
    assert np.all(drops < 1e-12), drops
    assert energies[0] - energies[-1] > 1e-5  # the decomposition really happens
    if not coupling:  # (coherency stresses slow it down when coupled)
        arr = problem.w.x.array[problem._c_dofs]
        spread = problem.comm.allreduce(arr.max(initial=0.0), op=MPI.MAX) - problem.comm.allreduce(
            arr.min(initial=1.0), op=MPI.MIN
        )
        assert spread > 0.15  # grew from the 0.1 of the perturbation
