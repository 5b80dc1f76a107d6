"""A single-precision MUMPS LU of a PETSc AIJ matrix, as the lagged preconditioner of the phase
field's Newton-Krylov solves.

The factorisation is only a preconditioner (FGMRES in double precision on the current Jacobian
decides the Newton step), so float32 factors serve as well as float64 ones where the lag, not
the rounding, limits the preconditioner: on the 1 nm wire a factorisation lagged by 1-40
Jacobians needed the same Krylov iterations in single and in double precision at every
tolerance from 1e-2 to 1e-9 (a fresh one needs 3-4 iterations to 1e-9 instead of 1). The
factors take half the memory, so a triangular solve, which is bound by reading them, takes
2.2 instead of 4.0 ms, and a numeric factorisation 41 instead of 62 ms (docs/phasefield.md).

PETSc's MUMPS interface is built for the PETSc scalar (double) only, so MUMPS's single-precision
library (``libsmumps``, installed with PETSc's MUMPS) is called through a small C shim,
``mumps_single.c``, compiled with ``$MPICC`` (default ``mpicc``) on first use
(:mod:`fem_anode.fem.compiled`). The matrix is passed distributed (each rank its owned rows),
the right-hand side distributed by rows, and the solution comes back in MUMPS's distribution and
is scattered to the owned rows: no rank holds a whole vector (on one process the right-hand side
is passed dense and the solution returned in place, about 8 % faster a solve).
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np
from mpi4py import MPI
from petsc4py import PETSc

from fem_anode.fem.compiled import LOAD_ERRORS, CompileError, compiled_library

__all__ = ["FactorisationError", "SinglePrecisionLU", "single_precision_available"]

_SOURCE = Path(__file__).with_name("mumps_single.c")
_FLAGS = ("-O2", "-fPIC", "-shared")
_LIBRARIES = ("-lsmumps", "-lmumps_common")
_library: ctypes.CDLL | None = None
_unavailable: str | None = None
#: MUMPS's INFOG(1) codes of a too small workspace: the factorisation is retried with more
_WORKSPACE_ERRORS = (-8, -9, -14, -15, -17, -20)


class FactorisationError(RuntimeError):
    """MUMPS failed (the message gives INFOG(1) and INFOG(2), see the MUMPS manual)."""


def _load_local() -> ctypes.CDLL:
    library = compiled_library(_SOURCE, os.environ.get("MPICC", "mpicc"), _FLAGS, _LIBRARIES)
    pointer, integer = ctypes.c_void_p, ctypes.c_int
    library.fa_lu_create.argtypes = [integer]
    library.fa_lu_create.restype = pointer
    library.fa_lu_set_icntl.argtypes = [pointer, integer, integer]
    library.fa_lu_set_icntl.restype = None
    library.fa_lu_analyse.argtypes = [pointer, integer, ctypes.c_int64, pointer, pointer]
    library.fa_lu_factor.argtypes = [pointer, pointer]
    library.fa_lu_solve.argtypes = [pointer, integer, pointer, pointer]
    for name in ("fa_lu_analyse", "fa_lu_factor", "fa_lu_solve", "fa_lu_lsol"):
        getattr(library, name).restype = integer
    library.fa_lu_lsol.argtypes = [pointer]
    library.fa_lu_sol.argtypes = [pointer]
    library.fa_lu_sol.restype = ctypes.POINTER(ctypes.c_float)
    library.fa_lu_isol.argtypes = [pointer]
    library.fa_lu_isol.restype = ctypes.POINTER(ctypes.c_int)
    library.fa_lu_infog.argtypes = [pointer, integer]
    library.fa_lu_infog.restype = integer
    library.fa_lu_destroy.argtypes = [pointer]
    library.fa_lu_destroy.restype = None
    library.fa_lu_central.argtypes = [pointer]
    library.fa_lu_central.restype = integer
    return library


def single_precision_available(comm: MPI.Comm) -> str | None:
    """``None`` if the single-precision LU can be used on every rank of ``comm``, else the reason
    it cannot (the same on every rank). Collective, always: each process compiles or loads the
    shim once (the compiled file is cached and written atomically), and every call agrees over
    ``comm``, so ranks whose processes have used it on other communicators cannot fall out of step."""
    global _library, _unavailable
    if _library is None and _unavailable is None:
        if PETSc.IntType != np.int32 or PETSc.ScalarType != np.float64:
            _unavailable = "PETSc is not built with 32-bit indices and real double scalars"
        else:
            try:
                _library = _load_local()
            except LOAD_ERRORS as exc:
                _unavailable = str(exc)
    reasons = [reason for reason in comm.allgather(_unavailable) if reason is not None]
    return reasons[0] if reasons else None


class SinglePrecisionLU:
    """LU factorisation of an assembled PETSc AIJ matrix in single precision (MUMPS), solved in
    place of a double-precision LU: :meth:`factorise` (the symbolic analysis once, for the
    pattern of the first matrix; numeric after), :meth:`solve` (``x = A^-1 b`` to float32
    accuracy, ``b`` and ``x`` with the matrix's row layout). Collective on the matrix's
    communicator.

    Raises:
        CompileError: the shim is not available (:func:`single_precision_available` says why).
    """

    def __init__(self, comm: MPI.Comm) -> None:
        reason = single_precision_available(comm)
        if reason is not None:
            raise CompileError(reason)
        assert _library is not None
        self.lib, self.comm = _library, comm
        self.handle = self.lib.fa_lu_create(comm.py2f())
        if not self.handle:
            raise FactorisationError("MUMPS (single precision) could not be initialised")
        #: one process: dense right-hand side, overwritten by the solution (the shim decides)
        self._central = bool(self.lib.fa_lu_central(self.handle))
        self._rows: np.ndarray | None = None  # 1-based global rows of the owned entries
        self._columns: np.ndarray | None = None
        self._owned: np.ndarray | None = None  # 1-based global indices of the owned rows
        self._values = np.empty(0, dtype=np.float32)
        self._rhs = np.empty(0, dtype=np.float32)
        self._workspace = 80
        self._scatter: PETSc.Scatter | None = None
        self._solution: PETSc.Vec | None = None
        self._isol: np.ndarray | None = None
        self.factor_entries = 0  # INFOG(29): entries of the factors (all ranks)

    def _check(self, err: int, what: str) -> None:
        if err < 0:
            raise FactorisationError(
                f"MUMPS (single precision) {what} failed: INFOG(1) = {err}, INFOG(2) = "
                f"{self.lib.fa_lu_infog(self.handle, 2)}"
            )

    def factorise(self, A: PETSc.Mat) -> None:
        """Factorise ``A`` (the symbolic analysis at the first call; ``A`` keeps its pattern)."""
        indptr, columns, values = A.getValuesCSR()
        start, end = A.getOwnershipRange()
        if self._rows is None:
            rows = (np.repeat(np.arange(start, end, dtype=np.int32), np.diff(indptr)) + 1).astype(np.int32)
            cols = (columns + 1).astype(np.int32)
            self._owned = np.arange(start + 1, end + 1, dtype=np.int32)
            self._rhs = np.empty(end - start, dtype=np.float32)
            err = self.lib.fa_lu_analyse(self.handle, A.getSize()[0], len(rows), rows.ctypes.data, cols.ctypes.data)
            self._rows, self._columns = rows, cols  # MUMPS reads them again at every factorisation
            self._check(err, "analysis")
        elif len(values) != len(self._rows):
            raise FactorisationError("the matrix changed its pattern since the analysis")
        self._values = values.astype(np.float32)  # kept alive: MUMPS reads it during the factorisation
        err = self.lib.fa_lu_factor(self.handle, self._values.ctypes.data)
        while err in _WORKSPACE_ERRORS and self._workspace < 1000:  # delayed pivots: more room, again
            self._workspace *= 2
            self.lib.fa_lu_set_icntl(self.handle, 14, self._workspace)
            err = self.lib.fa_lu_factor(self.handle, self._values.ctypes.data)
        self._check(err, "factorisation")
        self.factor_entries = abs(self.lib.fa_lu_infog(self.handle, 29))
        self._isol = None  # MUMPS fills the solution's row indices at the first solve

    def solve(self, b: PETSc.Vec, x: PETSc.Vec) -> None:
        """``x = A^-1 b`` with the last factorisation (float32 factors, float64 in and out)."""
        assert self._owned is not None
        self._rhs[:] = b.getArray(readonly=True)
        err = self.lib.fa_lu_solve(self.handle, len(self._owned), self._owned.ctypes.data, self._rhs.ctypes.data)
        self._check(err, "solve")
        if self._central:  # the solution replaced the right-hand side
            x.getArray()[:] = self._rhs
            return
        n = self.lib.fa_lu_lsol(self.handle)
        solution = np.ctypeslib.as_array(self.lib.fa_lu_sol(self.handle), shape=(max(n, 1),))[:n]
        if self._isol is None:
            isol = np.ctypeslib.as_array(self.lib.fa_lu_isol(self.handle), shape=(max(n, 1),))[:n] - 1
            self._isol = isol.astype(PETSc.IntType)
            self._make_scatter(x)
        if self.comm.size == 1:
            x.getArray()[self._isol] = solution
            return
        assert self._solution is not None and self._scatter is not None
        self._solution.getArray()[:] = solution
        self._scatter.scatter(self._solution, x, addv=PETSc.InsertMode.INSERT_VALUES, mode=PETSc.ScatterMode.FORWARD)

    def _make_scatter(self, x: PETSc.Vec | None) -> None:
        """From MUMPS's distribution of the solution to ``x``'s rows (several ranks; ``None``:
        only free the previous one)."""
        for obj in (self._scatter, self._solution):
            if obj is not None:
                obj.destroy()
        self._scatter = self._solution = None
        if self.comm.size == 1 or x is None:
            return
        assert self._isol is not None
        self._solution = PETSc.Vec().createMPI((len(self._isol), PETSc.DECIDE), comm=self.comm)
        start, end = self._solution.getOwnershipRange()
        source = PETSc.IS().createStride(end - start, first=start, step=1, comm=self.comm)
        target = PETSc.IS().createGeneral(self._isol, comm=self.comm)
        self._scatter = PETSc.Scatter().create(self._solution, source, x, target)
        source.destroy()
        target.destroy()

    def release(self) -> None:
        """Free the factors and the analysis (collective); the next :meth:`factorise` starts
        afresh. For runs in double precision, so that one set of factors is held at a time."""
        self.lib.fa_lu_destroy(self.handle)
        self.handle = self.lib.fa_lu_create(self.comm.py2f())
        if not self.handle:
            raise FactorisationError("MUMPS (single precision) could not be initialised")
        self._rows = self._columns = self._owned = self._isol = None
        self._values = np.empty(0, dtype=np.float32)
        self._workspace = 80
        self._make_scatter(None)

    def destroy(self) -> None:
        if self.handle:
            self.lib.fa_lu_destroy(self.handle)
            self.handle = None
        for obj in (self._scatter, self._solution):
            if obj is not None:
                obj.destroy()
        self._scatter = self._solution = None
