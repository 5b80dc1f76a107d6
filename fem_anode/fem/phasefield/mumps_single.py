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
(:mod:`fem_anode.fem.compiled`). Every factorisation in it runs on one process (the right-hand
side dense and overwritten by the solution).

:class:`SinglePrecisionLU` is the one-rank LU. On several ranks MUMPS's parallel factorisation sums
contribution blocks in the order they arrive, so its float32 round-off, and with it the Krylov
counts of a run, changes from run to run; :class:`SubstructuredLU` is used there instead: one
float32 MUMPS LU per rank on its own process and a dense Schur complement of the ranks'
interface, bitwise the same in every run (2 ranks at 0.5 nm: factorisation 109 ms and solve
7.4 ms, against 205 and 17.7 ms on one rank).
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np
from mpi4py import MPI
from petsc4py import PETSc

from fem_anode.fem.compiled import LOAD_ERRORS, CompileError, compiled_library
from fem_anode.parallel import send_rows

__all__ = [
    "MAX_INTERFACE",
    "FactorisationError",
    "InterfaceTooLarge",
    "SinglePrecisionLU",
    "SubstructuredLU",
    "single_precision_available",
]

_SOURCE = Path(__file__).with_name("mumps_single.c")
_FLAGS = ("-O2", "-fPIC", "-shared")
_LIBRARIES = ("-lsmumps", "-lmumps_common")
_library: ctypes.CDLL | None = None
_unavailable: str | None = None
#: MUMPS's INFOG(1) codes of a too small workspace: the factorisation is retried with more
_WORKSPACE_ERRORS = (-8, -9, -14, -15, -17, -20)


#: largest interface (unknowns coupled across ranks) for :class:`SubstructuredLU`: its dense
#: Schur complement is held and factorised on every rank (3000: 36 MB and about 0.2 s)
MAX_INTERFACE = 3000


class FactorisationError(RuntimeError):
    """MUMPS failed (the message gives INFOG(1) and INFOG(2), see the MUMPS manual)."""


class InterfaceTooLarge(FactorisationError):
    """The ranks' interface is too large for :class:`SubstructuredLU`'s dense Schur complement."""


def _load_local() -> ctypes.CDLL:
    library = compiled_library(_SOURCE, os.environ.get("MPICC", "mpicc"), _FLAGS, _LIBRARIES)
    pointer, integer = ctypes.c_void_p, ctypes.c_int
    library.fa_lu_create.argtypes = []
    library.fa_lu_create.restype = pointer
    library.fa_lu_set_icntl.argtypes = [pointer, integer, integer]
    library.fa_lu_set_perm.argtypes = [pointer, pointer]
    library.fa_lu_set_schur.argtypes = [pointer, integer, pointer, pointer]
    library.fa_lu_analyse.argtypes = [pointer, integer, ctypes.c_int64, pointer, pointer]
    library.fa_lu_factor.argtypes = [pointer, pointer]
    library.fa_lu_solve.argtypes = [pointer, integer, pointer, pointer]
    library.fa_lu_infog.argtypes = [pointer, integer]
    library.fa_lu_destroy.argtypes = [pointer]
    for name in ("fa_lu_set_icntl", "fa_lu_set_perm", "fa_lu_set_schur", "fa_lu_destroy"):
        getattr(library, name).restype = None
    for name in ("fa_lu_analyse", "fa_lu_factor", "fa_lu_solve", "fa_lu_infog"):
        getattr(library, name).restype = integer
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
    """LU factorisation of an assembled PETSc AIJ matrix on one process in single precision
    (MUMPS), solved in place of a double-precision LU: :meth:`factorise` (the symbolic analysis
    once, for the pattern of the first matrix; numeric after), :meth:`solve` (``x = A^-1 b`` to
    float32 accuracy). Several ranks use :class:`SubstructuredLU`.

    Raises:
        CompileError: the shim is not available (:func:`single_precision_available` says why).
        ValueError: ``comm`` has more than one process.
    """

    def __init__(self, comm: MPI.Comm) -> None:
        if comm.size != 1:
            raise ValueError("SinglePrecisionLU factorises on one process; use SubstructuredLU on several")
        reason = single_precision_available(comm)
        if reason is not None:
            raise CompileError(reason)
        assert _library is not None
        self.lib, self.comm = _library, comm
        self.handle: int | None = self._create()
        self._rows: np.ndarray | None = None  # 1-based rows and columns of the entries
        self._columns: np.ndarray | None = None
        self._values = np.empty(0, dtype=np.float32)
        self._rhs = np.empty(0, dtype=np.float32)
        self._workspace = 80
        self.factor_entries = 0  # INFOG(29): entries of the factors

    def _create(self) -> int:
        handle = self.lib.fa_lu_create()
        if not handle:
            raise FactorisationError("MUMPS (single precision) could not be initialised")
        return handle

    @property
    def analysed(self) -> bool:
        """Whether the symbolic analysis (and factors) are held (not after :meth:`release`)."""
        return self._rows is not None

    def _check(self, err: int, what: str) -> None:
        if err < 0:
            raise FactorisationError(
                f"MUMPS (single precision) {what} failed: INFOG(1) = {err}, INFOG(2) = "
                f"{self.lib.fa_lu_infog(self.handle, 2)}"
            )

    def factorise(self, A: PETSc.Mat) -> None:
        """Factorise ``A`` (the symbolic analysis at the first call; ``A`` keeps its pattern)."""
        indptr, columns, values = A.getValuesCSR()
        if self._rows is None:
            n = A.getSize()[0]
            rows = (np.repeat(np.arange(n, dtype=np.int32), np.diff(indptr)) + 1).astype(np.int32)
            cols = (columns + 1).astype(np.int32)
            self._rhs = np.empty(n, dtype=np.float32)
            err = self.lib.fa_lu_analyse(self.handle, n, len(rows), rows.ctypes.data, cols.ctypes.data)
            self._rows, self._columns = rows, cols  # MUMPS reads them again at every factorisation
            self._check(err, "analysis")
        elif len(values) != len(self._rows):
            raise FactorisationError("the matrix changed its pattern since the analysis")
        self._values = values.astype(np.float32)  # kept alive: MUMPS reads it during the factorisation
        self._check(_factorise_growing_workspace(self, self._values), "factorisation")
        self.factor_entries = abs(self.lib.fa_lu_infog(self.handle, 29))

    def solve(self, b: PETSc.Vec, x: PETSc.Vec) -> None:
        """``x = A^-1 b`` with the last factorisation (float32 factors, float64 in and out)."""
        self._rhs[:] = b.getArray(readonly=True)
        self._check(self.lib.fa_lu_solve(self.handle, 0, self._rhs.ctypes.data, None), "solve")
        x.getArray()[:] = self._rhs

    def release(self) -> None:
        """Free the factors and the analysis; the next :meth:`factorise` starts afresh. For runs
        in double precision, so that one set of factors is held at a time."""
        self.lib.fa_lu_destroy(self.handle)
        self.handle = self._create()
        self._rows = self._columns = None
        self._values = np.empty(0, dtype=np.float32)
        self._workspace = 80

    def destroy(self) -> None:
        if self.handle:
            self.lib.fa_lu_destroy(self.handle)
            self.handle = None


def _factorise_growing_workspace(lu: SinglePrecisionLU | SubstructuredLU, values: np.ndarray) -> int:
    """Numeric factorisation of ``lu.handle`` with ``values``, retried with twice the workspace
    while MUMPS runs out of it (delayed pivots); returns MUMPS's INFOG(1) (negative: failed)."""
    err = lu.lib.fa_lu_factor(lu.handle, values.ctypes.data)
    while err in _WORKSPACE_ERRORS and lu._workspace < 1000:
        lu._workspace *= 2
        lu.lib.fa_lu_set_icntl(lu.handle, 14, lu._workspace)
        err = lu.lib.fa_lu_factor(lu.handle, values.ctypes.data)
    return err


class SubstructuredLU:
    """Single-precision LU on several ranks that rounds the same way in every run: the same
    interface as :class:`SinglePrecisionLU`, but each rank factorises its own block with
    MUMPS on its own process, and the ranks meet only in a small dense Schur complement.

    The interface ``G`` is a smallest set of unknowns that every coupling (in either direction
    of ``A``'s pattern) between two ranks' unknowns touches (:meth:`_interface`); the other
    unknowns of rank ``r``, ``I_r``, couple only to their own rank and to ``G``. With ``A``
    ordered ``[I_1 .. I_p, G]``::

        S = A_GG - sum_r A_G,Ir A_Ir,Ir^-1 A_Ir,G
        A x = b:  S x_G = b_G - sum_r A_G,Ir A_Ir,Ir^-1 b_Ir,  x_Ir = A_Ir,Ir^-1 (b_Ir - A_Ir,G x_G)

    Rank ``r`` factorises ``[[A_Ir,Ir, A_Ir,Gr], [A_Gr,Ir, 0]]`` (``G_r``: the interface unknowns
    coupled to ``I_r``) in float32 with MUMPS's Schur option, which also gives its term of ``S``
    and, in a solve, the reduced right-hand side (condensation) and ``x_Ir`` (expansion). ``S``
    is summed over the ranks (one ``Allreduce``) and LU-factorised in float32 on every rank
    (``len(G) <= max_interface``, else :class:`InterfaceTooLarge`). It is an exact LU of the
    float32-rounded ``A`` up to rounding, like MUMPS's parallel one, but no sum depends on the
    order in which messages arrive, so two runs on the same ranks are bitwise the same.
    Collective on ``comm``.

    Raises:
        CompileError: the shim is not available (:func:`single_precision_available` says why).
    """

    def __init__(self, comm: MPI.Comm, max_interface: int = MAX_INTERFACE) -> None:
        reason = single_precision_available(comm)
        if reason is not None:
            raise CompileError(reason)
        assert _library is not None
        self.lib, self.comm, self.max_interface = _library, comm, max_interface
        self.handle: int | None = None  # the local MUMPS instance, on this process alone
        self._workspace = 80
        self.factor_entries = 0  # entries of the local factors (all ranks) and of S's LU
        self.interface_size = 0  # len(G)
        self._layout: dict[str, np.ndarray] | None = None

    @property
    def analysed(self) -> bool:
        """Whether the decomposition, analysis and factors are held (not after :meth:`release`)."""
        return self._layout is not None

    # -- set-up (at the first factorisation; A keeps its pattern) --------------------------
    def _analyse(self, A: PETSc.Mat) -> None:
        comm, rank = self.comm, self.comm.rank
        indptr, columns, _ = A.getValuesCSR()
        start, end = A.getOwnershipRange()
        ranges = np.asarray(A.getOwnershipRanges())
        rows = np.repeat(np.arange(end - start), np.diff(indptr))  # local row of each entry
        owner = np.searchsorted(ranges, columns, side="right") - 1
        interface = np.zeros(end - start, dtype=bool)
        interface[self._interface(start + rows, columns, owner) - start] = True
        owned_interface = start + np.flatnonzero(interface)
        gamma = np.concatenate(comm.allgather(owned_interface)).astype(np.int64)  # sorted: ranks in order
        self.interface_size = len(gamma)
        if len(gamma) > self.max_interface:
            raise InterfaceTooLarge(
                f"{len(gamma)} unknowns are coupled across the {comm.size} ranks (at most {self.max_interface} "
                "for the substructured single-precision LU)"
            )
        column_gamma = np.searchsorted(gamma, columns)
        column_in_gamma = np.zeros(len(columns), dtype=bool)
        if len(gamma):
            column_in_gamma = (column_gamma < len(gamma)) & (gamma[np.minimum(column_gamma, len(gamma) - 1)] == columns)
        row_in_gamma = interface[rows]
        interior = np.flatnonzero(~interface)  # local rows of I_r
        # entries of the rows of G owned here in another rank's I_s go to that rank
        outgoing = row_in_gamma & ~column_in_gamma & (owner != rank)
        pairs = np.stack([start + rows[outgoing], columns[outgoing]], axis=1).astype(np.int64)
        remote, _, _ = send_rows(self.comm, owner[outgoing], pairs)
        # G_r: the interface unknowns coupled to I_r
        mine = ~row_in_gamma & column_in_gamma  # A_Ir,G
        local_k = row_in_gamma & ~column_in_gamma & (owner == rank)  # A_Gr,Ir from my rows
        gamma_r = np.unique(np.concatenate([columns[mine], start + rows[local_k], remote[:, 0]]))
        n_interior = len(interior)
        interior_index = np.full(end - start, -1, dtype=np.int64)
        interior_index[interior] = np.arange(n_interior)

        def local_index(global_index: np.ndarray, is_gamma: np.ndarray) -> np.ndarray:
            out = np.empty(len(global_index), dtype=np.int64)
            out[is_gamma] = n_interior + np.searchsorted(gamma_r, global_index[is_gamma])
            out[~is_gamma] = interior_index[global_index[~is_gamma] - start]
            return out

        in_k = ~row_in_gamma | local_k  # I_r rows (all their entries), and A_Gr,Ir of my rows
        k_rows = np.concatenate(
            [local_index(start + rows[in_k], row_in_gamma[in_k]), local_index(remote[:, 0], np.ones(len(remote), bool))]
        )
        k_cols = np.concatenate(
            [local_index(columns[in_k], column_in_gamma[in_k]), local_index(remote[:, 1], np.zeros(len(remote), bool))]
        )
        # A_GG (owned rows) straight into S
        in_s = row_in_gamma & column_in_gamma
        self._layout = {
            "interior": interior,
            "owned_gamma_rows": np.flatnonzero(interface),
            "owned_gamma_at": np.searchsorted(gamma, owned_interface),
            "gamma_r_at": np.searchsorted(gamma, gamma_r),
            "k_from": np.flatnonzero(in_k),
            "outgoing": np.flatnonzero(outgoing),
            "outgoing_owner": owner[outgoing],
            "s_from": np.flatnonzero(in_s),
            "s_at": column_gamma[in_s] + len(gamma) * np.searchsorted(gamma, start + rows[in_s]),
            "k_rows": (k_rows + 1).astype(np.int32),
            "k_cols": (k_cols + 1).astype(np.int32),
            "listvar": np.arange(n_interior + 1, n_interior + len(gamma_r) + 1, dtype=np.int32),
            "perm_in": _pivot_order(k_rows, k_cols, n_interior, len(gamma_r)),
        }
        self._n_remote, self._entries = len(remote), len(columns)
        self._schur_r = np.zeros((len(gamma_r), len(gamma_r)), dtype=np.float32)
        self._rhs = np.zeros(n_interior + len(gamma_r), dtype=np.float32)
        self._reduced = np.zeros(max(len(gamma_r), 1), dtype=np.float32)
        self._g = np.zeros(len(gamma) + 1, dtype=np.float64)  # + one slot: a rank's failure
        self._values = np.empty(0, dtype=np.float32)
        self._schur: tuple[np.ndarray, np.ndarray] | None = None
        err = 0
        if n_interior:
            self.handle = self.lib.fa_lu_create()
            if not self.handle:
                err = -1
            else:
                layout = self._layout
                self.lib.fa_lu_set_perm(self.handle, layout["perm_in"].ctypes.data)
                self.lib.fa_lu_set_schur(
                    self.handle, len(gamma_r), layout["listvar"].ctypes.data, self._schur_r.ctypes.data
                )
                err = self.lib.fa_lu_analyse(
                    self.handle, len(self._rhs), len(k_rows), layout["k_rows"].ctypes.data, layout["k_cols"].ctypes.data
                )
        self._collective_check(err, "analysis")

    def _interface(self, rows: np.ndarray, columns: np.ndarray, owner: np.ndarray) -> np.ndarray:
        """The owned unknowns of the interface ``G`` (global indices): for each pair of ranks
        ``q < s``, a minimum vertex cover of the bipartite graph of the couplings between their
        unknowns (Koenig's theorem, from a maximum matching), computed on ``q``. Every coupling
        of two ranks' unknowns then has an end in ``G``; on the 0.5 nm wire split in two, 758
        unknowns instead of the 1202 that all of one side's coupled unknowns would be."""
        rank = self.comm.rank
        cross = owner != rank
        mine_lower = np.minimum(owner[cross], rank) == rank  # pairs whose lower rank is this one
        lower_end = np.where(mine_lower, rows[cross], columns[cross])
        higher_end = np.where(mine_lower, columns[cross], rows[cross])
        higher_rank = np.maximum(owner[cross], rank)
        edges = np.stack([lower_end, higher_end, higher_rank], axis=1)
        received, _, _ = send_rows(self.comm, np.minimum(owner[cross], rank), edges.astype(np.int64))
        edges = np.unique(received, axis=0)
        cover_mine: list[np.ndarray] = []
        cover_theirs, destination = [], []
        for other in np.unique(edges[:, 2]):
            pair = edges[edges[:, 2] == other]
            left, right = _minimum_vertex_cover(pair[:, 0], pair[:, 1])
            cover_mine.append(left)
            cover_theirs.append(right)
            destination.append(np.full(len(right), other))
        sent = np.concatenate(cover_theirs) if cover_theirs else np.empty(0, dtype=np.int64)
        to = np.concatenate(destination) if destination else np.empty(0, dtype=np.int64)
        back, _, _ = send_rows(self.comm, to.astype(np.int64), sent.astype(np.int64))
        return np.unique(np.concatenate([*cover_mine, back])).astype(np.int64)

    def _collective_check(self, err: int, what: str) -> None:
        worst = self.comm.allreduce(err, op=MPI.MIN)
        if worst < 0:
            infog2 = self.lib.fa_lu_infog(self.handle, 2) if self.handle and err < 0 else 0
            raise FactorisationError(
                f"MUMPS (single precision, substructured) {what} failed on a rank: INFOG(1) = {worst}"
                + (f", INFOG(2) = {infog2} here" if err < 0 else "")
            )

    # -- the public interface of SinglePrecisionLU ---------------------------------------
    def factorise(self, A: PETSc.Mat) -> None:
        """Factorise ``A`` (the decomposition and symbolic analysis at the first call)."""
        if self._layout is None:
            self._analyse(A)
        layout = self._layout
        assert layout is not None
        _, _, values = A.getValuesCSR()
        if len(values) != self._entries:
            raise FactorisationError("the matrix changed its pattern since the analysis")
        remote_values, _, _ = send_rows(self.comm, layout["outgoing_owner"], values[layout["outgoing"]])
        if len(remote_values) != self._n_remote:
            raise FactorisationError("the matrix changed its pattern since the analysis")
        self._values = np.concatenate([values[layout["k_from"]], remote_values]).astype(np.float32)
        err = 0
        if self.handle:
            err = _factorise_growing_workspace(self, self._values)
        self._collective_check(err, "factorisation")
        n = self.interface_size
        entries = np.zeros(n * n, dtype=np.float32)
        entries[layout["s_at"]] = values[layout["s_from"]]
        schur = entries.reshape(n, n)
        at = layout["gamma_r_at"]
        schur[np.ix_(at, at)] += self._schur_r
        self.comm.Allreduce(MPI.IN_PLACE, schur, op=MPI.SUM)
        factors, pivots = _dense_lu(schur) if n else (schur, np.empty(0, dtype=np.int32))
        diagonal = np.diagonal(factors)
        if not np.all(np.isfinite(diagonal)) or np.any(diagonal == 0.0):  # the same S on every rank
            raise FactorisationError("the Schur complement of the ranks' interface is singular in float32")
        self._schur = factors, pivots
        local = abs(self.lib.fa_lu_infog(self.handle, 29)) if self.handle else 0
        self.factor_entries = self.comm.allreduce(local) + n * n

    def solve(self, b: PETSc.Vec, x: PETSc.Vec) -> None:
        """``x = A^-1 b`` with the last factorisation (float32 local factors, float64 in and out)."""
        layout = self._layout
        assert layout is not None and self._schur is not None
        b_array = b.getArray(readonly=True)
        n_interior = len(layout["interior"])
        self._rhs[:n_interior] = b_array[layout["interior"]]
        self._rhs[n_interior:] = 0.0
        g = self._g
        g[:] = 0.0
        err = 0
        n_gamma_r = len(layout["gamma_r_at"])
        if self.handle:  # condensation (or, without interface unknowns, the whole local solve)
            phase = 1 if n_gamma_r else 0
            err = self.lib.fa_lu_solve(self.handle, phase, self._rhs.ctypes.data, self._reduced.ctypes.data)
            g[layout["gamma_r_at"]] = self._reduced[:n_gamma_r]
        g[layout["owned_gamma_at"]] += b_array[layout["owned_gamma_rows"]]
        g[-1] = 1.0 if err < 0 else 0.0
        self.comm.Allreduce(MPI.IN_PLACE, g, op=MPI.SUM)
        if g[-1] > 0.0:
            raise FactorisationError(f"MUMPS (single precision, substructured) condensation failed: INFOG(1) = {err}")
        x_gamma = _dense_solve(self._schur, g[:-1].astype(np.float32)) if self.interface_size else g[:0]
        x_array = x.getArray()
        x_array[layout["owned_gamma_rows"]] = x_gamma[layout["owned_gamma_at"]]
        if self.handle:
            if n_gamma_r:  # expansion
                self._reduced[:n_gamma_r] = x_gamma[layout["gamma_r_at"]]
                err = self.lib.fa_lu_solve(self.handle, 2, self._rhs.ctypes.data, self._reduced.ctypes.data)
            x_array[layout["interior"]] = self._rhs[:n_interior]
        self._collective_check(err, "expansion")

    def release(self) -> None:
        """Free the local factors, ``S`` and the decomposition (collective)."""
        if self.handle:
            self.lib.fa_lu_destroy(self.handle)
        self.handle = None
        self._layout = self._schur = None
        self._workspace = 80

    def destroy(self) -> None:
        self.release()


def _minimum_vertex_cover(left: np.ndarray, right: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A minimum vertex cover of the bipartite graph with edges ``(left[k], right[k])``: the
    covering left and right vertices. Koenig's construction: with a maximum matching, ``Z`` the
    vertices reachable from unmatched left vertices by alternating paths, the cover is the left
    vertices not in ``Z`` and the right ones in ``Z``."""
    from scipy import sparse
    from scipy.sparse.csgraph import maximum_bipartite_matching

    left_ids, i = np.unique(left, return_inverse=True)
    right_ids, j = np.unique(right, return_inverse=True)
    graph = sparse.csr_matrix((np.ones(len(i)), (i, j)), shape=(len(left_ids), len(right_ids)))
    match_of_left = maximum_bipartite_matching(graph, perm_type="column")  # -1: unmatched
    match_of_right = np.full(len(right_ids), -1)
    matched = match_of_left >= 0
    match_of_right[match_of_left[matched]] = np.flatnonzero(matched)
    reached_left = ~matched
    reached_right = np.zeros(len(right_ids), dtype=bool)
    frontier = np.flatnonzero(reached_left)
    while len(frontier):  # left -> right on any edge, right -> left on the matching
        neighbours = np.unique(np.concatenate([graph.indices[graph.indptr[k] : graph.indptr[k + 1]] for k in frontier]))
        new_right = neighbours[~reached_right[neighbours]]
        reached_right[new_right] = True
        back = match_of_right[new_right]
        back = back[(back >= 0) & ~reached_left[np.maximum(back, 0)]]
        reached_left[back] = True
        frontier = back
    return left_ids[~reached_left], right_ids[reached_right]


def _pivot_order(rows: np.ndarray, columns: np.ndarray, n_interior: int, n_schur: int) -> np.ndarray:
    """MUMPS's ``PERM_IN`` (1-based position of each variable) for a matrix whose first
    ``n_interior`` variables are eliminated and the last ``n_schur`` kept (the Schur variables,
    last): a nested dissection of the interior's graph. MUMPS's own choice with a Schur
    complement is AMD, whose factors were 1.6x larger on the 0.5 nm wire (docs/phasefield.md)."""
    interior = (rows < n_interior) & (columns < n_interior) & (rows != columns)
    graph = np.unique(
        np.concatenate(
            [rows[interior] * n_interior + columns[interior], columns[interior] * n_interior + rows[interior]]
        )
    )
    indptr = np.searchsorted(graph // max(n_interior, 1), np.arange(n_interior + 1)).astype(np.int32)
    position = _nested_dissection(indptr, (graph % max(n_interior, 1)).astype(np.int32), n_interior)
    return np.concatenate([position + 1, np.arange(n_interior + 1, n_interior + n_schur + 1)]).astype(np.int32)


def _nested_dissection(indptr: np.ndarray, indices: np.ndarray, n: int) -> np.ndarray:
    """Position of each vertex in a nested-dissection order of a symmetric graph (CSR without
    the diagonal): METIS's ``NodeND`` where ``libmetis`` loads, else PETSc's ``nd`` (10-20 %
    more fill on the 0.5 nm wire)."""
    import ctypes.util

    if n == 0:
        return np.empty(0, dtype=np.int32)
    name = ctypes.util.find_library("metis")
    if name is not None:
        try:
            metis = ctypes.CDLL(name)
            options = np.full(40, -1, dtype=np.int32)  # METIS_NOPTIONS; -1: the defaults
            order, position = np.zeros(n, dtype=np.int32), np.zeros(n, dtype=np.int32)
            vertices = ctypes.c_int32(n)
            pointers = (indptr, indices, None, options, order, position)
            args = [ctypes.c_void_p(a.ctypes.data) if a is not None else None for a in pointers]
            ok = metis.METIS_NodeND(ctypes.byref(vertices), *args) == 1  # METIS_OK (and 32-bit indices:)
            if ok and np.array_equal(np.sort(position), np.arange(n)):
                return position
        except (OSError, AttributeError):
            pass
    graph = PETSc.Mat().createAIJWithArrays(
        (n, n), (indptr.astype(PETSc.IntType), indices.astype(PETSc.IntType), np.ones(len(indices))), comm=MPI.COMM_SELF
    )
    row_order, column_order = graph.getOrdering("nd")
    position = np.empty(n, dtype=np.int32)
    position[row_order.getIndices()] = np.arange(n, dtype=np.int32)
    for obj in (graph, row_order, column_order):
        obj.destroy()
    return position


def _dense_lu(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from scipy.linalg import lu_factor

    return lu_factor(matrix, overwrite_a=True, check_finite=False)


def _dense_solve(factors: tuple[np.ndarray, np.ndarray], rhs: np.ndarray) -> np.ndarray:
    from scipy.linalg import lu_solve

    return lu_solve(factors, rhs, check_finite=False)
