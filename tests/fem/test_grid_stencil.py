"""The grid-stencil sweeps of P1 matrices on voxel meshes (fem_anode.fem.grid_stencil): the operator
stored by row types is the assembled ``K + R + s M`` (also at nodes split by face connectivity),
its sweeps solve the SSOR triangles in grid order, and the fused CG on it is PETSc's KSPCG +
PCEISENSTAT on the assembled matrix in the same order. Runs on 1 and 2 ranks (each rank's rows)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("dolfinx")

import scipy.sparse as sparse  # noqa: E402
from scipy.sparse.linalg import spsolve_triangular  # noqa: E402
from mpi4py import MPI  # noqa: E402
from petsc4py import PETSc  # noqa: E402
from test_csr_sweeps import petsc_cg  # noqa: E402  (tests/fem is on sys.path: pytest's prepend mode)

from fem_anode.fem import read_mesh  # noqa: E402
from fem_anode.fem.diffusion import DiffusionProblem, DiffusionSettings, GeometrySettings, TimeSettings  # noqa: E402
from fem_anode.fem.diffusion.transient import FusedEisenstatSolver  # noqa: E402
from fem_anode.fem.grid_stencil import GridStencilKernel, grid_coordinates  # noqa: E402
from fem_anode.fem.voxel_sweeps import load_sweep_library, seqaij_arrays  # noqa: E402
from fem_anode.io import VoxelImage  # noqa: E402
from fem_anode.meshing import write_voxel_mesh  # noqa: E402

OMEGA = 1.3
N = 9  # voxels per side


@pytest.fixture(scope="module", params=["porous", "dense"])
def problem(request, tmp_path_factory, comm):
    """P1 on a random SEI/pore volume (seeded). "porous" (9^3, 40 % pore): many voxels touch only
    along an edge or at a corner, so face connectivity splits nodes; pore faces carry the Robin
    term. "dense" (14^3, 4 % pore): most rows are interior rows in runs along x, which the kernels
    sweep by sliding windows."""
    directory = Path(comm.bcast(str(tmp_path_factory.mktemp("grid")) if comm.rank == 0 else None, root=0))
    n, pore = (N, 0.4) if request.param == "porous" else (14, 0.04)
    labels = np.where(np.random.default_rng(3).random((n, n, n)) < 1.0 - pore, 3, 0).astype(np.uint8)
    labels[:, :, 0] = 3  # one face-connected wall keeps every part near the others
    path = directory / "volume.msh"
    if comm.rank == 0:
        write_voxel_mesh(VoxelImage(labels, (20e-9,) * 3, {"pore": 0, "sei": 3}), path, keep=["sei"])
    comm.barrier()
    settings = DiffusionSettings(
        geometry=GeometrySettings(mesh=path), time=TimeSettings(t_end=1e-5, output_times=[1e-5], dt_initial=1e-6)
    )
    settings.check()
    out = DiffusionProblem(read_mesh(path, comm), settings)
    out.volume_kind = request.param
    yield out
    out.destroy()


def local_blocks(problem) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    """``K + R`` and ``M`` of this rank's rows and columns (CSR arrays), and ``M``'s values."""
    KR, M = problem._KR, problem._M
    if problem.comm.size > 1:
        KR, M = KR.getDiagonalBlock(), M.getDiagonalBlock()
    return seqaij_arrays(KR), seqaij_arrays(M)[2]


def test_the_grid_stencil_is_the_assembled_operator(problem):
    (indptr, indices, k_values), m_values = local_blocks(problem)
    grid = problem._voxel_grid()
    assert grid is not None and grid.shape == (indptr.size - 1, 3)
    library = load_sweep_library(MPI.COMM_SELF)
    kernel = GridStencilKernel(indptr, indices, k_values, m_values, grid, OMEGA, library)
    n = kernel.n
    if problem.volume_kind == "porous":
        # split nodes exist (face connectivity) and are kept as CSR rows; the rest are a few row types
        split = problem.comm.allreduce(n - np.unique(grid, axis=0).shape[0])
        assert split > 0 and problem.comm.allreduce(kernel.nspecial) > split
        if problem.comm.size == 1:  # (a rank's thin slab has many types of boundary rows)
            assert kernel.ntypes < n / 4
    else:  # many rows are swept by sliding windows (fewer in the ranks' parts of a partitioned mesh)
        in_runs = problem.comm.allreduce(int((kernel.run_hi - kernel.run_lo).sum()))
        total = problem.comm.allreduce(n)
        assert in_runs > total / (3 if problem.comm.size == 1 else 20), (in_runs, total)
    K = sparse.csr_matrix((k_values, indices, indptr), shape=(n, n))
    M = sparse.csr_matrix((m_values, indices, indptr), shape=(n, n))
    rng = np.random.default_rng(problem.comm.rank)
    x, out = rng.standard_normal(n), np.empty(n)
    Mp = M[kernel.order][:, kernel.order].tocsr()
    kernel.mass_mult(x, out)
    np.testing.assert_allclose(out, Mp @ x, rtol=0, atol=1e-12 * float((abs(Mp) @ np.abs(x)).max()))
    for scale in (0.7, 40.0):
        kernel.set_scale(scale)
        A = (K + scale * M)[kernel.order][:, kernel.order].tocsr()  # in grid order
        x, out = rng.standard_normal(n), np.empty(n)
        kernel.mult(x, out)
        np.testing.assert_allclose(out, A @ x, rtol=0, atol=1e-12 * float((abs(A) @ np.abs(x)).max()))
        np.testing.assert_allclose(kernel.diagonal(), A.diagonal(), rtol=1e-12)
        d = A.diagonal()
        lower = (sparse.tril(A, -1) + sparse.diags(d / OMEGA)).tocsr()
        upper = lower.T.tocsr()

        def solve(triangle, rhs):  # the triangle of B = D/omega + L or of B^T
            return spsolve_triangular(triangle, rhs, lower=triangle is lower)

        for sweep, triangle in ((kernel.forward, lower), (kernel.backward, upper)):
            sweep(x, out)
            np.testing.assert_allclose(out, solve(triangle, x), rtol=1e-10, atol=1e-12 * np.abs(out).max())
        kernel.apply_upper(x, out)
        np.testing.assert_allclose(out, upper @ x, rtol=1e-12, atol=1e-13 * np.abs(out).max())
        # the fused CG passes against their dense definitions
        r, p0, t0, y = rng.standard_normal((4, n))
        mid, beta = 1.0 - 2.0 / OMEGA, 0.37
        kernel.forward_eisenstat(y, t0, d, mid, out)
        np.testing.assert_allclose(out, solve(lower, y + mid * d * t0), rtol=1e-10, atol=1e-12)
        p, t, w = p0.copy(), np.empty(n), np.empty(n)
        kernel.cg_direction_backward(r, d, beta, p, t)
        p_expected = d * r + beta * p0
        t_expected = solve(upper, p_expected)
        np.testing.assert_allclose(p, p_expected, rtol=1e-15)
        np.testing.assert_allclose(t, t_expected, rtol=1e-10, atol=1e-12 * np.abs(t_expected).max())
        pw = kernel.cg_forward_product(p, t, d, mid, w)
        z_expected = solve(lower, p_expected + mid * d * t_expected)
        np.testing.assert_allclose(t, z_expected, rtol=1e-10, atol=1e-12 * np.abs(z_expected).max())
        assert pw == pytest.approx(float(p_expected @ (z_expected + t_expected)), rel=1e-10)
        # the CG's start in one pass: B^T x, B^-1 b, B^-1 (B^T x + mid D x) and b . D b of B^-1 b
        y_start, b_hat, z_start = np.empty(n), np.empty(n), np.empty(n)
        bdb = kernel.cg_start(r, t0, d, mid, y_start, b_hat, z_start)
        np.testing.assert_allclose(y_start, upper @ t0, rtol=1e-12, atol=1e-13 * np.abs(y_start).max())
        b_expected = solve(lower, r)
        np.testing.assert_allclose(b_hat, b_expected, rtol=1e-10, atol=1e-12 * np.abs(b_expected).max())
        z_expected = solve(lower, upper @ t0 + mid * d * t0)
        np.testing.assert_allclose(z_start, z_expected, rtol=1e-10, atol=1e-12 * np.abs(z_expected).max())
        assert bdb == pytest.approx(float(b_expected @ (d * b_expected)), rel=1e-10)


def test_the_native_and_the_portable_build_sweep_to_the_same_bits(problem, tmp_path, monkeypatch):
    """The kernels compiled for this processor (``-march=native``, the default) and the portable
    build (``FEM_ANODE_NATIVE=0``) give bitwise the same sweeps, products and CG passes."""
    from fem_anode.fem import voxel_sweeps

    (indptr, indices, k_values), m_values = local_blocks(problem)
    grid = problem._voxel_grid()
    monkeypatch.setenv("FEM_ANODE_CACHE_DIR", str(tmp_path / "cache"))
    results = []
    for native in ("1", "0"):
        monkeypatch.setenv("FEM_ANODE_NATIVE", native)
        kernel = GridStencilKernel(indptr, indices, k_values, m_values, grid, OMEGA, voxel_sweeps._load_local())
        kernel.set_scale(3.0)
        rng = np.random.default_rng(7)
        n = kernel.n
        x, r, p, t, w, y, bh, z = rng.standard_normal((8, n))
        d = kernel.diagonal()
        out = {}
        for name, sweep in (("forward", kernel.forward), ("backward", kernel.backward), ("mult", kernel.mult)):
            out[name] = np.empty(n)
            sweep(x, out[name])
        kernel.cg_direction_backward(r, d, 0.37, p, t)
        out["pw"] = np.array([kernel.cg_forward_product(p, t, d, 1.0 - 2.0 / OMEGA, w)])
        out["bdb"] = np.array([kernel.cg_start(r, x, d, -0.5, y, bh, z)])
        results.append({**out, "p": p, "t": t, "w": w, "y": y, "bh": bh, "z": z})
    assert len(list((tmp_path / "cache").glob("voxel_sweeps-*.so"))) in (1, 2)  # 1: no -march=native here
    for name, value in results[0].items():
        assert np.array_equal(value, results[1][name]), name


def petsc_eisenstat_cg(A: sparse.csr_matrix) -> tuple[PETSc.KSP, PETSc.Mat]:
    """PETSc's KSPCG + PCEISENSTAT (as in test_csr_sweeps) on one rank, and its matrix."""
    A = A.tocsr()
    A.sort_indices()
    mat = PETSc.Mat().createAIJ(
        A.shape, csr=(A.indptr.astype(np.int32), A.indices.astype(np.int32), A.data), comm=PETSc.COMM_SELF
    )
    mat.assemble()
    return petsc_cg(mat, {"pc_type": "eisenstat", "pc_eisenstat_omega": OMEGA}), mat


def test_the_fused_solver_on_the_grid_is_petscs_cg_with_pceisenstat_in_its_order(problem):
    """Any number of ranks: the fused CG on the grid stencil is KSPCG + PCEISENSTAT on the whole
    assembled matrix renumbered in the solver's order (one rank: grid order; several: every rank's
    rows without couplings to other ranks in grid order, then the separator rows colour by colour):
    the same first residual norms (to 1e-8), iterations within one, solutions within the tolerance.
    The reference runs on each rank on the gathered matrix."""
    comm, scale = problem.comm, 25.0
    solver = FusedEisenstatSolver(
        problem._KR, problem._M, OMEGA, 1e-10, 500, load_sweep_library(comm), grid=problem._voxel_grid()
    )
    solver.prepare(scale)
    expected = "eisenstat+grid-stencil" if comm.size == 1 else "eisenstat-separator+grid-stencil"
    assert solver.getPC().getType() == expected and solver.order is not None
    kernel = solver.kernel
    start = problem._KR.getOwnershipRange()[0]
    # the solver's global order: (group, rank, kernel row) with group 0 for the first rows, 1 + colour after
    colour = solver.cg.sweeps.colour if comm.size > 1 else 0
    group = np.where(np.arange(kernel.n) < kernel.n_first, 0, 1 + colour)
    keys = np.concatenate(comm.allgather(np.stack([group, np.full(kernel.n, comm.rank), np.arange(kernel.n)], axis=1)))
    rows = np.concatenate(comm.allgather(start + solver.order))  # the matrix row of each kernel row
    order = rows[np.lexsort((keys[:, 2], keys[:, 1], keys[:, 0]))]
    A = problem._KR.copy()
    A.axpy(scale, problem._M, structure=PETSc.Mat.Structure.SAME_NONZERO_PATTERN)
    indptr, indices, values = A.getValuesCSR()
    whole = sparse.vstack(
        comm.allgather(sparse.csr_matrix((values, indices, indptr), shape=(indptr.size - 1, A.size[1])))
    )
    reference, mat = petsc_eisenstat_cg(whole.tocsr()[order][:, order])
    n = A.size[0]
    rng = np.random.default_rng(9)
    rhs, guess = rng.random(n) - 0.3, rng.random(n)
    b, x = A.createVecLeft(), A.createVecLeft()
    lo, hi = A.getOwnershipRange()
    b.array[:], x.array[:] = rhs[lo:hi], guess[lo:hi]
    solver.solve(b, x)  # in the matrix's order
    fused = (solver.getIterationNumber(), np.asarray(solver.getConvergenceHistory()))
    solution = np.concatenate(comm.allgather(x.array))
    b_seq, x_seq = mat.createVecLeft(), mat.createVecLeft()
    b_seq.array[:], x_seq.array[:] = rhs[order], guess[order]
    reference.solve(b_seq, x_seq)
    assert solver.getConvergedReason() == reference.getConvergedReason() > 0
    assert abs(fused[0] - reference.getIterationNumber()) <= 1 and fused[0] > 5
    np.testing.assert_allclose(fused[1][:4], np.asarray(reference.getConvergenceHistory())[:4], rtol=1e-8)
    np.testing.assert_allclose(solution[order], x_seq.array, rtol=0, atol=1e-7 * np.abs(x_seq.array).max())
    # the mass-matrix product of the time loop by the stencil (this rank's table and the
    # couplings to other ranks' rows), in the matrix's order
    assert solver.has_mass_mult
    b.array[:] = rng.standard_normal(b.getLocalSize())
    expected = A.createVecLeft()
    problem._M.mult(b, expected)
    solver.mass_mult(b, x)
    scale_of = float(np.abs(expected.array).max(initial=0.0))
    assert comm.allreduce(float(np.abs(x.array - expected.array).max(initial=0.0))) <= 1e-12 * comm.allreduce(scale_of)
    # a solve that fails on a non-finite right-hand side (NaN in the CG's vectors) must not
    # spoil the next one: the same solve as above, the same iterations
    b.array[:] = np.nan
    solver.solve(b, x)
    assert solver.getConvergedReason() == PETSc.KSP.ConvergedReason.DIVERGED_NANORINF
    b.array[:], x.array[:] = rhs[lo:hi], guess[lo:hi]
    solver.solve(b, x)
    assert solver.getConvergedReason() > 0 and solver.getIterationNumber() == fused[0]
    assert np.isfinite(x.array).all()
    expected.destroy()
    for obj in (b, x, b_seq, x_seq, mat, reference, A):
        obj.destroy()
    solver.free()


def test_what_is_not_a_grid_stencil_is_refused(problem):
    (indptr, indices, k_values), m_values = local_blocks(problem)
    grid = problem._voxel_grid()
    library = load_sweep_library(MPI.COMM_SELF)
    with pytest.raises(ValueError, match="not grid neighbours"):  # a coarser grid: couplings two nodes apart
        GridStencilKernel(indptr, indices, k_values, m_values, 2 * grid, OMEGA, library)
    with pytest.raises(ValueError, match="integer indices"):
        GridStencilKernel(indptr, indices, k_values, m_values, grid[:-1], OMEGA, library)
    # the solver falls back to the CSR sweeps on every rank
    solver = FusedEisenstatSolver(
        problem._KR, problem._M, OMEGA, 1e-10, 50, load_sweep_library(problem.comm), grid=2 * grid
    )
    assert solver.order is None and solver.getPC().getType().endswith("+compiled")
    solver.free()
    # a collision of the first row key (two row types under one key) is caught by the second key
    import ctypes

    class CollidingKeys:
        """The kernels, but the first key of every row made the same."""

        def __getattr__(self, name):
            return getattr(library, name)

        def fa_st_row_keys(self, n, *args):
            outside = library.fa_st_row_keys(n, *args)
            ctypes.memset(args[10], 0, 8 * n)  # key0
            return outside

    with pytest.raises(ValueError, match="ambiguous"):
        GridStencilKernel(indptr, indices, k_values, m_values, grid, OMEGA, CollidingKeys())
    # points off the lattice
    points = np.array([[0.0, 0.0, 0.0], [1.0, 0.5, 0.0]])
    assert grid_coordinates(points, np.zeros(3), np.ones(3)) is None
    np.testing.assert_array_equal(grid_coordinates(points, np.zeros(3), np.full(3, 0.5)), [[0, 0, 0], [2, 1, 0]])


def test_quadrilateral_meshes_take_the_grid_stencil_and_agree_with_the_direct_solve(tmp_path_factory, comm):
    """2D: a voxel mesh of quadrilaterals (pore channel, Si discs with uptake) runs its SSOR-CG on
    the grid stencil and gives the direct solve's records (rtol 1e-10 per step)."""
    from fem_anode.fem.diffusion import PhysicsSettings, SolverSettings

    directory = Path(comm.bcast(str(tmp_path_factory.mktemp("grid2d")) if comm.rank == 0 else None, root=0))
    labels = np.full((24, 30), 3, dtype=np.uint8)
    labels[:, :3] = 0
    yy, xx = np.mgrid[:24, :30]
    labels[(yy - 6) ** 2 + (xx - 22) ** 2 <= 9] = 1
    labels[(yy - 17) ** 2 + (xx - 21) ** 2 <= 6] = 1
    labels[10, 9] = labels[11, 10] = 0  # a corner contact in the SEI: a split node
    path = directory / "roi.msh"
    if comm.rank == 0:
        write_voxel_mesh(VoxelImage(labels, (20e-9, 20e-9), {"pore": 0, "si": 1, "sei": 3}), path, keep=["sei"])
    comm.barrier()
    tagged = read_mesh(path, comm)
    results, names = {}, {}
    for kind in ("direct", "iterative"):
        settings = DiffusionSettings(
            geometry=GeometrySettings(mesh=path),
            physics=PhysicsSettings(k_si=1e-3),
            time=TimeSettings(t_end=2e-3, output_times=[2e-3], dt_initial=1e-7),
            solver=SolverSettings(type=kind, preconditioner="ssor"),
        )
        settings.check()
        problem = DiffusionProblem(tagged, settings)
        results[kind] = problem.run()
        names[kind] = problem._fused.getPC().getType() if isinstance(problem._fused, FusedEisenstatSolver) else None
        problem.destroy()
    assert names["iterative"] in ("eisenstat+grid-stencil", "eisenstat-separator+grid-stencil")
    c_bulk = 1000.0
    np.testing.assert_allclose(
        results["iterative"].domain_mean, results["direct"].domain_mean, rtol=0, atol=1e-8 * c_bulk
    )
    assert results["iterative"].domain_mean[-1] > 0.3 * c_bulk  # far enough to be a test
