"""Assembly of cell integrals through precomputed positions (the C loop in ``cell_assembly.c``,
compiled on first use): a bilinear form into a fixed CSR pattern, and the residual and Jacobian
of a system bordered by one global scalar each in one pass over the cells.

dolfinx's assembler looks up every entry of every element matrix in its row of the CSR pattern
at every assembly (a binary search per entry). A Newton solver assembles the same form on the
same pattern hundreds of times, so :class:`CellMatrixAssembler` finds each entry's position in
``MatrixCSR.data`` once and afterwards only calls the form's own FFCx kernel per cell and adds
the element matrix at those positions. The cells are visited in dolfinx's order and every
entry is added in the same order, so the matrix is bit for bit the one
``dolfinx.fem.assemble_matrix`` gives (tested); on the 1 nm phase-field wire an assembly takes
4.8 instead of 11.1 ms (docs/phasefield.md).

:class:`BorderedCellAssembler` serves Newton solvers whose unknowns are a field ``w`` and one
global scalar ``lambda`` with one scalar equation ``g = 0`` (generalised plane strain). dolfinx
would assemble ``R``, ``g``, ``dR/dw``, ``dR/dlambda``, ``dg/dw`` and ``dg/dlambda`` as six forms,
each evaluating the constitutive law at every quadrature point again. Here they come from two
forms on the extended space ``W x DG0``, whose one DG0 dof per cell carries the scalar: the DG0
test function times ``g``'s integrand in the residual, the DG0 trial function times the
derivatives with respect to ``lambda`` in the Jacobian. Summed over the cells, the DG0 row of the
residual's element vectors is ``g``; the Jacobian's element matrices give ``dR/dw`` (W rows and
columns), ``dR/dlambda`` (W rows, DG0 column), ``dg/dw`` (DG0 row) and ``dg/dlambda``.
With ``prune`` it also leaves out of ``dR/dw``'s pattern the blocks of fields (sub-elements)
that the kernel never fills, which dolfinx's pattern of a mixed space holds (every dof of a cell
coupled with every other): half the entries of the phase field's Jacobian.

What both serve: real float64 forms with cell integrals only, the same space for test and trial
functions and elements without dof transformations (Lagrange and other point-evaluation
elements on simplices and quadrilaterals). Anything else raises :class:`AssemblyUnsupported`,
and the caller keeps dolfinx's assembler.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cffi  # type: ignore[import-untyped]
import numpy as np
from dolfinx import cpp as _cpp
from dolfinx import fem, la
from mpi4py import MPI

from fem_anode.errors import SolverError
from fem_anode.fem.compiled import LOAD_ERRORS, compiled_library, load_collectively

__all__ = ["AssemblyUnsupported", "BorderedCellAssembler", "CellMatrixAssembler"]

_SOURCE = Path(__file__).with_name("cell_assembly.c")
_FLAGS = ("-O2", "-std=c99", "-fPIC", "-shared")
#: cells whose positions are computed in one vectorised batch (bounds the set-up's temporaries)
_BATCH_CELLS = 20_000
_library: ctypes.CDLL | None = None
_ffi = cffi.FFI()


class AssemblyUnsupported(RuntimeError):
    """The form or matrix is outside what the assemblers serve (the message says what);
    assemble with dolfinx instead."""


def _load_local() -> ctypes.CDLL:
    library = compiled_library(_SOURCE, os.environ.get("CC", "cc"), _FLAGS)
    pointer, int32 = ctypes.c_void_p, ctypes.c_int32
    library.fa_assemble_cells.argtypes = [
        ctypes.c_size_t,  # kernel
        int32,
        pointer,  # cells
        int32,
        pointer,  # coefficients
        int32,
        pointer,  # constants
        pointer,  # x
        pointer,  # x dofmap
        int32,
        pointer,  # positions
        pointer,  # data
        pointer,  # border
    ]
    library.fa_assemble_cells.restype = ctypes.c_int
    return library


def _address(array: np.ndarray) -> int:
    return array.ctypes.data


def _library_for(comm: Any) -> ctypes.CDLL:
    """The compiled loop, loaded collectively over ``comm`` (AssemblyUnsupported if it cannot be)."""
    global _library
    if _library is None:
        try:
            _library = load_collectively(comm, _load_local)
        except LOAD_ERRORS as exc:
            raise AssemblyUnsupported(str(exc)) from exc
    return _library


def _refuse(comm: Any, reason: str | None) -> None:
    """Raise AssemblyUnsupported on every rank if any rank has a reason."""
    reasons = [r for r in comm.allgather(reason) if r]
    if reasons:
        raise AssemblyUnsupported(reasons[0])


def _form_unsupported(form: fem.Form, rank: int) -> str | None:
    if form.rank != rank or np.dtype(form.dtype) != np.float64:
        return f"only real float64 forms of rank {rank} are served"
    if set(form.integral_types) != {fem.IntegralType.cell}:
        return "only cell integrals are served"
    spaces = form.function_spaces
    if any(space is not spaces[0] for space in spaces[1:]):
        return "the test and trial spaces differ"
    if spaces[0].element.needs_dof_transformations:
        return "the element needs dof transformations"
    return None


def _cell_integrals(form: fem.Form) -> list[tuple[int, int, np.ndarray]]:
    """(kernel address, integral id, integration cells) of each cell integral of ``form``."""
    ufcx_form, cpp_form = form.ufcx_form, form._cpp_object
    first, last = ufcx_form.form_integral_offsets[0], ufcx_form.form_integral_offsets[1]
    integrals = []
    for index in range(first, last):
        integral_id = int(ufcx_form.form_integral_ids[index])
        kernel = int(_ffi.cast("uintptr_t", ufcx_form.form_integrals[index].tabulate_tensor_float64))
        cells = np.ascontiguousarray(cpp_form.domains(fem.IntegralType.cell, integral_id), dtype=np.int32)
        integrals.append((kernel, integral_id, cells))
    return integrals


def _pattern_keys(matrix: la.MatrixCSR | CSRArrays) -> tuple[np.ndarray, int]:
    """Sorted keys ``row * n_columns + column`` of the matrix's local entries, and n_columns."""
    n_rows = len(matrix.indptr) - 1
    indptr = np.asarray(matrix.indptr, dtype=np.int64)
    columns = np.asarray(matrix.indices, dtype=np.int64)
    n_columns = int(columns.max()) + 1 if len(columns) else 1
    return np.repeat(np.arange(n_rows, dtype=np.int64), np.diff(indptr)) * n_columns + columns, n_columns


def _constrained_dofs(bcs: Sequence[fem.DirichletBC], n_dofs: int) -> tuple[np.ndarray, np.ndarray]:
    """Mask of the conditions' local dofs (owned and ghost) and the owned ones, sorted."""
    constrained = np.zeros(n_dofs, dtype=bool)
    owned: list[np.ndarray] = []
    for bc in bcs:
        dofs, first_ghost = bc._cpp_object.dof_indices()
        constrained[dofs] = True
        owned.append(np.asarray(dofs[:first_ghost], dtype=np.int64))
    return constrained, (np.unique(np.concatenate(owned)) if owned else np.empty(0, np.int64))


def _diagonal_positions(keys: np.ndarray, n_columns: int, dofs: np.ndarray) -> np.ndarray:
    wanted = dofs * n_columns + dofs
    found = np.searchsorted(keys, wanted)
    if not np.array_equal(keys[np.minimum(found, len(keys) - 1)], wanted):
        raise AssemblyUnsupported("a constrained dof has no diagonal entry in the matrix pattern")
    return found


def _matrix_positions(
    cell_dofs: np.ndarray,
    cells: np.ndarray,
    block: int,
    keys: np.ndarray,
    n_columns: int,
    constrained: np.ndarray,
    absent: np.ndarray | None = None,
) -> np.ndarray:
    """For each cell and element-matrix entry (row-major), its index in the matrix's values; -1
    where the row or column is constrained or the entry is ``absent`` (a mask over the element
    matrix's entries: not in the pattern)."""
    n_local = cell_dofs.shape[1] * block
    positions = np.empty((len(cells), n_local * n_local), dtype=np.int32)
    for start in range(0, len(cells), _BATCH_CELLS):
        chunk = cells[start : start + _BATCH_CELLS]
        dofs = _unrolled(cell_dofs[chunk], block)
        wanted = (dofs[:, :, None] * n_columns + dofs[:, None, :]).reshape(len(chunk), -1)
        found = np.searchsorted(keys, wanted)
        found = np.minimum(found, len(keys) - 1)
        missing = keys[found] != wanted
        if absent is not None:
            missing &= ~absent[None, :]
            found[:, absent] = -1
        if missing.any():
            raise AssemblyUnsupported("the matrix pattern does not hold every element entry")
        drop = constrained[dofs]
        found[(drop[:, :, None] | drop[:, None, :]).reshape(len(chunk), -1)] = -1
        positions[start : start + len(chunk)] = found
    return positions


def _unrolled(cell_dofs: np.ndarray, block: int) -> np.ndarray:
    """Cell dofs (int64) unrolled in the kernel's order: node-major, component-minor."""
    dofs = cell_dofs.astype(np.int64)
    if block > 1:
        dofs = (dofs[:, :, None] * block + np.arange(block)).reshape(len(dofs), -1)
    return dofs


_EMPTY = np.zeros(1)
#: slots the left-out Jacobian entries are summed into (their sums must stay zero)
_CHECK_SLOTS = 64


def _form_data(form: fem.Form) -> tuple[np.ndarray, dict, np.ndarray, np.ndarray]:
    """The form's packed constants and coefficients (per integral) and the mesh geometry."""
    constants = np.ascontiguousarray(_cpp.fem.pack_constants(form._cpp_object), dtype=np.float64)
    geometry = form.mesh.geometry
    return (
        constants if constants.size else _EMPTY,
        _cpp.fem.pack_coefficients(form._cpp_object),
        np.ascontiguousarray(geometry.x, dtype=np.float64),
        np.ascontiguousarray(geometry.dofmap, dtype=np.int32),
    )


def _run_cells(
    lib: ctypes.CDLL,
    kernel: int,
    cells: np.ndarray,
    n_entries: int,
    packed: np.ndarray,
    form_data: tuple[np.ndarray, dict, np.ndarray, np.ndarray],
    positions: np.ndarray,
    data: np.ndarray,
    border: np.ndarray,
) -> None:
    """The C loop over ``cells`` with their packed coefficients (one row per cell)."""
    constants, _, x, x_dofmap = form_data
    packed = np.ascontiguousarray(packed, dtype=np.float64)
    stride = packed.shape[1] if packed.ndim == 2 else 0
    err = lib.fa_assemble_cells(
        kernel,
        len(cells),
        _address(cells),
        n_entries,
        _address(packed if packed.size else _EMPTY),
        stride,
        _address(constants),
        _address(x),
        _address(x_dofmap),
        x_dofmap.shape[1],
        _address(positions),
        _address(data),
        _address(border),
    )
    if err:
        raise MemoryError("cell assembly: the element buffers could not be allocated")


def _assemble(
    lib: ctypes.CDLL,
    form: fem.Form,
    integrals: list[tuple[int, int, np.ndarray, np.ndarray]],
    n_entries: int,
    data: np.ndarray,
    border: np.ndarray,
) -> None:
    """Add ``form``'s element tensors at the integrals' positions (``data`` and ``border``)."""
    form_data = _form_data(form)
    for kernel, integral_id, cells, positions in integrals:
        packed = form_data[1][(fem.IntegralType.cell, integral_id)]
        _run_cells(lib, kernel, cells, n_entries, packed, form_data, positions, data, border)


def _probe_couplings(lib: ctypes.CDLL, form: fem.Form, fields: np.ndarray) -> np.ndarray:
    """``coupled[i, j]``: whether the element matrices of the bilinear ``form`` have any entry in
    rows of field ``i`` and columns of field ``j`` (``fields``: the field of each element-local
    dof) that is nonzero or not finite, in any cell, under any of three evaluations: the current
    coefficients, NaN coefficients (every entry computed from a coefficient is NaN) and random
    ones in (0.1, 0.9), seeded. A block that is zero under all three is one the form's kernel
    never fills (its couplings are absent from the equations); the assemblers check this again
    at every assembly."""
    n_fields = int(fields.max()) + 1
    n_entries = len(fields) ** 2
    block = (fields[:, None] * n_fields + fields[None, :]).ravel()  # block of each entry
    coupled = np.zeros(n_fields * n_fields, dtype=bool)
    form_data = _form_data(form)
    random = np.random.default_rng(0)
    for kernel, integral_id, cells in _cell_integrals(form):
        packed = np.asarray(form_data[1][(fem.IntegralType.cell, integral_id)])
        for start in range(0, len(cells), _BATCH_CELLS):
            chunk = cells[start : start + _BATCH_CELLS]
            positions = np.arange(len(chunk) * n_entries, dtype=np.int32)
            current = packed[start : start + len(chunk)] if packed.ndim == 2 else packed
            for probe in (current, np.full_like(current, np.nan), random.uniform(0.1, 0.9, current.shape)):
                data = np.zeros(positions.size)
                _run_cells(lib, kernel, chunk, n_entries, probe, form_data, positions, data, _EMPTY)
                touched = (data != 0).reshape(len(chunk), -1).any(axis=0)
                np.logical_or.at(coupled, block[touched], True)
    return coupled.reshape(n_fields, n_fields)


@dataclass
class CSRArrays:
    """A local CSR matrix (one process): row pointers, column indices (int32) and values."""

    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray


def _dof_fields(space: Any) -> tuple[np.ndarray, np.ndarray]:
    """The field (sub-element) of each element-local dof and of each local dof of a mixed space
    (dolfinx's C++ function space, as ``Form.function_spaces`` holds it)."""
    n_fields = space.element.num_sub_elements
    subs = [space.sub([i]) for i in range(n_fields)]
    local = np.repeat(np.arange(n_fields), [sub.element.space_dimension for sub in subs])
    index_map = space.dofmap.index_map
    dofs = np.full(index_map.size_local + index_map.num_ghosts, -1, dtype=np.int64)
    for i, sub in enumerate(subs):
        dofs[np.asarray(sub.dofmap.map())] = i
    return local, dofs


@dataclass
class _Pruning:
    """The field blocks left out of a Jacobian's pattern: ``absent`` masks the element matrix's
    entries (row-major) in them; on one process ``pattern`` is the pruned CSR pattern, on several
    ``kept`` marks the CSR matrix's entries in the pruned pattern."""

    absent: np.ndarray
    pattern: CSRArrays | None
    kept: np.ndarray | None

    def check_slots(self, first: int) -> np.ndarray:
        """Border positions (codes <= -2) for the absent entries, spread over ``_CHECK_SLOTS``
        slots from ``first`` on, so that their additions do not wait on each other."""
        return -2 - (first + np.arange(int(self.absent.sum())) % _CHECK_SLOTS)


def _pruning(lib: ctypes.CDLL, jacobian: fem.Form, matrix: la.MatrixCSR, space: Any, extended: bool) -> _Pruning | None:
    """Probe ``jacobian``'s kernel for the field blocks of the unknowns' mixed ``space`` (C++)
    that it never fills (agreed over the ranks); None if it fills every block. ``extended``:
    the form's space is ``space`` plus a last element for a border, whose blocks stay."""
    local_fields, dof_fields = _dof_fields(space)
    n_fields = int(local_fields.max()) + 1
    form_fields = np.append(local_fields, n_fields) if extended else local_fields
    coupled = _probe_couplings(lib, jacobian, form_fields)[:n_fields, :n_fields].astype(np.uint8)
    comm = jacobian.mesh.comm
    comm.Allreduce(MPI.IN_PLACE, coupled, op=MPI.MAX)  # the same blocks on every rank
    if coupled.all():
        return None
    blocks = coupled.astype(bool)
    absent = ~blocks[local_fields[:, None], local_fields[None, :]].ravel()
    kept = _kept_entries(matrix, blocks, dof_fields)
    if comm.size == 1:
        return _Pruning(absent, _kept_pattern(matrix, kept), None)
    return _Pruning(absent, None, kept)


class CellMatrixAssembler:
    """Assembles ``form`` into ``matrix`` (a ``dolfinx.la.MatrixCSR`` created for it, whose
    pattern must not change) with Dirichlet conditions ``bcs`` applied as dolfinx does: rows and
    columns of their dofs zeroed and ``diagonal`` on the owned diagonal entries. Ghost rows are
    left for the caller's ``matrix.scatter_reverse()``. Collective on the mesh's communicator
    (at construction only). The positions follow from the pattern, the integration cells and
    the conditions' dofs as they are at construction (the conditions' values never enter the
    matrix); make a new assembler if one of these changes. Coefficients, constants and mesh
    coordinates are read at every assembly.

    Raises:
        AssemblyUnsupported: the form, the matrix or the platform is not served (see the module
            docstring), on every rank alike.
    """

    def __init__(
        self,
        form: fem.Form,
        matrix: la.MatrixCSR,
        bcs: Sequence[fem.DirichletBC],
        diagonal: float = 1.0,
        prune: bool = False,
    ):
        comm = form.mesh.comm
        _refuse(comm, _form_unsupported(form, 2) or _matrix_unsupported(matrix))
        self.lib = _library_for(comm)
        self.form, self.matrix, self.diagonal, self.comm = form, matrix, float(diagonal), comm
        space = form.function_spaces[0]
        block = space.dofmap.bs
        cell_dofs = np.asarray(space.dofmap.map())  # type: ignore[attr-defined]  # the C++ space (Form.function_spaces)
        mixed = block == 1 and space.element.num_sub_elements > 1
        pruning = _pruning(self.lib, form, matrix, space, extended=False) if prune and mixed else None
        #: the matrix without the never-filled field blocks (one process, ``prune``), else None
        self.pattern = pruning.pattern if pruning is not None else None
        #: several processes, ``prune``: the entries of ``matrix`` in the pruned pattern, else None
        self.kept = pruning.kept if pruning is not None else None
        keys, n_columns = _pattern_keys(self.pattern if self.pattern is not None else matrix)
        constrained, owned = _constrained_dofs(bcs, len(matrix.indptr) - 1)
        self._diagonal_positions = _diagonal_positions(keys, n_columns, owned)
        absent = pruning.absent if pruning is not None else None
        self._integrals = []
        for kernel, integral_id, cells in _cell_integrals(form):
            positions = _matrix_positions(cell_dofs, cells, block, keys, n_columns, constrained, absent)
            if pruning is not None:
                positions[:, pruning.absent] = pruning.check_slots(0)
            self._integrals.append((kernel, integral_id, cells, positions))
        self._n_entries = (cell_dofs.shape[1] * block) ** 2
        self._check = np.zeros(_CHECK_SLOTS)

    def assemble(self) -> None:
        """Zero the matrix's values and assemble the form at the current coefficients (owned and
        ghost rows; the caller scatters). Raises SolverError (on every rank) if an entry left out
        by pruning is not zero."""
        data = self.matrix.data if self.pattern is None else self.pattern.data
        data[:] = 0.0
        self._check[:] = 0.0
        _assemble(self.lib, self.form, self._integrals, self._n_entries, data, self._check)
        _check_left_out(self.comm, self._check)
        data[self._diagonal_positions] = self.diagonal


def _check_left_out(comm: Any, slots: np.ndarray) -> None:
    """SolverError on every rank if any rank's check slots hold a nonzero (or NaN)."""
    filled = bool(np.any(slots != 0.0))
    if comm.size > 1:
        filled = comm.allreduce(filled, op=MPI.LOR)
    if filled:
        raise SolverError(
            "the Jacobian has entries in field blocks that probing its kernel found empty "
            "(left out of the matrix); assemble without pruning (solver.jacobian_assembly = 'cached')"
        )


def _matrix_unsupported(matrix: la.MatrixCSR) -> str | None:
    if matrix.block_size != [1, 1]:
        return "only matrices with block size 1 are served"
    if len(matrix.indices) >= np.iinfo(np.int32).max:
        return "the matrix has too many local entries for 32-bit positions"
    return None


def _extension_unsupported(form: fem.Form, space: fem.FunctionSpace) -> str | None:
    """Why ``form``'s space is not ``space``'s mixed element extended by one element with one dof
    per cell, last (None if it is)."""
    extended, base = form.function_spaces[0].element, space.element
    if base.num_sub_elements == 0 or extended.num_sub_elements != base.num_sub_elements + 1:
        return "the form's space is not the unknowns' mixed space extended by one element"
    if not extended.signature().startswith(base.signature()[:-1]):
        return "the form's space does not start with the unknowns' elements"
    if extended.space_dimension != base.space_dimension + 1:
        return "the extension has more than one dof per cell"
    if space.dofmap.bs != 1 or form.function_spaces[0].dofmap.bs != 1:
        return "blocked mixed spaces are not served"
    return None


class BorderedCellAssembler:
    """The residual ``(R, g)`` and the Jacobian ``(dR/dw, dR/dlambda, dg/dw, dg/dlambda)`` of a
    system bordered by one global scalar, each in one pass over the cells (module docstring).

    Args:
        residual: linear form on ``W x DG0`` (``space`` extended by a scalar DG0 element, last).
        jacobian: bilinear form on ``W x DG0`` (see the module docstring for its blocks).
        space: ``W``, the space of the unknown field (a mixed space, not blocked).
        matrix: ``dolfinx.la.MatrixCSR`` of ``dR/dw`` (created for ``W``'s Jacobian form).
        bcs: Dirichlet conditions on ``W``: their rows and columns of ``dR/dw`` are zeroed with
            ``diagonal`` on the owned diagonal, their entries of ``dR/dlambda`` and ``dg/dw``
            are zero; ``R`` is left to the caller's ``set_bc``.
        prune: leave out of ``dR/dw``'s pattern the field blocks (pairs of sub-elements) that
            the Jacobian's kernel never fills, found by probing it (:func:`_probe_couplings`,
            the same blocks on every rank). On one process ``dR/dw`` then goes into
            :attr:`pattern` instead of ``matrix``; on several it still goes into ``matrix``
            (whose left-out entries stay zero) and :attr:`kept` marks the entries to copy. Every
            assembly checks that the left-out entries are still zero.

    Collective on the mesh's communicator (at construction only). Local arrays hold the owned
    and ghost dofs; ghost contributions and the sums of ``g`` and ``dg/dlambda`` over the ranks
    are left to the caller.

    Raises:
        AssemblyUnsupported: the forms, the matrix or the platform is not served, on every rank.
    """

    def __init__(
        self,
        residual: fem.Form,
        jacobian: fem.Form,
        space: fem.FunctionSpace,
        matrix: la.MatrixCSR,
        bcs: Sequence[fem.DirichletBC],
        diagonal: float = 1.0,
        prune: bool = False,
    ):
        comm = space.mesh.comm
        reason = (
            _form_unsupported(residual, 1)
            or _form_unsupported(jacobian, 2)
            or _matrix_unsupported(matrix)
            or _extension_unsupported(residual, space)
            or _extension_unsupported(jacobian, space)
        )
        _refuse(comm, reason)
        self.lib = _library_for(comm)
        self.residual, self.jacobian, self.matrix, self.diagonal = residual, jacobian, matrix, float(diagonal)
        cell_dofs = np.asarray(space.dofmap.list).astype(np.int64)
        n_dofs = len(matrix.indptr) - 1
        self.n_dofs = n_dofs
        m = cell_dofs.shape[1]
        self.comm = comm
        #: dR/dw with the never-filled field blocks left out (one process, ``prune``), else None
        self.pattern: CSRArrays | None = None
        #: several processes, ``prune``: the entries of ``matrix`` in the pruned pattern, else None
        self.kept: np.ndarray | None = None
        pruning = _pruning(self.lib, jacobian, matrix, space._cpp_object, extended=True) if prune else None
        if pruning is not None:
            self.pattern, self.kept = pruning.pattern, pruning.kept
        target = self.pattern if self.pattern is not None else matrix
        keys, n_columns = _pattern_keys(target)
        constrained, owned = _constrained_dofs(bcs, n_dofs)
        self._diagonal_positions = _diagonal_positions(keys, n_columns, owned)
        self._n_vector, self._n_matrix = m + 1, (m + 1) ** 2
        # border of the Jacobian: [dR/dlambda (n_dofs), dg/dw (n_dofs), dg/dlambda, left-out
        # entries (must stay 0; spread over _CHECK_SLOTS, so their additions do not wait on each other)]; of R: [g]
        self._border = np.zeros(2 * n_dofs + 1 + _CHECK_SLOTS)
        self._g = np.zeros(1)
        self._residual_integrals: list[tuple[int, int, np.ndarray, np.ndarray]] = []
        for kernel, integral_id, cells in _cell_integrals(residual):
            dofs = cell_dofs[cells]
            targets = np.full((len(cells), m + 1), -2, dtype=np.int32)  # the DG0 entry: g
            targets[:, :m] = dofs
            self._residual_integrals.append((kernel, integral_id, cells, targets))
        self._jacobian_integrals: list[tuple[int, int, np.ndarray, np.ndarray]] = []
        for kernel, integral_id, cells in _cell_integrals(jacobian):
            positions = np.empty((len(cells), m + 1, m + 1), dtype=np.int32)
            absent = pruning.absent if pruning is not None else None
            inner = _matrix_positions(cell_dofs, cells, 1, keys, n_columns, constrained, absent)
            if pruning is not None:
                inner[:, pruning.absent] = pruning.check_slots(2 * n_dofs + 1)
            positions[:, :m, :m] = inner.reshape(len(cells), m, m)
            dofs = cell_dofs[cells]
            drop = constrained[dofs]
            positions[:, :m, m] = np.where(drop, -1, -2 - dofs)  # dR/dlambda
            positions[:, m, :m] = np.where(drop, -1, -2 - n_dofs - dofs)  # dg/dw
            positions[:, m, m] = -2 - 2 * n_dofs  # dg/dlambda
            self._jacobian_integrals.append((kernel, integral_id, cells, positions.reshape(len(cells), -1)))

    def assemble_residual(self, r: np.ndarray) -> float:
        """``R`` into the local array ``r`` (zeroed first); returns this rank's part of ``g``."""
        r[:] = 0.0
        self._g[0] = 0.0
        _assemble(self.lib, self.residual, self._residual_integrals, self._n_vector, r, self._g)
        return float(self._g[0])

    def assemble_jacobian(self, b: np.ndarray, c: np.ndarray) -> float:
        """``dR/dw`` into the matrix or :attr:`pattern` (zeroed first; Dirichlet rows as
        documented), ``dR/dlambda`` into ``b`` and ``dg/dw`` into ``c`` (local arrays); returns
        this rank's part of ``dg/dlambda``. Raises SolverError (on every rank) if a left-out
        entry is not zero."""
        data = self.matrix.data if self.pattern is None else self.pattern.data
        border, n = self._border, self.n_dofs
        data[:] = 0.0
        border[:] = 0.0
        _assemble(self.lib, self.jacobian, self._jacobian_integrals, self._n_matrix, data, border)
        _check_left_out(self.comm, border[2 * n + 1 :])
        data[self._diagonal_positions] = self.diagonal
        b[:] = border[:n]
        c[:] = border[n : 2 * n]
        return float(border[2 * n])


def _rows(matrix: Any) -> np.ndarray:
    """The row of each stored entry of a CSR matrix."""
    indptr = np.asarray(matrix.indptr, dtype=np.int64)
    return np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))


def _kept_entries(matrix: Any, coupled: np.ndarray, dof_fields: np.ndarray) -> np.ndarray:
    """Mask of ``matrix``'s entries in coupled field blocks (and the diagonal). ``dof_fields``:
    the field of each local dof of the space (owned first); the matrix's row and column index
    maps may hold more ghosts (couplings of ghost rows), whose fields come from their owners."""
    rows = _rows(matrix)
    columns = np.asarray(matrix.indices, dtype=np.int64)
    row_fields, column_fields = dof_fields, dof_fields
    if hasattr(matrix, "index_map") and matrix.index_map(0).comm.size > 1:
        n_owned = matrix.index_map(0).size_local
        row_fields, column_fields = (_owner_fields(matrix.index_map(i), dof_fields[:n_owned]) for i in (0, 1))
    return coupled[row_fields[rows], column_fields[columns]] | (rows == columns)


def _kept_pattern(matrix: Any, kept: np.ndarray) -> CSRArrays:
    """The CSR pattern of ``matrix``'s ``kept`` entries (one process), values zero."""
    counts = np.bincount(_rows(matrix)[kept], minlength=len(matrix.indptr) - 1)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    return CSRArrays(indptr, np.asarray(matrix.indices)[kept].astype(np.int32), np.zeros(int(kept.sum())))


def _owner_fields(index_map: Any, owned_fields: np.ndarray) -> np.ndarray:
    """The field of every local index of ``index_map`` (owned ones given, ghosts from their owners)."""
    vector = la.vector(index_map, dtype=np.float64)
    vector.array[: len(owned_fields)] = owned_fields
    vector.scatter_forward()
    return np.rint(vector.array).astype(np.int64)
