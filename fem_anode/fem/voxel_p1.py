r"""P1 (trilinear) finite-element operators on the voxels of an image, built without a mesh.

On a mesh of equal axis-aligned hexahedra the element matrices of the diffusion model are the
same for every cell, so a row of ``K + R`` or ``M`` depends only on the voxels around its node:
which of the 8 are transporting, which are pore or Si (Robin faces between two of them). This
module builds what :class:`~fem_anode.fem.grid_stencil.GridStencilKernel` keeps (a table of the
distinct rows, a type per row, the few other rows in CSR form) straight from a slab of the label
image, with the numbering of :func:`~fem_anode.fem.voxel_mesh.create_voxel_mesh`: the
face-connected copies of every grid node (:mod:`fem_anode.meshing.voxel`), in grid order (x
fastest, then y, then z), the copies of a node by their smallest block position. The result is
the matrices dolfinx assembles on that mesh (same integrals, exact Gauss quadrature) to
round-off, in another dof order, and on any number of ranks the same global numbering.

The element matrices of a voxel with edges ``h = (h_z, h_y, h_x)`` (local corners ``a``, ``c`` in
``{0, 1}^3``; 1D mass ``m_h = h/6 [[2, 1], [1, 2]]`` and stiffness ``k_h = 1/h [[1, -1], [-1, 1]]``):

.. math::

    M_{ac} = \prod_i m_{h_i}[a_i, c_i],\qquad
    K_{ac} = r_D \sum_i k_{h_i}[a_i, c_i] \prod_{j \ne i} m_{h_j}[a_j, c_j],\qquad
    R^{(i)}_{ac} = r \prod_{j \ne i} m_{h_j}[a_j, c_j]\ \ (a_i = c_i = \text{the face's side}),

with ``r_D = D_eff / L^2`` and ``r = k_f / L`` (pore faces) or ``k_si / L`` (Si faces) in the
micrometre unit ``L`` of :mod:`fem_anode.fem.diffusion.transient`.

Row kinds: a row is *typed* when its node has one copy and no neighbour has several (its values
then follow from the 8 voxel classes around the node: a 16-bit key); the copies of split nodes, the
rows next to them and, on several ranks, the rows of the node plane at each slab face shared with
another rank are *special* (assembled voxel by voxel). Their couplings to another rank's rows are
kept apart (:attr:`VoxelP1Operator.off_rank`); the rows stay in grid order on every rank (the
slab-face order of :class:`~fem_anode.fem.grid_stencil.GridSlabSweeps`).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator
from typing import Any

import numpy as np
from mpi4py import MPI

from fem_anode.fem.grid_stencil import SPECIAL
from fem_anode.meshing.voxel import _TABLES, corner_offsets

__all__ = ["OTHER", "PORE", "SI", "TRANSPORT", "OffRankRows", "VoxelP1Operator", "element_matrices", "slab_classes"]

#: Voxel classes: outside the image or a phase that neither transports nor exchanges Li.
OTHER = 0
#: The transporting phase (the mesh's cells).
TRANSPORT = 1
#: The pore phase (Robin faces with ``k_f``).
PORE = 2
#: The Si phase (Robin faces with ``k_si``).
SI = 3

_CORNERS = corner_offsets(3)  # (z, y, x) bits of block position / local corner p = 4 z + 2 y + x
_BITS = np.array([4, 2, 1])
_NODES_PER_CHUNK = 1 << 11  # special nodes per pass: about 64 contributions of 56 B each per node


def element_matrices(
    spacing: np.ndarray, rate_d: float, lumped: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The trilinear element matrices of a voxel with edges ``spacing = (h_z, h_y, h_x)``.

    Returns ``K`` (``rate_d`` grad.grad), ``M`` (8 x 8, local corners ``p = 4 z + 2 y + x``) and
    the face masses ``F[i]`` (8 x 8, the face normal to axis ``i`` through the first corner's
    side; zero unless both corners lie on it), all in the units of ``spacing``. ``lumped``: ``M``
    and each ``F[i]`` replaced by the diagonal of their row sums (``h_z h_y h_x / 8`` per corner,
    a quarter of the face per corner of it)."""
    h = np.asarray(spacing, dtype=np.float64)
    mass_1d = [hi / 6.0 * np.array([[2.0, 1.0], [1.0, 2.0]]) for hi in h]
    stiff_1d = [1.0 / hi * np.array([[1.0, -1.0], [-1.0, 1.0]]) for hi in h]
    K = np.zeros((8, 8))
    M = np.zeros((8, 8))
    F = np.zeros((3, 8, 8))
    for a, c in itertools.product(range(8), repeat=2):
        ab, cb = _CORNERS[a], _CORNERS[c]
        m = [mass_1d[i][ab[i], cb[i]] for i in range(3)]
        M[a, c] = m[0] * m[1] * m[2]
        K[a, c] = rate_d * sum(
            stiff_1d[i][ab[i], cb[i]] * np.prod([m[j] for j in range(3) if j != i]) for i in range(3)
        )
        for i in range(3):
            if ab[i] == cb[i]:
                F[i, a, c] = np.prod([m[j] for j in range(3) if j != i])
    if lumped:
        M = np.diag(M.sum(axis=1))
        F = np.stack([np.diag(face.sum(axis=1)) for face in F])
    return K, M, F


def slab_classes(image: Any, z0: int, z1: int, roles: dict[int, int]) -> np.ndarray:
    """The voxel classes of layers ``z0 - 2 .. z1`` of a 3D label ``image`` (read by
    ``image.read_layers``; :data:`OTHER` beyond the image and for labels not in ``roles``).

    Args:
        roles: label value -> class (:data:`TRANSPORT`, :data:`PORE`, :data:`SI`).
    """
    nz, ny, nx = (int(n) for n in image.shape)
    out = np.zeros((z1 - z0 + 3, ny, nx), np.uint8)
    a, b = max(z0 - 2, 0), min(z1 + 1, nz)
    if b > a:
        labels = np.asarray(image.read_layers(a, b))
        block = out[a - (z0 - 2) : b - (z0 - 2)]
        for value, role in roles.items():
            block[labels == value] = role
    return out


@dataclasses.dataclass
class OffRankRows:
    """Couplings of this rank's rows to other ranks' rows: ``rows`` (local, sorted) and a CSR block
    ``(indptr, columns, k, m)`` whose columns are global dof numbers (ascending within a row)."""

    rows: np.ndarray
    indptr: np.ndarray
    columns: np.ndarray
    k: np.ndarray
    m: np.ndarray


class VoxelP1Operator:
    """``K + R`` and ``M`` of the P1 diffusion model on this rank's slab of a voxel image (collective).

    Args:
        comm: the communicator (every rank a slab of consecutive z layers, in rank order).
        classes: voxel classes (:data:`OTHER`, :data:`TRANSPORT`, :data:`PORE`, :data:`SI`) of the
            layers ``z0 - 2 .. z1`` (two halo layers below the slab, one above; :data:`OTHER` beyond
            the image), shape ``(z1 - z0 + 3, ny, nx)``.
        z0, z1: the slab's layers (global); ``z1 = nz`` on the last slab.
        nz: layers of the image.
        spacing: voxel edges ``(h_z, h_y, h_x)`` in the length unit of the rates.
        rate_d: ``D_eff / L^2`` (1/s); rate_f: ``k_f / L`` (1/s) of pore faces; rate_si: ``k_si / L``
            of Si faces (0: Si faces carry no flux, but :attr:`w_si` is still their measure).
        lumped: diagonal (row-sum) mass and face-mass matrices (:func:`element_matrices`).

    Attributes (this rank's dofs, numbered ``offset .. offset + n - 1`` globally):
        n, offset, ndofs: local and first global number, total over ranks.
        position, box: the dofs' nodes' linear indices in a padded grid box of ``box = (x, y, z)``
            nodes (ascending: the dofs are numbered in grid order).
        row_type, k_table, m_table, coupled, special: the rows as
            :meth:`~fem_anode.fem.grid_stencil.GridStencilKernel.from_types` takes them.
        last: the rows coupled to other ranks.
        off_rank: those couplings (:class:`OffRankRows`); with ``special`` ``None`` after
            :meth:`release_rows`.
        w_dx, w_pore, w_si: ``M 1``, ``R_pore 1`` and ``R_si 1`` per dof (``R`` without the rate: the
            integral of the basis function over the volume, the pore faces, the Si faces).
    """

    def __init__(
        self,
        comm: MPI.Intracomm,
        classes: np.ndarray,
        z0: int,
        z1: int,
        nz: int,
        spacing: tuple[float, float, float] | np.ndarray,
        rate_d: float,
        rate_f: float,
        rate_si: float,
        lumped: bool = False,
    ) -> None:
        layers = z1 - z0
        if classes.ndim != 3 or classes.shape[0] != layers + 3:
            raise ValueError(f"VoxelP1Operator: classes must hold the {layers + 3} layers z0 - 2 .. z1")
        if int(classes.max(initial=0)) > SI:
            raise ValueError("VoxelP1Operator: unknown voxel class")
        self.comm = comm
        self.z0, self.z1, self.nz = int(z0), int(z1), int(nz)
        self.has_prev = z0 > 0
        self.has_next = z1 < nz
        if (self.has_prev or self.has_next) and layers < 2:
            raise ValueError("VoxelP1Operator: a slab next to another rank's needs at least two layers")
        ny, nx = classes.shape[1:]
        self._padded = np.pad(np.asarray(classes, dtype=np.uint8), ((0, 0), (1, 1), (1, 1)))
        self.node_shape = (layers + 2, ny + 1, nx + 1)  # node planes z0 - 1 .. z1
        self._strides = np.array([(ny + 1) * (nx + 1), nx + 1, 1], dtype=np.int64)
        self._voxel_strides = np.array([(ny + 2) * (nx + 2), nx + 2, 1], dtype=np.int64)
        self.K_e, self.M_e, self.F_e = element_matrices(np.asarray(spacing, np.float64), rate_d, lumped)
        self.rates = {PORE: float(rate_f), SI: float(rate_si)}
        ordinal, count = _TABLES[3]
        self._ordinal = ordinal
        config = np.zeros(self.node_shape, np.uint8)
        key = np.zeros(self.node_shape, np.uint16)
        for p, (bz, by, bx) in enumerate(_CORNERS):
            around = self._padded[bz : bz + layers + 2, by : by + ny + 1, bx : bx + nx + 1]
            config |= (around == TRANSPORT).view(np.uint8) << p
            key |= around.astype(np.uint16) << (2 * p)
        copies = count[config]
        own_hi = layers + 1 + (0 if self.has_next else 1)  # owned planes 1 .. own_hi - 1
        self.n = int(copies[1:own_hi].sum(dtype=np.int64))
        self.offset = int(comm.exscan(self.n) or 0) if comm.size > 1 else 0
        self.ndofs = int(comm.allreduce(self.n)) if comm.size > 1 else self.n
        self._config, self._copies = config.ravel(), copies.ravel()
        self._plane0 = int(copies[0].sum(dtype=np.int64))  # copies on the plane below the slab
        self._wide = int(self._copies.sum(dtype=np.int64)) + 8 >= 2**31
        # The first local dof of each node plane (planes z0 - 1 .. z1 and one past): what
        # _plane_first_dofs needs after compact(), 8 B per plane.
        self._plane_starts = np.concatenate(([0], np.cumsum(copies.sum(axis=(1, 2), dtype=np.int64)))) - self._plane0
        del config, copies
        self._first: np.ndarray | None = None
        self._first = self._first_dofs()
        self._build(key.ravel(), own_hi)

    def _first_dofs(self) -> np.ndarray:
        """The first local dof of every node's copies (planes ``z0 - 1 .. z1``; the plane below the
        slab negative): kept until :meth:`compact`, then recomputed when asked (8 B per node)."""
        if self._first is not None:
            return self._first
        dtype = np.int64 if self._wide else np.int32
        first = np.empty(self._copies.size, dtype)
        first[0] = 0
        np.cumsum(self._copies[:-1], dtype=dtype, out=first[1:])
        np.subtract(first, self._plane0, out=first)
        return first

    def _plane_first_dofs(self, q: int) -> np.ndarray:
        """:meth:`_first_dofs` of the nodes of plane ``q`` (``0``: the plane below the slab) only:
        after :meth:`compact` the cost of one plane, not of the slab, so a pass over the layers
        (outputs, particle reports, fluxes) stays linear in the slab's size."""
        plane = int(self._strides[0])
        if self._first is not None:
            return self._first[q * plane : (q + 1) * plane]
        dtype = np.int64 if self._wide else np.int32
        copies = self._copies[q * plane : (q + 1) * plane]
        first = np.empty(plane, dtype)
        first[0] = 0
        np.cumsum(copies[:-1], dtype=dtype, out=first[1:])
        np.add(first, int(self._plane_starts[q]), out=first)
        return first

    def compact(self) -> None:
        """Drop what only the set-up needs (the per-node dof numbers; recomputed on demand)."""
        self._first = None

    # -- the rows -----------------------------------------------------------------------------
    def _build(self, key: np.ndarray, own_hi: int) -> None:
        plane = int(self._strides[0])
        lo, hi = plane, own_hi * plane  # owned nodes (flat)
        copies = self._copies[lo:hi]
        nodes = np.flatnonzero(copies) + lo
        dof_nodes = np.repeat(nodes, copies[nodes - lo])  # per local dof: its node
        del nodes
        _, ny1, nx1 = self.node_shape
        #: the kernel's grid box (x, y, z): the node planes z0 - 1 .. z1 (and one more on the last
        #: slab) with one padding node on each side in x and y
        self.box = np.array([nx1 + 2, ny1 + 2, self.node_shape[0] + 1], np.int64)
        #: per dof, its node's linear index in that box (ascending: the dofs are in grid order)
        if int(np.prod(self.box)) >= 2**31:
            raise ValueError("VoxelP1Operator: a slab of more than 2^31 nodes (use more ranks)")
        position = (dof_nodes // plane) * (self.box[0] * self.box[1])
        rest = dof_nodes % plane
        position += (rest // nx1 + 1) * self.box[0] + rest % nx1 + 1
        self.position = position.astype(np.int32)
        del rest, position
        # special nodes: split, next to a split node, and the plane at a face shared with another rank
        split = (self._copies >= 2).reshape(self.node_shape)
        near = split.copy()
        for axis in range(3):
            grown = near.copy()
            for shift in (1, -1):
                view = np.roll(near, shift, axis=axis)
                edge = [slice(None)] * 3
                edge[axis] = slice(0, 1) if shift == 1 else slice(-1, None)
                view[tuple(edge)] = False
                grown |= view
            near = grown
        if self.has_prev:  # (the rows of the slab-face order, GridSlabSweeps, stay in grid order)
            near[1] = True
        if self.has_next:
            near[own_hi - 1] = True
        special_node = near.ravel()[dof_nodes]
        del near, split
        # typed rows: the distinct keys (16 bits: a table lookup, no sort), one representative each
        typed = np.flatnonzero(~special_node)
        keys = key[dof_nodes[typed]]
        present = np.zeros(1 << 16, bool)
        present[keys] = True
        unique_keys = np.flatnonzero(present)
        if unique_keys.size >= SPECIAL:
            raise ValueError(f"VoxelP1Operator: {unique_keys.size} row types (at most {SPECIAL - 1})")
        lookup = np.zeros(1 << 16, np.uint16)
        lookup[unique_keys] = np.arange(unique_keys.size)
        types = lookup[keys]
        representative = np.zeros(1 << 16, np.int64)
        representative[keys] = typed  # any row of a type will do: all its rows are equal
        del keys
        self.row_type = np.full(self.n, SPECIAL, np.uint16)
        self.row_type[typed] = types
        reps = dof_nodes[representative[unique_keys]]
        r_rows, _, r_codes, r_k, r_m, r_pore, r_si = self._rows(reps, np.arange(reps.size))
        self.k_table = np.zeros((unique_keys.size, 27))
        self.m_table = np.zeros((unique_keys.size, 27))
        np.add.at(self.k_table, (r_rows, r_codes), r_k)
        np.add.at(self.m_table, (r_rows, r_codes), r_m)
        #: which of the 27 stencil codes each type couples to (the voxels' corners; with a lumped mass
        #: some couplings hold zeros, so the pattern is this table, not the values')
        self.coupled = np.zeros((unique_keys.size, 27), bool)
        self.coupled[r_rows, r_codes] = True
        pore_by_type = np.bincount(r_rows, weights=r_pore, minlength=unique_keys.size)
        si_by_type = np.bincount(r_rows, weights=r_si, minlength=unique_keys.size)
        self.w_dx = np.empty(self.n)
        self.w_pore = np.empty(self.n)
        self.w_si = np.empty(self.n)
        self.w_dx[typed] = self.m_table.sum(axis=1)[types]
        self.w_pore[typed] = pore_by_type[types]
        self.w_si[typed] = si_by_type[types]
        # special rows, voxel by voxel, in chunks of nodes
        special_rows = np.flatnonzero(special_node)  # local dofs
        special, off_rank, sums = self._special_entries(special_rows, dof_nodes[special_rows])
        self.special: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = special
        self.off_rank: OffRankRows | None = off_rank
        for weights, values in zip((self.w_dx, self.w_pore, self.w_si), sums):
            weights[special_rows] = values
        self.last = np.zeros(self.n, bool)  # the rows coupled to other ranks (all special)
        self.last[off_rank.rows] = True
        self._special_nonzeros = int(special[2].size + off_rank.columns.size)

    def _special_entries(
        self, special_rows: np.ndarray, special_dof_nodes: np.ndarray
    ) -> tuple[
        tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray],
        OffRankRows,
        tuple[np.ndarray, np.ndarray, np.ndarray],
    ]:
        """The special rows assembled voxel by voxel (in chunks of nodes: bounded temporaries):
        ``(rows, indptr, local columns, k, m)``, their couplings to other ranks and their ``M 1``,
        ``R_pore 1`` and ``R_si 1``."""
        special_nodes = np.unique(special_dof_nodes)
        firsts = self._first_dofs()
        sums = np.zeros((3, special_rows.size))
        parts: list[tuple[np.ndarray, ...]] = []
        for start in range(0, special_nodes.size, _NODES_PER_CHUNK):
            chunk = special_nodes[start : start + _NODES_PER_CHUNK]
            rows, cols, _, k, m, pore, si = self._rows(chunk, firsts[chunk].astype(np.int64))
            where = np.searchsorted(special_rows, rows)  # (the chunk's rows are all special)
            for total, values in zip(sums, (m, pore, si)):
                total += np.bincount(where, weights=values, minlength=special_rows.size)
            rows, cols, k, m = self._sum_duplicates(rows, cols, k, m)
            parts.append((rows.astype(np.int32), cols, k, m))
        empty = (np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros(0), np.zeros(0))
        rows, cols, k, m = (np.concatenate(p) for p in zip(*parts)) if parts else empty
        del parts
        local = (cols >= self.offset) & (cols < self.offset + self.n)
        counts = np.bincount(rows[local], minlength=self.n)[special_rows]
        if special_rows.size and np.any(counts == 0):  # every row has its diagonal (a bug, never bad input)
            raise RuntimeError("VoxelP1Operator: a special row without entries")
        indptr = np.zeros(special_rows.size + 1, np.int64)
        np.cumsum(counts, out=indptr[1:])
        special = (special_rows, indptr, (cols[local] - self.offset).astype(np.int32), k[local], m[local])
        off = ~local
        o_rows = rows[off]
        coupled = np.unique(o_rows)
        o_indptr = np.zeros(coupled.size + 1, np.int64)
        np.cumsum(np.bincount(np.searchsorted(coupled, o_rows), minlength=coupled.size), out=o_indptr[1:])
        off_rank = OffRankRows(coupled, o_indptr, cols[off], k[off], m[off])
        return special, off_rank, (sums[0], sums[1], sums[2])

    def release_rows(self) -> None:
        """Drop the special rows and the couplings to other ranks once the solver holds its own
        copies (:meth:`csr` assembles them again if asked)."""
        self.special = None
        self.off_rank = None

    def _rows_now(self) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray], OffRankRows]:
        """The special rows and the off-rank couplings, assembled again if released."""
        if self.special is not None and self.off_rank is not None:
            return self.special, self.off_rank
        special_rows = np.flatnonzero(self.row_type == SPECIAL)
        special, off_rank, _ = self._special_entries(special_rows, self.dof_nodes()[special_rows])
        return special, off_rank

    @staticmethod
    def _sum_duplicates(rows: np.ndarray, cols: np.ndarray, *values: np.ndarray) -> tuple[np.ndarray, ...]:
        """Entries sorted by (row, column), duplicates summed (the row sums of ``values`` unchanged)."""
        order = np.lexsort((cols, rows))
        rows, cols = rows[order], cols[order]
        start = np.flatnonzero(np.concatenate([[True], (np.diff(rows) != 0) | (np.diff(cols) != 0)]))
        summed = [np.add.reduceat(v[order], start) if start.size else v[:0] for v in values]
        return (rows[start], cols[start], *summed)

    def _rows(self, nodes: np.ndarray, row_base: np.ndarray) -> tuple[np.ndarray, ...]:
        """The element contributions to the rows of the copies at ``nodes`` (flat node indices):
        ``(rows, columns, codes, k, m, pore, si)`` per contribution, unsummed. A row is
        ``row_base[i] + ordinal`` (the copy's ordinal at ``nodes[i]``); columns are global dofs, codes
        the neighbour's stencil code (x fastest); ``pore``/``si`` the face integrals of the basis
        function (their sums are the rows of ``R 1`` without the rate)."""
        nodes = np.asarray(nodes, np.int64)
        q, j, i = np.unravel_index(nodes, self.node_shape)
        voxel0 = q * self._voxel_strides[0] + j * self._voxel_strides[1] + i  # voxel (q-1, j-1, i-1), padded
        cfg = self._config[nodes]
        flat_classes = self._padded.ravel()
        firsts = self._first_dofs()
        parts: list[tuple[np.ndarray, ...]] = []

        def add(
            rows: np.ndarray, at: np.ndarray, a: np.ndarray, c: np.ndarray, values: tuple[float, float, float, float]
        ) -> None:
            """Couple ``rows`` (their nodes ``at``, corner ``a`` of the voxel) to the voxel's corner ``c``."""
            d = c - a
            neighbours = at + int(d @ self._strides)
            position = int((1 - c) @ _BITS)  # the voxel's block position at the neighbour
            cols = firsts[neighbours].astype(np.int64) + self._ordinal[self._config[neighbours], position]
            cols += self.offset
            code = int((d[2] + 1) + 3 * (d[1] + 1) + 9 * (d[0] + 1))
            parts.append((rows, cols, np.full(rows.size, code), *(np.full(rows.size, v) for v in values)))

        for p, b in enumerate(_CORNERS):  # the voxel at block position p of every node
            vox = voxel0 + int(b @ self._voxel_strides)
            sel = np.flatnonzero(flat_classes[vox] == TRANSPORT)
            if sel.size == 0:
                continue
            rows = row_base[sel] + self._ordinal[cfg[sel], p]
            at = nodes[sel]
            a = 1 - b  # the node's corner of the voxel
            ai = int(a @ _BITS)
            for ci, c in enumerate(_CORNERS):
                add(rows, at, a, c, (self.K_e[ai, ci], self.M_e[ai, ci], 0.0, 0.0))
            for axis in range(3):  # Robin faces through the node: the voxel across the axis
                across = flat_classes[vox[sel] + (1 - 2 * int(b[axis])) * int(self._voxel_strides[axis])]
                for cls, rate in self.rates.items():
                    hit = np.flatnonzero(across == cls)
                    for ci, c in enumerate(_CORNERS):
                        if hit.size == 0 or c[axis] != a[axis]:
                            continue
                        face = self.F_e[axis, ai, ci]
                        add(rows[hit], at[hit], a, c, (rate * face, 0.0, face * (cls == PORE), face * (cls == SI)))
        if not parts:
            empty = np.zeros(0, np.int64)
            return (empty, empty, empty, *(np.zeros(0) for _ in range(4)))
        return tuple(np.concatenate(column) for column in zip(*parts))

    # -- for the solvers ------------------------------------------------------------------------
    def dof_nodes(self) -> np.ndarray:
        """Per local dof, its node's flat index in the node planes ``z0 - 1 .. z1`` (for output)."""
        plane_box = int(self.box[0] * self.box[1])
        q, rest = np.divmod(self.position, plane_box)
        j, i = np.divmod(rest, int(self.box[0]))
        return q * self._strides[0] + (j - 1) * self._strides[1] + (i - 1)

    def grid_indices(self) -> np.ndarray:
        """``(n, 3)`` global grid indices ``(x, y, z)`` of the dofs' nodes."""
        q, j, i = np.unravel_index(self.dof_nodes(), self.node_shape)
        return np.stack([i, j, q + self.z0 - 1], axis=1).astype(np.int64)

    def with_upper_plane(self, values: np.ndarray) -> np.ndarray:
        """``values`` of this rank's dofs followed by those of node plane ``z1`` (the next rank's
        first plane; none on the last rank): entry ``g - offset`` is dof ``g``'s value, for every dof
        at a corner of this slab's voxels. Collective (ranks in slab order)."""
        plane = int(self._strides[0])
        upper = int(self._copies[(self.node_shape[0] - 1) * plane :].sum()) if self.has_next else 0
        first_plane = int(self._copies[plane : 2 * plane].sum()) if self.has_prev else 0
        out = np.empty(self.n + upper)
        out[: self.n] = values
        requests = []
        rank = self.comm.rank
        if self.has_prev:
            requests.append(self.comm.Isend(np.ascontiguousarray(values[:first_plane]), dest=rank - 1, tag=941))
        if self.has_next:
            requests.append(self.comm.Irecv(out[self.n :], source=rank + 1, tag=941))
        MPI.Request.Waitall(requests)
        return out

    def node_layers(self) -> np.ndarray:
        """Per dof, the global index ``0 .. nz`` of its node plane (int32; 4 B per dof)."""
        plane_box = int(self.box[0] * self.box[1])
        return (self.position // plane_box + (self.z0 - 1)).astype(np.int32)

    def corner_dofs(self, z: int, corner: np.ndarray) -> np.ndarray:
        """For the voxels of layer ``z`` (global, ``z0 <= z < z1``): the dof of their ``corner``
        (``(cz, cy, cx)`` in ``{0, 1}``) as an index into :meth:`with_upper_plane`'s array, ``-1``
        where the voxel is not transporting. Shape ``(ny, nx)``."""
        _, ny1, nx1 = self.node_shape
        q = z + int(corner[0]) - (self.z0 - 1)
        in_plane = ((np.arange(ny1 - 1)[:, None] + int(corner[1])) * self._strides[1]) + (
            np.arange(nx1 - 1)[None, :] + int(corner[2])
        )
        nodes = q * self._strides[0] + in_plane
        position = int((1 - np.asarray(corner)) @ _BITS)
        dofs = self._plane_first_dofs(q)[in_plane].astype(np.int64) + self._ordinal[self._config[nodes], position]
        inside = self._padded[z - self.z0 + 2, 1:-1, 1:-1] == TRANSPORT
        return np.where(inside, dofs, -1)

    def voxel_counts(self, in_z: np.ndarray, in_y: np.ndarray, in_x: np.ndarray) -> np.ndarray:
        """Per dof, how many of the transporting voxels of its copy lie in the box ``in_z x in_y x
        in_x`` (flags of the layers ``z0 - 2 .. z1``, the rows and the columns): the basis function's
        integral over the box is that count times ``h_z h_y h_x / 8``."""
        plane = int(self._strides[0])
        own_hi = self.node_shape[0] - (1 if self.has_next else 0)
        every = np.arange(plane, own_hi * plane, dtype=np.int64)
        nodes = every[self._copies[every] > 0]
        box = np.pad(in_z[:, None, None] & in_y[None, :, None] & in_x[None, None, :], ((0, 0), (1, 1), (1, 1)))
        inside = (self._padded == TRANSPORT) & box
        q, j, i = np.unravel_index(nodes, self.node_shape)
        voxel0 = q * self._voxel_strides[0] + j * self._voxel_strides[1] + i
        counts = np.zeros(self.n)
        flat = inside.ravel()
        firsts = self._first_dofs()
        for p, b in enumerate(_CORNERS):
            vox = voxel0 + int(b @ self._voxel_strides)
            sel = np.flatnonzero(flat[vox])
            rows = firsts[nodes[sel]].astype(np.int64) + self._ordinal[self._config[nodes[sel]], p]
            counts += np.bincount(rows, minlength=self.n)
        return counts

    def csr_blocks(
        self, rows_per_block: int = 1 << 16, start: int = 0, stop: int | None = None
    ) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        """This rank's rows ``start .. stop - 1`` (default all) of ``K + R`` and ``M`` in blocks of
        consecutive rows: per block ``(first row, indptr, columns, k, m)`` with global columns,
        ascending in each row (one pattern). The temporaries are bounded by the block (about 150 B
        per entry of a block); :meth:`csr` joins the blocks."""
        codes = np.arange(27)
        steps = np.stack([codes // 9 - 1, (codes // 3) % 3 - 1, codes % 3 - 1], axis=1) @ self._strides  # (z, y, x)
        present = self.coupled
        (s_rows, s_indptr, s_cols, s_k, s_m), off = self._rows_now()
        firsts = self._first_dofs()
        nodes = self.dof_nodes()
        stop = self.n if stop is None else min(int(stop), self.n)
        for a in range(max(int(start), 0), stop, rows_per_block):
            b = min(a + rows_per_block, stop)
            # Typed rows: their neighbours have one copy each, numbered in grid order, so a row's
            # columns ascend with the stencil code: the (row, code) table is already in CSR order.
            typed = np.flatnonzero(self.row_type[a:b] != SPECIAL)  # (block rows)
            types = self.row_type[a + typed].astype(np.intp)
            coupled = present[types]  # (typed rows, 27)
            # Special rows: their entries and their couplings to other ranks, sorted (few rows).
            sa, sb = np.searchsorted(s_rows, (a, b))
            ea, eb = s_indptr[sa], s_indptr[sb]
            oa, ob = np.searchsorted(off.rows, (a, b))
            fa, fb = off.indptr[oa], off.indptr[ob]
            special_rows = (
                np.concatenate(
                    [
                        np.repeat(s_rows[sa:sb], np.diff(s_indptr[sa : sb + 1])),
                        np.repeat(off.rows[oa:ob], np.diff(off.indptr[oa : ob + 1])),
                    ]
                )
                - a
            )
            special_cols = np.concatenate([s_cols[ea:eb].astype(np.int64) + self.offset, off.columns[fa:fb]])
            order = np.lexsort((special_cols, special_rows))
            special_rows = special_rows[order]
            counts = np.bincount(special_rows, minlength=b - a)
            counts[typed] = coupled.sum(axis=1)
            indptr = np.zeros(b - a + 1, np.int64)
            np.cumsum(counts, out=indptr[1:])
            columns = np.empty(int(indptr[-1]), np.int64)
            k = np.empty(columns.size)
            m = np.empty(columns.size)
            where = (indptr[typed][:, None] + np.cumsum(coupled, axis=1) - 1)[coupled]
            columns[where] = firsts[(nodes[a + typed][:, None] + steps[None, :])[coupled]] + self.offset
            k[where] = self.k_table[types][coupled]
            m[where] = self.m_table[types][coupled]
            where = indptr[special_rows] + np.arange(special_rows.size) - np.searchsorted(special_rows, special_rows)
            columns[where] = special_cols[order]
            k[where] = np.concatenate([s_k[ea:eb], off.k[fa:fb]])[order]
            m[where] = np.concatenate([s_m[ea:eb], off.m[fa:fb]])[order]
            yield a, indptr, columns, k, m

    def csr(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """This rank's rows of ``K + R`` and ``M`` as CSR arrays ``(indptr, columns, k, m)`` with global
        columns, ascending in each row (one pattern; for assembled solvers and tests: about 540 B per
        row, made on demand)."""
        blocks = list(self.csr_blocks())
        if not blocks:
            return np.zeros(1, np.int64), np.zeros(0, np.int64), np.zeros(0), np.zeros(0)
        counts = np.concatenate([np.diff(blk[1]) for blk in blocks])
        indptr = np.zeros(self.n + 1, np.int64)
        np.cumsum(counts, out=indptr[1:])
        return (
            indptr,
            np.concatenate([blk[2] for blk in blocks]),
            np.concatenate([blk[3] for blk in blocks]),
            np.concatenate([blk[4] for blk in blocks]),
        )

    @property
    def transport_voxels(self) -> int:
        """Transporting voxels of this rank's layers."""
        return int(np.count_nonzero(self._padded[2:-1] == TRANSPORT))

    @property
    def nonzeros(self) -> int:
        """Entries of this rank's rows of the assembled matrix (the mesh path's pattern)."""
        typed = self.row_type[self.row_type != SPECIAL]
        per_type = np.count_nonzero(self.coupled, axis=1)
        return int(per_type[typed].sum()) + self._special_nonzeros

    @property
    def nbytes(self) -> int:
        """Bytes held (the numbering arrays, the rows and the weights)."""
        arrays: list[Any] = [self._padded, self._config, self._copies, self.position, self.row_type, self._plane_starts]
        arrays += [] if self._first is None else [self._first]
        arrays += [self.k_table, self.m_table, self.w_dx, self.w_pore, self.w_si, self.last]
        if self.special is not None and self.off_rank is not None:
            off = self.off_rank
            arrays += [*self.special, off.rows, off.indptr, off.columns, off.k, off.m]
        return int(sum(a.nbytes for a in arrays))
