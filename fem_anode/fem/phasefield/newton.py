"""Newton (PETSc SNES with line search) on the coupled fields plus one global scalar.

Generalised plane strain adds one unknown to the finite element system, the uniform axial
stretch ``lambda``, with one equation, zero net axial force. dolfinx 0.9 has no "Real"
space, so the SNES works on a vector ``X = [w, lambda]`` (the mixed-space dofs, with
``lambda`` owned by rank 0) and its Jacobian is the bordered matrix

.. math::

    J = \\begin{pmatrix} A & b \\\\ c^T & d \\end{pmatrix},\\qquad
    A = \\partial R/\\partial w,\\ b = \\partial R/\\partial\\lambda,\\
    c = \\partial g/\\partial w,\\ d = \\partial g/\\partial\\lambda,

applied as a matrix-free shell (for the line search) and solved by block elimination in a
shell preconditioner: with ``P`` a factorised copy of ``A`` (MUMPS LU or the fallback) and
``z = P^-1 b``, each application costs one solve plus dot products
(``x_lambda = (r_lambda - c.P^-1 r_w) / (d - c.z)``); the Schur complement ``d - c.z`` is a
positive scalar (the axial stiffness). For plane strain the last equation is ``lambda - 1 = 0``.

**Factorisation reuse** (``reuse_factorisation``): the Newton step is solved by a Krylov method
on the current bordered Jacobian, preconditioned by this block elimination with a *lagged*
factorisation ``P`` (numeric refactorisation only; the symbolic analysis is kept). A
factorisation of the 1 nm nanowire costs as much as dozens of triangular solves. Two schemes:

* ``refactor_on_stall`` (default): FGMRES, which allows the preconditioner to change between
  iterations. When a solve has used ``refactor_iterations`` applications of a lagged ``P``
  without converging, ``P`` is refactorised from the current Jacobian inside the solve (the
  next applications are exact, so it converges in one or two more). A Newton iteration never
  fails for a stale factorisation, and ``P`` is renewed exactly when it stopped paying.
* otherwise (the previous scheme): GMRES; ``P`` is refactorised at the next Newton iteration
  when the previous solve needed more than ``refactor_iterations`` iterations or failed, and a
  Newton solve whose linear solve failed is repeated once with a fresh factorisation.

The linear tolerance is ``linear_rtol`` (1e-10: still Newton with the consistent tangent), or,
with ``linear_rtol=None``, the Eisenstat-Walker forcing term (PETSc ``snes_ksp_ew``, capped at
1e-2): loose while the Newton residual is large, tighter as Newton converges, so that the
final iterations stay (super)quadratic while the early ones stop wasting Krylov iterations.
Newton's own tolerances still decide convergence, so the converged state is the same within
them. With Eisenstat-Walker the Krylov solve also stops once its residual is a tenth of what
Newton's tolerance asks of the whole attempt (KSP ``atol = 0.1 max(rtol |F_0|, atol)``): the
last Newton iteration of an attempt no longer solves its linear system far below the residual
at which Newton stops. Without reuse ``P = A`` at every iteration and the outer solve is a
single exact application (``preonly``).

**Lagged border**: the block elimination uses the border of the matrix it was factorised from
(``z = P^-1 b``, ``c`` and the Schur complement ``d - c.z`` are updated with each factorisation,
not at every Newton iteration), so the preconditioner is the exact inverse of the lagged
bordered Jacobian and a Newton iteration without refactorisation costs no extra triangular
solve; the mat-vecs use the current border.

**Single precision** (``single_precision``, with reuse only): the lagged factorisation is
MUMPS's in float32 (:class:`~fem_anode.fem.phasefield.mumps_single.SinglePrecisionLU` on one
rank, :class:`~fem_anode.fem.phasefield.mumps_single.SubstructuredLU` on several: a local LU per
rank and a dense Schur complement of the ranks' interface, which rounds the same way in every
run, where MUMPS's parallel factorisation does not); the
Krylov solve, the mat-vecs and Newton stay in double precision. A preconditioner lagged over
Newton iterations and steps is limited by the lag, not by the rounding of its factors, and the
factors are half the bytes a triangular solve reads. Where float32 factors are not enough (MUMPS
fails in single precision, or a linear solve fails right after a fresh single-precision
factorisation: an ill-conditioned Jacobian at a porous front), the next ``DOUBLE_RUN``
factorisations are in double precision, the run after a further failure twice as long, and so on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
from dolfinx import fem
from dolfinx.fem import petsc as fem_petsc
from mpi4py import MPI
from petsc4py import PETSc

from fem_anode.errors import UsageError
from fem_anode.fem.cell_assembly import AssemblyUnsupported, BorderedCellAssembler, CellMatrixAssembler
from fem_anode.fem.petsc_ksp import CSRValues, direct_solver_package, prefixed_options, unique_prefix
from fem_anode.fem.phasefield.mumps_single import (
    FactorisationError,
    InterfaceTooLarge,
    SinglePrecisionLU,
    SubstructuredLU,
)

__all__ = ["BorderedNewton", "linear_solver_options"]

logger = logging.getLogger(__name__)
_BAD = 1e30  # residual entries used when the forms evaluate to inf/NaN (line search backtracks)
#: Stagnation stop: from this Newton iteration on, if the last STAGNATION_WINDOW iterations did
#: not halve the residual norm.
STAGNATION_START = 8
STAGNATION_WINDOW = 4
#: Flat stall (part of the stagnation stop): an attempt whose residual is already below
#: FLAT_BELOW times its first one and whose last FLAT_WINDOW iterations each kept more than
#: FLAT_RATIO of it will not converge: the line search takes steps of almost zero length (at the
#: porous fronts the implicit step has no solution near the iterate; only a smaller step helps).
FLAT_BELOW = 1e-2
FLAT_WINDOW = 2
FLAT_RATIO = 0.9
#: Factorisations in double precision after the first failure of a single-precision one
#: (doubled after each further failure).
DOUBLE_RUN = 8


def linear_solver_options(choice: str, comm_size: int) -> dict[str, str]:
    """PETSc options of the direct solver for ``A``: ``"auto"`` is the package's fallback order
    (:func:`~fem_anode.fem.petsc_ksp.direct_solver_package`: MUMPS, SuperLU_dist, PETSc's own LU
    on one rank).

    Raises:
        UsageError: the requested package is not in this PETSc build, or PETSc's own LU was
            asked for in parallel (or no direct solver can run on ``comm_size`` ranks).
    """
    if choice == "auto":
        choice = direct_solver_package(comm_size) or "petsc"
    if choice in ("mumps", "superlu_dist") and not PETSc.Sys.hasExternalPackage(choice):
        raise UsageError(f"solver.linear_solver = {choice!r} but this PETSc has no {choice}")
    if choice == "petsc":
        if comm_size > 1:
            raise UsageError(
                "solver.linear_solver = 'petsc' (serial LU) cannot run on several ranks; use mumps or superlu_dist"
            )
        return {"ksp_type": "preonly", "pc_type": "lu", "pc_factor_shift_type": "NONE"}
    options = {"ksp_type": "preonly", "pc_type": "lu", "pc_factor_mat_solver_type": choice}
    if choice == "mumps":
        options["mat_mumps_icntl_14"] = "80"  # memory head-room for pivoting
    return options


class BorderedNewton:
    """SNES Newton with line search on ``[w, lambda]``.

    Args:
        w: the mixed-space unknown (updated in place).
        residual: form of ``R(w, lambda)`` (linear in the test function).
        jacobian: form of ``dR/dw``.
        bcs: Dirichlet conditions on ``w``.
        axial: ``None`` for plane strain, else ``(g, dR_dlambda, dg_dw, dg_dlambda)`` forms
            (``g`` and ``dg_dlambda`` scalar forms, the others vectors).
        lam: the constant holding ``lambda``.
        linear_options: PETSc options of the factorisation of ``A``.
        snes_options: PETSc options of the SNES (without prefix).
        reuse_factorisation: lag the factorisation (see the module docstring).
        refactor_iterations: refactorise when a linear solve takes more Krylov iterations.
        refactor_on_stall: refactorise inside a stalled solve (FGMRES) rather than at the next
            Newton iteration (GMRES).
        linear_rtol: relative tolerance of the Krylov solves with reuse; ``None``: Eisenstat-Walker.
        stagnation: stop (as diverged) once Newton has run ``STAGNATION_START`` iterations and the
            last ``STAGNATION_WINDOW`` of them did not halve the residual, or once the residual is
            below ``FLAT_BELOW`` of the first and flat (``FLAT_WINDOW`` iterations each keeping
            more than ``FLAT_RATIO`` of it): such an attempt almost never converges within
            ``max_it`` and the time step is retried smaller sooner.
        single_precision: with reuse, factorise in single precision (see the module docstring;
            the caller checks :func:`~fem_anode.fem.phasefield.mumps_single.single_precision_available`).
        cached_assembly: assemble the Jacobian with
            :class:`~fem_anode.fem.cell_assembly.CellMatrixAssembler` (the same matrix bit for bit,
            in less than half the time) where it serves the form, else with dolfinx.
        bordered: with ``cached_assembly`` and ``axial``, the residual and Jacobian of
            ``[w, lambda]`` as forms on ``W x DG0``
            (:class:`~fem_anode.fem.cell_assembly.BorderedCellAssembler`): ``R`` with ``g`` and the
            Jacobian with its border each in one pass over the cells (equal to the separate forms
            up to round-off). ``None``: the separate forms.
        prune_pattern: with ``cached_assembly``, ``A``'s pattern without the field blocks the
            Jacobian's kernel never fills (about half the non-zeros of the phase field's;
            :mod:`fem_anode.fem.cell_assembly`), else dolfinx's full pattern.
    """

    def __init__(
        self,
        w: fem.Function,
        residual: fem.Form,
        jacobian: fem.Form,
        bcs: list[fem.DirichletBC],
        axial: tuple[fem.Form, fem.Form, fem.Form, fem.Form] | None,
        lam: fem.Constant,
        linear_options: dict[str, str],
        snes_options: dict[str, Any],
        reuse_factorisation: bool = False,
        refactor_iterations: int = 30,
        refactor_on_stall: bool = False,
        linear_rtol: float | None = 1e-10,
        stagnation: bool = False,
        single_precision: bool = False,
        cached_assembly: bool = False,
        bordered: tuple[fem.Form, fem.Form] | None = None,
        prune_pattern: bool = False,
    ) -> None:
        self.w, self.residual, self.jacobian, self.bcs, self.axial, self.lam = w, residual, jacobian, bcs, axial, lam
        V = w.function_space
        self.comm = V.mesh.comm
        self.root = self.comm.rank == 0
        self.n = V.dofmap.index_map.size_local * V.dofmap.index_map_bs
        nloc = self.n + (1 if self.root else 0)
        self.X = PETSc.Vec().createMPI((nloc, PETSc.DECIDE), comm=self.comm)
        self.F = self.X.duplicate()
        self.A = fem_petsc.create_matrix(jacobian)
        self._csr = self._native_matrix(jacobian)
        #: one rank: ``A`` is built on the CSR matrix's own arrays, so an assembly needs no copy
        self._shares_csr = self._csr is not None and self.comm.size == 1
        #: the Jacobian through precomputed positions in the CSR matrix (None: dolfinx's assembler)
        self._cached: CellMatrixAssembler | None = None
        #: residual and Jacobian with their border in one pass each (None: separate forms)
        self._bordered: BorderedCellAssembler | None = None
        if cached_assembly and self._csr is not None and axial is not None and bordered is not None:
            try:
                self._bordered = BorderedCellAssembler(*bordered, V, self._csr[0], bcs, prune=prune_pattern)
            except AssemblyUnsupported as exc:
                logger.info("bordered forms assembled separately: %s", exc)
        if cached_assembly and self._csr is not None and self._bordered is None:
            try:
                self._cached = CellMatrixAssembler(jacobian, self._csr[0], bcs, prune=prune_pattern)
            except AssemblyUnsupported as exc:
                logger.info("Jacobian assembled by dolfinx: %s", exc)
        #: several ranks with the pruned pattern: the entries of the CSR matrix copied into ``A``
        self._copied: np.ndarray | None = None
        #: ``A`` itself in that case, with its values replaced in one copy per assembly
        self._pruned: CSRValues | None = None
        assembler = self._bordered or self._cached
        if assembler is not None and assembler.kept is not None:
            self._prune_parallel_matrix(assembler.kept)
        if self._csr is not None and self._shares_csr:
            csr, indptr, columns, nnz = self._csr
            arrays = (indptr, columns, csr.data[:nnz])
            if assembler is not None and assembler.pattern is not None:  # one rank, pruned
                arrays = (assembler.pattern.indptr, assembler.pattern.indices, assembler.pattern.data)
            shared = PETSc.Mat().createAIJWithArrays(self.A.getSizes(), arrays, comm=self.comm)
            self.A.destroy()
            self.A = shared
        self.P: PETSc.Mat | None = None if reuse_factorisation else self.A  # the factorised matrix
        #: the single-precision factorisation (replaces ``P`` and ``ksp`` while ``_single``), if used
        self.lu: SinglePrecisionLU | SubstructuredLU | None = None
        if single_precision and reuse_factorisation:
            self.lu = SinglePrecisionLU(self.comm) if self.comm.size == 1 else SubstructuredLU(self.comm)
        self._single = False  # the current factorisation is the single-precision one
        self._double_left = 0  # double-precision factorisations before single precision again
        self._double_run = DOUBLE_RUN
        self.single_failures = 0
        self.reuse, self.refactor_iterations = reuse_factorisation, refactor_iterations
        self.on_stall = reuse_factorisation and refactor_on_stall
        self._refactor = True
        self._fresh = False  # P is the factorisation of the current A
        self._applications = 0  # preconditioner applications in the current linear solve
        self._refactored_in_solve = False
        self.factorisations = 0
        self.linear_iterations = 0
        self.r = fem_petsc.create_vector(residual)
        self.z1, self.z2, self.xw, self.yw = (self.A.createVecRight() for _ in range(4))
        if axial is not None:
            self.bvec = fem_petsc.create_vector(axial[1])
            self.cvec = fem_petsc.create_vector(axial[2])
        self.d = 1.0
        self.schur = 1.0
        self.c_lagged: PETSc.Vec | None = None  # c of the factorised border (see _update_border)
        self._krylov_floor = reuse_factorisation and linear_rtol is None
        self.history: list[float] = []
        self.on_residual: list[Callable[[], None]] = []
        self.ksp = PETSc.KSP().create(self.comm)
        # the factorisation package reads its options at the first set-up (the first factorisation)
        self._linear_options: dict[str, Any] | None = dict(linear_options)
        self._set_options(self.ksp, unique_prefix("phasefield_lin"), linear_options)
        self.snes = PETSc.SNES().create(self.comm)
        J = PETSc.Mat().createPython(((nloc, PETSc.DECIDE), (nloc, PETSc.DECIDE)), comm=self.comm)
        J.setPythonContext(_Shell(self))
        J.setUp()
        self.J = J
        self.snes.setFunction(self._function, self.F)
        self.snes.setJacobian(self._jacobian, J, J)
        self.snes.setMonitor(lambda snes, its, norm: self.history.append(float(norm)))
        self.stagnation = stagnation
        self._stagnated = False
        self._fnorm0 = 0.0
        self.snes.setConvergenceTest(self._converged)
        outer = self.snes.getKSP()
        if reuse_factorisation:
            outer.setType("fgmres" if self.on_stall else "gmres")
            outer.setGMRESRestart(60)
            outer.setTolerances(rtol=1e-10 if linear_rtol is None else linear_rtol, atol=1e-14, max_it=60)
            if self.on_stall:
                outer.setPCSide(PETSc.PC.Side.RIGHT)
            outer.setNormType(PETSc.KSP.NormType.UNPRECONDITIONED)
            if linear_rtol is None:  # Eisenstat-Walker forcing terms, user options still win
                snes_options = {
                    "snes_ksp_ew": True,
                    "snes_ksp_ew_rtol0": 1e-2,
                    "snes_ksp_ew_rtolmax": 1e-2,
                    **snes_options,
                }
        else:
            outer.setType("preonly")
        pc = outer.getPC()
        pc.setType("python")
        pc.setPythonContext(_Shell(self))
        self._set_options(self.snes, unique_prefix("phasefield"), snes_options)

    @staticmethod
    def _set_options(obj: Any, prefix: str, options: dict[str, Any]) -> None:
        obj.setOptionsPrefix(prefix)
        with prefixed_options(prefix, options):
            obj.setFromOptions()

    # -- state ----------------------------------------------------------------------------
    def pack(self) -> None:
        """Copy ``w`` and ``lambda`` into the SNES vector."""
        arr = self.X.getArray()
        arr[: self.n] = self.w.x.array[: self.n]
        if self.root:
            arr[self.n] = float(self.lam.value)

    def _unpack(self, X: PETSc.Vec) -> None:
        arr = X.getArray(readonly=True)
        self.w.x.array[: self.n] = arr[: self.n]
        self.w.x.scatter_forward()
        self.lam.value = self.comm.bcast(float(arr[self.n]) if self.root else None, root=0)

    def _split(self, x: PETSc.Vec, xw: PETSc.Vec) -> float:
        arr = x.getArray(readonly=True)
        xw.getArray()[:] = arr[: self.n]
        return self.comm.bcast(float(arr[self.n]) if self.root else None, root=0)

    def _join(self, yw: PETSc.Vec, yl: float, y: PETSc.Vec) -> None:
        arr = y.getArray()
        arr[: self.n] = yw.getArray(readonly=True)
        if self.root:
            arr[self.n] = yl

    # -- SNES callbacks -------------------------------------------------------------------
    def _function(self, snes: PETSc.SNES, X: PETSc.Vec, F: PETSc.Vec) -> None:
        self._unpack(X)
        for hook in self.on_residual:
            hook()
        g_local = 0.0
        with self.r.localForm() as loc:
            if self._bordered is not None:
                g_local = self._bordered.assemble_residual(loc.array)
            else:
                loc.set(0.0)
        if self._bordered is None:
            fem_petsc.assemble_vector(self.r, self.residual)
            if self.axial is not None:
                g_local = fem.assemble_scalar(self.axial[0])
        self.r.ghostUpdate(addv=PETSc.InsertMode.ADD, mode=PETSc.ScatterMode.REVERSE)
        fem_petsc.set_bc(self.r, self.bcs, x0=self.w.x.petsc_vec, alpha=-1.0)
        if self.axial is None:
            g = float(self.lam.value) - 1.0
        else:
            g = self.comm.allreduce(g_local)
        out = F.getArray()
        out[: self.n] = self.r.getArray(readonly=True)[: self.n]
        if self.root:
            out[self.n] = g
        bad = self.comm.allreduce(int(not np.all(np.isfinite(out))))
        if bad:
            out[~np.isfinite(out)] = _BAD

    def _jacobian(self, snes: PETSc.SNES, X: PETSc.Vec, J: PETSc.Mat, P: PETSc.Mat) -> None:
        self._unpack(X)
        outer = snes.getKSP()
        if self.reuse and snes.getIterationNumber() > 0:
            its = outer.getIterationNumber()
            self.linear_iterations += its
            if outer.getConvergedReason() < 0 or (its > self.refactor_iterations and not self._refactored_in_solve):
                self._refactor = True
        self._applications, self._refactored_in_solve = 0, False
        self.assemble_jacobian()
        if self._refactor or not self.reuse:
            self._factorise()
        else:
            self._fresh = False  # the border of the preconditioner stays that of P (module docstring)

    def _native_matrix(self, jacobian: fem.Form) -> tuple[Any, np.ndarray, np.ndarray, int] | None:
        """dolfinx's own CSR matrix of the Jacobian and the owned rows' pattern in global column
        indices, if it is the PETSc matrix's pattern (else None: assemble into PETSc directly).

        Element matrices go into the CSR matrix (its row search is fast) and the owned rows are
        then copied into ``A`` row by row with sorted columns (on one rank ``A`` holds the CSR
        matrix's arrays themselves: no copy, 6 ms per assembly at 1 nm). Inserting them into the PETSc
        matrix element by element (``MatSetValuesLocal``, unsorted) cost about 3x the whole rest
        of the assembly, kernels included (docs/phasefield.md).
        """
        csr = fem.create_matrix(jacobian)
        n_rows = self.A.getLocalSize()[0]
        if csr.block_size != [1, 1] or csr.index_map(0).size_local != n_rows:
            return None
        indptr = csr.indptr[: n_rows + 1].astype(PETSc.IntType)
        columns = csr.index_map(1).local_to_global(csr.indices[: indptr[-1]].astype(np.int32)).astype(PETSc.IntType)
        info = self.A.getInfo(PETSc.Mat.InfoType.LOCAL)
        same = int(info["nz_allocated"]) == int(indptr[-1])
        if not self.comm.allreduce(same, op=MPI.LAND):
            return None
        return csr, indptr, columns, int(indptr[-1])

    def _prune_parallel_matrix(self, kept: np.ndarray) -> None:
        """Several ranks: ``A`` with only the ``kept`` entries of the CSR matrix's owned rows
        (columns sorted in each row), and the positions they are copied from."""
        assert self._csr is not None
        csr, indptr, columns, nnz = self._csr
        rows = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
        entries = np.flatnonzero(kept[:nnz])
        entries = entries[np.lexsort((columns[entries], rows[entries]))]
        counts = np.bincount(rows[entries], minlength=len(indptr) - 1)
        pruned_indptr = np.concatenate([[0], np.cumsum(counts)]).astype(PETSc.IntType)
        pruned_columns = columns[entries].astype(PETSc.IntType)
        self._pruned = CSRValues(self.A.getSizes(), pruned_indptr, pruned_columns, self.comm)
        self.A.destroy()
        self.A = self._pruned.matrix
        self._csr = (csr, pruned_indptr, pruned_columns, nnz)
        self._copied = entries

    def assemble_jacobian(self) -> None:
        """Assemble the Jacobian ``A`` at the current state and, in generalised plane strain, its
        border vectors and corner (one Jacobian assembly, as the benchmark's profile times it)."""
        bordered = self._bordered if self._csr is not None else None  # with the border (below)
        d_local = 0.0
        if self._csr is None:
            self.A.zeroEntries()
            # dolfinx's singledispatch overload (matrix, form, ...); mypy sees the first signature only
            fem_petsc.assemble_matrix(self.A, self.jacobian, bcs=self.bcs)  # type: ignore[arg-type, misc]
        else:
            csr, indptr, columns, nnz = self._csr
            if bordered is not None:
                with self.bvec.localForm() as b, self.cvec.localForm() as c:
                    d_local = bordered.assemble_jacobian(b.array, c.array)
            elif self._cached is not None:
                self._cached.assemble()
            else:
                csr.set_value(0.0)
                fem.assemble_matrix(csr, self.jacobian, bcs=self.bcs)  # type: ignore[arg-type, misc]  # as above
            csr.scatter_reverse()
            if self._pruned is not None:  # several ranks, pruned: the kept entries straight into A
                assert self._copied is not None
                self._pruned.set(csr.data[self._copied])  # fancy indexing: 3x faster than np.take here
            elif not self._shares_csr:  # several ranks: copy the owned rows (global columns) into A
                self.A.setValuesCSR(indptr, columns, csr.data[:nnz], addv=PETSc.InsertMode.INSERT_VALUES)
        self.A.assemble()
        if self.axial is not None:
            for vec, form in ((self.bvec, self.axial[1]), (self.cvec, self.axial[2])):
                if bordered is None:
                    with vec.localForm() as loc:
                        loc.set(0.0)
                    fem_petsc.assemble_vector(vec, form)
                vec.ghostUpdate(addv=PETSc.InsertMode.ADD, mode=PETSc.ScatterMode.REVERSE)
                fem_petsc.set_bc(vec, self.bcs, alpha=0.0)
            if bordered is None:
                d_local = fem.assemble_scalar(self.axial[3])
            self.d = self.comm.allreduce(d_local)

    def _factorise(self) -> None:
        """Factorise the current ``A`` (into ``P`` with reuse) and update the border solve."""
        was_single = self._single
        self._single = self.lu is not None and self._double_left == 0
        if self._single and not was_single and self.P is not None:
            self._release_double()  # back to float32 after a run in float64
        if self._single:
            assert self.lu is not None
            try:
                self.lu.factorise(self.A)
            except InterfaceTooLarge as exc:  # for the whole run (collective: the size is global)
                if self.root:
                    logger.info("%s: double precision for this run", exc)
                self.lu.destroy()
                self.lu, self._single = None, False
            except FactorisationError as exc:
                self._single_failed(str(exc))
        if not self._single:
            self._double_left = max(self._double_left - 1, 0)
            if self.reuse:
                if self.P is None:
                    self.P = self.A.copy()
                else:
                    self.A.copy(self.P, structure=PETSc.Mat.Structure.SAME_NONZERO_PATTERN)
            self.ksp.setOperators(self.P)
            if self._linear_options is not None:  # first factorisation: with the package's options
                with prefixed_options(self.ksp.getOptionsPrefix(), self._linear_options):
                    self.ksp.setUp()
                self._linear_options = None
            else:
                self.ksp.setUp()
        self.factorisations += 1
        self._refactor, self._fresh = False, True
        self._update_border()

    def _update_border(self) -> None:
        """``z2 = P^-1 b``, the Schur complement ``d - c.z2`` and a copy of ``c``: the border of the
        bordered matrix whose exact inverse the preconditioner applies until the next factorisation."""
        if self.axial is None:
            return
        self.lagged_solve(self.bvec, self.z2)
        if self.c_lagged is None:
            self.c_lagged = self.cvec.duplicate()
        self.cvec.copy(self.c_lagged)
        self.schur = self.d - self.cvec.dot(self.z2)

    def lagged_solve(self, b: PETSc.Vec, x: PETSc.Vec) -> None:
        """``x = P^-1 b`` with the current factorisation of ``A`` (without the border)."""
        if self._single:
            assert self.lu is not None
            try:
                self.lu.solve(b, x)
                return
            except FactorisationError as exc:
                self._single_failed(str(exc))
                self._factorise()  # in double precision
        self.ksp.solve(b, x)

    def _release_double(self) -> None:
        """Free the float64 factorisation and the copy of ``A`` it was made from (they come back
        at the next run in double precision; the float32 ones are freed when such a run starts):
        one set of factors is held at a time."""
        self.ksp.reset()
        assert self.P is not None
        self.P.destroy()
        self.P = None

    def _single_failed(self, reason: str) -> None:
        """Factorise in double precision for the next ``_double_run`` factorisations, then try
        single precision again (collective: the reasons are MUMPS's global codes or a KSP's
        convergence reason)."""
        self._single = False
        self._double_left = self._double_run
        self.single_failures += 1
        assert self.lu is not None
        self.lu.release()  # float32 factors back at the next single-precision factorisation
        if self.root:
            logger.info("%s: the next %d factorisations in double precision", reason, self._double_run)
        self._double_run *= 2

    def _converged(self, snes: PETSc.SNES, its: int, norms: tuple[float, float, float]) -> int:
        """PETSc's default test (absolute, relative to the first residual, step, divergence)
        plus, with :attr:`stagnation`, the stagnation stop."""
        xnorm, ynorm, fnorm = norms
        rtol, atol, stol, _ = snes.getTolerances()
        if its == 0:
            self._fnorm0 = fnorm
            self._stagnated = False
            if self._krylov_floor:  # no linear solve below a tenth of Newton's own target
                snes.getKSP().setTolerances(atol=0.1 * max(rtol * fnorm, atol))
        if not np.isfinite(fnorm):
            return PETSc.SNES.ConvergedReason.DIVERGED_FNORM_NAN
        if fnorm < atol:
            return PETSc.SNES.ConvergedReason.CONVERGED_FNORM_ABS
        if its == 0:
            return PETSc.SNES.ConvergedReason.ITERATING
        if fnorm <= rtol * self._fnorm0:
            return PETSc.SNES.ConvergedReason.CONVERGED_FNORM_RELATIVE
        if ynorm < stol * xnorm:
            return PETSc.SNES.ConvergedReason.CONVERGED_SNORM_RELATIVE
        divtol = snes.getDivergenceTolerance()
        if divtol > 0 and fnorm > divtol * self._fnorm0:
            return PETSc.SNES.ConvergedReason.DIVERGED_DTOL
        h = self.history
        seq = [*h, fnorm] if len(h) == its else h  # PETSc may test before it monitors
        if self.stagnation and (
            (its >= STAGNATION_START and len(h) > STAGNATION_WINDOW and h[-1] > 0.5 * h[-1 - STAGNATION_WINDOW])
            or (
                len(seq) > FLAT_WINDOW
                and fnorm < FLAT_BELOW * self._fnorm0
                and all(seq[-k] > FLAT_RATIO * seq[-k - 1] for k in range(1, FLAT_WINDOW + 1))
            )
        ):
            self._stagnated = True
            return PETSc.SNES.ConvergedReason.DIVERGED_MAX_IT
        return PETSc.SNES.ConvergedReason.ITERATING

    # -- solve ----------------------------------------------------------------------------
    def solve(self) -> tuple[bool, int, str]:
        """Newton from the current ``w``/``lambda``. Returns (converged, iterations, reason).

        With factorisation reuse, a Newton solve whose linear solve failed on a lagged
        factorisation (the matrix changed too much, e.g. a new dt or mobility) is repeated once
        from the start with a fresh factorisation.
        """
        self.pack()
        start = self.X.copy()
        try:
            attempts = 2 if self.reuse else 1
            for attempt in range(attempts):
                self.history = []
                try:
                    self.snes.solve(None, self.X)
                except PETSc.Error as err:  # a failed factorisation (zero pivot) inside the PC
                    self._refactor = True
                    return False, self.snes.getIterationNumber(), f"PETSc error {err.ierr}"
                reason = self.snes.getConvergedReason()
                if reason == -3 and self._single and self._fresh:
                    self._single_failed("a linear solve failed on a fresh single-precision factorisation")
                if self.reuse:
                    self.linear_iterations += self.snes.getKSP().getIterationNumber()
                    if reason < 0:
                        self._refactor = True  # a retry starts from a fresh factorisation
                if reason != -3 or attempt == attempts - 1:  # -3: diverged linear solve
                    break
                logger.debug("linear solve failed on a lagged factorisation: Newton again with a fresh one")
                start.copy(self.X)
                self._unpack(self.X)
        finally:
            start.destroy()
        self._unpack(self.X)
        label = "diverged: Newton stagnated" if self._stagnated and reason < 0 else _REASONS.get(reason, str(reason))
        return reason > 0, self.snes.getIterationNumber(), label

    def invalidate(self) -> None:
        """Refactorise at the next Jacobian (call when the operator changes abruptly)."""
        self._refactor = True

    def destroy(self) -> None:
        for obj in {
            id(o): o
            for o in (self.snes, self.ksp, self.J, self.A, self.P, self.X, self.F, self.c_lagged)
            if o is not None
        }.values():
            obj.destroy()
        if self.lu is not None:
            self.lu.destroy()


class _Shell:
    """Python context of the bordered Jacobian (``mult``) and its exact inverse (``apply``)."""

    def __init__(self, newton: BorderedNewton) -> None:
        self.nw = newton

    def mult(self, mat: PETSc.Mat, x: PETSc.Vec, y: PETSc.Vec) -> None:
        nw = self.nw
        xl = nw._split(x, nw.xw)
        nw.A.mult(nw.xw, nw.yw)
        if nw.axial is None:
            yl = xl
        else:
            nw.yw.axpy(xl, nw.bvec)
            yl = nw.cvec.dot(nw.xw) + nw.d * xl
        nw._join(nw.yw, yl, y)

    def apply(self, pc: PETSc.PC, x: PETSc.Vec, y: PETSc.Vec) -> None:
        nw = self.nw
        nw._applications += 1
        if nw.on_stall and not nw._fresh and nw._applications > nw.refactor_iterations:
            nw._factorise()  # FGMRES: the preconditioner may change from here on
            nw._refactored_in_solve = True
        rl = nw._split(x, nw.xw)
        nw.lagged_solve(nw.xw, nw.z1)
        if nw.axial is None:
            nw._join(nw.z1, rl, y)
            return
        assert nw.c_lagged is not None  # set by the factorisation before any application
        xl = (rl - nw.c_lagged.dot(nw.z1)) / nw.schur
        nw.z1.axpy(-xl, nw.z2)
        nw._join(nw.z1, xl, y)


_REASONS = {
    2: "converged: residual below atol",
    3: "converged: residual reduced by rtol",
    4: "converged: small step",
    -1: "diverged: function domain",
    -2: "diverged: function count",
    -3: "diverged: linear solve",
    -4: "diverged: residual NaN/inf",
    -5: "diverged: too many iterations",
    -6: "diverged: line search failed",
    -8: "diverged: local minimum",
    -9: "diverged: residual grew beyond divtol",
}
