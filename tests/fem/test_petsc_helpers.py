"""PETSc helpers: an AIJ matrix whose values are replaced in one copy (1 and several ranks)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("petsc4py")
from mpi4py import MPI  # noqa: E402
from petsc4py import PETSc  # noqa: E402

from fem_anode.fem.petsc_ksp import CSRValues  # noqa: E402


def _pattern(comm, n_local: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Owned rows of a nonsymmetric pattern with columns on every rank, sorted in each row."""
    n = n_local * comm.size
    start = comm.rank * n_local
    rows = [
        sorted({g, (g + 1) % n, (g - 1) % n, (g + 7) % n, (3 * g + 5) % n, (g + n_local) % n})
        for g in range(start, start + n_local)
    ]
    indptr = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(PETSc.IntType)
    return indptr, np.concatenate(rows).astype(PETSc.IntType), n


def test_replaced_values_equal_those_inserted_row_by_row():
    comm = MPI.COMM_WORLD
    indptr, columns, n = _pattern(comm, 50)
    sizes = ((50, n), (50, n))
    fast = CSRValues(sizes, indptr, columns, comm)
    reference = PETSc.Mat().createAIJ(sizes, csr=(indptr, columns), comm=comm)
    rng = np.random.default_rng(comm.rank)
    x = fast.matrix.createVecRight()
    x.setArray(rng.random(50))
    for _ in range(2):  # the second set replaces the first entirely
        values = rng.random(len(columns))
        fast.set(values[::-1][::-1])  # any strides: copied contiguous when needed
        reference.setValuesCSR(indptr, columns, values)
        reference.assemble()
        y_fast, y_ref = fast.matrix.createVecLeft(), reference.createVecLeft()
        fast.matrix.mult(x, y_fast)
        reference.mult(x, y_ref)
        np.testing.assert_array_equal(y_fast.getArray(), y_ref.getArray())  # the same entries, bit for bit
    state = fast.matrix.stateGet()
    fast.set(np.zeros(len(columns)))
    assert fast.matrix.stateGet() > state  # solvers see the change
    assert fast.matrix.norm() == 0.0
    with pytest.raises(ValueError, match=f"expected {len(columns)} values"):
        fast.set(np.zeros(len(columns) + 1))
