"""The compiled sweeps of a general CSR matrix (fem_anode.fem.voxel_sweeps.CSRSweepKernel, used by
the P1/P2 diffusion on one rank) equal PETSc's MatSOR on the same matrix, read PETSc's own arrays
in place, and the fused CG on them (FusedEisenstatSolver) is PETSc's KSPCG + PCEISENSTAT: the
same residual history, iterations, solution and reasons."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("petsc4py")

import scipy.sparse as sparse
from mpi4py import MPI
from petsc4py import PETSc

from fem_anode.fem import voxel_sweeps
from fem_anode.fem.diffusion.transient import FusedEisenstatSolver

OMEGA = 1.3
SCALE = 0.6  # s of A = K + s M
SOR = PETSc.Mat.SORType


def spd_matrix(n: int, seed: int) -> sparse.csr_matrix:
    """A symmetric positive definite matrix with rows of 2-30 entries in a banded, irregular pattern
    (like a P1 matrix on voxels: a varying number of neighbours, some far from the diagonal)."""
    rng = np.random.default_rng(seed)
    rows = np.repeat(np.arange(n), 6)
    cols = np.clip(rows + rng.integers(-40, 41, rows.size), 0, n - 1)
    keep = rng.random(rows.size) < 0.8
    G = sparse.coo_matrix((-rng.random(keep.sum()), (rows[keep], cols[keep])), shape=(n, n)).tocsr()
    G = G + G.T
    G.setdiag(0.0)
    G.eliminate_zeros()
    diagonal = -np.asarray(G.sum(axis=1)).ravel() + rng.random(n) * 0.5 + 0.01  # diagonally dominant
    A = (G + sparse.diags(diagonal)).tocsr()
    A.sort_indices()
    return A


def petsc_matrix(A: sparse.csr_matrix) -> PETSc.Mat:
    mat = PETSc.Mat().createAIJ(
        A.shape, csr=(A.indptr.astype(np.int32), A.indices.astype(np.int32), A.data), comm=PETSc.COMM_SELF
    )
    mat.assemble()
    return mat


def petsc_cg(mat: PETSc.Mat, pc_options: dict[str, object]) -> PETSc.KSP:
    """PETSc's CG with the natural norm, rtol 1e-10, a nonzero initial guess and the given PC options
    (under a prefix of its own, removed from the options database afterwards)."""
    solver = PETSc.KSP().create(mat.getComm())
    solver.setOperators(mat)
    solver.setType("cg")
    solver.setNormType(PETSc.KSP.NormType.NATURAL)
    solver.setTolerances(rtol=1e-10, atol=0.0, max_it=500)
    solver.setInitialGuessNonzero(True)
    solver.setOptionsPrefix("csr_sweeps_test_")
    options = PETSc.Options()
    for key, value in pc_options.items():
        options["csr_sweeps_test_" + key] = value
    solver.setConvergenceHistory()
    solver.setFromOptions()
    for key in pc_options:
        del options["csr_sweeps_test_" + key]
    return solver


def assert_sweeps_equal_matsor(mat: PETSc.Mat, kernel: voxel_sweeps.CSRSweepKernel, b_values: np.ndarray) -> None:
    """The kernel's forward, backward and apply-upper sweeps equal MatSOR's on ``mat``."""
    b, x = mat.createVecLeft(), mat.createVecLeft()
    b.array[:] = b_values
    out = np.empty(kernel.n)
    for flag, sweep in (
        (SOR.FORWARD_SWEEP | SOR.ZERO_INITIAL_GUESS, kernel.forward),
        (SOR.BACKWARD_SWEEP | SOR.ZERO_INITIAL_GUESS, kernel.backward),
        (SOR.APPLY_UPPER, kernel.apply_upper),
    ):
        mat.SOR(b, x, OMEGA, flag, 0.0, 1, 1)
        sweep(b_values, out)
        np.testing.assert_allclose(out, x.array, rtol=1e-12, atol=1e-13 * np.abs(x.array).max())
    b.destroy()
    x.destroy()


def assert_same_cg(fused: tuple, petsc: tuple, history_terms: int) -> None:
    """Two CG runs ``(reason, iterations, residual history, solution, ...)`` agree: converged, the
    iterations within one (the dot products sum in another order), the first residual norms to
    1e-8 and the solutions within the tolerance."""
    assert fused[0] == petsc[0] == int(PETSc.KSP.ConvergedReason.CONVERGED_RTOL)
    assert abs(fused[1] - petsc[1]) <= 1 and fused[1] > 5
    np.testing.assert_allclose(fused[2][:history_terms], petsc[2][:history_terms], rtol=1e-8)
    np.testing.assert_allclose(fused[3], petsc[3], rtol=0, atol=1e-7 * np.abs(petsc[3]).max())


def test_csr_sweeps_equal_petsc_matsor():
    A = spd_matrix(900, 1)
    mat = petsc_matrix(A)
    indptr, indices, data = voxel_sweeps.seqaij_arrays(mat)
    np.testing.assert_array_equal(indptr, A.indptr)
    np.testing.assert_array_equal(indices, A.indices)
    np.testing.assert_array_equal(data, A.data)
    kernel = voxel_sweeps.CSRSweepKernel(indptr, indices, data, OMEGA, voxel_sweeps.load_sweep_library(MPI.COMM_SELF))
    d = A.diagonal()
    np.testing.assert_array_equal(kernel.diagonal(), d)
    kernel.set_diagonal(d)
    n = kernel.n
    assert_sweeps_equal_matsor(mat, kernel, np.random.default_rng(2).standard_normal(n))
    out = np.empty(n)
    # the definitions by dense triangles, for the fused CG passes
    lower = sparse.tril(A, -1).toarray() + np.diag(d / OMEGA)
    upper = lower.T
    rng = np.random.default_rng(4)
    r, p0, tt, y = rng.standard_normal((4, n))
    mid, beta = 1.0 - 2.0 / OMEGA, 0.37
    kernel.forward_eisenstat(y, tt, d, mid, out)
    np.testing.assert_allclose(out, np.linalg.solve(lower, y + mid * d * tt), rtol=1e-10, atol=1e-12)
    p_expected = d * r + beta * p0
    t_expected = np.linalg.solve(upper, p_expected)
    z_expected = np.linalg.solve(lower, p_expected + mid * d * t_expected)
    p, t, w = p0.copy(), np.empty(n), np.empty(n)
    kernel.cg_direction_backward(r, d, beta, p, t)
    np.testing.assert_allclose(p, p_expected, rtol=1e-15)
    np.testing.assert_allclose(t, t_expected, rtol=1e-10, atol=1e-12 * np.abs(t_expected).max())
    pw = kernel.cg_forward_product(p, t, d, mid, w)
    np.testing.assert_allclose(t, z_expected, rtol=1e-10, atol=1e-12 * np.abs(z_expected).max())
    np.testing.assert_allclose(w, z_expected + t_expected, rtol=1e-10, atol=1e-12 * np.abs(w).max())
    assert pw == pytest.approx(float(p_expected @ (z_expected + t_expected)), rel=1e-10)
    # the views are PETSc's storage: a change of the matrix's values is seen without a copy
    mat.scale(2.0)
    np.testing.assert_array_equal(data, 2.0 * A.data)
    mat.destroy()


def test_csr_kernel_refuses_what_it_cannot_sweep():
    library = voxel_sweeps.load_sweep_library(MPI.COMM_SELF)
    A = spd_matrix(50, 2).tolil()
    A[7, 7] = 0.0
    A = A.tocsr()
    A.eliminate_zeros()  # row 7 without a diagonal entry
    with pytest.raises(ValueError, match="1 rows have no diagonal entry"):
        voxel_sweeps.CSRSweepKernel(A.indptr.astype(np.int32), A.indices.astype(np.int32), A.data, OMEGA, library)
    with pytest.raises(ValueError, match="int32"):
        voxel_sweeps.CSRSweepKernel(A.indptr.astype(np.int64), A.indices.astype(np.int32), A.data, OMEGA, library)
    dense = PETSc.Mat().createDense((4, 4), array=np.eye(4), comm=PETSc.COMM_SELF)
    with pytest.raises(voxel_sweeps.SweepKernelUnavailable, match="seqaij"):
        voxel_sweeps.seqaij_arrays(dense)
    dense.destroy()


def test_fused_eisenstat_is_petscs_cg_with_pceisenstat():
    """``A = K + s M`` from two matrices of one pattern: same first residual norms (to 1e-8),
    iterations within one, solutions within the tolerance, a true residual at the tolerance, and
    PETSc's reason and count at an iteration limit of 3."""
    K = spd_matrix(2000, 3)
    M = abs(K)
    A = (K + SCALE * M).tocsr()
    mat, k_mat, m_mat = petsc_matrix(A), petsc_matrix(K), petsc_matrix(M)
    library = voxel_sweeps.load_sweep_library(MPI.COMM_SELF)
    rng = np.random.default_rng(6)
    rhs, guess = rng.random(A.shape[0]) - 0.3, rng.random(A.shape[0])
    results = {}
    for which in ("fused", "petsc"):
        b, x = mat.createVecLeft(), mat.createVecLeft()
        b.array[:], x.array[:] = rhs, guess
        if which == "fused":
            solver = FusedEisenstatSolver(k_mat, m_mat, OMEGA, 1e-10, 500, library)
            solver.prepare(SCALE)
        else:
            solver = petsc_cg(mat, {"pc_type": "eisenstat", "pc_eisenstat_omega": OMEGA})
        solver.solve(b, x)
        history = np.asarray(solver.getConvergenceHistory(), dtype=float)
        residual = A @ x.array - rhs
        first = (solver.getConvergedReason(), solver.getIterationNumber(), history, x.array.copy())
        x.array[:] = 0.0
        if which == "fused":
            solver.cg.max_it = 3
        else:
            solver.setTolerances(max_it=3)
        solver.solve(b, x)
        results[which] = (
            *first,
            np.linalg.norm(residual) / np.linalg.norm(rhs),
            (solver.getConvergedReason(), solver.getIterationNumber()),
        )
        if which == "fused":
            solver.free()
        else:
            solver.destroy()
        b.destroy()
        x.destroy()
    fused, petsc = results["fused"], results["petsc"]
    assert_same_cg(fused, petsc, history_terms=4)
    assert fused[4] < 1e-7 and petsc[4] < 1e-7
    assert fused[5] == petsc[5] == (int(PETSc.KSP.ConvergedReason.DIVERGED_MAX_IT), 3)
    for obj in (mat, k_mat, m_mat):
        obj.destroy()


def test_fused_block_jacobi_is_petscs_cg_with_local_ssor(comm):
    """On any number of ranks the fused CG on each rank's rows (block-Jacobi SSOR, the couplings
    between the ranks' rows inside Eisenstat's operator) is PETSc's KSPCG with PCSOR's local
    symmetric sweeps (the same preconditioner up to a constant factor): the same relative residual
    history (to 1e-8), iterations within one, and solutions within the tolerance."""
    K = spd_matrix(3000, 4)
    M = abs(K)
    A = (K + SCALE * M).tocsr()
    n = A.shape[0]
    lo, hi = n * comm.rank // comm.size, n * (comm.rank + 1) // comm.size

    def distributed(matrix: sparse.csr_matrix) -> PETSc.Mat:
        local = matrix[lo:hi]
        out = PETSc.Mat().createAIJ(
            ((hi - lo, n), (hi - lo, n)),
            csr=(local.indptr.astype(np.int32), local.indices.astype(np.int32), local.data),
            comm=comm,
        )
        out.assemble()
        return out

    mat, k_mat, m_mat = distributed(A), distributed(K), distributed(M)
    library = voxel_sweeps.load_sweep_library(comm)
    rng = np.random.default_rng(7)
    rhs, guess = rng.random(n) - 0.3, rng.random(n)
    results = {}
    for which in ("fused", "petsc"):
        b, x = mat.createVecLeft(), mat.createVecLeft()
        b.array[:], x.array[:] = rhs[lo:hi], guess[lo:hi]
        if which == "fused":
            solver = FusedEisenstatSolver(k_mat, m_mat, OMEGA, 1e-10, 500, library)
            solver.prepare(SCALE)
            assert solver.getPC().getType() == (
                "eisenstat+compiled" if comm.size == 1 else "eisenstat-block-jacobi+compiled"
            )
        else:
            solver = petsc_cg(mat, {"pc_type": "sor", "pc_sor_omega": OMEGA})  # local symmetric sweeps
        solver.solve(b, x)
        history = np.asarray(solver.getConvergenceHistory(), dtype=float)
        solution = np.concatenate(comm.allgather(x.array))
        results[which] = (solver.getConvergedReason(), solver.getIterationNumber(), history / history[0], solution)
        if which == "fused":
            solver.free()
        else:
            solver.destroy()
        b.destroy()
        x.destroy()
    fused, petsc = results["fused"], results["petsc"]
    assert_same_cg(fused, petsc, history_terms=5)
    assert np.linalg.norm(A @ fused[3] - rhs) < 1e-7 * np.linalg.norm(rhs)
    for obj in (mat, k_mat, m_mat):
        obj.destroy()


def test_split_kernel_is_the_operator_k_plus_s_m():
    """The split kernel's sweeps of ``K + s M`` equal MatSOR's on the assembled sum, for two values
    of ``s`` (the values follow ``set_scale``; ``K`` and ``M`` are read in place)."""
    K = spd_matrix(700, 5)
    M = abs(K)
    k_mat, m_mat = petsc_matrix(K), petsc_matrix(M)
    library = voxel_sweeps.load_sweep_library(MPI.COMM_SELF)
    kernel = voxel_sweeps.SplitCSRSweepKernel(
        *voxel_sweeps.seqaij_arrays(k_mat), voxel_sweeps.seqaij_arrays(m_mat)[2], OMEGA, library
    )
    rng = np.random.default_rng(8)
    b_values = rng.standard_normal(K.shape[0])
    for scale in (0.6, 2.5):
        kernel.set_scale(scale)
        mat = petsc_matrix((K + scale * M).tocsr())
        np.testing.assert_allclose(kernel.diagonal(), mat.getDiagonal().array, rtol=1e-15)
        assert_sweeps_equal_matsor(mat, kernel, b_values)
        mat.destroy()
    with pytest.raises(TypeError, match="set_scale"):
        kernel.set_diagonal(np.ones(K.shape[0]))
    k_mat.destroy()
    m_mat.destroy()
