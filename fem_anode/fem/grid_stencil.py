r"""SSOR sweeps of a P1 matrix on a voxel grid, stored by row types instead of entries.

On a mesh of equal axis-aligned hexahedra (or quadrilaterals) the row of a P1 matrix couples a
node to itself and to its 26 (8) grid neighbours, and its values depend only on the local
geometry: which of the 8 (4) cells around the node belong to the mesh and which of their faces
carry a Robin boundary. A 128^3 electrode has about a million rows but only a few hundred distinct
rows. :class:`GridStencilKernel` stores ``A = K + s M`` as a table of the distinct rows (``K`` and
``M`` separately, so a new ``s`` only rebuilds the table) and, per row, its type (2 B) and grid
position (4 B); a grid-sized map (4 B per grid node) finds the neighbours' rows. A sweep then
streams 6 B per row instead of the 12 B per entry (about 160 B per row) of a CSR half.

Most rows are interior rows (all 8 cells around the node in the mesh: 69 % of the 128^3 electrode's
rows) in runs along x. Along a run the 13 neighbours of a half-stencil lie on 4 grid lines of 3
nodes plus the row next to it, and every neighbour's row moves by one from one row to the next;
the C kernels keep the lines' values in a sliding window, so a row loads 4 new values instead of 13
rows from the grid map and 13 values (:meth:`GridStencilKernel._runs` finds the runs and checks
their shape). A forward or backward sweep takes about 6 ms per million rows, against 8 ms by the
grid map alone and 17 ms for the CSR halves.

The rows are renumbered in grid order (x fastest, then y, then z; ties: the original order),
which is also the sweeps' order. Rows that are not a plain stencil are kept as CSR rows of their
own ("special", in the same sweep order): the extra dofs of nodes split by face connectivity
(voxels touching only along an edge or at a corner, :mod:`fem_anode.meshing.voxel`), the other
dofs of their nodes, and the rows that couple to them.

Rows are grouped by their values quantised to ``2^-40`` of the largest entry of ``K`` and of
``M`` and take the values of one row of their group: the grouped operator equals the assembled
one to about 1e-13 relative, the round-off the mesh coordinates put into the assembled element
matrices (a second, independent key checks every group).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from petsc4py import PETSc

from fem_anode.fem.voxel_sweeps import _ptr, _SweepKernel

if TYPE_CHECKING:
    from mpi4py import MPI

    from fem_anode.fem.slab_sweeps import OffRankCouplings

__all__ = ["GridSeparatorSweeps", "GridStencilKernel", "grid_coordinates", "rank_colours"]

#: The type of a special (CSR) row.
SPECIAL = 0xFFFF
#: Grid offsets (dx, dy, dz) of the 27 stencil entries, x fastest; code 13 is the row's own node.
_CODES = np.array([(c % 3 - 1, (c // 3) % 3 - 1, c // 9 - 1) for c in range(27)], dtype=np.int64)
_QUANTUM = 2.0**-40
#: The 26 codes of the neighbours (all but the row's own node, code 13).
_OFF_DIAGONAL = np.delete(np.arange(27), 13)


def _row_entries(indptr: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The positions of the entries of ``rows`` in a CSR matrix (row by row) and each row's count."""
    counts = (indptr[rows + 1] - indptr[rows]).astype(np.int64)
    starts = indptr[rows].astype(np.int64) - np.concatenate([[0], np.cumsum(counts)[:-1]])
    return np.repeat(starts, counts) + np.arange(int(counts.sum())), counts


class _Stencil(ctypes.Structure):
    """The C kernels' view of a :class:`GridStencilKernel` (``fa_stencil`` in ``voxel_sweeps.c``)."""

    _fields_ = [
        ("lo", ctypes.c_int64),
        ("hi", ctypes.c_int64),
        ("c_lo", ctypes.c_int64),
        ("c_hi", ctypes.c_int64),
        ("type", ctypes.c_void_p),
        ("grid", ctypes.c_void_p),
        ("map", ctypes.c_void_p),
        ("offset", ctypes.c_void_p),
        ("lower", ctypes.c_void_p),
        ("upper", ctypes.c_void_p),
        ("diag", ctypes.c_void_p),
        ("dinv", ctypes.c_void_p),
        ("s_indptr", ctypes.c_void_p),
        ("s_diag", ctypes.c_void_p),
        ("s_cols", ctypes.c_void_p),
        ("s_values", ctypes.c_void_p),
        ("s_dinv", ctypes.c_void_p),
        ("run_type", ctypes.c_int64),
        ("r_lo", ctypes.c_int64),
        ("r_hi", ctypes.c_int64),
        ("run_lo", ctypes.c_void_p),
        ("run_hi", ctypes.c_void_p),
    ]


def grid_coordinates(points: np.ndarray, origin: np.ndarray, spacing: np.ndarray) -> np.ndarray | None:
    """Integer grid indices ``(n, 3)`` of ``points`` (``(n, 3)``, metres) on the grid with this
    ``origin`` and ``spacing`` per axis, or ``None`` if a point is off the grid by more than 1e-6
    of a spacing."""
    scaled = (points - origin) / spacing
    indices = np.rint(scaled)
    if indices.size and float(np.abs(scaled - indices).max()) > 1e-6:
        return None
    return indices.astype(np.int64)


class GridStencilKernel(_SweepKernel):
    """SOR sweeps and the fused CG passes (as :class:`~fem_anode.fem.voxel_sweeps.SplitCSRSweepKernel`)
    of ``A = K + s M`` for two matrices of one CSR pattern whose rows are the nodes of a voxel grid,
    stored by row types (see the module docstring). The kernel's rows are the matrix's rows in grid
    order: ``order[i]`` is the matrix row of kernel row ``i``; vectors passed to the sweeps are in
    kernel order (:meth:`to_kernel_order`). Memory: about 20 B per row and 4 B per grid node of the
    rows' bounding box, plus the special rows' CSR entries.

    Args:
        indptr, indices, k_values, m_values: ``K`` and ``M`` in CSR form (one pattern, square, every
            row with a diagonal entry; e.g. one rank's diagonal blocks).
        grid: ``(n, 3)`` integer grid indices of the rows' nodes (2D grids: a zero third column).
        omega: relaxation factor.
        library: from :func:`~fem_anode.fem.voxel_sweeps.load_sweep_library`.

    Raises:
        ValueError: the matrix is not a stencil of the grid (a coupling beyond the 26 neighbours,
            more than 65 534 row types, a grid too large for 32-bit positions).
    """

    def __init__(
        self,
        indptr: np.ndarray,
        indices: np.ndarray,
        k_values: np.ndarray,
        m_values: np.ndarray,
        grid: np.ndarray,
        omega: float,
        library: Any,
        last: np.ndarray | None = None,
    ) -> None:
        n = indptr.shape[0] - 1
        if indices.shape != k_values.shape or m_values.shape != k_values.shape:
            raise ValueError("GridStencilKernel: K and M must share one CSR pattern")
        position, dims, is_last = self._layout(grid, n, last)
        by_node = np.lexsort((np.arange(n), position))
        first_of_node = np.ones(n, bool)
        first_of_node[1:] = position[by_node][1:] != position[by_node][:-1]
        primary = np.empty(n, np.uint8)  # per matrix row: the first dof of its node
        primary[by_node] = first_of_node
        special = np.zeros(n, np.uint8)  # per matrix row
        split_nodes = np.unique(position[by_node][~first_of_node])
        special[np.isin(position, split_nodes)] = 1
        if is_last.any():  # the rows flagged last and their neighbours leave the grid order: CSR rows
            last_rows = np.flatnonzero(is_last)
            special[indices[_row_entries(indptr, last_rows)[0]]] = 1
            special[last_rows] = 1
        offsets27 = _CODES @ np.array([1, dims[0], dims[0] * dims[1]], dtype=np.int64)
        scale_k = max(float(np.abs(k_values).max(initial=0.0)), 1e-300) * _QUANTUM
        scale_m = max(float(np.abs(m_values).max(initial=0.0)), 1e-300) * _QUANTUM
        # two independent keys per row: the second checks the grouping by the first
        mult = np.random.default_rng(12345).integers(1, 2**63 - 1, size=108, dtype=np.int64).astype(np.uint64) | 1
        keys = np.empty((2, n), np.uint64)
        outside = library.fa_st_row_keys(
            n,
            _ptr(indptr),
            _ptr(indices),
            _ptr(k_values),
            _ptr(m_values),
            _ptr(position),
            _ptr(primary),
            _ptr(offsets27),
            scale_k,
            scale_m,
            _ptr(mult),
            _ptr(keys[0]),
            _ptr(keys[1]),
            _ptr(special),
        )
        if outside:
            raise ValueError(f"GridStencilKernel: {outside} entries couple rows that are not grid neighbours")
        regular = np.flatnonzero(special == 0)  # matrix rows
        unique_keys, representative, types = np.unique(keys[0][regular], return_index=True, return_inverse=True)
        if unique_keys.size >= SPECIAL:
            raise ValueError(f"GridStencilKernel: {unique_keys.size} row types (at most {SPECIAL - 1})")
        second = keys[1][regular]
        if not np.array_equal(second, second[representative][types]):
            raise ValueError("GridStencilKernel: row grouping is ambiguous (key collision)")
        # the tables: the values of one row of each type, by stencil code
        k_table = np.zeros((unique_keys.size, 27))
        m_table = np.zeros((unique_keys.size, 27))
        for t, row in enumerate(regular[representative]):
            span = slice(int(indptr[row]), int(indptr[row + 1]))
            codes = np.searchsorted(offsets27, position[indices[span]] - position[row])
            k_table[t, codes] = k_values[span]
            m_table[t, codes] = m_values[span]
        row_type = np.full(n, SPECIAL, np.uint16)  # per matrix row
        row_type[regular] = types
        special_rows = np.flatnonzero(special)
        entries, counts = _row_entries(indptr, special_rows)
        s_indptr = np.zeros(special_rows.size + 1, np.int64)
        np.cumsum(counts, out=s_indptr[1:])
        self._build(
            position,
            dims,
            is_last,
            row_type,
            k_table,
            m_table,
            (special_rows, s_indptr, indices[entries], k_values[entries], m_values[entries]),
            omega,
            library,
        )

    @classmethod
    def from_types(
        cls,
        position: np.ndarray,
        dims: np.ndarray,
        row_type: np.ndarray,
        k_table: np.ndarray,
        m_table: np.ndarray,
        special: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray],
        omega: float,
        library: Any,
        last: np.ndarray | None = None,
        coupled: np.ndarray | None = None,
    ) -> GridStencilKernel:
        """The kernel from its row types instead of assembled matrices (e.g. built from a voxel image,
        :mod:`fem_anode.fem.voxel_p1`).

        Args:
            position: per row, its node's linear index ``x + X y + X Y z`` in a grid box of
                ``dims = (X, Y, Z)`` nodes with at least one node of padding on every side.
            row_type: per row, its type (a row of the tables) or :data:`SPECIAL`.
            k_table, m_table: ``(ntypes, 27)`` values of ``K`` and ``M`` of each type by stencil code
                (:data:`_CODES`: offsets ``(dx, dy, dz)``, x fastest; code 13 is the diagonal).
            special: the :data:`SPECIAL` rows in CSR form, ``(rows, indptr, columns, k, m)`` (rows and
                columns in the matrix's numbering, as ``row_type``).
            omega, library, last: as for the constructor.
            coupled: ``(ntypes, 27)`` flags of the codes each type couples to (default: where
                ``m_table`` is non-zero, as for a consistent mass matrix; a lumped one needs them).

        The caller guarantees the tables: a typed row's neighbour at code ``c`` is the first dof of the
        node at that offset, and only special rows couple to other dofs of split nodes, to rows flagged
        ``last`` or (if flagged ``last``) to anything but grid neighbours.
        """
        n = int(row_type.shape[0])
        dims = np.asarray(dims, np.int64)
        if position.shape != (n,) or dims.shape != (3,) or int(np.prod(dims)) >= 2**31:
            raise ValueError("GridStencilKernel: a position per row in a grid box of fewer than 2^31 nodes")
        is_last = np.zeros(n, bool) if last is None else np.asarray(last, bool)
        if is_last.shape != (n,):
            raise ValueError(f"GridStencilKernel: last must hold {n} flags")
        if k_table.shape != m_table.shape or k_table.ndim != 2 or k_table.shape[1:] != (27,):
            raise ValueError("GridStencilKernel: the tables must be (types, 27) arrays of one shape")
        if k_table.shape[0] >= SPECIAL:
            raise ValueError(f"GridStencilKernel: {k_table.shape[0]} row types (at most {SPECIAL - 1})")
        rows = np.asarray(special[0])
        if not np.array_equal(np.sort(rows), np.flatnonzero(row_type == SPECIAL)):
            raise ValueError("GridStencilKernel: the special rows must be the rows of type SPECIAL")
        typed = row_type[row_type != SPECIAL]
        if typed.size and int(typed.max()) >= k_table.shape[0]:
            raise ValueError("GridStencilKernel: a row type beyond the tables")
        if coupled is not None and coupled.shape != k_table.shape:
            raise ValueError("GridStencilKernel: coupled must have the tables' shape")
        kernel = cls.__new__(cls)
        kernel._build(
            position, dims, is_last, np.asarray(row_type, np.uint16), k_table, m_table, special, omega, library, coupled
        )
        return kernel

    def _layout(self, grid: np.ndarray, n: int, last: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each row's linear position in the padded grid box, the box's dims and the ``last`` flags."""
        if grid.shape != (n, 3) or not np.issubdtype(grid.dtype, np.integer):
            raise ValueError(f"GridStencilKernel: grid must be {n} x 3 integer indices")
        low = grid.min(axis=0) if n else np.zeros(3, np.int64)
        dims = (grid.max(axis=0) - low + 3) if n else np.ones(3, np.int64)  # one padding node each side
        if int(np.prod(dims)) >= 2**31:
            raise ValueError("GridStencilKernel: the rows' grid box exceeds 2^31 nodes")
        position = (grid - low + 1) @ np.array([1, dims[0], dims[0] * dims[1]], dtype=np.int64)
        is_last = np.zeros(n, bool) if last is None else np.asarray(last, bool)
        if is_last.shape != (n,):
            raise ValueError(f"GridStencilKernel: last must hold {n} flags")
        return position, np.asarray(dims, np.int64), is_last

    def _build(
        self,
        position: np.ndarray,
        dims: np.ndarray,
        is_last: np.ndarray,
        row_type: np.ndarray,
        k_table: np.ndarray,
        m_table: np.ndarray,
        special: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray],
        omega: float,
        library: Any,
        coupled: np.ndarray | None = None,
    ) -> None:
        """The kernel's arrays from the rows' positions, types and special rows (matrix numbering)."""
        n = int(position.shape[0])
        self.n, self.omega, self.library = n, float(omega), library
        #: kernel rows 0 .. n_first - 1 are the rows not flagged last
        self.n_first = int(n - np.count_nonzero(is_last))
        first_of_node = np.ones(n, bool)
        #: whether kernel and matrix order are the same (no renumbering of vectors)
        self.identity = False
        if bool(np.all(position[1:] >= position[:-1])):  # rows in grid order already: no sorts
            by_node = np.arange(n, dtype=np.int32)
            self.order = (
                by_node
                if self.n_first == n
                else np.concatenate([np.flatnonzero(~is_last), np.flatnonzero(is_last)]).astype(np.int32)
            )
            first_of_node[1:] = position[1:] != position[:-1]
            self.identity = self.n_first == n
        else:
            # kernel row -> matrix row: grid order, the rows flagged last after the others
            self.order = np.lexsort((np.arange(n), position, is_last)).astype(np.int32)
            by_node = np.lexsort((np.arange(n), position))
            first_of_node[1:] = position[by_node][1:] != position[by_node][:-1]
        offsets27 = _CODES @ np.array([1, dims[0], dims[0] * dims[1]], dtype=np.int64)
        ntypes = int(k_table.shape[0])
        self._k_table = np.array(k_table, dtype=np.float64)
        self._m_table = np.array(m_table, dtype=np.float64)
        self._coupled = self._m_table != 0.0 if coupled is None else np.asarray(coupled, bool)
        self.map = np.zeros(int(np.prod(dims)), np.int32)  # grid position -> kernel row of its first dof
        inverse: np.ndarray
        if self.identity:  # no permutation: no gathers, no second array
            inverse = self._inverse = self.order
            self.type = np.asarray(row_type, np.uint16)  # (the caller's arrays where they fit)
            self.grid = np.asarray(position, np.int32)
            firsts = np.flatnonzero(first_of_node)
            self.map[position[firsts]] = firsts
        else:
            inverse = np.empty(n, np.int64)
            inverse[self.order] = np.arange(n)
            #: matrix row -> kernel row (from_kernel_order gathers by it: a gather is about twice as fast as a scatter)
            self._inverse = inverse.astype(np.int32)
            self.type = np.empty(n, np.uint16)  # per kernel row
            self.type[inverse] = row_type
            self.grid = position[self.order].astype(np.int32)
            firsts = by_node[first_of_node]  # matrix rows
            self.map[position[firsts]] = inverse[firsts]
        del firsts, first_of_node, by_node
        self.offset = np.concatenate([offsets27[:13], offsets27[14:]])
        # the special rows: CSR in kernel numbering, columns sorted (= sweep order)
        s_rows, s_indptr, s_columns, s_k, s_m = special
        counts = np.diff(np.asarray(s_indptr, np.int64))
        rows = np.repeat(inverse[np.asarray(s_rows, np.int64)], counts)
        columns = inverse[np.asarray(s_columns, np.int64)]
        by_row = np.lexsort((columns, rows))
        special_rows = np.sort(inverse[np.asarray(s_rows, np.int64)])  # kernel rows
        self._special = special_rows  # (for set_scale)
        self._diag_by_type = np.zeros(SPECIAL + 1)  # a type's a_ii (for set_scale: d in one gather)
        self.s_cols = columns[by_row].astype(np.int32)
        self._s_k = np.asarray(s_k, np.float64)[by_row]
        self._s_m = np.asarray(s_m, np.float64)[by_row]
        rows = rows[by_row]
        self.s_indptr = np.zeros(special_rows.size + 1, np.int32)
        np.cumsum(np.bincount(np.searchsorted(special_rows, rows), minlength=special_rows.size), out=self.s_indptr[1:])
        self.s_diag = np.flatnonzero(rows == self.s_cols).astype(np.int32)
        if self.s_diag.size != special_rows.size or bool(np.any(self._k_table[:, 13] == 0.0)):
            raise ValueError("GridStencilKernel: every row needs a diagonal entry")
        self.nspecial = int(special_rows.size)
        self.ntypes = ntypes
        self.s_values = np.zeros(self._s_k.size)
        self.s_dinv = np.zeros(self.nspecial)
        self.lower = np.zeros((ntypes, 13))
        self.upper = np.zeros((ntypes, 13))
        self.diag = np.zeros(ntypes)
        self.type_dinv = np.zeros(ntypes)
        self.d = np.zeros(n)
        self.run_type, self.run_lo, self.run_hi = self._runs()
        arrays = [
            _ptr(a)
            for a in (self.type, self.grid, self.map, self.offset, self.lower, self.upper, self.diag, self.type_dinv)
        ]
        arrays += [_ptr(a) for a in (self.s_indptr, self.s_diag, self.s_cols, self.s_values, self.s_dinv)]
        # the C kernels' views of the rows: all of them, the first n_first, the rest
        self._arrays = arrays
        self._structs = {}
        for part, (lo, hi) in (("all", (0, n)), ("first", (0, self.n_first)), ("last", (self.n_first, n))):
            self._structs[part] = self._view(lo, hi)
        # M alone, for the mass-matrix products of the time loop (its tables never change)
        self._m_lower = np.ascontiguousarray(self._m_table[:, :13])
        self._m_upper = np.ascontiguousarray(self._m_table[:, 14:])
        self._m_diag = np.ascontiguousarray(self._m_table[:, 13])
        mass = [_ptr(a) for a in (self.type, self.grid, self.map, self.offset, self._m_lower, self._m_upper)]
        mass += [_ptr(self._m_diag), _ptr(self.type_dinv)]  # (dinv: unused by the product)
        mass += [_ptr(a) for a in (self.s_indptr, self.s_diag, self.s_cols, self._s_m, self.s_dinv)]
        self._structs["mass"] = _Stencil(0, n, 0, self.nspecial, *mass, *self._run_view(0, n))
        self._refs = {part: ctypes.addressof(struct) for part, struct in self._structs.items()}
        self.scale: float | None = None

    def _view(self, lo: int, hi: int) -> _Stencil:
        """The C kernels' view of the kernel rows ``lo .. hi - 1``."""
        c_lo, c_hi = (int(v) for v in np.searchsorted(self._special, [lo, hi]))
        return _Stencil(lo, hi, c_lo, c_hi, *self._arrays, *self._run_view(lo, hi))

    def define_part(self, name: str, lo: int, hi: int) -> None:
        """Let the sweeps take ``part=name``: the kernel rows ``lo .. hi - 1``."""
        if not 0 <= lo <= hi <= self.n:
            raise ValueError(f"GridStencilKernel.define_part: rows {lo} .. {hi} - 1 of {self.n}")
        if name in ("all", "first", "last", "mass"):
            raise ValueError(f"GridStencilKernel.define_part: {name!r} is taken")
        self._structs[name] = self._view(lo, hi)
        self._refs[name] = ctypes.addressof(self._structs[name])

    def _runs(self, shortest: int = 4) -> tuple[int, np.ndarray, np.ndarray]:
        """The runs the C kernels sweep by sliding windows: the interior type (the most frequent type
        coupling to all 26 neighbours), and the kernel rows ``lo[k] .. hi[k] - 1`` of each maximal run
        of at least ``shortest`` rows of that type at consecutive grid positions whose 26 neighbours
        are consecutive rows too (so along a run every neighbour's row moves by one per row)."""
        none = (-1, np.zeros(0, np.int64), np.zeros(0, np.int64))
        regular = self.type != SPECIAL
        # coupled to all 26 (by default M's entries: K's vanish at the face neighbours of cubes, up to round-off)
        full = np.flatnonzero(np.all(self._coupled[:, _OFF_DIAGONAL], axis=1))
        if full.size == 0 or not regular.any():
            return none
        counts = np.bincount(self.type[regular], minlength=self.ntypes)
        run_type = int(full[np.argmax(counts[full])])
        rows = np.flatnonzero(self.type == run_type)
        # the windows' shape: each line's three nodes are consecutive rows, the point is the row next to it
        position = self.grid[rows].astype(np.int64)
        fits = (self.map[position + self.offset[12]] == rows - 1) & (self.map[position + self.offset[13]] == rows + 1)
        for first in (0, 3, 6, 9, 14, 17, 20, 23):  # a line's x - 1 node among the 26 offsets (13 lower, 13 upper)
            centre = self.map[position + self.offset[first + 1]].astype(np.int64)
            fits &= self.map[position + self.offset[first]] == centre - 1
            fits &= self.map[position + self.offset[first + 2]] == centre + 1
        rows = rows[fits]
        if rows.size < 2:
            return none
        # row j continues the run of row j - 1 (both of the run type)
        step = (np.diff(rows) == 1) & (np.diff(self.grid[rows]) == 1)
        for offset in self.offset:  # every neighbour's row also moves by one
            neighbour = self.map[self.grid[rows] + offset]
            step &= np.diff(neighbour) == 1
        starts = np.flatnonzero(np.concatenate([[True], ~step]))
        lengths = np.diff(np.append(starts, rows.size))
        keep = lengths >= shortest
        lo = rows[starts[keep]].astype(np.int64)
        return run_type, lo, lo + lengths[keep]

    def _run_view(self, lo: int, hi: int) -> tuple[int, int, int, int, int]:
        """The ``fa_stencil`` fields of the runs inside the rows ``lo .. hi - 1``."""
        r_lo = int(np.searchsorted(self.run_lo, lo))
        r_hi = int(np.searchsorted(self.run_hi, hi, side="right"))
        return self.run_type, r_lo, max(r_lo, r_hi), _ptr(self.run_lo), _ptr(self.run_hi)

    @property
    def nbytes(self) -> int:
        """Bytes held (the per-row arrays, the grid map, the tables and the special rows)."""
        arrays: list[np.ndarray] = [self.order, self.type, self.grid, self.map, self.d]
        arrays += [] if self._inverse is self.order else [self._inverse]
        arrays += [self.run_lo, self.run_hi]
        arrays += [self.s_cols, self._s_k, self._s_m, self.s_values, self.s_indptr, self.s_diag, self.s_dinv]
        arrays += [self._k_table, self._m_table, self._m_lower, self._m_upper, self._m_diag]
        arrays += [self.lower, self.upper, self.diag, self.type_dinv]
        return int(sum(a.nbytes for a in arrays))

    def set_scale(self, scale: float) -> None:
        """Take ``A = K + scale M`` (the tables, the special rows' values and ``d``)."""
        table = self._k_table + scale * self._m_table
        self.lower[:] = table[:, :13]
        self.upper[:] = table[:, 14:]
        self.diag[:] = table[:, 13]
        np.divide(self.omega, self.diag, out=self.type_dinv)
        np.multiply(self._s_m, scale, out=self.s_values)
        self.s_values += self._s_k
        special_diagonal = self.s_values[self.s_diag]
        np.divide(self.omega, special_diagonal, out=self.s_dinv)
        self._diag_by_type[: self.ntypes] = self.diag
        np.take(self._diag_by_type, self.type, out=self.d)
        self.d[self._special] = special_diagonal
        self.scale = float(scale)

    def diagonal(self) -> np.ndarray:
        """The diagonal of ``A`` in kernel order for the last :meth:`set_scale` (a new array)."""
        return self.d.copy()

    def set_diagonal(self, d: np.ndarray) -> None:
        raise TypeError("GridStencilKernel takes its diagonal from K and M: use set_scale")

    def to_kernel_order(self, values: np.ndarray, out: np.ndarray) -> np.ndarray:
        """``values`` (matrix row order) into ``out`` in kernel order."""
        self._check("to_kernel_order", values=values, out=out)
        self.library.fa_gather(self.n, _ptr(self.order), _ptr(values), _ptr(out))
        return out

    def from_kernel_order(self, values: np.ndarray, out: np.ndarray) -> np.ndarray:
        """``values`` (kernel order) into ``out`` in matrix row order."""
        self._check("from_kernel_order", values=values, out=out)
        self.library.fa_gather(self.n, _ptr(self._inverse), _ptr(values), _ptr(out))
        return out

    def _vectors(self, name: str, q: np.ndarray | None, part: str = "all", **vectors: np.ndarray) -> int | None:
        """Check the vectors; the pointer the C kernels take for ``q``: a vector of all rows, or of
        the part's rows only (the kernels index ``q`` from the part's first row)."""
        self._check(name, **vectors)
        if q is None:
            return None
        view = self._structs[part]
        if q.dtype != np.float64 or not q.flags.c_contiguous or q.shape not in ((self.n,), (view.hi - view.lo,)):
            raise ValueError(f"{name}: q must hold {self.n} or the part's {view.hi - view.lo} float64 values")
        return _ptr(q) + (8 * view.lo if q.shape[0] == self.n else 0)

    def forward(self, b: np.ndarray, x: np.ndarray, q: np.ndarray | None = None, part: str = "all") -> None:
        """``x = (D/omega + L)^{-1} (b + q)`` on the rows of ``part`` (``"all"``, ``"first"``: kernel
        rows ``0 .. n_first - 1``, ``"last"``: the others; the other rows of ``x`` are read, not written)."""
        qp = self._vectors("forward", q, part, b=b, x=x)
        self.library.fa_st_forward(self._refs[part], _ptr(b), qp, _ptr(x))

    def backward(self, b: np.ndarray, x: np.ndarray, q: np.ndarray | None = None, part: str = "all") -> None:
        """``x = (D/omega + U)^{-1} (b + q)`` on the rows of ``part``."""
        qp = self._vectors("backward", q, part, b=b, x=x)
        self.library.fa_st_backward(self._refs[part], _ptr(b), qp, _ptr(x))

    def apply_upper(self, x: np.ndarray, y: np.ndarray, q: np.ndarray | None = None, part: str = "all") -> None:
        """``y = (D/omega + U) x + q`` on the rows of ``part``."""
        qp = self._vectors("apply_upper", q, part, x=x, y=y)
        self.library.fa_st_apply_upper(self._refs[part], _ptr(x), qp, _ptr(y))

    def mult(self, x: np.ndarray, y: np.ndarray) -> None:
        """``y = A x``."""
        self._vectors("mult", None, x=x, y=y)
        self.library.fa_st_mult(self._refs["all"], _ptr(x), _ptr(y))

    def mass_mult(self, x: np.ndarray, y: np.ndarray) -> None:
        """``y = M x`` (this rank's rows and columns, kernel order)."""
        self._vectors("mass_mult", None, x=x, y=y)
        self.library.fa_st_mult(self._refs["mass"], _ptr(x), _ptr(y))

    def forward_eisenstat(
        self,
        y: np.ndarray,
        t: np.ndarray,
        d: np.ndarray,
        mid: float,
        z: np.ndarray,
        q: np.ndarray | None = None,
        part: str = "all",
    ) -> None:
        """``z = (D/omega + L)^{-1} (y + mid d t + q)`` on the rows of ``part``."""
        qp = self._vectors("forward_eisenstat", q, part, y=y, t=t, d=d, z=z)
        self.library.fa_st_forward_eisenstat(self._refs[part], _ptr(y), _ptr(t), _ptr(d), float(mid), qp, _ptr(z))

    def cg_start(
        self, b: np.ndarray, x: np.ndarray, d: np.ndarray, mid: float, y: np.ndarray, bh: np.ndarray, z: np.ndarray
    ) -> float:
        """In one pass over all rows: ``y = (D/omega + U) x``, ``bh = (D/omega + L)^{-1} b`` and
        ``z = (D/omega + L)^{-1} (y + mid d x)``; returns ``bh . (d bh)`` (one rank, no couplings to
        other rows)."""
        self._vectors("cg_start", None, b=b, x=x, d=d, y=y, bh=bh, z=z)
        return float(
            self.library.fa_st_cg_start(
                self._refs["all"], _ptr(b), _ptr(x), _ptr(d), float(mid), _ptr(y), _ptr(bh), _ptr(z)
            )
        )

    def cg_direction_backward(
        self,
        r: np.ndarray,
        d: np.ndarray,
        beta: float,
        p: np.ndarray,
        t: np.ndarray,
        q: np.ndarray | None = None,
        part: str = "all",
    ) -> None:
        """``p = d r + beta p``, then ``t = (D/omega + U)^{-1} (p + q)``, in one pass over the rows of ``part``."""
        qp = self._vectors("cg_direction_backward", q, part, r=r, d=d, p=p, t=t)
        self.library.fa_st_cg_direction_backward(self._refs[part], _ptr(r), _ptr(d), float(beta), _ptr(p), qp, _ptr(t))

    def cg_forward_product(
        self,
        p: np.ndarray,
        t: np.ndarray,
        d: np.ndarray,
        mid: float,
        w: np.ndarray,
        q: np.ndarray | None = None,
        part: str = "all",
    ) -> float:
        """``w = z + t`` with ``z = (D/omega + L)^{-1} (p + mid d t + q)``, ``z`` overwriting ``t``, on
        the rows of ``part``; returns their part of ``p . w``."""
        qp = self._vectors("cg_forward_product", q, part, p=p, t=t, d=d, w=w)
        return float(
            self.library.fa_st_cg_forward_product(self._refs[part], _ptr(p), _ptr(t), _ptr(d), float(mid), qp, _ptr(w))
        )


def rank_colours(neighbours: list[list[int]]) -> list[int]:
    """A colour per rank, different for ranks that are neighbours (greedy, in rank order; two
    colours for a chain of slabs). ``neighbours[r]``: the ranks coupled to rank ``r``."""
    colours: list[int] = []
    for rank, adjacent in enumerate(neighbours):
        taken = {colours[other] for other in adjacent if other < rank}
        colours.append(next(c for c in range(len(neighbours) + 1) if c not in taken))
    return colours


def _coupled_product(
    off: OffRankCouplings,
    vec: PETSc.Vec,
    mask: np.ndarray,
    sign: float,
    masked: np.ndarray,
    out: np.ndarray,
    coupled: tuple[int, int] | None = None,
    positions: np.ndarray | None = None,
) -> np.ndarray:
    """Scatter ``vec``'s ghost columns (collective), then ``out = sign O_mask vec`` on the coupled
    rows (``O_mask``: the couplings to the ghost columns where ``mask`` is 1; ``masked``: a scratch
    array of the ghosts' size; ``coupled``, ``positions``: as for ``OffRankCouplings.rows_product``)."""
    off.scatter.scatter(vec, off.ghost_values, PETSc.InsertMode.INSERT_VALUES, PETSc.ScatterMode.FORWARD)
    np.multiply(off.ghost_values.array_r, mask, out=masked)
    off.rows_product(off.values, masked, out, coupled, positions)
    if sign != 1.0:
        k0, k1 = coupled if coupled is not None else (0, off.rows.size)
        out[off.rows[k0:k1] if positions is None else positions] *= sign
    return out


class GridSeparatorSweeps:
    r"""SSOR sweeps of the whole distributed matrix in a separator order (collective), by the grid
    stencil of each rank's rows: the sweeps of :class:`~fem_anode.fem.slab_sweeps.EisenstatCG` on
    several ranks, the same preconditioner as on one rank in another row order (instead of
    block-Jacobi SSOR, whose iterations grow with the ranks: 1.45x on two).

    The order: first every rank's rows without couplings to other ranks (all ranks at once, each in
    grid order), then the rows with such couplings ("separator" rows: the kernel's ``last`` part),
    rank by rank in the order of the ranks' colours (:func:`rank_colours`; ranks of one colour are
    not coupled and sweep together). A forward sweep is the first rows, then one stage per colour:
    the values of the ghost columns (the lower colours' separator rows, just swept) are scattered
    and their couplings ``O_lower x`` enter the separator rows' right-hand side; a backward sweep
    runs the stages the other way with ``O_upper``, then the first rows. Two colours (slabs): one
    scatter per sweep, and the separator rows (about two node layers per neighbour) wait once.

    Args:
        comm: the communicator.
        kernel: this rank's kernel, built with ``last`` = the rows with couplings to other ranks.
        couplings: those couplings in the kernel's order (``OffRankCouplings(..., order=kernel.order)``).
        like: a vector of the kernel's layout (for the ownership ranges).
    """

    off = None  # the couplings to other ranks are inside the sweeps (EisenstatCG adds no O t)

    def __init__(self, comm: MPI.Comm, kernel: GridStencilKernel, couplings: OffRankCouplings, like: PETSc.Vec) -> None:
        if kernel.n - kernel.n_first != np.unique(couplings.rows).size or (
            couplings.rows.size and int(couplings.rows.min()) < kernel.n_first
        ):
            raise ValueError("GridSeparatorSweeps: the kernel's last rows must be the rows with off-rank couplings")
        self.comm, self.kernel, self.omega, self.couplings = comm, kernel, kernel.omega, couplings
        ranges = np.asarray(like.getOwnershipRanges())
        owners = np.searchsorted(ranges, couplings.ghost_indices, side="right") - 1
        colours = rank_colours(comm.allgather(sorted({int(o) for o in owners})))
        self.colour, self.ncolours = colours[comm.rank], max(colours) + 1
        owner_colours = np.asarray(colours)[owners] if owners.size else np.zeros(0, int)
        self.lower_mask = (owner_colours < self.colour).astype(np.float64)
        self.upper_mask = (owner_colours > self.colour).astype(np.float64)
        if couplings.q.shape != (kernel.n,):
            raise ValueError("GridSeparatorSweeps: the couplings' rows are not the kernel's")
        # One array with the couplings' products (8 B per row): both write only the coupled rows
        # (the rest stays 0) and every use consumes it before the next product.
        self.q = couplings.q
        self._masked = np.zeros(owners.size)

    def _couple(self, vec: PETSc.Vec, mask: np.ndarray, sign: float, compute: bool) -> np.ndarray | None:
        """Scatter ``vec``'s ghost columns (collective); if ``compute``: ``q = sign O_mask vec`` on
        the separator rows (an array of this object's)."""
        off = self.couplings
        if not compute:
            off.scatter.scatter(vec, off.ghost_values, PETSc.InsertMode.INSERT_VALUES, PETSc.ScatterMode.FORWARD)
            return None
        return _coupled_product(off, vec, mask, sign, self._masked, self.q)

    def _forward_last(self, vec: PETSc.Vec, sweep: Callable[[np.ndarray | None], Any]) -> None:
        """The separator rows' forward sweep, stage by stage (``vec``: the vector being swept)."""
        for stage in range(self.ncolours):
            mine = stage == self.colour
            q = self._couple(vec, self.lower_mask, -1.0, mine) if stage > 0 else None
            if mine:
                sweep(q)

    def _backward_last(self, vec: PETSc.Vec, sweep: Callable[[np.ndarray | None], Any]) -> None:
        for stage in reversed(range(self.ncolours)):
            mine = stage == self.colour
            q = self._couple(vec, self.upper_mask, -1.0, mine) if stage < self.ncolours - 1 else None
            if mine:
                sweep(q)

    def forward(self, b: PETSc.Vec, x: PETSc.Vec) -> None:
        """``x = B^{-1} b``."""
        k, bb, xx = self.kernel, b.array_r, x.array
        k.forward(bb, xx, part="first")
        self._forward_last(x, lambda q: k.forward(bb, xx, q=q, part="last"))

    def backward(self, b: PETSc.Vec, x: PETSc.Vec) -> None:
        """``x = B^{-T} b``."""
        k, bb, xx = self.kernel, b.array_r, x.array
        self._backward_last(x, lambda q: k.backward(bb, xx, q=q, part="last"))
        k.backward(bb, xx, part="first")

    def apply_upper(self, x: PETSc.Vec, y: PETSc.Vec) -> None:
        """``y = B^T x``."""
        q = self._couple(x, self.upper_mask, 1.0, True)
        self.kernel.apply_upper(x.array_r, y.array, q=q)

    def forward_eisenstat(self, y: PETSc.Vec, t: PETSc.Vec, d: PETSc.Vec, mid: float, z: PETSc.Vec) -> None:
        """``z = B^{-1} (y + mid D t)``."""
        k, yy, tt, dd, zz = self.kernel, y.array_r, t.array_r, d.array_r, z.array
        k.forward_eisenstat(yy, tt, dd, mid, zz, part="first")
        self._forward_last(z, lambda q: k.forward_eisenstat(yy, tt, dd, mid, zz, q=q, part="last"))

    def cg_direction_backward(self, r: PETSc.Vec, d: PETSc.Vec, beta: float, p: PETSc.Vec, t: PETSc.Vec) -> None:
        """``p = D r + beta p``, then ``t = B^{-T} p``."""
        k, rr, dd, pp, tt = self.kernel, r.array_r, d.array_r, p.array, t.array
        self._backward_last(t, lambda q: k.cg_direction_backward(rr, dd, beta, pp, tt, q=q, part="last"))
        k.cg_direction_backward(rr, dd, beta, pp, tt, part="first")

    def cg_forward_product(self, p: PETSc.Vec, t: PETSc.Vec, d: PETSc.Vec, mid: float, w: PETSc.Vec) -> float:
        """``w = z + t``, ``z = B^{-1} (p + mid D t)`` overwriting ``t``; returns this rank's part of ``p . w``."""
        k, pp, tt, dd, ww = self.kernel, p.array_r, t.array, d.array_r, w.array
        total = [k.cg_forward_product(pp, tt, dd, mid, ww, part="first")]
        self._forward_last(t, lambda q: total.append(k.cg_forward_product(pp, tt, dd, mid, ww, q=q, part="last")))
        return float(sum(total))


class GridSlabSweeps:
    r"""SSOR sweeps of the whole distributed matrix in a slab-face order (collective), by the grid
    stencil of each rank's rows kept in grid order (no renumbering, no extra CSR rows): the sweeps
    of :class:`~fem_anode.fem.slab_sweeps.EisenstatCG` for z slabs in rank order.

    On each rank the rows coupled to a lower rank come first in grid order (``low``: rows
    ``0 .. a - 1``, the slab's first node plane) and those coupled to a higher rank last
    (``high``: rows ``b .. n - 1``). The global order is every rank's ``low`` rows, then every
    rank's rows ``a .. b - 1``, then every rank's ``high`` rows. Each rank's local couplings are
    then split into lower and upper parts by grid order, as the stencil does anyway, and the
    couplings to other ranks are lower for ``high`` rows and upper for ``low`` rows. A forward
    sweep is the rows ``0 .. b - 1`` (all ranks at once), one scatter of the next ranks' ``low``
    values, then the ``high`` rows; a backward sweep the rows ``a .. n - 1``, one scatter of the
    previous ranks' ``high`` values, then the ``low`` rows. Every rank works in every phase (the
    separator order of :class:`GridSeparatorSweeps` lets one colour wait).

    Args:
        comm: the communicator.
        kernel: this rank's kernel, in grid order (built without ``last``).
        couplings: its rows' couplings to other ranks (``OffRankCouplings`` without ``order``).
        like: a vector of the kernel's layout (for the ownership ranges).

    Raises:
        ValueError: when the couplings are not those of slabs (a row coupled to a lower and a higher
            rank, or the rows coupled to lower ranks not all before those coupled to higher ones).
    """

    off = None  # the couplings to other ranks are inside the sweeps (EisenstatCG adds no O t)

    def __init__(self, comm: MPI.Comm, kernel: GridStencilKernel, couplings: OffRankCouplings, like: PETSc.Vec) -> None:
        if kernel.n_first != kernel.n:
            raise ValueError("GridSlabSweeps: the kernel's rows must be in grid order (no rows flagged last)")
        self.comm, self.kernel, self.omega, self.couplings = comm, kernel, kernel.omega, couplings
        ranges = np.asarray(like.getOwnershipRanges())
        owners = np.searchsorted(ranges, couplings.ghost_indices, side="right") - 1
        below = owners < comm.rank
        # per coupled row: whether it has entries to lower / to higher ranks
        entry_rows = np.repeat(np.arange(couplings.rows.size), np.diff(couplings.row_ptr))
        to_lower = np.zeros(couplings.rows.size, bool)
        to_lower[entry_rows[below[couplings.columns]]] = True
        to_higher = np.zeros(couplings.rows.size, bool)
        to_higher[entry_rows[~below[couplings.columns]]] = True
        n = kernel.n
        a = int(couplings.rows[to_lower].max()) + 1 if to_lower.any() else 0
        b = int(couplings.rows[to_higher].min()) if to_higher.any() else n
        problem = bool(np.any(to_lower & to_higher)) or a > b
        if any(comm.allgather(problem)):
            raise ValueError("GridSlabSweeps: the couplings to other ranks are not those of z slabs in rank order")
        self.low_end, self.high_start = a, b
        kernel.define_part("slab_forward", 0, b)
        kernel.define_part("slab_high", b, n)
        kernel.define_part("slab_backward", a, n)
        kernel.define_part("slab_low", 0, a)
        # The products with other ranks' values only ever enter the low rows (the couplings to lower
        # ranks) or the high rows (to higher ranks): one short vector for each part, 8 B per row of it.
        n_low = int(np.count_nonzero(couplings.rows < a))
        high_rows = (couplings.rows[n_low:] - b).astype(np.int32)  # positions in the high rows' vector
        self._low = (np.zeros(a), (0, n_low), couplings.rows[:n_low])
        self._high = (np.zeros(n - b), (n_low, couplings.rows.size), high_rows)
        self._masked = np.zeros(owners.size)
        self._later = below.astype(np.float64)  # the ghosts of lower ranks' high rows: later in the order
        self._earlier = (~below).astype(np.float64)  # those of higher ranks' low rows: earlier

    def _couple(self, vec: PETSc.Vec, side: tuple[np.ndarray, tuple[int, int], np.ndarray], sign: float) -> np.ndarray:
        """Scatter ``vec``'s ghost columns (collective); ``q = sign O vec`` on the low or high rows
        (``side``: that part's vector, its coupled rows and their positions in it)."""
        q, coupled, positions = side
        mask = self._later if side is self._low else self._earlier
        return _coupled_product(self.couplings, vec, mask, sign, self._masked, q, coupled, positions)

    def forward(self, b: PETSc.Vec, x: PETSc.Vec) -> None:
        """``x = B^{-1} b``."""
        k, bb, xx = self.kernel, b.array_r, x.array
        k.forward(bb, xx, part="slab_forward")
        k.forward(bb, xx, q=self._couple(x, self._high, -1.0), part="slab_high")

    def backward(self, b: PETSc.Vec, x: PETSc.Vec) -> None:
        """``x = B^{-T} b``."""
        k, bb, xx = self.kernel, b.array_r, x.array
        k.backward(bb, xx, part="slab_backward")
        k.backward(bb, xx, q=self._couple(x, self._low, -1.0), part="slab_low")

    def apply_upper(self, x: PETSc.Vec, y: PETSc.Vec) -> None:
        """``y = B^T x``."""
        k = self.kernel
        k.apply_upper(x.array_r, y.array, q=self._couple(x, self._low, 1.0), part="slab_low")
        k.apply_upper(x.array_r, y.array, part="slab_backward")  # (the high rows' off-rank couplings are lower)

    def forward_eisenstat(self, y: PETSc.Vec, t: PETSc.Vec, d: PETSc.Vec, mid: float, z: PETSc.Vec) -> None:
        """``z = B^{-1} (y + mid D t)``."""
        k, yy, tt, dd, zz = self.kernel, y.array_r, t.array_r, d.array_r, z.array
        k.forward_eisenstat(yy, tt, dd, mid, zz, part="slab_forward")
        k.forward_eisenstat(yy, tt, dd, mid, zz, q=self._couple(z, self._high, -1.0), part="slab_high")

    def cg_direction_backward(self, r: PETSc.Vec, d: PETSc.Vec, beta: float, p: PETSc.Vec, t: PETSc.Vec) -> None:
        """``p = D r + beta p``, then ``t = B^{-T} p``."""
        k, rr, dd, pp, tt = self.kernel, r.array_r, d.array_r, p.array, t.array
        # p's update runs over all rows: the low rows' part of it in the second call, after the scatter
        k.cg_direction_backward(rr, dd, beta, pp, tt, part="slab_backward")
        k.cg_direction_backward(rr, dd, beta, pp, tt, q=self._couple(t, self._low, -1.0), part="slab_low")

    def cg_forward_product(self, p: PETSc.Vec, t: PETSc.Vec, d: PETSc.Vec, mid: float, w: PETSc.Vec) -> float:
        """``w = z + t``, ``z = B^{-1} (p + mid D t)`` overwriting ``t``; returns this rank's part of ``p . w``."""
        k, pp, tt, dd, ww = self.kernel, p.array_r, t.array, d.array_r, w.array
        total = k.cg_forward_product(pp, tt, dd, mid, ww, part="slab_forward")
        q = self._couple(t, self._high, -1.0)
        return total + k.cg_forward_product(pp, tt, dd, mid, ww, q=q, part="slab_high")
