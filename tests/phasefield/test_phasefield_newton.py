"""Newton with the consistent tangent converges quadratically on a plastic step; failures raise."""

from __future__ import annotations

import logging

import numpy as np
import pytest

dolfinx = pytest.importorskip("dolfinx")

from mpi4py import MPI  # noqa: E402
from petsc4py import PETSc  # noqa: E402

from fem_anode.errors import SolverError  # noqa: E402
from fem_anode.fem.phasefield.geometry import disk_mesh  # noqa: E402
from fem_anode.fem.phasefield.problem import PhaseFieldProblem  # noqa: E402
from fem_anode.fem.phasefield.settings import (
    CyclingSettings,
    MaterialSettings,
    MeshSettings,
    ModelSettings,
    PhaseFieldSettings,
    SolverSettings,
)  # noqa: E402

logger = logging.getLogger(__name__)


@pytest.mark.parametrize("kinematics", ["generalized_plane_strain", "plane_strain"])
def test_quadratic_convergence_on_a_plastic_step(kinematics, caplog):
    settings = PhaseFieldSettings(
        model=ModelSettings(kinematics=kinematics, plasticity=True),
        material=MaterialSettings(beta=0.15, yield_strength=0.5),
        mesh=MeshSettings(size=4e-9),
        solver=SolverSettings(rtol=1e-14, atol=1e-13, max_it=40),
    )
    problem = PhaseFieldProblem(disk_mesh(20e-9, 4e-9, MPI.COMM_WORLD), settings)
    # a lithiated shell around an unlithiated core: strongly plastic near the interface
    problem.set_initial_condition(lambda x: 0.14 + 0.72 / (1 + np.exp(-(np.hypot(x[0], x[1]) - 0.7) / 0.15)))
    first = problem.equilibrate(increments=4)
    assert first.ok, first.reason
    assert problem.diagnostics()["max_eq_plastic_strain"] > 0.01  # plastic flow has happened
    ep0 = problem.comm.allreduce(problem.quadrature_values()[1].sum())
    # the plastic step whose convergence is examined: more Li in the shell
    problem.set_concentration(np.minimum(problem.w.x.array[problem._c_dofs] * 1.01, 0.9))
    result = problem.equilibrate()
    assert result.ok, result.reason
    history = np.asarray(result.history)
    with caplog.at_level(logging.INFO):
        logger.info("%s plastic step residual history: %s", kinematics, " ".join(f"{h:.3e}" for h in history))
    assert problem.comm.allreduce(problem.quadrature_values()[1].sum()) > 1.001 * ep0  # the step is plastic
    # quadratic: e_{k+1} <= C e_k^2 (e = residual / initial residual) once e_k < 0.1, down to
    # the round-off floor; linear convergence would make C grow without bound. One pair may
    # exceed the bound: a change of the plastic active set (the return map is only piecewise
    # smooth) restarts the quadratic phase once.
    e = history / history[0]
    pairs = [(e[k], e[k + 1]) for k in range(len(e) - 1) if e[k] < 0.1 and history[k + 1] > 1.5 * history.min()]
    assert len(pairs) >= 2, f"too few iterations in the asymptotic range: {history}"
    constants = [b / a**2 for a, b in pairs]
    assert sorted(constants)[-2] < 10 and constants[-1] < 10, (
        f"not quadratic: e_k+1 / e_k^2 = {constants}, history {history}"
    )
    assert e[-1] < 1e-10
    assert len(history) - 1 <= 8


def test_repeated_failure_raises_solver_error():
    settings = PhaseFieldSettings(
        mesh=MeshSettings(size=10e-9),
        cycling=CyclingSettings(
            half_cycles=1, half_cycle_time=0.1, ramp_time=0.0, dt_initial=0.05, dt_min=0.01, max_retries=2
        ),
        solver=SolverSettings(max_it=1),
    )
    problem = PhaseFieldProblem(disk_mesh(20e-9, 10e-9, MPI.COMM_WORLD), settings)
    with pytest.raises(SolverError, match="failed at t = 0"):
        problem.run_half_cycle(1, "lithiation", 0.1)


def _vacancy_problem_in_a_lithiation(
    predictor: str = "linear",
    precision: str = "auto",
    mesh=None,
    assembly: str = "bordered",
    kinematics: str = "generalized_plane_strain",
    step_fraction: float = 1 / 16,
):
    """A few steps (of ``step_fraction`` of the first step size) into a lithiation; pass
    ``mesh`` to compare two problems dof by dof (a new mesh may be partitioned differently on
    several ranks)."""
    from fem_anode.fem.phasefield.vacancy import VacancyPhaseFieldProblem

    solver = SolverSettings(predictor=predictor, factorisation_precision=precision, jacobian_assembly=assembly)
    model = ModelSettings(kinematics=kinematics)
    settings = PhaseFieldSettings(mesh=MeshSettings(size=4e-9), solver=solver, model=model)
    problem = VacancyPhaseFieldProblem(mesh or disk_mesh(20e-9, 4e-9, MPI.COMM_WORLD), settings)
    problem._ramp = (0.14, 0.86, 0.0, settings.cycling.ramp_time)
    for _ in range(3):
        result = problem.step(settings.cycling.dt_initial * step_fraction)
        assert result.ok, result.reason
    return problem


def test_jacobian_through_the_native_matrix_is_the_petsc_assembly():
    """The Jacobian assembled into dolfinx's CSR matrix and copied into PETSc by rows (on one
    rank: through the bordered assembler into the pattern without the never-filled field
    blocks) equals the element-by-element assembly into a PETSc matrix with the full pattern."""
    from dolfinx.fem import petsc as fem_petsc

    problem = _vacancy_problem_in_a_lithiation()
    nw = problem.newton
    assert nw._csr is not None  # the fast path is used here (1 and 2 ranks)
    nw.assemble_jacobian()
    direct = fem_petsc.create_matrix(nw.jacobian)
    fem_petsc.assemble_matrix(direct, nw.jacobian, bcs=nw.bcs)
    direct.assemble()
    if MPI.COMM_WORLD.size == 1:  # the pruned pattern holds half the entries
        assert nw.A.getInfo()["nz_used"] < 0.6 * direct.getInfo()["nz_used"]
    scale = nw.A.norm()
    direct.axpy(-1.0, nw.A, structure=PETSc.Mat.Structure.SUBSET_NONZERO_PATTERN)
    assert direct.norm() <= 1e-14 * scale
    direct.destroy()
    problem.destroy()


@pytest.mark.parametrize("kinematics", ["generalized_plane_strain", "plane_strain"])
def test_the_three_assemblies_step_to_the_same_state(kinematics):
    """'bordered' (one pass per residual and Jacobian under generalised plane strain, and the
    pattern without the never-filled field blocks), 'cached' and 'dolfinx' take the same steps
    to the same state within the Newton tolerance, each through its own assembler."""
    mesh = disk_mesh(20e-9, 4e-9, MPI.COMM_WORLD)
    gps = kinematics == "generalized_plane_strain"
    states, stretches, entries = {}, {}, {}
    for assembly in ("dolfinx", "cached", "bordered"):
        # plane strain: the in-plane swelling stalls Newton at larger steps, whatever the assembly
        fraction = 1 / 16 if gps else 1 / 256
        problem = _vacancy_problem_in_a_lithiation(
            mesh=mesh, assembly=assembly, kinematics=kinematics, step_fraction=fraction
        )
        nw = problem.newton
        assert (nw._bordered is not None) == (assembly == "bordered" and gps)
        assert (nw._cached is not None) == (assembly == "cached" or (assembly == "bordered" and not gps))
        states[assembly] = problem.w.x.array[problem._bounded_dofs].copy()
        stretches[assembly] = float(problem.lam.value)
        entries[assembly] = MPI.COMM_WORLD.allreduce(nw.A.getInfo(PETSc.Mat.InfoType.LOCAL)["nz_used"])
        problem.destroy()
    for assembly in ("cached", "bordered"):
        diff = float(np.abs(states[assembly] - states["dolfinx"]).max(initial=0.0))
        assert MPI.COMM_WORLD.allreduce(diff, op=MPI.MAX) < 1e-7
        assert abs(stretches[assembly] - stretches["dolfinx"]) < 1e-7 * stretches["dolfinx"]
    assert (stretches["bordered"] != 1.0) == gps  # generalised plane strain: the border is exercised
    assert entries["cached"] == entries["dolfinx"]
    assert entries["bordered"] < 0.6 * entries["cached"]  # the pruned pattern, on 1 and 2 ranks


def test_predictor_starts_newton_nearer_and_converges_to_the_same_state():
    """A step from the same state with and without the linear predictor: the predicted first
    residual is smaller and both converge to the same state within the Newton tolerance."""
    problem = _vacancy_problem_in_a_lithiation()
    saved = problem.w.x.array.copy(), float(problem.lam.value), problem.t
    dt = problem.settings.cycling.dt_initial / 16
    results, states = {}, {}
    for predictor in ("none", "linear"):
        problem.settings.solver.predictor = predictor
        problem.w.x.array[:] = saved[0]
        problem.lam.value = saved[1]
        problem.t = saved[2]
        problem.newton.invalidate()
        w_prev, dt_prev, lam_prev = problem._w_prev.x.array.copy(), problem._dt_prev, problem._lam_prev
        results[predictor] = problem.step(dt)
        states[predictor] = problem.w.x.array[problem._bounded_dofs].copy()
        # put back the history the next attempt predicts from (the step was accepted)
        problem.w_old.x.array[:] = saved[0]
        problem._w_prev.x.array[:], problem._dt_prev, problem._lam_prev = w_prev, dt_prev, lam_prev
        problem.lam_old = saved[1]
    assert results["none"].ok and results["linear"].ok
    assert results["linear"].history[0] < 0.5 * results["none"].history[0]
    diff = problem.comm.allreduce(float(np.abs(states["linear"] - states["none"]).max(initial=0.0)), op=MPI.MAX)
    assert diff < 1e-7
    problem.destroy()


def test_predictor_does_not_extrapolate_across_the_end_of_the_surface_ramp():
    """Inside the ramp of the surface value the predictor extrapolates; the step that leaves the
    ramp (the surface value has a kink there) starts from the last state, exactly as without a
    predictor; the step after it extrapolates again."""
    problem = _vacancy_problem_in_a_lithiation()  # three steps inside the ramp (0.01)
    end = problem._ramp[2] + problem._ramp[3]
    assert not problem._leaves_ramp(0.5 * (end - problem.t)) and problem._leaves_ramp(2 * (end - problem.t))
    for k in range(6, 0, -1):  # to the ramp's end in steps that extrapolate along the ramp
        assert not problem._leaves_ramp((end - problem.t) / k)
        assert problem.step((end - problem.t) / k).ok
    dt = 0.0005
    assert problem._leaves_ramp(dt)
    saved = problem.w.x.array.copy(), float(problem.lam.value), problem.t
    history = {}
    for predictor in ("none", "linear"):
        problem.settings.solver.predictor = predictor
        problem.w.x.array[:] = saved[0]
        problem.lam.value, problem.t = saved[1], saved[2]
        problem.newton.invalidate()
        w_prev, dt_prev, lam_prev = problem._w_prev.x.array.copy(), problem._dt_prev, problem._lam_prev
        result = problem.step(dt)
        assert result.ok, result.reason
        history[predictor] = result.history
        problem.w_old.x.array[:] = saved[0]
        problem._w_prev.x.array[:], problem._dt_prev, problem._lam_prev = w_prev, dt_prev, lam_prev
        problem.lam_old = saved[1]
    assert history["linear"][0] == pytest.approx(history["none"][0], rel=1e-10)
    problem.w.x.array[:] = saved[0]
    problem.t = saved[2]
    assert problem.step(dt).ok
    assert not problem._leaves_ramp(dt)  # past the ramp: extrapolation again
    problem.destroy()


def test_the_problem_and_its_output_leave_the_callers_mesh_in_metres(shared_tmp_path):
    """The forms are written in the length unit l0 on the mesh in metres: building a problem,
    stepping and writing the deformed mesh leave the caller's mesh coordinates bit for bit as
    they were; the writer's own copy moves by the displacement (metres)."""
    from fem_anode.fem.phasefield.output import FieldWriter

    problem = _vacancy_problem_in_a_lithiation()
    x = problem.mesh.geometry.x
    radius = problem.comm.allreduce(float(np.hypot(x[:, 0], x[:, 1]).max(initial=0.0)), op=MPI.MAX)
    assert radius == pytest.approx(20e-9, rel=1e-6)  # metres, not units of l0
    original = x.copy()
    assert problem.step(problem.settings.cycling.dt_initial / 16).ok
    writer = FieldWriter(problem, shared_tmp_path)
    writer.write(problem.t)
    writer.close()
    assert np.array_equal(problem.mesh.geometry.x, original)
    moved = writer.mesh.geometry.x - original
    u = writer.f.u.x.array.reshape(-1, 2)[writer.f.node_dofs]
    assert np.allclose(moved[:, :2], u, rtol=1e-12, atol=1e-12 * 20e-9)
    assert problem.comm.allreduce(float(np.abs(moved).max(initial=0.0)), op=MPI.MAX) > 1e-3 * 20e-9  # it swells
    problem.destroy()


@pytest.mark.parametrize("precision, inverse_tol", [("double", 1e-8), ("single", 1e-3)])
def test_preconditioner_is_the_exact_inverse_of_the_lagged_bordered_jacobian(precision, inverse_tol):
    """Between factorisations the block elimination keeps the border it was factorised with:
    applied to ``J_lagged x`` it returns ``x`` (to the factorisation's precision: round-off in
    double, float32 factors of a matrix with a condition number of ~1e4-1e5 in single) after the
    Jacobian (and its border) has been reassembled at a new state without refactorisation, and
    ``J_new x`` it does not (the lag is a larger error than either precision's)."""
    if precision == "single":
        _require_single_precision()
    problem = _vacancy_problem_in_a_lithiation(precision=precision)
    nw = problem.newton
    assert nw.axial is not None and nw.reuse
    assert nw._single == (precision == "single")
    nw.pack()
    nw._unpack(nw.X)
    nw.assemble_jacobian()
    nw._factorise()
    x, y, z = nw.X.duplicate(), nw.X.duplicate(), nw.X.duplicate()
    x.setRandom()
    nw.J.mult(x, y)  # y = J_lagged x (the matrix just factorised, with its border)
    assert problem.step(problem.settings.cycling.dt_initial / 8).ok  # moves on, lagged factorisation
    nw.assemble_jacobian()  # a new A, b, c, d; no refactorisation
    nw._fresh = False
    assert not nw._refactor
    shell = nw.snes.getKSP().getPC()
    shell.apply(y, z)
    z.axpy(-1.0, x)
    lagged_error = z.norm()
    assert lagged_error <= inverse_tol * x.norm()
    nw.J.mult(x, y)  # the current Jacobian differs: the preconditioner is not its inverse
    shell.apply(y, z)
    z.axpy(-1.0, x)
    assert z.norm() > 1e-6 * x.norm() and z.norm() > 10 * lagged_error
    for vec in (x, y, z):
        vec.destroy()
    problem.destroy()


def test_krylov_floor_follows_the_newton_tolerance_and_keeps_the_converged_state():
    """With Eisenstat-Walker the Krylov solves stop at a tenth of Newton's own target
    (``0.1 max(rtol |F_0|, atol)``); the step converges to the state of exact linear solves
    within the Newton tolerance."""
    problem = _vacancy_problem_in_a_lithiation()
    saved = problem.w.x.array.copy(), float(problem.lam.value), problem.t
    w_prev, dt_prev, lam_prev = problem._w_prev.x.array.copy(), problem._dt_prev, problem._lam_prev
    dt = problem.settings.cycling.dt_initial / 16
    result = problem.step(dt)
    assert result.ok, result.reason
    rtol, atol, _, _ = problem.newton.snes.getTolerances()
    floor = problem.newton.snes.getKSP().getTolerances()[1]
    assert floor == pytest.approx(0.1 * max(rtol * result.history[0], atol), rel=1e-12)
    assert result.history[-1] <= max(rtol * result.history[0], atol)
    state = problem.w.x.array[problem._bounded_dofs].copy()
    exact = PhaseFieldSettings(
        mesh=MeshSettings(size=4e-9), solver=SolverSettings(reuse_factorisation=False)
    ).solver  # an LU at every Newton iteration: exact linear solves
    problem.newton.destroy()
    problem.settings.solver = exact
    problem.newton = problem._make_solver(problem.bcs)
    problem.w.x.array[:], problem.lam.value, problem.t = saved
    problem.w_old.x.array[:] = saved[0]
    problem._w_prev.x.array[:], problem._dt_prev, problem._lam_prev = w_prev, dt_prev, lam_prev
    problem.lam_old = saved[1]
    assert problem.step(dt).ok
    diff = np.abs(problem.w.x.array[problem._bounded_dofs] - state).max(initial=0.0)
    assert problem.comm.allreduce(float(diff), op=MPI.MAX) < 1e-7
    problem.destroy()


def test_smooth_controller_grows_fast_only_after_very_easy_steps():
    """``fast_growth`` after a step of at most half of ``easy_iterations`` effective Newton
    iterations, ``growth`` after an easy one; both still limited by ``dc_target max_dc / dc``."""
    from types import SimpleNamespace

    from fem_anode.fem.phasefield.problem import StepResult

    settings = PhaseFieldSettings()
    cyc = settings.cycling  # growth 1.5, fast_growth 3, easy_iterations 4, target 0.75 x 0.2
    fake = SimpleNamespace(settings=settings)
    fake._effective_iterations = lambda h: PhaseFieldProblem._effective_iterations(fake, h)

    def next_dt(effective: int, dc: float) -> float:
        history = [1.0] + [1e-3] * (effective - 1) + [1e-9]  # the residual falls by 1e-6 at `effective`
        return PhaseFieldProblem._next_dt(fake, 0.01, 0.01, StepResult(True, effective, "", history, dc))

    assert next_dt(2, 1e-4) == pytest.approx(0.01 * cyc.fast_growth)
    assert next_dt(3, 1e-4) == pytest.approx(0.01 * cyc.growth)
    assert next_dt(2, 0.075) == pytest.approx(0.01 * 2.0)  # dc-limited: 0.15 / 0.075
    assert next_dt(6, 1e-4) == pytest.approx(0.01)
    cyc.fast_growth = 1.0  # never below growth
    assert next_dt(1, 1e-4) == pytest.approx(0.01 * cyc.growth)


def _require_single_precision():
    from fem_anode.fem.phasefield.mumps_single import single_precision_available

    reason = single_precision_available(MPI.COMM_WORLD)
    if reason is not None:
        pytest.skip(f"single-precision MUMPS not available: {reason}")


def test_single_precision_factorisation_solves_to_float32_accuracy():
    """The one-rank single-precision LU: ``A x = b`` to float32 accuracy against PETSc's
    double-precision MUMPS on the same Jacobian, and a repeated factorisation (the numeric phase
    only) gives the same solution; on several ranks it refuses (SubstructuredLU serves there)."""
    _require_single_precision()
    from fem_anode.fem.phasefield.mumps_single import SinglePrecisionLU

    problem = _vacancy_problem_in_a_lithiation(precision="double")
    nw = problem.newton
    nw.assemble_jacobian()
    if problem.comm.size > 1:
        with pytest.raises(ValueError, match="SubstructuredLU"):
            SinglePrecisionLU(problem.comm)
        problem.destroy()
        return
    lu = SinglePrecisionLU(problem.comm)
    lu.factorise(nw.A)
    b, x, reference, again = (nw.A.createVecRight() for _ in range(4))
    b.setArray(np.cos(np.arange(b.getLocalSize()) + 7.0 * b.getOwnershipRange()[0]))
    lu.solve(b, x)
    ksp = PETSc.KSP().create(problem.comm)
    ksp.setOperators(nw.A)
    ksp.setType("preonly")
    ksp.getPC().setType("lu")
    ksp.getPC().setFactorSolverType("mumps")
    ksp.solve(b, reference)
    x.axpy(-1.0, reference)
    assert x.norm() <= 1e-3 * reference.norm()
    assert x.norm() >= 1e-12 * reference.norm()  # float32 factors, not double ones
    lu.factorise(nw.A)
    lu.solve(b, again)
    again.axpy(-1.0, reference)
    assert again.norm() == pytest.approx(x.norm(), rel=1e-6)
    assert again.norm() <= 1e-3 * reference.norm()
    assert lu.factor_entries > nw.A.getInfo()["nz_used"]  # fill-in
    for obj in (b, x, reference, again, ksp):
        obj.destroy()
    lu.destroy()
    problem.destroy()


def test_substructured_factorisation_solves_to_float32_accuracy_and_repeats_bitwise():
    """The several-rank single-precision LU (a local LU per rank, a dense Schur complement of the
    interface): ``A x = b`` to float32 accuracy against PETSc's double-precision MUMPS; no
    coupling joins two ranks' interiors; a repeated factorisation gives the bitwise same
    solution (MUMPS's parallel float32 LU did not); too large an interface is refused."""
    _require_single_precision()
    from fem_anode.fem.phasefield.mumps_single import InterfaceTooLarge, SubstructuredLU

    problem = _vacancy_problem_in_a_lithiation(precision="double")
    comm = problem.comm
    nw = problem.newton
    nw.assemble_jacobian()
    lu = SubstructuredLU(comm)
    lu.factorise(nw.A)
    b, x, reference, again = (nw.A.createVecRight() for _ in range(4))
    b.setArray(np.cos(np.arange(b.getLocalSize()) + 7.0 * b.getOwnershipRange()[0]))
    lu.solve(b, x)
    ksp = PETSc.KSP().create(comm)
    ksp.setOperators(nw.A)
    ksp.setType("preonly")
    ksp.getPC().setType("lu")
    ksp.getPC().setFactorSolverType("mumps")
    ksp.solve(b, reference)
    error = x.copy()
    error.axpy(-1.0, reference)
    assert error.norm() <= 1e-4 * reference.norm()
    assert error.norm() >= 1e-12 * reference.norm()  # float32 factors, not double ones
    # the interface separates the ranks: no entry couples an interior unknown to another rank's
    indptr, columns, _ = nw.A.getValuesCSR()
    start, end = nw.A.getOwnershipRange()
    interior = np.zeros(nw.A.getSize()[0], dtype=bool)
    local = np.zeros(end - start, dtype=bool)
    local[lu._layout["interior"]] = True
    interior[start:end] = local
    interior = comm.allreduce(interior.astype(np.int8), op=MPI.SUM).astype(bool)
    rows = start + np.repeat(np.arange(end - start), np.diff(indptr))
    foreign = (columns < start) | (columns >= end)
    assert not np.any(interior[rows[foreign]] & interior[columns[foreign]])
    assert (lu.interface_size > 0) == (comm.size > 1)
    lu.factorise(nw.A)
    lu.solve(b, again)
    assert np.array_equal(again.getArray(), x.getArray())
    lu.destroy()
    if comm.size > 1:
        small = SubstructuredLU(comm, max_interface=lu.interface_size - 1)
        with pytest.raises(InterfaceTooLarge, match="coupled across"):
            small.factorise(nw.A)
        small.destroy()
    for obj in (b, x, reference, again, error, ksp):
        obj.destroy()
    problem.destroy()


def test_too_large_an_interface_runs_in_double_precision(caplog):
    """On several ranks an interface above the substructured LU's limit makes the run factorise
    in double precision (logged), without a failed step or a counted float32 failure."""
    _require_single_precision()
    if MPI.COMM_WORLD.size == 1:
        pytest.skip("the substructured LU is the several-rank one")
    from fem_anode.fem.phasefield.vacancy import VacancyPhaseFieldProblem

    settings = PhaseFieldSettings(mesh=MeshSettings(size=4e-9), solver=SolverSettings(factorisation_precision="single"))
    problem = VacancyPhaseFieldProblem(disk_mesh(20e-9, 4e-9, MPI.COMM_WORLD), settings)
    problem._ramp = (0.14, 0.86, 0.0, settings.cycling.ramp_time)
    problem.newton.lu.max_interface = 0
    with caplog.at_level("INFO", logger="fem_anode.fem.phasefield.newton"):
        result = problem.step(settings.cycling.dt_initial / 16)
    assert result.ok, result.reason
    nw = problem.newton
    assert nw.lu is None and nw.P is not None and nw.single_failures == 0
    if problem.comm.rank == 0:
        assert "coupled across" in caplog.text and "double precision for this run" in caplog.text
    problem.destroy()


def test_interface_is_a_minimum_vertex_cover_of_the_couplings():
    """Koenig's construction: the cover touches every edge and has as many vertices as a maximum
    matching; on K(2,5) it is the two left vertices, on a star around a right vertex that one."""
    from fem_anode.fem.phasefield.mumps_single import _minimum_vertex_cover

    left, right = np.repeat([3, 8], 5), np.tile([10, 11, 12, 13, 14], 2)  # K(2,5)
    cover_left, cover_right = _minimum_vertex_cover(left, right)
    assert cover_left.tolist() == [3, 8] and cover_right.tolist() == []
    cover_left, cover_right = _minimum_vertex_cover(np.arange(6), np.full(6, 40))  # a star
    assert cover_left.tolist() == [] and cover_right.tolist() == [40]
    rng = np.random.default_rng(5)
    for _ in range(20):
        left, right = rng.integers(0, 30, 60), rng.integers(100, 125, 60)
        cover_left, cover_right = _minimum_vertex_cover(left, right)
        assert np.all(np.isin(left, cover_left) | np.isin(right, cover_right))
        from scipy import sparse
        from scipy.sparse.csgraph import maximum_bipartite_matching

        graph = sparse.csr_matrix((np.ones(60), (left, right - 100)), shape=(30, 25))
        matching = int(np.sum(maximum_bipartite_matching(graph, perm_type="column") >= 0))
        assert len(cover_left) + len(cover_right) == matching


def test_single_precision_runs_repeat_bitwise_on_any_number_of_ranks():
    """Two identical runs of a few steps with float32 factors (substructured on several ranks)
    take the same Krylov iterations and factorisations and end in the bitwise same state."""
    _require_single_precision()
    mesh = disk_mesh(20e-9, 4e-9, MPI.COMM_WORLD)
    runs = []
    for _ in range(2):
        problem = _vacancy_problem_in_a_lithiation(precision="single", mesh=mesh)
        nw = problem.newton
        runs.append((nw.linear_iterations, nw.factorisations, problem.w.x.array.copy()))
        problem.destroy()
    assert runs[0][:2] == runs[1][:2]
    assert np.array_equal(runs[0][2], runs[1][2])


def test_single_precision_steps_converge_to_the_double_precision_state():
    """Newton with the single-precision preconditioner reaches the state of the double-precision
    one within the Newton tolerance (the Krylov solves are in double precision)."""
    _require_single_precision()
    states = []
    mesh = disk_mesh(20e-9, 4e-9, MPI.COMM_WORLD)  # one mesh: the same dofs on every rank for both
    for precision in ("single", "double"):
        problem = _vacancy_problem_in_a_lithiation(precision=precision, mesh=mesh)
        assert (problem.newton.lu is not None) == (precision == "single")
        result = problem.step(problem.settings.cycling.dt_initial / 8)
        assert result.ok, result.reason
        states.append(problem.w.x.array[problem._bounded_dofs].copy())
        problem.destroy()
    diff = np.abs(states[0] - states[1]).max(initial=0.0)
    assert MPI.COMM_WORLD.allreduce(float(diff), op=MPI.MAX) < 1e-6


def _fail_next_single_factorisation(nw) -> list[int]:
    """Make the next float32 factorisation of ``nw`` fail as MUMPS would; returns the list of
    failures so far (clear it to make the next one fail again)."""
    from fem_anode.fem.phasefield.mumps_single import FactorisationError

    working = nw.lu.factorise
    failures: list[int] = []

    def failing_once(matrix):
        if not failures:
            failures.append(1)
            raise FactorisationError("MUMPS (single precision) factorisation failed: INFOG(1) = -10, INFOG(2) = 3")
        working(matrix)

    nw.lu.factorise = failing_once
    return failures


def test_single_precision_failure_falls_back_to_double_for_a_while(caplog):
    """A MUMPS failure in single precision is not a failed step: the next ``DOUBLE_RUN``
    factorisations are double precision (logged), then single precision again."""
    _require_single_precision()
    from fem_anode.fem.phasefield.newton import DOUBLE_RUN

    problem = _vacancy_problem_in_a_lithiation(precision="single")
    nw = problem.newton
    failures = _fail_next_single_factorisation(nw)
    with caplog.at_level("INFO", logger="fem_anode.fem.phasefield.newton"):
        nw.invalidate()
        result = problem.step(problem.settings.cycling.dt_initial / 16)
    assert result.ok, result.reason
    assert nw.single_failures == 1 and nw.P is not None
    assert not nw.lu.analysed  # the float32 factors (and analysis) are freed during the float64 run
    if problem.comm.rank == 0:
        assert f"the next {DOUBLE_RUN} factorisations in double precision" in caplog.text
    for _ in range(DOUBLE_RUN):
        nw.invalidate()
        assert not nw._single or nw._double_left == 0
        nw._factorise()
    assert nw._single and nw._double_left == 0  # single precision again after the run
    assert nw._double_run == 2 * DOUBLE_RUN
    assert nw.P is None  # the float64 factors are freed while float32 ones are in use
    failures.clear()  # fails again: a second run in double precision, twice as long, works as the first
    with caplog.at_level("INFO", logger="fem_anode.fem.phasefield.newton"):
        nw.invalidate()
        result = problem.step(problem.settings.cycling.dt_initial / 16)
    assert result.ok, result.reason
    assert nw.single_failures == 2 and not nw._single and nw._double_run == 4 * DOUBLE_RUN
    pc = nw.ksp.getPC()
    assert pc.getType() == "lu" and pc.getFactorSolverType() == "mumps"  # the package's options survive
    problem.destroy()


def test_single_precision_failures_are_counted_in_the_half_cycle_record():
    """A float32 factorisation that fails inside a half-cycle shows in its record and in the
    checkpoint state (the next half-cycle's record counts from there)."""
    _require_single_precision()
    problem = _vacancy_problem_in_a_lithiation(precision="single")
    nw = problem.newton
    _fail_next_single_factorisation(nw)
    nw.invalidate()
    duration = problem.settings.cycling.dt_initial / 4
    record = problem.run_half_cycle(1, "lithiation", duration)
    assert record["single_precision_failures"] == 1 and record["factorisations"] >= 1
    assert problem.checkpoint_state()[0]["single_failures"] == 1
    assert problem.run_half_cycle(2, "lithiation", duration)["single_precision_failures"] == 0
    problem.destroy()


def test_single_precision_usage_errors_and_the_automatic_choice():
    """'single' without reuse or with another direct solver is a usage error naming the setting;
    'auto' is single precision on any number of ranks (substructured on several: reproducible)."""
    from fem_anode.errors import UsageError
    from fem_anode.fem.phasefield.mumps_single import SinglePrecisionLU, SubstructuredLU, single_precision_available
    from fem_anode.fem.phasefield.vacancy import VacancyPhaseFieldProblem

    mesh = disk_mesh(20e-9, 4e-9, MPI.COMM_WORLD)
    automatic = VacancyPhaseFieldProblem(mesh, PhaseFieldSettings(mesh=MeshSettings(size=4e-9)))
    if single_precision_available(MPI.COMM_WORLD) is None:
        kind = SinglePrecisionLU if MPI.COMM_WORLD.size == 1 else SubstructuredLU
        assert isinstance(automatic.newton.lu, kind)
    else:
        assert automatic.newton.lu is None
    automatic.destroy()
    for options, match in (
        ({"factorisation_precision": "single", "reuse_factorisation": False}, "reuse_factorisation"),
        ({"factorisation_precision": "single", "linear_solver": "superlu_dist"}, "superlu_dist"),
    ):
        with pytest.raises(UsageError, match=match):
            SolverSettings(**options)  # the settings themselves refuse it, before any problem is built
    for options in ({"reuse_factorisation": False}, {"linear_solver": "superlu_dist"}):  # auto: just double
        problem = VacancyPhaseFieldProblem(
            mesh, PhaseFieldSettings(mesh=MeshSettings(size=4e-9), solver=SolverSettings(**options))
        )
        assert problem.newton.lu is None
        problem.destroy()


def _controller_run(failure_ceiling: float) -> list[tuple[float, float, bool]]:
    """Attempts ``(t, dt, accepted)`` of a half-cycle with the smooth controller and a fake step
    (no Newton): until t = 0.3 a front moves (every accepted step changes c by 0.05) and Newton
    fails for every step larger than 0.02; after it, c hardly changes (1e-5) and nothing fails."""
    from fem_anode.fem.phasefield.problem import StepResult

    cycling = CyclingSettings(
        half_cycles=1, half_cycle_time=1.0, ramp_time=0.0, dt_initial=0.01, failure_ceiling=failure_ceiling
    )
    settings = PhaseFieldSettings(mesh=MeshSettings(size=10e-9), cycling=cycling)
    problem = PhaseFieldProblem(disk_mesh(20e-9, 10e-9, MPI.COMM_WORLD), settings)
    attempts: list[tuple[float, float, bool]] = []

    def fake_step(dt: float) -> StepResult:
        front = problem.t < 0.3
        if front and dt > 0.02:
            attempts.append((problem.t, dt, False))
            return StepResult(False, 8, "diverged: Newton stagnated", [1e-2, 1e-5, 1e-5], None)
        attempts.append((problem.t, dt, True))
        problem.t += dt
        return StepResult(True, 2, "converged", [1e-2, 1e-5, 1e-9], 0.05 if front else 1e-5)

    problem.step = fake_step  # type: ignore[method-assign]
    problem.run_half_cycle(1, "lithiation", cycling.half_cycle_time)
    problem.destroy()
    return attempts


def test_failure_ceiling_keeps_steps_below_a_failed_attempt_for_a_while():
    """After a failed Newton attempt of ``dt_f`` the next steps stay below ``0.5 dt_f``, a bound
    growing by 1.3 per accepted step, until c hardly changes any more (then ``fast_growth`` again);
    the saw-tooth of grow-fail-cut without it fails far more often."""
    with_ceiling, without = _controller_run(0.5), _controller_run(0.0)
    failures = [dt for _, dt, ok in with_ceiling if not ok]
    assert 0 < len(failures) < len([dt for _, dt, ok in without if not ok]) / 2
    bound, failed_at = None, None
    for t, dt, ok in with_ceiling:
        if t >= 0.3:
            break
        if bound is not None:
            assert dt <= bound * (1 + 1e-12), (t, dt, bound)
        if not ok:
            failed_at, bound = dt, None
        elif failed_at is not None:
            bound = 0.5 * failed_at if bound is None else bound * 1.3
    quiet = [dt for t, dt, ok in with_ceiling if ok and t >= 0.3]
    assert quiet[1] == pytest.approx(3 * quiet[0]) and quiet[2] == pytest.approx(3 * quiet[1])  # fast growth
    assert sum(dt for _, dt, ok in with_ceiling if ok) == pytest.approx(1.0)


def test_stagnation_stop_on_a_flat_residual_only_once_newton_has_converged_far():
    """A Newton attempt whose residual has fallen below 1e-2 of its first one and then stays flat
    (each of the last two iterations kept more than 0.9 of it) is stopped as stagnated; a slow
    start (the globalisation phase) or a converging tail is not."""
    from types import SimpleNamespace

    from fem_anode.fem.phasefield.newton import BorderedNewton

    snes = SimpleNamespace(getTolerances=lambda: (1e-6, 1e-10, 1e-8, 25), getDivergenceTolerance=lambda: -1.0)

    def decision(history: list[float], monitored_first: bool = False) -> int:
        newton = SimpleNamespace(stagnation=True, history=[], _fnorm0=0.0, _krylov_floor=False, _stagnated=False)
        reason = 0
        for its, fnorm in enumerate(history):
            if monitored_first:
                newton.history.append(fnorm)
            reason = BorderedNewton._converged(newton, snes, its, (1.0, 1.0, fnorm))
            if not monitored_first:
                newton.history.append(fnorm)
            if reason != 0:
                return reason
        return reason

    stagnated = PETSc.SNES.ConvergedReason.DIVERGED_MAX_IT
    for monitored_first in (False, True):  # PETSc's order of monitor and test
        assert decision([1.7e-2, 3.5e-4, 4.4e-5, 1.1e-5, 5.8e-6, 5.7e-6, 5.7e-6], monitored_first) == stagnated
        assert decision([3.4, 3.1, 2.8], monitored_first) == 0  # slow start, not below 1e-2 of the first
        assert decision([1e-2, 1e-4, 9.5e-5, 9e-6], monitored_first) == 0  # one flat iteration only


def test_convex_split_takes_the_concave_terms_from_the_last_state_and_is_consistent():
    """``solver.time_scheme = "convex_split"``: the residuals of the two schemes at the same state
    differ by exactly the concave terms' change, ``-2 Omega (c - c_old) v - 2 (1 - h) omega_v
    (c_v - c_v,old) v_v`` with the vertex rule (so they share their steady states); one step from
    the same state differs from backward Euler by less when the step is halved (a consistent
    scheme; about 2x here, where the surface ramp's stiff modes dominate the difference)."""
    import ufl

    from fem_anode.fem.phasefield.vacancy import VacancyPhaseFieldProblem, interpolation

    mesh = disk_mesh(20e-9, 4e-9, MPI.COMM_WORLD)
    problems = {}
    for scheme in ("implicit", "convex_split"):
        settings = PhaseFieldSettings(mesh=MeshSettings(size=4e-9), solver=SolverSettings(time_scheme=scheme))
        problem = VacancyPhaseFieldProblem(mesh, settings)
        problem._ramp = (0.14, 0.86, 0.0, settings.cycling.ramp_time)
        problems[scheme] = problem
    implicit, split = problems["implicit"], problems["convex_split"]
    for _ in range(3):  # the same history for both: a few backward-Euler steps into a lithiation
        assert implicit.step(settings.cycling.dt_initial / 16).ok
    w_now, w_before = implicit.w.x.array.copy(), implicit._w_prev.x.array.copy()
    state, t, lam = implicit.state.x.array.copy(), implicit.t, float(implicit.lam.value)

    # the residuals at w with w_old one step earlier
    residuals = []
    for problem in (implicit, split):
        problem.w.x.array[:], problem.w_old.x.array[:] = w_now, w_before
        problem.state.x.array[:], problem.lam.value = state, lam
        problem.dt.value, problem.c_surface.value = implicit.dt.value, implicit.c_surface.value
        residuals.append(dolfinx.fem.assemble_vector(problem.residual_form).array.copy())
    c, _, _, cv, _ = ufl.split(implicit.w)
    c_old, cv_old = ufl.split(implicit.w_old)[0], ufl.split(implicit.w_old)[3]
    _, v, _, _, vv = ufl.TestFunctions(implicit.W)
    mat = settings.material
    h, _ = interpolation(c, mat.c_min, mat.c_max)
    change = -(2 * mat.omega * (c - c_old) * v + 2 * (1 - h) * implicit.omega_v * (cv - cv_old) * vv)
    expected = dolfinx.fem.assemble_vector(dolfinx.fem.form(change * implicit.dx_vertex)).array
    scale = np.abs(expected).max(initial=0.0)
    assert implicit.comm.allreduce(scale, op=MPI.MAX) > 0
    error = np.abs(residuals[1] - residuals[0] - expected).max(initial=0.0)
    assert implicit.comm.allreduce(error, op=MPI.MAX) <= 1e-10 * implicit.comm.allreduce(scale, op=MPI.MAX)

    def one_step(problem, dt: float) -> np.ndarray:
        problem.w.x.array[:] = problem.w_old.x.array[:] = w_now
        problem.state.x.array[:] = state
        problem.lam.value, problem.lam_old, problem.t = lam, lam, t
        problem._dt_prev = None  # no predictor: the same Newton start for both schemes
        problem.newton.invalidate()
        result = problem.step(dt)
        assert result.ok, result.reason
        return problem.w.x.array[problem._c_dofs].copy()

    differences = []
    for dt in (0.001, 0.0005):
        local = np.abs(one_step(split, dt) - one_step(implicit, dt)).max(initial=0.0)
        differences.append(implicit.comm.allreduce(local, op=MPI.MAX))
    assert differences[1] > 0 and differences[0] / differences[1] > 1.7, differences
    for problem in problems.values():
        problem.destroy()
