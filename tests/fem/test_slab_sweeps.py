"""The separator-order SSOR of slab-distributed voxel matrices (fem_anode.fem.slab_sweeps) equals the
dense SSOR of the whole matrix in that order, for the SBAIJ matrices of the tortuosity factor and
for the compiled kernel that replaces them (its mat-vec too); with three ranks a middle slab
corrects both of its layers."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("petsc4py")

from fem_anode.fem.slab_sweeps import (  # noqa: E402
    SeparatorMatrix,
    SeparatorSSOR,
    SeparatorSweeps,
    separator_order_possible,
)
from fem_anode.fem.tortuosity.clusters import slab_bounds, spanning_clusters  # noqa: E402
from fem_anode.fem.tortuosity.fv import assemble_face_conductances  # noqa: E402

OMEGA = 1.6
CONDUCTANCE = (0.7, 1.0, 1.3)  # z, y, x face conductances


def _matrices(comm, nz=9):
    """The tortuosity operator of a random 70 % pore volume (its clusters spanning z), as SBAIJ
    (upper triangle) and as AIJ; the layer masks of this rank."""
    pore = np.random.default_rng(5).random((nz, 5, 4)) < 0.7
    slab = slab_bounds(comm, nz)
    solved = spanning_clusters(comm, slab, pore[slab.z0 : slab.z1])
    sbaij = assemble_face_conductances(comm, slab, solved, CONDUCTANCE, True)[0]
    aij = assemble_face_conductances(comm, slab, solved, CONDUCTANCE, False)[0]
    plane = 5 * 4
    first = solved[0].ravel() if slab.layers else np.zeros(plane, bool)
    last = solved[-1].ravel() if slab.layers else np.zeros(plane, bool)
    return slab, sbaij, aij, first, last, solved


@pytest.mark.parametrize("kind", ["sbaij", "compiled"])
def test_separator_ssor_equals_the_dense_ssor_in_separator_order(comm, kind):
    slab, sbaij, aij, first, last, solved = _matrices(comm)
    assert separator_order_possible(comm, slab)
    if kind == "sbaij":
        sweeps = SeparatorSweeps(comm, slab, sbaij, first, last, CONDUCTANCE[0], OMEGA)
    else:  # the kernel is the matrix: its diagonal from the assembled one, no PETSc matrix
        from fem_anode.fem.voxel_sweeps import VoxelSweepKernel, load_sweep_library

        kernel = VoxelSweepKernel(solved, CONDUCTANCE, OMEGA, load_sweep_library(comm), with_matrix=True)
        kernel.set_diagonal(aij.getDiagonal().array)
        sweeps = SeparatorSweeps(comm, slab, None, first, last, CONDUCTANCE[0], OMEGA, kernel=kernel)
        shell = SeparatorMatrix(sweeps).as_petsc()
        X, Y, Z = aij.createVecRight(), aij.createVecLeft(), aij.createVecLeft()
        X.array[:] = np.random.default_rng(7 + comm.rank).random(X.getLocalSize())
        aij.mult(X, Y)
        shell.mult(X, Z)
        np.testing.assert_allclose(Z.array, Y.array, rtol=1e-13, atol=1e-14 * np.abs(Y.array).max())
        for obj in (shell, X, Y, Z):
            obj.destroy()
    ssor = SeparatorSSOR(sweeps)
    try:
        ssor.setUp(None)
        n = aij.getSize()[0]
        lo, hi = aij.getOwnershipRange()
        dense = np.vstack(comm.allgather(aij.getValues(range(lo, hi), range(n))))
        top = slab.next is None
        separators = np.concatenate(comm.allgather(np.zeros(0, int) if top else sweeps.last_rows + lo))
        order = np.concatenate([np.setdiff1d(np.arange(n), separators), separators])
        P = dense[np.ix_(order, order)]
        D = np.diag(np.diag(P))
        B = np.tril(P, -1) + D / OMEGA
        r = np.random.default_rng(6).random(n)
        expected = np.empty(n)
        expected[order] = np.linalg.solve(B.T, D @ np.linalg.solve(B, r[order]))
        R, Z = sbaij.createVecLeft(), sbaij.createVecLeft()
        R.array[:] = r[lo:hi]
        ssor.apply(None, R, Z)
        np.testing.assert_allclose(Z.array, expected[lo:hi], rtol=1e-10, atol=1e-12 * np.abs(expected).max())
        # the same matrix swept in the natural order (block Jacobi on several ranks) differs there
        if comm.size > 1:
            natural = np.linalg.solve(np.triu(dense, 1) + np.diag(np.diag(dense)) / OMEGA, np.diag(np.diag(dense)))
            natural = natural @ np.linalg.solve(np.tril(dense, -1) + np.diag(np.diag(dense)) / OMEGA, r)
            assert np.abs(natural - expected).max() > 1e-6 * np.abs(expected).max()
        R.destroy()
        Z.destroy()
    finally:
        ssor.destroy()
        sbaij.destroy()
        aij.destroy()


def test_one_pass_cg_start_equals_its_definition(comm):
    """:meth:`SeparatorSweeps.cg_start` (the fused CG's start in one pass, with the layer
    corrections across slabs) gives ``y = B^T x``, ``bh = B^{-1} b``, ``z = B^{-1} (y + mid D x)``,
    ``r = bh - (z + x)`` and the two weighted sums of the dense matrices in the separator order; on
    one rank the values and sums equal the separate sweeps' bit for bit."""
    from fem_anode.fem.voxel_sweeps import VoxelSweepKernel, load_sweep_library

    slab, sbaij, aij, first, last, solved = _matrices(comm)
    kernel = VoxelSweepKernel(solved, CONDUCTANCE, OMEGA, load_sweep_library(comm), with_matrix=True)
    d_vec = aij.getDiagonal()
    kernel.set_diagonal(d_vec.array)
    sweeps = SeparatorSweeps(comm, slab, None, first, last, CONDUCTANCE[0], OMEGA, kernel=kernel)
    mid = 1.0 - 2.0 / OMEGA
    vecs = [aij.createVecLeft() for _ in range(6)]
    b, x, y, bh, z, r = vecs
    try:
        n = aij.getSize()[0]
        lo, hi = aij.getOwnershipRange()
        rng = np.random.default_rng(8)
        b_all, x_all = rng.standard_normal((2, n))  # the same on every rank
        b.array[:], x.array[:] = b_all[lo:hi], x_all[lo:hi]
        sums = comm.allreduce(np.array(sweeps.cg_start(b, x, d_vec, mid, (y, bh, z, r))))
        dense = np.vstack(comm.allgather(aij.getValues(range(lo, hi), range(n))))
        top = slab.next is None
        separators = np.concatenate(comm.allgather(np.zeros(0, int) if top else sweeps.last_rows + lo))
        order = np.concatenate([np.setdiff1d(np.arange(n), separators), separators])
        P = dense[np.ix_(order, order)]
        dd = np.diag(P)
        B = np.tril(P, -1) + np.diag(dd) / OMEGA
        expected = {}
        yo = B.T @ x_all[order]
        bo = np.linalg.solve(B, b_all[order])
        zo = np.linalg.solve(B, yo + mid * dd * x_all[order])
        for name, values in (("y", yo), ("bh", bo), ("z", zo), ("r", bo - (zo + x_all[order]))):
            expected[name] = np.empty(n)
            expected[name][order] = values
        for name, vec in (("y", y), ("bh", bh), ("z", z), ("r", r)):
            scale = np.abs(expected[name]).max()
            np.testing.assert_allclose(vec.array, expected[name][lo:hi], rtol=1e-10, atol=1e-12 * scale, err_msg=name)
        d_all = np.diag(dense)
        assert sums[0] == pytest.approx(expected["bh"] @ (d_all * expected["bh"]), rel=1e-10)
        assert sums[1] == pytest.approx(expected["r"] @ (d_all * expected["r"]), rel=1e-10)
        if comm.size == 1:  # the separate passes of the three-pass start, bit for bit
            w, r2, y2 = (aij.createVecLeft() for _ in range(3))
            sweeps.forward(b, r2)
            sweeps.apply_upper(x, y2)
            started = kernel.weighted_dot(r2.array_r, d_vec.array_r, r2.array_r)
            sweeps.forward_eisenstat(y2, x, d_vec, mid, w)
            np.testing.assert_array_equal(bh.array, r2.array)
            np.testing.assert_array_equal(y.array, y2.array)
            np.testing.assert_array_equal(z.array, w.array)
            w.axpy(1.0, x)
            r2.axpy(-1.0, w)
            np.testing.assert_array_equal(r.array, r2.array)
            assert sums[0] == started
            assert sums[1] == kernel.weighted_dot(r2.array_r, d_vec.array_r, r2.array_r)
            for vec in (w, r2, y2):
                vec.destroy()
    finally:
        for vec in (*vecs, d_vec):
            vec.destroy()
        sweeps.destroy()
        sbaij.destroy()
        aij.destroy()


def _random_mpiaij(comm, n_local: int, seed: int):
    """A random ``mpiaij`` matrix with a band of couplings reaching into the neighbouring ranks."""
    from petsc4py import PETSc

    n = n_local * comm.size
    A = PETSc.Mat().create(comm=comm)
    A.setSizes(((n_local, n), (n_local, n)))
    A.setType(PETSc.Mat.Type.MPIAIJ)  # (also on one rank: the couplings read its off-rank block)
    A.setPreallocationNNZ((7, 7))
    rng = np.random.default_rng(seed + comm.rank)
    lo, hi = A.getOwnershipRange()
    for row in range(lo, hi):
        for column in sorted({row, *(int(c) for c in rng.integers(max(row - 5, 0), min(row + 6, n), 4))}):
            A.setValue(row, column, float(rng.random()) + (3.0 if column == row else 0.0))
    A.assemble()
    return A


def test_off_rank_couplings_equal_the_off_diagonal_block(comm):
    """``O t`` (compiled, no SciPy) equals ``A t`` minus the diagonal block's product, for
    ``A = K + s M`` at two scales; the mass couplings alone equal ``M``'s; columns that do not
    ascend are refused."""
    from petsc4py import PETSc

    from fem_anode.fem.slab_sweeps import OffRankCouplings
    from fem_anode.fem.voxel_sweeps import load_sweep_library

    library = load_sweep_library(comm)
    K, M = _random_mpiaij(comm, 12, 3), _random_mpiaij(comm, 12, 3)
    M.scale(0.25)  # same pattern, other values
    t = K.createVecRight()
    t.array[:] = np.random.default_rng(11 + comm.rank).random(t.getLocalSize())
    couplings = OffRankCouplings(K, t, library, M)

    def off_block_product(A):
        full = A.createVecLeft()
        A.mult(t, full)
        block = A.getDiagonalBlock()
        local = block.createVecLeft()
        block.mult(PETSc.Vec().createWithArray(t.array_r.copy(), comm=PETSc.COMM_SELF), local)
        return full.array - local.array

    off_k, off_m = off_block_product(K), off_block_product(M)
    for scale in (0.0, 2.5):
        couplings.set_scale(scale)
        expected = off_k + scale * off_m
        got = np.zeros(t.getLocalSize())
        got[couplings.rows] = couplings.product(t)[couplings.rows]
        np.testing.assert_allclose(got, expected, rtol=1e-13, atol=1e-13 * max(np.abs(expected).max(), 1.0))
    expected_mass = off_m
    got = np.zeros(t.getLocalSize())
    got[couplings.rows] = couplings.mass_product(t)[couplings.rows]
    np.testing.assert_allclose(got, expected_mass, rtol=1e-13, atol=1e-13 * max(np.abs(expected_mass).max(), 1.0))
    assert comm.allreduce(couplings.rows.size) > 0 if comm.size > 1 else couplings.rows.size == 0
    couplings.destroy()
    with pytest.raises(ValueError, match="must ascend"):
        OffRankCouplings.from_rows(
            4, np.array([1]), np.array([0, 2]), np.array([7, 5]), np.ones(2), np.ones(2), t, library
        )
    for obj in (K, M, t):
        obj.destroy()
