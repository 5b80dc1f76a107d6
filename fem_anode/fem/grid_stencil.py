r"""SSOR sweeps of a P1 matrix on a voxel grid, stored by row types instead of entries.

On a mesh of equal axis-aligned hexahedra (or quadrilaterals) the row of a P1 matrix couples a
node to itself and to its 26 (8) grid neighbours, and its values depend only on the local
geometry: which of the 8 (4) cells around the node belong to the mesh and which of their faces
carry a Robin boundary. A 128^3 electrode has about a million rows but only a few hundred distinct
rows. :class:`GridStencilKernel` stores ``A = K + s M`` as a table of the distinct rows (``K`` and
``M`` separately, so a new ``s`` only rebuilds the table) and, per row, its type (2 B) and grid
position (4 B); a grid-sized map (4 B per grid node) finds the neighbours' rows. A sweep then
streams 6 B per row instead of the 12 B per entry (about 160 B per row) of a CSR half, and takes
about 7 ms per million rows instead of 17 ms.

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
from typing import Any

import numpy as np

from fem_anode.fem.voxel_sweeps import _ptr, _ptr_or_null, _SweepKernel

__all__ = ["GridStencilKernel", "grid_coordinates"]

#: The type of a special (CSR) row.
SPECIAL = 0xFFFF
#: Grid offsets (dx, dy, dz) of the 27 stencil entries, x fastest; code 13 is the row's own node.
_CODES = np.array([(c % 3 - 1, (c // 3) % 3 - 1, c // 9 - 1) for c in range(27)], dtype=np.int64)
_QUANTUM = 2.0**-40


class _Stencil(ctypes.Structure):
    """The C kernels' view of a :class:`GridStencilKernel` (``fa_stencil`` in ``voxel_sweeps.c``)."""

    _fields_ = [
        ("n", ctypes.c_int64),
        ("type", ctypes.c_void_p),
        ("grid", ctypes.c_void_p),
        ("map", ctypes.c_void_p),
        ("offset", ctypes.c_void_p),
        ("lower", ctypes.c_void_p),
        ("upper", ctypes.c_void_p),
        ("diag", ctypes.c_void_p),
        ("dinv", ctypes.c_void_p),
        ("nspecial", ctypes.c_int64),
        ("s_indptr", ctypes.c_void_p),
        ("s_diag", ctypes.c_void_p),
        ("s_cols", ctypes.c_void_p),
        ("s_values", ctypes.c_void_p),
        ("s_dinv", ctypes.c_void_p),
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
    ) -> None:
        n = indptr.shape[0] - 1
        if grid.shape != (n, 3) or not np.issubdtype(grid.dtype, np.integer):
            raise ValueError(f"GridStencilKernel: grid must be {n} x 3 integer indices")
        if indices.shape != k_values.shape or m_values.shape != k_values.shape:
            raise ValueError("GridStencilKernel: K and M must share one CSR pattern")
        self.n, self.omega, self.library = n, float(omega), library
        low = grid.min(axis=0) if n else np.zeros(3, np.int64)
        dims = (grid.max(axis=0) - low + 3) if n else np.ones(3, np.int64)  # one padding node each side
        if int(np.prod(dims)) >= 2**31:
            raise ValueError("GridStencilKernel: the rows' grid box exceeds 2^31 nodes")
        position = (grid - low + 1) @ np.array([1, dims[0], dims[0] * dims[1]], dtype=np.int64)
        self.order = np.lexsort((np.arange(n), position)).astype(np.int32)  # kernel row -> matrix row
        position_sorted = position[self.order]
        first = np.ones(n, bool)  # kernel rows that are the first dof of their node
        first[1:] = position_sorted[1:] != position_sorted[:-1]
        primary = np.empty(n, np.uint8)  # per matrix row
        primary[self.order] = first
        special = np.zeros(n, np.uint8)  # per matrix row
        split_nodes = np.unique(position_sorted[~first])
        special[np.isin(position, split_nodes)] = 1
        offsets27 = _CODES @ np.array([1, dims[0], dims[0] * dims[1]], dtype=np.int64)
        keys = []
        scale_k = max(float(np.abs(k_values).max(initial=0.0)), 1e-300) * _QUANTUM
        scale_m = max(float(np.abs(m_values).max(initial=0.0)), 1e-300) * _QUANTUM
        for seed in (12345, 67890):  # a second, independent key checks the grouping
            mult = np.random.default_rng(seed).integers(1, 2**63 - 1, size=54, dtype=np.int64).astype(np.uint64) | 1
            key = np.empty(n, np.uint64)
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
                _ptr(key),
                _ptr(special),
            )
            if outside:
                raise ValueError(f"GridStencilKernel: {outside} entries couple rows that are not grid neighbours")
            keys.append(key)
        regular = np.flatnonzero(special == 0)  # matrix rows
        unique_keys, representative, types = np.unique(keys[0][regular], return_index=True, return_inverse=True)
        if unique_keys.size >= SPECIAL:
            raise ValueError(f"GridStencilKernel: {unique_keys.size} row types (at most {SPECIAL - 1})")
        if np.unique(np.stack([keys[0][regular], keys[1][regular]]), axis=1).shape[1] != unique_keys.size:
            raise ValueError("GridStencilKernel: row grouping is ambiguous (key collision)")
        ntypes = unique_keys.size
        # the tables: the values of one row of each type, by stencil code
        self._k_table = np.zeros((ntypes, 27))
        self._m_table = np.zeros((ntypes, 27))
        inverse = np.empty(n, np.int64)
        inverse[self.order] = np.arange(n)
        for t, row in enumerate(regular[representative]):
            span = slice(int(indptr[row]), int(indptr[row + 1]))
            codes = np.searchsorted(offsets27, position[indices[span]] - position[row])
            self._k_table[t, codes] = k_values[span]
            self._m_table[t, codes] = m_values[span]
        self.type = np.full(n, SPECIAL, np.uint16)  # per kernel row
        self.type[inverse[regular]] = types
        self.grid = position_sorted.astype(np.int32)
        self.map = np.zeros(int(np.prod(dims)), np.int32)  # grid position -> kernel row of its first dof
        self.map[position_sorted[first]] = np.flatnonzero(first)
        self.offset = np.concatenate([offsets27[:13], offsets27[14:]])
        # the special rows: CSR in kernel numbering, columns sorted (= sweep order)
        special_rows = np.sort(inverse[np.flatnonzero(special)])  # kernel rows
        source = self.order[special_rows]  # their matrix rows
        counts = (indptr[source + 1] - indptr[source]).astype(np.int64)
        entries = np.repeat(indptr[source].astype(np.int64) - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
        entries += np.arange(int(counts.sum()))
        rows = np.repeat(special_rows, counts)
        columns = inverse[indices[entries]]
        by_row = np.lexsort((columns, rows))
        self.s_cols = columns[by_row].astype(np.int32)
        self._s_k = k_values[entries[by_row]]
        self._s_m = m_values[entries[by_row]]
        self.s_indptr = np.zeros(special_rows.size + 1, np.int32)
        np.cumsum(counts, out=self.s_indptr[1:])
        self.s_diag = np.flatnonzero(rows[by_row] == self.s_cols).astype(np.int32)
        if self.s_diag.size != special_rows.size or bool(np.any(self._k_table[:, 13] == 0.0)):
            raise ValueError("GridStencilKernel: every row needs a diagonal entry")
        self.nspecial = int(special_rows.size)
        self.ntypes = int(ntypes)
        self.s_values = np.zeros(self._s_k.size)
        self.s_dinv = np.zeros(self.nspecial)
        self.lower = np.zeros((ntypes, 13))
        self.upper = np.zeros((ntypes, 13))
        self.diag = np.zeros(ntypes)
        self.type_dinv = np.zeros(ntypes)
        self.d = np.zeros(n)
        self._struct = _Stencil(
            n,
            _ptr(self.type),
            _ptr(self.grid),
            _ptr(self.map),
            _ptr(self.offset),
            _ptr(self.lower),
            _ptr(self.upper),
            _ptr(self.diag),
            _ptr(self.type_dinv),
            self.nspecial,
            _ptr(self.s_indptr),
            _ptr(self.s_diag),
            _ptr(self.s_cols),
            _ptr(self.s_values),
            _ptr(self.s_dinv),
        )
        self._ref = ctypes.addressof(self._struct)
        self.scale: float | None = None

    @property
    def nbytes(self) -> int:
        """Bytes held (the per-row arrays, the grid map, the tables and the special rows)."""
        arrays = (self.order, self.type, self.grid, self.map, self.d, self._k_table, self._m_table)
        special = (self.s_cols, self._s_k, self._s_m, self.s_values, self.s_indptr, self.s_diag, self.s_dinv)
        tables = (self.lower, self.upper, self.diag, self.type_dinv)
        return int(sum(a.nbytes for a in (*arrays, *special, *tables)))

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
        regular = self.type != SPECIAL
        self.d[regular] = self.diag[self.type[regular]]
        self.d[~regular] = special_diagonal
        self.scale = float(scale)

    def diagonal(self) -> np.ndarray:
        """The diagonal of ``A`` in kernel order for the last :meth:`set_scale` (a new array)."""
        return self.d.copy()

    def set_diagonal(self, d: np.ndarray) -> None:
        raise TypeError("GridStencilKernel takes its diagonal from K and M: use set_scale")

    def to_kernel_order(self, values: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """``values`` (matrix row order) in kernel order."""
        return np.take(values, self.order, out=out)

    def from_kernel_order(self, values: np.ndarray, out: np.ndarray) -> np.ndarray:
        """``values`` (kernel order) into ``out`` in matrix row order."""
        out[self.order] = values
        return out

    def _call(self, name: str, *vectors: np.ndarray) -> None:
        self._check(name, **{f"vector {k}": v for k, v in enumerate(vectors)})
        getattr(self.library, name)(self._ref, *(_ptr(v) for v in vectors))

    def forward(self, b: np.ndarray, x: np.ndarray) -> None:
        """``x = (D/omega + L)^{-1} b``."""
        self._call("fa_st_forward", b, x)

    def backward(self, b: np.ndarray, x: np.ndarray) -> None:
        """``x = (D/omega + U)^{-1} b``."""
        self._call("fa_st_backward", b, x)

    def apply_upper(self, x: np.ndarray, y: np.ndarray) -> None:
        """``y = (D/omega + U) x``."""
        self._call("fa_st_apply_upper", x, y)

    def mult(self, x: np.ndarray, y: np.ndarray) -> None:
        """``y = A x``."""
        self._call("fa_st_mult", x, y)

    def forward_eisenstat(
        self, y: np.ndarray, t: np.ndarray, d: np.ndarray, mid: float, z: np.ndarray, q: np.ndarray | None = None
    ) -> None:
        """``z = (D/omega + L)^{-1} (y + mid d t + q)`` (``q``: couplings to other ranks' rows, or none)."""
        self._check("forward_eisenstat", y=y, t=t, d=d, z=z, **({"q": q} if q is not None else {}))
        self.library.fa_st_forward_eisenstat(self._ref, _ptr(y), _ptr(t), _ptr(d), float(mid), _ptr_or_null(q), _ptr(z))

    def cg_direction_backward(self, r: np.ndarray, d: np.ndarray, beta: float, p: np.ndarray, t: np.ndarray) -> None:
        """``p = d r + beta p``, then ``t = (D/omega + U)^{-1} p``, in one pass."""
        self._check("cg_direction_backward", r=r, d=d, p=p, t=t)
        self.library.fa_st_cg_direction_backward(self._ref, _ptr(r), _ptr(d), float(beta), _ptr(p), _ptr(t))

    def cg_forward_product(
        self, p: np.ndarray, t: np.ndarray, d: np.ndarray, mid: float, w: np.ndarray, q: np.ndarray | None = None
    ) -> float:
        """``w = z + t`` with ``z = (D/omega + L)^{-1} (p + mid d t + q)``, ``z`` overwriting ``t``;
        returns ``p . w``."""
        self._check("cg_forward_product", p=p, t=t, d=d, w=w, **({"q": q} if q is not None else {}))
        return float(
            self.library.fa_st_cg_forward_product(
                self._ref, _ptr(p), _ptr(t), _ptr(d), float(mid), _ptr_or_null(q), _ptr(w)
            )
        )
