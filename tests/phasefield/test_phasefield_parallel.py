"""One lithiation/delithiation cycle gives the same records on 1 and on all ranks (run the suite
under ``mpirun -n 2`` for the real comparison; serially both runs are serial)."""

from __future__ import annotations

import pytest

dolfinx = pytest.importorskip("dolfinx")

from mpi4py import MPI  # noqa: E402

from fem_anode.fem.phasefield.run import run_phasefield  # noqa: E402
from fem_anode.fem.phasefield.settings import (  # noqa: E402
    CyclingSettings,
    MaterialSettings,
    MeshSettings,
    OutputSettings,
    PhaseFieldSettings,
    SolverSettings,
)

EXACT_KEYS = ("index", "kind", "steps", "rejected_steps")


def _settings() -> PhaseFieldSettings:
    # yield lowered so that the short cycle flows plastically; half-cycles end mid-transient
    return PhaseFieldSettings(
        mesh=MeshSettings(size=4e-9),
        material=MaterialSettings(yield_strength=0.3),
        cycling=CyclingSettings(half_cycles=2, half_cycle_time=0.006, dt_initial=0.001, ramp_time=0.002),
        solver=SolverSettings(rtol=1e-11, atol=1e-12, reuse_factorisation=False),  # see test_phasefield_vacancy
        output=OutputSettings(fields=False, figures=False, times=[]),
    )


def test_one_cycle_same_records_on_one_and_all_ranks():
    world = run_phasefield(_settings(), None, MPI.COMM_WORLD)["half_cycles"]
    serial = run_phasefield(_settings(), None, MPI.COMM_SELF)["half_cycles"]
    assert len(world) == len(serial) == 2
    assert world[0]["max_eq_plastic_strain"] > 1e-3  # plastic flow is part of the comparison
    assert world[0]["mean_c_li"] > 0.25 and world[1]["mean_c_li"] < world[0]["mean_c_li"]
    for a, b in zip(world, serial):
        for key in EXACT_KEYS:
            assert a[key] == b[key], key
        for key, value in a.items():
            if key in EXACT_KEYS or key == "wall_time_s" or key == "newton_iterations_total":
                continue
            assert abs(value - b[key]) <= 1e-6 * max(abs(value), abs(b[key])) + 1e-10, (key, value, b[key])
        assert abs(a["newton_iterations_total"] - b["newton_iterations_total"]) <= 2 * a["steps"]
