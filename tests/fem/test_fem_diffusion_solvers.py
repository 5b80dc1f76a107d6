"""Linear solvers of the diffusion step: every CG preconditioner agrees with the direct solve,
the automatic SSOR -> GAMG switch, the extrapolated initial guess, user options reaching the
multigrid levels, and an exact resume after the switch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("dolfinx")

from fem_anode.errors import Interrupted  # noqa: E402
from fem_anode.fem import read_mesh  # noqa: E402
from fem_anode.fem.diffusion import DiffusionProblem, DiffusionSettings, GeometrySettings, Region, SolverSettings, TimeSettings  # noqa: E402
from fem_anode.io import VoxelImage  # noqa: E402
from fem_anode.io.checkpoint import CheckpointPolicy, Checkpointer, CheckpointStore  # noqa: E402
from fem_anode.meshing import write_voxel_mesh  # noqa: E402

N = 12  # voxels per side (20 nm): 240 nm, diffusion time about 2.5e-4 s


@pytest.fixture(scope="module")
def volume(tmp_path_factory, comm):
    """SEI/C/B volume with a pore layer at z = 0 and a Si sphere: about 2k P1 dofs."""
    directory = Path(comm.bcast(str(tmp_path_factory.mktemp("volume")) if comm.rank == 0 else None, root=0))
    labels = np.full((N, N, N), 3, dtype=np.uint8)
    labels[:2] = 0
    zz, yy, xx = np.mgrid[:N, :N, :N]
    labels[(zz - 8) ** 2 + (yy - 6) ** 2 + (xx - 5) ** 2 <= 6] = 1
    path = directory / "volume.msh"
    if comm.rank == 0:
        write_voxel_mesh(VoxelImage(labels, (20e-9,) * 3, {"pore": 0, "si": 1, "sei": 3}), path, keep=["sei"])
    comm.barrier()
    return read_mesh(path, comm)


def settings_for(**solver) -> DiffusionSettings:
    settings = DiffusionSettings(
        geometry=GeometrySettings(mesh=Path("volume.msh")),
        time=TimeSettings(t_end=4e-4, output_times=[1e-5, 4e-4], dt_initial=1e-7, steps_per_level=2, dt_max=4e-5),
        solver=SolverSettings(**solver),
        regions=[Region(name="deep", box=[0.0, 0.0, 160e-9, 240e-9, 240e-9, 240e-9])],
    )
    settings.check()
    return settings


class RecordingProblem(DiffusionProblem):
    """Records (a0, PETSc preconditioner type, CG iterations) of every linear solve."""

    def __init__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        self.solves: list[tuple[float, str, int]] = []
        super().__init__(*args, **kwargs)

    def _solve(self, ksp, rhs) -> None:  # type: ignore[no-untyped-def]
        super()._solve(ksp, rhs)
        a0 = next(key for key, (cached, _) in self._ksp_cache.items() if cached is ksp)
        self.solves.append((a0, ksp.getPC().getType(), ksp.getIterationNumber()))


@pytest.fixture(scope="module")
def direct(volume):
    return DiffusionProblem(volume, settings_for(type="direct")).run()


@pytest.mark.parametrize("preconditioner", ["auto", "ssor", "gamg", "hypre"])
def test_cg_preconditioners_agree_with_the_direct_solve(volume, direct, preconditioner):
    problem = RecordingProblem(volume, settings_for(type="iterative", preconditioner=preconditioner))
    result = problem.run()
    assert result.steps == direct.steps
    # rtol 1e-10 on each step; the records are relative to c_bulk (mol/m^3)
    c_bulk = problem.settings.physics.c_bulk
    np.testing.assert_allclose(result.domain_mean, direct.domain_mean, rtol=0, atol=1e-8 * c_bulk)
    np.testing.assert_allclose(result.region_means["deep"], direct.region_means["deep"], rtol=0, atol=1e-8 * c_bulk)
    assert result.mass_balance_rel_error < 1e-8
    assert result.domain_mean[-1] > 0.5 * c_bulk  # the run gets far enough to be a test
    types = {pc for _, pc, _ in problem.solves}
    ssor = {"eisenstat" if problem.comm.size == 1 else "sor"}
    if preconditioner == "auto":  # SSOR first; GAMG once SSOR needs more than 20 iterations (if ever)
        assert ssor <= types <= ssor | {"gamg"}
    else:
        assert types == {"ssor": ssor, "gamg": {"gamg"}, "hypre": {"hypre"}}[preconditioner]
    # a few iterations per step with the reused preconditioner (measured medians on 1 / 2 ranks:
    # GAMG 9 / 9, BoomerAMG 5 / 5, SSOR 11 / 18, auto 8 / 18)
    median = np.median([its for _, _, its in problem.solves])
    assert median <= (10 if preconditioner in ("gamg", "hypre") else 20), median


def test_auto_moves_to_gamg_from_the_first_step_size_ssor_finds_slow(volume):
    switch = 8
    problem = RecordingProblem(volume, settings_for(type="iterative", switch_iterations=switch))
    problem.run()
    threshold = problem.amg_from_a0
    assert threshold is not None
    ssor = [(a0, its) for a0, pc, its in problem.solves if pc != "gamg"]
    gamg = [a0 for a0, pc, _ in problem.solves if pc == "gamg"]
    assert ssor and gamg
    # GAMG exactly for the step sizes at or beyond the switch, SSOR for the smaller ones
    assert all(a0 <= threshold * (1 + 1e-12) for a0 in gamg)
    assert all(a0 > threshold * (1 + 1e-12) or its > switch for a0, its in ssor)
    # the solve that triggered the switch needed n > switch_iterations and moved every
    # a0 <= a0_n (n / switch)^2 to GAMG; the SSOR solves at step sizes that kept SSOR did not
    assert any(its > switch and a0 * (its / switch) ** 2 == pytest.approx(threshold, rel=1e-12) for a0, its in ssor)
    assert all(its <= switch for a0, its in ssor if a0 > threshold * (1 + 1e-12))


def test_an_explicit_pc_type_is_never_switched(volume):
    problem = RecordingProblem(volume, settings_for(type="iterative", switch_iterations=1, petsc_options={"pc_type": "jacobi"}))
    problem.run()
    assert problem.amg_from_a0 is None and {pc for _, pc, _ in problem.solves} == {"jacobi"}


def test_user_options_reach_the_multigrid_levels(volume):
    """Options read at PCSetUp (mg_levels_*) must still be in the database at the first setup."""
    for options, expected in (({}, 2), ({"mg_levels_ksp_max_it": "1"}, 1)):
        problem = DiffusionProblem(volume, settings_for(type="iterative", preconditioner="gamg", petsc_options=options))
        pc = problem._ksp(1e5).getPC()
        assert pc.getType() == "gamg" and pc.getMGLevels() >= 2
        assert pc.getMGSmoother(pc.getMGLevels() - 1).getTolerances()[3] == expected
        problem.destroy()


def test_initial_guess_is_the_linear_extrapolation(volume):
    problem = DiffusionProblem(volume, settings_for(type="iterative"))
    x = problem.V.tabulate_dof_coordinates()[:, 0] * 1e6
    problem._c_older.x.array[:] = 1.0 + x
    problem._c_old.x.array[:] = 2.0 + 3.0 * x
    owned = problem.V.dofmap.index_map.size_local  # the solve's vector: owned dofs only
    problem._predict(0.5)  # dt = dt_previous / 2
    np.testing.assert_allclose(problem.c.x.array[:owned], (2.5 + 4.0 * x)[:owned], rtol=1e-14)
    problem._predict(None)  # first step: c^n
    np.testing.assert_array_equal(problem.c.x.array[:owned], problem._c_old.x.array[:owned])


class StopAfter:
    """A stand-in for SafeStop: requests a stop at the ``steps``-th safe point."""

    signal_name = "test"

    def __init__(self, steps: int) -> None:
        self.polls, self.steps = 0, steps

    @property
    def requested(self) -> bool:
        self.polls += 1
        return self.polls >= self.steps


def test_resume_after_the_switch_repeats_the_run(volume, shared_tmp_path, comm):
    settings = settings_for(type="iterative", switch_iterations=8)
    reference = RecordingProblem(volume, settings)
    expected = reference.run()
    # stop two steps after the switch
    switch_step = next(i for i, (a0, pc, _) in enumerate(reference.solves) if pc == "gamg")
    store = CheckpointStore(shared_tmp_path / "switched", comm)
    checkpointer = Checkpointer(store, CheckpointPolicy(interval_s=0.0, every_steps=0), stop=StopAfter(switch_step + 2), comm=comm)
    with pytest.raises(Interrupted):
        DiffusionProblem(volume, settings).run(checkpointer=checkpointer)
    checkpoint = store.load()
    assert checkpoint.state["problem"]["amg_from_a0"] == reference.amg_from_a0
    resumed = RecordingProblem(volume, settings)
    result = resumed.run(resume=checkpoint)
    assert resumed.amg_from_a0 == reference.amg_from_a0 and {pc for _, pc, _ in resumed.solves} == {"gamg"}
    np.testing.assert_allclose(result.domain_mean, expected.domain_mean, rtol=1e-10, atol=0)
    np.testing.assert_allclose(result.region_means["deep"], expected.region_means["deep"], rtol=1e-10, atol=0)


@pytest.mark.parametrize(
    ("solver", "message"),
    [
        ({"preconditioner": "multigrid"}, r"solver\.preconditioner must be one of 'auto', 'ssor', 'gamg', 'hypre', got 'multigrid'"),
        ({"switch_iterations": 0}, r"solver\.switch_iterations"),
        ({"rtol": -1e-10}, r"solver\.rtol"),
        ({"preconditionner": "gamg"}, r"did you mean 'preconditioner'"),
    ],
)
def test_bad_solver_settings_are_named(solver, message):
    from fem_anode.errors import UsageError

    with pytest.raises(UsageError, match=message):
        DiffusionSettings.from_dict({"solver": solver})
