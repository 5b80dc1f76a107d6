"""Linear solvers of the diffusion step: every CG preconditioner agrees with the direct solve,
the automatic SSOR -> multigrid switch, one multigrid hierarchy for every step size, the
extrapolated initial guess, user options reaching the multigrid levels, the memory-sized pool
of factorisations, and an exact resume after the switch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("dolfinx")

from fem_anode.errors import Interrupted  # noqa: E402
from fem_anode.fem import read_mesh  # noqa: E402
from fem_anode.fem.diffusion import (
    DiffusionProblem,
    DiffusionSettings,
    GeometrySettings,
    Region,
    SolverSettings,
    TimeSettings,
)  # noqa: E402
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

    def _ksp(self, a0):  # type: ignore[no-untyped-def]
        self._asked = float(f"{a0:.12e}")
        return super()._ksp(a0)

    def _solve(self, ksp, rhs) -> None:  # type: ignore[no-untyped-def]
        super()._solve(ksp, rhs)
        self.solves.append((self._asked, ksp.getPC().getType(), ksp.getIterationNumber()))


@pytest.fixture(scope="module")
def direct(volume):
    return DiffusionProblem(volume, settings_for(type="direct")).run()


def ssor_name(comm, kernel: str = "grid-stencil") -> str:
    """The fused SSOR-CG's name: the grid-stencil sweeps on this voxel mesh (global SSOR, in a
    separator order on several ranks), the CSR sweeps with ``sweep_kernel = "csr"`` (block Jacobi
    on several ranks)."""
    if kernel == "grid-stencil":
        return "eisenstat+grid-stencil" if comm.size == 1 else "eisenstat-separator+grid-stencil"
    return ("eisenstat" if comm.size == 1 else "eisenstat-block-jacobi") + "+" + kernel


@pytest.mark.parametrize("preconditioner", ["auto", "ssor", "ssor-csr", "mg", "gamg", "hypre"])
def test_cg_preconditioners_agree_with_the_direct_solve(volume, direct, preconditioner):
    options = {"preconditioner": preconditioner}
    if preconditioner == "ssor-csr":  # the compiled CSR sweeps, not the grid stencil
        options = {"preconditioner": "ssor", "sweep_kernel": "csr"}
    problem = RecordingProblem(volume, settings_for(type="iterative", **options))
    result = problem.run()
    assert result.steps == direct.steps
    # rtol 1e-10 on each step; the records are relative to c_bulk (mol/m^3)
    c_bulk = problem.settings.physics.c_bulk
    np.testing.assert_allclose(result.domain_mean, direct.domain_mean, rtol=0, atol=1e-8 * c_bulk)
    np.testing.assert_allclose(result.region_means["deep"], direct.region_means["deep"], rtol=0, atol=1e-8 * c_bulk)
    assert result.mass_balance_rel_error < 1e-8
    assert result.domain_mean[-1] > 0.5 * c_bulk  # the run gets far enough to be a test
    types = {pc for _, pc, _ in problem.solves}
    # the fused CG on the compiled sweeps (C compiler): Eisenstat's SSOR, block Jacobi on several ranks
    ssor = {ssor_name(problem.comm)}
    if preconditioner == "auto":  # SSOR first; multigrid once SSOR needs more than 40 iterations (if ever)
        assert ssor <= types <= ssor | {"mg"}
    else:
        expected = {"ssor": ssor, "ssor-csr": {ssor_name(problem.comm, "compiled")}, "mg": {"mg"}}
        assert types == {**expected, "gamg": {"gamg"}, "hypre": {"hypre"}}[preconditioner]
    # a few iterations per step with the reused preconditioner (measured medians on 1 / 2 ranks:
    # mg 5 / 5, GAMG 9 / 9, BoomerAMG 5 / 5, SSOR 11 / 18, auto 11 / 18)
    median = np.median([its for _, _, its in problem.solves])
    assert median <= (10 if preconditioner in ("mg", "gamg", "hypre") else 20), median
    if preconditioner == "mg":  # one hierarchy for every step size
        assert problem.factorisations == 1 and len({a0 for a0, _, _ in problem.solves}) > 5


def test_auto_moves_to_gamg_from_the_first_step_size_ssor_finds_slow(volume):
    switch = 8
    problem = RecordingProblem(volume, settings_for(type="iterative", switch_iterations=switch))
    problem.run()
    threshold = problem.amg_from_a0
    assert threshold is not None
    ssor = [(a0, its) for a0, pc, its in problem.solves if pc != "mg"]
    mg = [a0 for a0, pc, _ in problem.solves if pc == "mg"]
    assert ssor and mg
    # multigrid exactly for the step sizes at or beyond the switch, SSOR for the smaller ones
    assert all(a0 <= threshold * (1 + 1e-12) for a0 in mg)
    assert problem.factorisations == 1  # the hierarchy, once for all of them
    assert all(a0 > threshold * (1 + 1e-12) or its > switch for a0, its in ssor)
    # the solve that triggered the switch needed n > switch_iterations and moved every
    # a0 <= a0_n (n / switch)^2 to GAMG; the SSOR solves at step sizes that kept SSOR did not
    assert any(its > switch and a0 * (its / switch) ** 2 == pytest.approx(threshold, rel=1e-12) for a0, its in ssor)
    assert all(its <= switch for a0, its in ssor if a0 > threshold * (1 + 1e-12))


def test_auto_stays_on_ssor_when_the_multigrid_set_up_does_not_fit(volume, monkeypatch, caplog):
    """A switch that would need more memory than is available keeps SSOR (warned), never OOM."""
    from fem_anode.resources import estimate_multigrid_setup_memory

    need = estimate_multigrid_setup_memory(
        volume.mesh.comm.allreduce(volume.mesh.geometry.x.shape[0]), volume.mesh.comm.size
    ).bytes
    monkeypatch.setenv("FEM_ANODE_MEMORY_LIMIT", str(int(need / 10)))  # far below the set-up's estimate
    problem = RecordingProblem(volume, settings_for(type="iterative", switch_iterations=8))
    with caplog.at_level("WARNING", logger="fem_anode.fem.diffusion"):
        result = problem.run()
    assert problem.multigrid_fits is False and problem.amg_from_a0 is None and problem.factorisations == 0
    assert {pc for _, pc, _ in problem.solves} == {ssor_name(problem.comm)}
    assert any(its > 8 for _, _, its in problem.solves)  # the switch was asked for, and refused
    assert result.status == "completed" and "staying on SSOR" in caplog.text
    monkeypatch.setenv("FEM_ANODE_MEMORY_LIMIT", str(int(need * 10)))  # the same run with room for it switches
    roomy = RecordingProblem(volume, settings_for(type="iterative", switch_iterations=8))
    roomy.run()
    assert roomy.multigrid_fits is True and roomy.amg_from_a0 is not None


def test_the_memory_estimate_counts_an_explicit_multigrid():
    from fem_anode.fem.diffusion import MeshSettings
    from fem_anode.resources import estimate_multigrid_setup_memory, estimate_voxel_diffusion_memory

    def estimate(**solver):  # type: ignore[no-untyped-def]
        settings = DiffusionSettings(mesh=MeshSettings(method="voxel"), solver=SolverSettings(**solver))
        return estimate_voxel_diffusion_memory(1e6, 1.2e6, (128, 128, 128), settings, ranks=2)

    ssor, auto, mg = estimate(preconditioner="ssor"), estimate(), estimate(preconditioner="mg")
    assert auto.bytes == ssor.bytes and auto.details["multigrid_setup_bytes"] == 0
    petsc_ssor = estimate(preconditioner="ssor", sweep_kernel="petsc")  # the general FE estimate
    assert mg.details["multigrid_setup_bytes"] == estimate_multigrid_setup_memory(1.2e6, 2).bytes
    assert mg.bytes - petsc_ssor.bytes == pytest.approx(estimate_multigrid_setup_memory(1.2e6, 2).bytes, rel=1e-12)
    assert estimate_multigrid_setup_memory(1e6, 2).bytes > estimate_multigrid_setup_memory(1e6, 1).bytes


@pytest.mark.parametrize(
    ("dofs", "ranks", "peak_mib_per_rank"),
    [(996_509, 1, 1346), (996_509, 2, 779), (7_886_785, 1, 10_158), (7_886_785, 2, 5_172)],
)
def test_the_memory_estimate_of_the_grid_stencil_covers_the_measured_peaks(dofs, ranks, peak_mib_per_rank):
    """P1 SSOR-CG on the grid stencil (the 3D voxel default): the estimate is 1.0-1.3x the peaks the
    scale benchmark measured (128^3 and 256^3 electrode, 1 and 2 ranks; docs/benchmarks.md), where the
    general FE estimate (four matrices, an AMG hierarchy) was 2.2x; the other sweep kernels and P2
    keep the general one."""
    from fem_anode.fem.diffusion import MeshSettings
    from fem_anode.resources import estimate_voxel_diffusion_memory

    def estimate(order=1, **solver):  # type: ignore[no-untyped-def]
        settings = DiffusionSettings(mesh=MeshSettings(method="voxel", order=order), solver=SolverSettings(**solver))
        return estimate_voxel_diffusion_memory(0.84 * dofs, dofs, (128, 128, 128), settings, ranks=ranks)

    stencil = estimate(sweep_kernel="compiled")
    assert stencil.details["solver"] == "grid-stencil"
    assert 1.0 <= stencil.bytes / (ranks * peak_mib_per_rank * 2**20) <= 1.3
    for general in (estimate(sweep_kernel="petsc"), estimate(sweep_kernel="csr"), estimate(preconditioner="mg")):
        assert general.details["solver"] == "iterative" and general.bytes > 1.5 * stencil.bytes
    assert estimate(order=2, sweep_kernel="compiled").details["solver"] != "grid-stencil"


def test_an_explicit_pc_type_is_never_switched(volume):
    problem = RecordingProblem(
        volume, settings_for(type="iterative", switch_iterations=1, petsc_options={"pc_type": "jacobi"})
    )
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


def test_user_options_reach_the_shifted_multigrid_levels(volume):
    for options, expected in (({}, 1), ({"mg_levels_ksp_max_it": "2"}, 2)):
        problem = DiffusionProblem(volume, settings_for(type="iterative", preconditioner="mg", petsc_options=options))
        pc = problem._ksp(1e5).getPC()
        assert pc.getType() == "mg" and pc.getMGLevels() >= 2
        assert pc.getMGSmoother(pc.getMGLevels() - 1).getTolerances()[3] == expected
        problem.destroy()


def test_shifted_multigrid_levels_are_the_galerkin_operators(volume):
    """A new step size only shifts the levels: A_l(a0) = P^T A_(l+1)(a0) P, to round-off."""
    from petsc4py import PETSc

    problem = DiffusionProblem(volume, settings_for(type="iterative", preconditioner="mg"))
    problem._ksp(1e6)
    mg = problem._mg
    for a0 in (1e6, 3.0):
        problem._ksp(a0)
        fine = problem._operator(float(f"{a0:.12e}"))
        for level in range(mg.levels - 1, 0, -1):
            above = fine if level == mg.levels - 1 else mg.A[level]
            galerkin = above.ptap(mg.P[level - 1])
            galerkin.axpy(-1.0, mg.A[level - 1], structure=PETSc.Mat.Structure.DIFFERENT_NONZERO_PATTERN)
            scale = mg.A[level - 1].norm(PETSc.NormType.FROBENIUS)
            assert galerkin.norm(PETSc.NormType.FROBENIUS) <= 1e3 * np.finfo(float).eps * scale
            galerkin.destroy()
    assert problem.factorisations == 1
    problem.destroy()


def test_one_operator_matrix_for_every_step_size(volume):
    """Iterative solves keep one matrix A = K + R + a0 eps M, its values a function of a0 alone."""
    from petsc4py import PETSc

    problem = DiffusionProblem(volume, settings_for(type="iterative", preconditioner="ssor", sweep_kernel="petsc"))
    first = problem._ksp(1e6).getOperators()[0].copy()
    for a0 in (2e5, 1e6):
        A = problem._ksp(a0).getOperators()[0]
    assert A.equal(first)  # recomputed from K + R and M, not updated: bitwise the same
    expected = problem._KR.copy()
    expected.axpy(1e6 * problem.eps, problem._M)
    expected.axpy(-1.0, A)
    assert expected.norm(PETSc.NormType.FROBENIUS) <= 10 * np.finfo(float).eps * A.norm(PETSc.NormType.FROBENIUS)
    # three value arrays and one shared pattern
    nnz, ndofs = problem._M.getInfo()["nz_used"], problem.V.dofmap.index_map.size_global
    memory = problem.solver_memory()
    assert memory["matrices"] == pytest.approx(28 * nnz + 4 * ndofs)
    assert memory["per_dof"] < 30 * nnz / ndofs
    problem.destroy()


def test_direct_pool_is_sized_by_memory(volume):
    problem = DiffusionProblem(volume, settings_for(type="direct", cache_size=3))
    for a0 in (1e6, 2e6, 3e6):
        problem._ksp(a0)
    assert len(problem._direct) == 3 and problem._factor_bytes and problem._factor_bytes > 0
    # a budget below one factorisation keeps one, and a re-used a0 is not refactorised
    problem.settings.solver.cache_memory = 0.5 * problem._factor_bytes / problem.comm.size
    problem._ksp(4e6)
    assert list(problem._direct) == [4e6]
    before = problem.factorisations
    problem._ksp(4e6)
    assert problem.factorisations == before
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
    switch_step = next(i for i, (a0, pc, _) in enumerate(reference.solves) if pc == "mg")
    store = CheckpointStore(shared_tmp_path / "switched", comm)
    checkpointer = Checkpointer(
        store, CheckpointPolicy(interval_s=0.0, every_steps=0), stop=StopAfter(switch_step + 2), comm=comm
    )
    with pytest.raises(Interrupted):
        DiffusionProblem(volume, settings).run(checkpointer=checkpointer)
    checkpoint = store.load()
    assert checkpoint.state["problem"]["amg_from_a0"] == reference.amg_from_a0
    resumed = RecordingProblem(volume, settings)
    result = resumed.run(resume=checkpoint)
    assert resumed.amg_from_a0 == reference.amg_from_a0 and {pc for _, pc, _ in resumed.solves} == {"mg"}
    np.testing.assert_allclose(result.domain_mean, expected.domain_mean, rtol=1e-10, atol=0)
    np.testing.assert_allclose(result.region_means["deep"], expected.region_means["deep"], rtol=1e-10, atol=0)


@pytest.mark.parametrize(
    ("solver", "message"),
    [
        (
            {"preconditioner": "multigrid"},
            r"solver\.preconditioner must be one of 'auto', 'ssor', 'mg', 'gamg', 'hypre', got 'multigrid'",
        ),
        ({"cache_memory": 0}, r"solver\.cache_memory"),
        ({"switch_iterations": 0}, r"solver\.switch_iterations"),
        ({"rtol": -1e-10}, r"solver\.rtol"),
        ({"preconditionner": "gamg"}, r"did you mean 'preconditioner'"),
    ],
)
def test_bad_solver_settings_are_named(solver, message):
    from fem_anode.errors import UsageError

    with pytest.raises(UsageError, match=message):
        DiffusionSettings.from_dict({"solver": solver})


@pytest.mark.parametrize(
    ("section", "values", "message"),
    [
        ("physics", {"D": -3e-10}, r"physics\.D must be positive"),
        ("physics", {"k_f": 1e40}, r"physics\.k_f"),
        ("solver", {"rtol": 0.0}, r"solver\.rtol"),
    ],
)
def test_the_python_api_refuses_what_the_toml_path_refuses(volume, section, values, message):
    """Settings made or changed in Python are refused as the TOML path refuses them: on
    construction, and by the solver before any work when an attribute was changed later."""
    import dataclasses

    from fem_anode.errors import UsageError

    settings = settings_for(type="iterative")
    with pytest.raises(UsageError, match=message):  # a new settings object is checked on construction
        dataclasses.replace(getattr(settings, section), **values)
    for key, value in values.items():  # an attribute changed afterwards: the solver checks it
        setattr(getattr(settings, section), key, value)
    with pytest.raises(UsageError, match=message):
        DiffusionProblem(volume, settings)
