"""PETSc solver helpers shared by the diffusion, phase-field and tortuosity solvers.

* :func:`prefixed_options`: a solver's options live in PETSc's global database under the
  solver's own prefix only while it reads them, so solvers never see each other's options and
  nothing is left behind (``-options_left`` stays clean).
* :func:`ksp_from_options`: a KSP configured that way in one call.
* :func:`direct_solver_package`: the one fallback order of sparse direct solvers.
* :class:`CSRValues`: an AIJ matrix made from a CSR pattern whose values are replaced in one
  copy per assembly.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np

__all__ = ["CSRValues", "direct_solver_package", "ksp_from_options", "prefixed_options", "unique_prefix"]

_COUNTER = itertools.count()


def unique_prefix(name: str) -> str:
    """An options prefix no other solver of this process uses: ``fem_anode_<name>_<n>_``."""
    return f"fem_anode_{name}_{next(_COUNTER)}_"


@contextmanager
def prefixed_options(prefix: str, options: Mapping[str, Any]) -> Iterator[None]:
    """Put ``options`` (names without prefix) into PETSc's database under ``prefix`` for the
    duration of the block, and remove exactly those entries afterwards, also on an error.

    Call ``setFromOptions`` *and* the first ``setUp`` inside the block: multigrid levels and
    factorisation packages read their options only during the first set-up.
    """
    from petsc4py import PETSc

    database = PETSc.Options()
    for key, value in options.items():
        database[f"{prefix}{key}"] = value
    try:
        yield
    finally:
        for key in options:
            del database[f"{prefix}{key}"]


def ksp_from_options(
    comm: Any, operator: Any, options: Mapping[str, Any], name: str, *, nonzero_guess: bool = True
) -> Any:
    """A KSP on ``operator`` set up from ``options`` under its own prefix (see :func:`unique_prefix`).

    Args:
        comm: communicator of the operator.
        operator: the PETSc matrix.
        options: PETSc options without prefix (``{"ksp_type": "cg", "pc_type": "sor"}``).
        name: part of the prefix naming the solver (for ``-options_left`` and logs).
        nonzero_guess: start from the solution vector's values.
    """
    from petsc4py import PETSc

    ksp = PETSc.KSP().create(comm)
    prefix = unique_prefix(name)
    ksp.setOptionsPrefix(prefix)
    with prefixed_options(prefix, options):
        ksp.setOperators(operator)
        ksp.setFromOptions()
    ksp.setInitialGuessNonzero(nonzero_guess)
    return ksp


def direct_solver_package(comm_size: int, *, symmetric_positive_definite: bool = False) -> str | None:
    """The sparse direct solver this PETSc build offers, in the package's order of preference.

    One rank and an SPD matrix: CHOLMOD (supernodal Cholesky; factorises about 3x faster than
    MUMPS on the 2D ROI, docs/benchmarks.md). Otherwise MUMPS, then SuperLU_dist, then
    PETSc's own factorisation on one rank. ``None``: no direct solver can run on ``comm_size``
    ranks (PETSc's own factorisation is serial).
    """
    from petsc4py import PETSc

    if symmetric_positive_definite and comm_size == 1 and PETSc.Sys.hasExternalPackage("cholmod"):
        return "cholmod"
    for package in ("mumps", "superlu_dist"):
        if PETSc.Sys.hasExternalPackage(package):
            return package
    return "petsc" if comm_size == 1 else None


@functools.cache
def _update_with_array() -> Any:
    """PETSc's ``MatUpdateMPIAIJWithArray`` (PETSc >= 3.18), or None."""
    from petsc4py import PETSc

    try:
        function = ctypes.CDLL(PETSc.__file__).MatUpdateMPIAIJWithArray  # resolved in libpetsc
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    function.restype = ctypes.c_int
    return function


class CSRValues:
    """An AIJ matrix with a fixed CSR pattern (owned rows, global columns sorted in each row),
    whose values are replaced by :meth:`set`.

    On several ranks :meth:`set` copies the values straight into the matrix's diagonal and
    off-diagonal blocks (``MatUpdateMPIAIJWithArray``, which needs a matrix preallocated from
    this CSR pattern, as made here) instead of inserting them row by row with a search per
    entry (``MatSetValuesCSR``): 0.14 against 1.95 ms for 40k rows of 6 entries per rank.
    """

    def __init__(self, sizes: Any, indptr: np.ndarray, columns: np.ndarray, comm: Any) -> None:
        from petsc4py import PETSc

        self.matrix = PETSc.Mat().createAIJ(sizes, csr=(indptr, columns), comm=comm)
        self.matrix.setOption(PETSc.Mat.Option.NEW_NONZERO_ALLOCATION_ERR, True)
        self._indptr, self._columns = indptr, columns
        self._nnz = int(indptr[-1])
        parallel = self.matrix.getType() == PETSc.Mat.Type.MPIAIJ
        self._update = _update_with_array() if parallel and PETSc.ScalarType == np.float64 else None

    def set(self, values: np.ndarray) -> None:
        """Replace the values (one per pattern entry, in CSR order) and assemble."""
        from petsc4py import PETSc

        if values.shape != (self._nnz,):
            raise ValueError(f"expected {self._nnz} values, got shape {values.shape}")
        if self._update is None:
            self.matrix.setValuesCSR(self._indptr, self._columns, values, addv=PETSc.InsertMode.INSERT_VALUES)
            self.matrix.assemble()
            return
        values = np.ascontiguousarray(values, dtype=np.float64)
        error = self._update(self.matrix.handle, values.ctypes.data)
        if error:
            raise RuntimeError(f"MatUpdateMPIAIJWithArray failed with PETSc error {error}")
