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
