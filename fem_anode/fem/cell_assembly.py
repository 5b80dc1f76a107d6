"""Matrix assembly of a bilinear form's cell integrals into a fixed CSR pattern through
precomputed positions (the C loop in ``cell_assembly.c``, compiled on first use).

dolfinx's assembler looks up every entry of every element matrix in its row of the CSR pattern
at every assembly (a binary search per entry). A Newton solver assembles the same form on the
same pattern hundreds of times, so :class:`CellMatrixAssembler` finds each entry's position in
``MatrixCSR.data`` once and afterwards only calls the form's own FFCx kernel per cell and adds
the element matrix at those positions. The cells are visited in dolfinx's order and every
entry is added in the same order, so the matrix is bit for bit the one
``dolfinx.fem.assemble_matrix`` gives (tested); on the 1 nm phase-field wire an assembly takes
4.8 instead of 11.1 ms (docs/phasefield.md).

What it serves: real float64 forms with cell integrals only, the same space for test and trial
functions and elements without dof transformations (Lagrange and other point-evaluation
elements on simplices and quadrilaterals). Anything else raises :class:`AssemblyUnsupported`,
and the caller keeps dolfinx's assembler.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence
from pathlib import Path

import cffi  # type: ignore[import-untyped]
import numpy as np
from dolfinx import cpp as _cpp
from dolfinx import fem, la

from fem_anode.fem.compiled import LOAD_ERRORS, compiled_library, load_collectively

__all__ = ["AssemblyUnsupported", "CellMatrixAssembler"]

_SOURCE = Path(__file__).with_name("cell_assembly.c")
_FLAGS = ("-O2", "-std=c99", "-fPIC", "-shared")
#: cells whose positions are computed in one vectorised batch (bounds the set-up's temporaries)
_BATCH_CELLS = 20_000
_library: ctypes.CDLL | None = None
_ffi = cffi.FFI()


class AssemblyUnsupported(RuntimeError):
    """The form or matrix is outside what :class:`CellMatrixAssembler` serves (the message says
    what); assemble with dolfinx instead."""


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
    ]
    library.fa_assemble_cells.restype = ctypes.c_int
    return library


def _address(array: np.ndarray) -> int:
    return array.ctypes.data


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

    def __init__(self, form: fem.Form, matrix: la.MatrixCSR, bcs: Sequence[fem.DirichletBC], diagonal: float = 1.0):
        comm = form.mesh.comm
        reason = self._unsupported(form, matrix, bcs)
        reasons = [r for r in comm.allgather(reason) if r]
        if reasons:
            raise AssemblyUnsupported(reasons[0])
        global _library
        if _library is None:
            try:
                _library = load_collectively(comm, _load_local)
            except LOAD_ERRORS as exc:
                raise AssemblyUnsupported(str(exc)) from exc
        self.lib = _library
        self.form, self.matrix, self.diagonal = form, matrix, float(diagonal)
        cpp_form = form._cpp_object
        space = form.function_spaces[0]
        block = space.dofmap.bs
        cell_dofs = np.asarray(space.dofmap.map())  # type: ignore[attr-defined]  # the C++ space (Form.function_spaces)
        n_rows = len(matrix.indptr) - 1
        indptr = np.asarray(matrix.indptr, dtype=np.int64)
        columns = np.asarray(matrix.indices, dtype=np.int64)
        n_columns = int(columns.max()) + 1 if len(columns) else 1
        keys = np.repeat(np.arange(n_rows, dtype=np.int64), np.diff(indptr)) * n_columns + columns
        constrained = np.zeros(n_rows, dtype=bool)
        owned_constrained: list[np.ndarray] = []
        for bc in bcs:
            dofs, first_ghost = bc._cpp_object.dof_indices()
            constrained[dofs] = True
            owned_constrained.append(np.asarray(dofs[:first_ghost], dtype=np.int64))
        owned = np.unique(np.concatenate(owned_constrained)) if owned_constrained else np.empty(0, np.int64)
        self._diagonal_positions = np.searchsorted(keys, owned * n_columns + owned)
        if not np.array_equal(keys[np.minimum(self._diagonal_positions, len(keys) - 1)], owned * n_columns + owned):
            raise AssemblyUnsupported("a constrained dof has no diagonal entry in the matrix pattern")
        ufcx_form = form.ufcx_form
        first, last = ufcx_form.form_integral_offsets[0], ufcx_form.form_integral_offsets[1]
        self._integrals: list[tuple[int, int, np.ndarray, np.ndarray]] = []  # kernel, id, cells, positions
        for index in range(first, last):
            integral_id = int(ufcx_form.form_integral_ids[index])
            kernel = int(_ffi.cast("uintptr_t", ufcx_form.form_integrals[index].tabulate_tensor_float64))
            cells = np.ascontiguousarray(cpp_form.domains(fem.IntegralType.cell, integral_id), dtype=np.int32)
            positions = self._positions(cell_dofs, cells, block, keys, n_columns, constrained)
            self._integrals.append((kernel, integral_id, cells, positions))
        self._n_entries = (cell_dofs.shape[1] * block) ** 2
        self._empty_constants = np.zeros(1)

    @staticmethod
    def _unsupported(form: fem.Form, matrix: la.MatrixCSR, bcs: Sequence[fem.DirichletBC]) -> str | None:
        if form.rank != 2 or np.dtype(form.dtype) != np.float64:
            return "only real float64 bilinear forms are served"
        if set(form.integral_types) != {fem.IntegralType.cell}:
            return "only cell integrals are served"
        spaces = form.function_spaces
        if spaces[0] is not spaces[1]:
            return "the test and trial spaces differ"
        if spaces[0].element.needs_dof_transformations:
            return "the element needs dof transformations"
        if matrix.block_size != [1, 1]:
            return "only matrices with block size 1 are served"
        if len(matrix.indices) >= np.iinfo(np.int32).max:
            return "the matrix has too many local entries for 32-bit positions"
        return None

    def _positions(
        self,
        cell_dofs: np.ndarray,
        cells: np.ndarray,
        block: int,
        keys: np.ndarray,
        n_columns: int,
        constrained: np.ndarray,
    ) -> np.ndarray:
        """For each cell and element-matrix entry (row-major), its index in ``matrix.data``; -1
        where the row or column is constrained."""
        n_local = cell_dofs.shape[1] * block
        positions = np.empty((len(cells), n_local * n_local), dtype=np.int32)
        for start in range(0, len(cells), _BATCH_CELLS):
            chunk = cells[start : start + _BATCH_CELLS]
            dofs = cell_dofs[chunk].astype(np.int64)
            if block > 1:  # unrolled in the kernel's order: node-major, component-minor
                dofs = (dofs[:, :, None] * block + np.arange(block)).reshape(len(chunk), n_local)
            wanted = (dofs[:, :, None] * n_columns + dofs[:, None, :]).reshape(len(chunk), -1)
            found = np.searchsorted(keys, wanted)
            found = np.minimum(found, len(keys) - 1)
            if not np.array_equal(keys[found], wanted):
                raise AssemblyUnsupported("the matrix pattern does not hold every element entry")
            drop = constrained[dofs]
            found[(drop[:, :, None] | drop[:, None, :]).reshape(len(chunk), -1)] = -1
            positions[start : start + len(chunk)] = found
        return positions

    def assemble(self) -> None:
        """Zero the matrix's values and assemble the form at the current coefficients (owned and
        ghost rows; the caller scatters)."""
        form, matrix = self.form, self.matrix
        constants = np.ascontiguousarray(_cpp.fem.pack_constants(form._cpp_object), dtype=np.float64)
        if constants.size == 0:
            constants = self._empty_constants
        coefficients = _cpp.fem.pack_coefficients(form._cpp_object)
        geometry = form.mesh.geometry
        x = np.ascontiguousarray(geometry.x, dtype=np.float64)
        x_dofmap = np.ascontiguousarray(geometry.dofmap, dtype=np.int32)
        data = matrix.data
        data[:] = 0.0
        for kernel, integral_id, cells, positions in self._integrals:
            packed = np.ascontiguousarray(coefficients[(fem.IntegralType.cell, integral_id)], dtype=np.float64)
            stride = packed.shape[1] if packed.ndim == 2 else 0
            if packed.size == 0:
                packed = self._empty_constants
            err = self.lib.fa_assemble_cells(
                kernel,
                len(cells),
                _address(cells),
                self._n_entries,
                _address(packed),
                stride,
                _address(constants),
                _address(x),
                _address(x_dofmap),
                x_dofmap.shape[1],
                _address(positions),
                _address(data),
            )
            if err:
                raise MemoryError("cell assembly: the element buffers could not be allocated")
        data[self._diagonal_positions] = self.diagonal
