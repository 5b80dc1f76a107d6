r"""SOR sweeps on several ranks that are one global SSOR, for voxel matrices distributed by z slabs.

The matrices of the finite-volume diffusion and of the finite-volume tortuosity factor couple
face neighbours (7-point stencil); every rank owns the rows of a slab of consecutive z layers,
numbered in the image's C order, so a rank's rows couple to other ranks only through its first
layer (to the last layer of the slab below, entry ``-g_z``) and its last layer (to the first layer
of the slab above). PETSc's parallel SOR sweeps each rank's rows alone (block Jacobi), which costs
iterations; :class:`SeparatorSweeps` instead sweeps in the **separator order**: the voxels of every
slab except its last layer, slab by slab, then the last layers of all slabs but the top one (the
separators; each touches only the slabs on its two sides). With ``B = D/omega + L``, ``L`` the
strictly lower triangle of ``A`` in that order:

* backward, ``t = B^{-T} y``: every rank sweeps its own block (the compiled stencil kernel of
  :mod:`fem_anode.fem.voxel_sweeps`, or PETSc's ``MatSOR``); a slab's first
  layer also couples to the separator below it, which comes later in the order, so that layer is
  corrected by ``t_F += (D/omega + U_FF)^{-1} (g_z t_S)`` on the layer alone, exact because the first
  layer is the last one a backward sweep reaches;
* forward, ``z = B^{-1} w``: likewise, a separator couples to the first layer of the slab above,
  which comes earlier: ``z_S += (D/omega + L_SS)^{-1} (g_z z_F)`` on the separator alone.

One layer of values travels each way per sweep; the sweeps run on all ranks at once. With the
kernel no matrix is needed at all: :class:`SeparatorMatrix` is its mat-vec. This needs
the first and last layers of every slab between two others to differ (at least two layers);
:func:`separator_order_possible` says whether they do. On one rank it is the natural order.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from mpi4py import MPI
from petsc4py import PETSc

from fem_anode.fem.grid_stencil import GridSeparatorSweeps, GridSlabSweeps, GridStencilKernel
from fem_anode.fem.voxel_sweeps import CSRSweepKernel, VoxelSweepKernel
from fem_anode.imaging.slabs import Slab, exchange_layers

__all__ = [
    "EisenstatCG",
    "LayerPass",
    "LocalSweeps",
    "OffRankCouplings",
    "SeparatorMatrix",
    "SeparatorSSOR",
    "SeparatorSweeps",
    "pass_layer",
    "separator_order_possible",
]

_ZERO_GUESS = PETSc.Mat.SORType.ZERO_INITIAL_GUESS


def separator_order_possible(comm: MPI.Comm, slab: Slab) -> bool:
    """Whether every slab between two others has at least two layers (collective)."""
    ok = slab.prev is None or slab.next is None or slab.layers >= 2
    return bool(comm.allreduce(ok, op=MPI.LAND))


class LayerPass:
    """A layer on its way to the slab above (``upward``) or below, and the one coming from the other
    side: the sends and receives start here and :meth:`finish` waits for them, so that work can run
    in between. Collective over the ranks with non-empty slabs."""

    def __init__(self, comm: MPI.Comm, slab: Slab, layer: np.ndarray, *, upward: bool) -> None:
        dest, source = (slab.next, slab.prev) if upward else (slab.prev, slab.next)
        tag = 931 if upward else 932
        self._sent = np.ascontiguousarray(layer)  # alive until the send completes
        self._requests = []
        self._received = None
        if source is not None:
            self._received = np.empty_like(self._sent)
            self._requests.append(comm.Irecv(self._received, source=source, tag=tag))
        if dest is not None:
            self._requests.append(comm.Isend(self._sent, dest=dest, tag=tag))

    def finish(self) -> np.ndarray | None:
        """The layer received (``None`` at the end of the volume), once both transfers are done."""
        MPI.Request.Waitall(self._requests)
        self._requests = []
        return self._received


def pass_layer(comm: MPI.Comm, slab: Slab, layer: np.ndarray, *, upward: bool) -> np.ndarray | None:
    """Send ``layer`` to the slab above (``upward``) or below and return the one received from the
    other side (``None`` at the end of the volume). Collective over the ranks with non-empty slabs."""
    return LayerPass(comm, slab, layer, upward=upward).finish()


class SeparatorSweeps:
    """Forward, backward and apply-upper SOR sweeps of ``A`` in the separator order (collective).

    Args:
        comm: the matrix's communicator.
        slab: this rank's slab of layers.
        A: the matrix (AIJ, or SBAIJ holding the upper triangle), rows in the slab's C order;
            ``None`` with a ``kernel`` (the kernel is then the matrix: its diagonal comes from the
            caller, by :meth:`refresh` or a kernel made ``with_matrix``; the layer corrections use
            the kernel's layer sweeps).
        first, last: which voxels of this rank's first and last layer have rows (flat masks of a
            layer, ``ny * nx``).
        g_z: the conductance of a z face (the off-rank entries are ``-g_z``).
        omega: the relaxation factor.
        kernel: compiled sweeps of this rank's block (:class:`~fem_anode.fem.voxel_sweeps.VoxelSweepKernel`,
            same ``omega``), used for the block's sweeps instead of PETSc's ``MatSOR``.
    """

    def __init__(
        self,
        comm: MPI.Comm,
        slab: Slab,
        A: PETSc.Mat | None,
        first: np.ndarray,
        last: np.ndarray,
        g_z: float,
        omega: float,
        kernel: VoxelSweepKernel | None = None,
    ) -> None:
        self.comm, self.slab, self.A, self.g_z, self.omega = comm, slab, A, g_z, omega
        if kernel is not None and kernel.omega != omega:
            raise ValueError(f"the kernel's omega {kernel.omega} differs from the sweeps' {omega}")
        self.kernel = kernel
        if A is None and kernel is None:
            raise ValueError("SeparatorSweeps without a matrix needs a kernel")
        # this rank's rows and columns (values follow A)
        self.block = None if A is None else A.getDiagonalBlock() if comm.size > 1 else A
        n = A.getLocalSize()[0] if A is not None else kernel.n  # type: ignore[union-attr]  # checked above
        self.n = int(n)  # this rank's rows
        self.plane_size = first.size
        self.first_pos = np.flatnonzero(first)
        self.last_pos = np.flatnonzero(last)
        self.first_rows = np.arange(self.first_pos.size)
        self.last_rows = np.arange(n - self.last_pos.size, n)
        # the same rows as slices (contiguous: indexing by a slice is a view, no gather)
        self._row_slices = (slice(0, self.first_pos.size), slice(n - self.last_pos.size, n))
        # Wrappers of the local arrays of the vectors swept (placeArray): created on never-touched
        # np.empty buffers, so they cost no resident memory (createSeq would allocate 8 B per row each).
        self._seq = [PETSc.Vec().createWithArray(np.empty(n), comm=PETSc.COMM_SELF) for _ in range(2)]
        self._layer_is = [
            PETSc.IS().createGeneral(rows.astype(PETSc.IntType), comm=PETSc.COMM_SELF)
            for rows in (self.first_rows, self.last_rows)
        ]
        self._layer_vecs = [
            (
                PETSc.Vec().createSeq(rows.size, comm=PETSc.COMM_SELF),
                PETSc.Vec().createSeq(rows.size, comm=PETSc.COMM_SELF),
            )
            for rows in (self.first_rows, self.last_rows)
        ]
        self._kernel_sweeps: dict[int, Callable[[np.ndarray, np.ndarray], None]] = (
            {
                int(PETSc.Mat.SORType.FORWARD_SWEEP | _ZERO_GUESS): kernel.forward,
                int(PETSc.Mat.SORType.BACKWARD_SWEEP | _ZERO_GUESS): kernel.backward,
                int(PETSc.Mat.SORType.APPLY_UPPER): kernel.apply_upper,
            }
            if kernel is not None
            else {}
        )
        #: A on the rows and columns of the first layer (next to the separator below) and the last (a separator).
        self._layers: list[PETSc.Mat | None] = [None, None]
        self.refresh()

    def refresh(self, diagonal: PETSc.Vec | None = None) -> None:
        """Take the matrix's current values for the layer corrections and the kernel (after its
        diagonal changed); without a matrix, the kernel takes ``diagonal`` (if given)."""
        if self.kernel is not None:
            if self.block is not None:
                local = PETSc.Vec().createWithArray(self.kernel.dinv, comm=PETSc.COMM_SELF)
                self.block.getDiagonal(local)
                local.destroy()
                self.kernel.set_diagonal(self.kernel.dinv)
            elif diagonal is not None:
                self.kernel.set_diagonal(diagonal.array_r)
            return  # the layer corrections use the kernel's layer sweeps
        assert self.block is not None
        needed = (self.slab.prev is not None, self.slab.next is not None)
        for which in (0, 1):
            if needed[which]:
                iset = self._layer_is[which]
                self._layers[which] = self.block.createSubMatrix(iset, iset, self._layers[which])

    def block_sweep(self, b: PETSc.Vec, x: PETSc.Vec, kind: Any) -> None:
        """One sweep on this rank's block alone, on the local arrays of the vectors (no copies)."""
        if self.kernel is not None:
            sweep = self._kernel_sweeps.get(int(kind))
            if sweep is not None:
                sweep(b.array_r, x.array)
                return
        if self.block is None:
            raise ValueError(f"SOR type {kind} needs the matrix")
        src, dst = self._seq
        src.placeArray(b.array_r)  # read only: PETSc locks a shell product's input
        dst.placeArray(x.array)
        try:
            self.block.SOR(src, dst, self.omega, kind, 0.0, 1, 1)
        finally:
            src.resetArray()
            dst.resetArray()

    def layer_values(self, x: PETSc.Vec, which: int) -> np.ndarray:
        """This rank's first (0) or last (1) layer of ``x`` as a whole layer (0 where no row)."""
        layer = np.zeros(self.plane_size)
        layer[self.first_pos if which == 0 else self.last_pos] = x.array_r[self._row_slices[which]]
        return layer

    def _correct(self, which: int, x: PETSc.Vec, coupled: np.ndarray, kind: Any) -> np.ndarray:
        """``x[layer] += (D/omega + T)^{-1} (g_z coupled)`` on the first (0) or last (1) layer alone;
        returns the values added (one per row of the layer)."""
        layer = self._layers[which]
        positions, rows = (self.first_pos, self.first_rows) if which == 0 else (self.last_pos, self.last_rows)
        if rows.size == 0:
            return np.zeros(0)
        rhs, delta = self._layer_vecs[which]
        rhs.array[:] = self.g_z * coupled[positions]
        if self.kernel is not None:
            forward = int(kind) == int(PETSc.Mat.SORType.FORWARD_SWEEP)
            self.kernel.layer_sweep(int(rows[0]), rhs.array_r, delta.array, forward=forward)
        else:
            assert layer is not None
            layer.SOR(rhs, delta, self.omega, kind | _ZERO_GUESS, 0.0, 1, 1)
        x.array[self._row_slices[which]] += delta.array_r
        return delta.array_r

    @property
    def alone(self) -> bool:
        """Whether this rank's slab has no neighbours (no layers travel)."""
        return self.slab.prev is None and self.slab.next is None

    def _forward_passing(self, sweep: Callable[[tuple[int, int] | None], Any], x: PETSc.Vec) -> tuple[Any, Any]:
        """Run the kernel's forward ``sweep`` (of a row range) that writes ``x``: the first layer,
        whose values are then final (it couples below only to the separator, which comes later),
        travels to the slab below while the rest is swept. Returns the sweep's results (summed:
        the forward product's partial dot products) and the layer from the slab above."""
        if self.alone:
            return sweep(None), None
        head = int(self.first_rows.size)
        first = sweep((0, head))
        passing = LayerPass(self.comm, self.slab, self.layer_values(x, 0), upward=False)
        rest = sweep((head, self.n))
        total = None if first is None else first + rest
        return total, passing.finish()

    def _backward_passing(self, sweep: Callable[[tuple[int, int] | None], None], x: PETSc.Vec) -> Any:
        """Run the kernel's backward ``sweep`` that writes ``x``: the last layer (a separator, final
        once swept) travels to the slab above while the rest is swept. Returns the layer from the
        slab below."""
        if self.alone:
            sweep(None)
            return None
        tail = self.n - int(self.last_rows.size)
        sweep((tail, self.n))
        passing = LayerPass(self.comm, self.slab, self.layer_values(x, 1), upward=True)
        sweep((0, tail))
        return passing.finish()

    def forward(self, b: PETSc.Vec, x: PETSc.Vec) -> None:
        """``x = B^{-1} b``."""
        if self.kernel is None:
            self.block_sweep(b, x, PETSc.Mat.SORType.FORWARD_SWEEP | _ZERO_GUESS)
            self._forward_correction(x)
            return
        kernel = self.kernel
        _, above = self._forward_passing(lambda rows: kernel.forward(b.array_r, x.array, rows), x)
        self._correct_last(x, above)

    def forward_eisenstat(self, y: PETSc.Vec, t: PETSc.Vec, d: PETSc.Vec, mid: float, z: PETSc.Vec) -> None:
        """``z = B^{-1} (y + mid D t)`` (``d``: the diagonal ``D``) in one pass of the compiled
        kernel (requires ``kernel``): the forward half of Eisenstat's operator."""
        kernel = self.kernel
        assert kernel is not None
        _, above = self._forward_passing(
            lambda rows: kernel.forward_eisenstat(y.array_r, t.array_r, d.array_r, mid, z.array, rows), z
        )
        self._correct_last(z, above)

    def _forward_correction(self, x: PETSc.Vec) -> None:
        if self.alone:
            return
        self._correct_last(x, pass_layer(self.comm, self.slab, self.layer_values(x, 0), upward=False))

    def _correct_last(self, x: PETSc.Vec, above: np.ndarray | None) -> None:
        if above is not None:
            self._correct(1, x, above, PETSc.Mat.SORType.FORWARD_SWEEP)

    def _correct_first(self, x: PETSc.Vec, below: np.ndarray | None) -> None:
        if below is not None:
            self._correct(0, x, below, PETSc.Mat.SORType.BACKWARD_SWEEP)

    def backward(self, b: PETSc.Vec, x: PETSc.Vec) -> None:
        """``x = B^{-T} b``."""
        if self.kernel is None:
            self.block_sweep(b, x, PETSc.Mat.SORType.BACKWARD_SWEEP | _ZERO_GUESS)
            if not self.alone:
                self._correct_first(x, pass_layer(self.comm, self.slab, self.layer_values(x, 1), upward=True))
            return
        kernel = self.kernel
        self._correct_first(x, self._backward_passing(lambda rows: kernel.backward(b.array_r, x.array, rows), x))

    def cg_direction_backward(
        self,
        r: PETSc.Vec,
        d: PETSc.Vec,
        beta: float,
        p: PETSc.Vec,
        t: PETSc.Vec,
        pending: tuple[float, PETSc.Vec] | None = None,
    ) -> None:
        """``p = D r + beta p``, then ``t = B^{-T} p`` (one pass of the compiled kernel, which is
        required); with ``pending = (alpha, y)`` first ``y += alpha p`` on the way (each row
        before ``p`` changes there)."""
        kernel = self.kernel
        assert kernel is not None
        on_the_way = None if pending is None else (pending[0], pending[1].array)
        below = self._backward_passing(
            lambda rows: kernel.cg_direction_backward(
                r.array_r, d.array_r, beta, p.array, t.array, rows, pending=on_the_way
            ),
            t,
        )
        self._correct_first(t, below)

    def cg_forward_product(self, p: PETSc.Vec, t: PETSc.Vec, d: PETSc.Vec, mid: float, w: PETSc.Vec) -> float:
        """``w = z + t``, ``z = B^{-1} (p + mid D t)`` (Eisenstat's operator applied to ``p``, ``t``
        from :meth:`cg_direction_backward`; ``z`` overwrites ``t``) in one pass of the compiled
        kernel; returns this rank's part of ``p . w`` (not reduced)."""
        kernel = self.kernel
        assert kernel is not None
        product, above = self._forward_passing(
            lambda rows: kernel.cg_forward_product(p.array_r, t.array, d.array_r, mid, w.array, rows), t
        )
        if above is not None and self.last_rows.size:
            delta = self._correct(1, t, above, PETSc.Mat.SORType.FORWARD_SWEEP)
            last = self._row_slices[1]
            w.array[last] += delta
            product += float(np.dot(p.array_r[last], delta))
        return product

    def cg_start(
        self, b: PETSc.Vec, x: PETSc.Vec, d: PETSc.Vec, mid: float, out: tuple[PETSc.Vec, ...]
    ) -> tuple[float, float]:
        """The start of :meth:`EisenstatCG.solve` in one pass of the compiled kernel (required):
        into ``out = (y, bh, z, r)``, ``y = B^T x``, ``bh = B^{-1} b``, ``z = B^{-1} (y + mid D x)``
        and ``r = bh - (z + x)``; returns this rank's ``bh . D bh`` and ``r . D r`` (not reduced).
        Across slabs: the layer of ``x`` below enters ``y`` on the first layer before the pass, and
        after it the separator (last layer) takes the corrections of ``bh`` and ``z`` from the first
        layer above, as in :meth:`forward`; its ``r`` and its share of the sums follow."""
        kernel = self.kernel
        assert kernel is not None
        y, bh, z, r = out
        arrays = (y.array, bh.array, z.array, r.array)
        if self.alone:
            return kernel.cg_start(b.array_r, x.array_r, d.array_r, mid, arrays)
        below = pass_layer(self.comm, self.slab, self.layer_values(x, 1), upward=True)
        q = None if below is None else -self.g_z * below[self.first_pos]
        corrected = self.slab.next is not None  # the last layer is a separator
        n_summed = self.last_rows[0] if corrected and self.last_rows.size else len(d.array_r)
        sums = kernel.cg_start(b.array_r, x.array_r, d.array_r, mid, arrays, q=q, summed=int(n_summed))
        both = np.concatenate([self.layer_values(bh, 0), self.layer_values(z, 0)])
        above = pass_layer(self.comm, self.slab, both, upward=False)
        if above is None:
            return sums
        rows = self._row_slices[1]
        self._correct(1, bh, above[: self.plane_size], PETSc.Mat.SORType.FORWARD_SWEEP)
        self._correct(1, z, above[self.plane_size :], PETSc.Mat.SORType.FORWARD_SWEEP)
        bh_last, z_last, dd = bh.array_r[rows], z.array_r[rows], d.array_r[rows]
        r_last = bh_last - (z_last + x.array_r[rows])
        r.array[rows] = r_last
        return sums[0] + float(bh_last @ (dd * bh_last)), sums[1] + float(r_last @ (dd * r_last))

    def apply_upper(self, x: PETSc.Vec, y: PETSc.Vec) -> None:
        """``y = B^T x = (D/omega + U) x`` (AIJ blocks only: PETSc's SBAIJ has no apply-upper)."""
        if self.alone:
            self.block_sweep(x, y, PETSc.Mat.SORType.APPLY_UPPER)
            return
        passing = LayerPass(self.comm, self.slab, self.layer_values(x, 1), upward=True)  # x is known
        self.block_sweep(x, y, PETSc.Mat.SORType.APPLY_UPPER)
        below = passing.finish()
        if below is not None and self.first_rows.size:
            y.array[self._row_slices[0]] -= self.g_z * below[self.first_pos]

    def add_off_rank(self, t: PETSc.Vec, w: PETSc.Vec) -> None:
        """``w += O t``, ``O`` the couplings to the neighbouring slabs (block Jacobi, which leaves
        them out of the sweeps, adds them here): both boundary layers travel both ways."""
        below, above = exchange_layers(self.comm, self.slab, self.layer_values(t, 0), self.layer_values(t, 1))
        if below is not None:
            w.array[self._row_slices[0]] -= self.g_z * below[self.first_pos]
        if above is not None:
            w.array[self._row_slices[1]] -= self.g_z * above[self.last_pos]

    def mult(self, x: PETSc.Vec, y: PETSc.Vec) -> None:
        """``y = A x`` by the kernel and the off-rank couplings (a kernel made ``with_matrix``)."""
        assert self.kernel is not None
        self.kernel.mult(x.array_r, y.array)
        if not self.alone:
            self.add_off_rank(x, y)

    def destroy(self) -> None:
        """Free the PETSc objects (the matrix belongs to the caller)."""
        for obj in (*self._seq, *self._layer_is, *(v for pair in self._layer_vecs for v in pair), *self._layers):
            if obj is not None:
                obj.destroy()


class SeparatorSSOR:
    """SSOR preconditioner in the separator order, a PETSc ``PCPYTHON`` context:
    ``z = B^{-T} D B^{-1} r`` (the symmetric SOR preconditioner up to the factor (2 - omega)/omega,
    which CG does not see). For an SBAIJ or AIJ matrix, whose diagonal is read at :meth:`setUp`,
    or for sweeps whose kernel is the matrix (its ``d``, no copy)."""

    def __init__(self, sweeps: SeparatorSweeps) -> None:
        self.sweeps = sweeps
        if sweeps.A is not None:
            self.d = sweeps.A.createVecLeft()
        else:
            assert sweeps.kernel is not None and sweeps.kernel.d is not None
            self.d = PETSc.Vec().createWithArray(
                sweeps.kernel.d, size=(sweeps.kernel.n, PETSc.DECIDE), comm=sweeps.comm
            )
        self.work = self.d.duplicate()

    def setUp(self, pc: Any) -> None:
        if self.sweeps.A is not None:
            self.sweeps.A.getDiagonal(self.d)
        self.sweeps.refresh()

    def apply(self, pc: Any, r: PETSc.Vec, z: PETSc.Vec) -> None:
        self.sweeps.forward(r, self.work)
        self.work.pointwiseMult(self.work, self.d)
        self.sweeps.backward(self.work, z)

    def destroy(self, pc: Any = None) -> None:
        """Free the work vectors and the sweeps' objects."""
        for vec in (self.d, self.work):
            vec.destroy()
        self.sweeps.destroy()


class SeparatorMatrix:
    """``A`` as a PETSc ``MATPYTHON`` context from sweeps whose kernel is the matrix: the mat-vec
    is the kernel's plus the off-rank couplings, no assembled matrix (33 B per row in all)."""

    def __init__(self, sweeps: SeparatorSweeps) -> None:
        if sweeps.kernel is None or sweeps.kernel.d is None:
            raise ValueError("SeparatorMatrix needs sweeps with a kernel made with_matrix")
        self.sweeps = sweeps

    def mult(self, mat: Any, x: PETSc.Vec, y: PETSc.Vec) -> None:
        self.sweeps.mult(x, y)

    def as_petsc(self) -> PETSc.Mat:
        """The PETSc matrix (collective)."""
        n = self.sweeps.kernel.n  # type: ignore[union-attr]  # checked in __init__
        mat = PETSc.Mat().createPython(((n, PETSc.DECIDE), (n, PETSc.DECIDE)), context=self, comm=self.sweeps.comm)
        mat.setUp()
        return mat


class OffRankCouplings:
    """``q = O t``: the couplings of this rank's rows to other ranks' columns of an ``MPIAIJ`` matrix
    ``A = K + s M`` (the off-diagonal blocks of ``K`` and ``M``, one pattern) applied to a
    distributed vector (one scatter of the ghost columns). Collective.

    The block is kept as CSR arrays over the coupled rows and applied by the compiled kernels
    (``fa_csr_rows_product``): no SciPy, whose import alone costs about 28 MB per rank.

    Args:
        K: the matrix (``mpiaij``), or ``K`` of ``K + s M``; the pattern must not change (nor, with
            ``M``, the values).
        like: a vector of the matrix's column layout (for the scatter).
        library: the compiled kernels (:func:`~fem_anode.fem.voxel_sweeps.load_sweep_library`).
        M: ``M`` of ``K + s M`` (same pattern as ``K``), or none (``A = K``).
        order: for vectors whose local entries are permuted on every rank (entry ``i`` holds the
            matrix's local row ``order[i]``, e.g. :class:`~fem_anode.fem.grid_stencil.GridStencilKernel`'s
            order): ``t`` and ``q`` are in that order; ``None``: the matrix's order.
    """

    def __init__(
        self,
        K: PETSc.Mat,
        like: PETSc.Vec,
        library: Any,
        M: PETSc.Mat | None = None,
        order: np.ndarray | None = None,
    ) -> None:
        from fem_anode.fem.voxel_sweeps import mpiaij_off_block

        (indptr, indices, k_values), ghosts = mpiaij_off_block(K)
        m_values: np.ndarray | None = None
        if M is not None:
            (m_indptr, m_indices, m_values), m_ghosts = mpiaij_off_block(M)
            if not (np.array_equal(m_indptr, indptr) and np.array_equal(m_indices, indices)):
                raise ValueError("OffRankCouplings: K and M differ in their off-rank pattern")
            if not np.array_equal(m_ghosts, ghosts):
                raise ValueError("OffRankCouplings: K and M differ in their ghost columns")
        n = K.getLocalSize()[0]
        # only the rows with off-rank couplings (a few layers of a slab-partitioned mesh)
        indptr = np.asarray(indptr, np.int64)
        rows = np.flatnonzero(np.diff(indptr)).astype(np.int32)
        # the empty rows hold no entries: the coupled rows' entries are all of them, in order
        row_ptr = np.append(indptr[rows], indptr[-1]) - indptr[0]
        columns = np.asarray(indices, np.int32)
        m_rows = None if m_values is None else np.asarray(m_values, np.float64)
        self._finish(
            n,
            rows,
            row_ptr,
            columns,
            np.asarray(k_values, np.float64),
            m_rows,
            np.asarray(ghosts),
            like,
            library,
            order,
        )

    @classmethod
    def from_rows(
        cls,
        n: int,
        rows: np.ndarray,
        indptr: np.ndarray,
        columns: np.ndarray,
        k_values: np.ndarray,
        m_values: np.ndarray,
        like: PETSc.Vec,
        library: Any,
        order: np.ndarray | None = None,
    ) -> OffRankCouplings:
        """The couplings given as CSR rows: ``rows`` (local, ascending) of ``n``, their entries'
        global ``columns`` (other ranks' rows, ascending within a row) and the values of ``K`` and
        ``M`` (collective; e.g. :attr:`~fem_anode.fem.voxel_p1.VoxelP1Operator.off_rank`).
        ``like``, ``library``, ``order``: as for the constructor."""
        ghosts, local = np.unique(np.asarray(columns, np.int64), return_inverse=True)
        row_ptr = np.asarray(indptr, np.int64)
        within = np.ones(max(local.size - 1, 0), bool)  # entry k and k + 1 are in one row
        within[row_ptr[1:-1][(row_ptr[1:-1] > 0) & (row_ptr[1:-1] < local.size)] - 1] = False
        if bool(np.any(np.diff(local)[within] <= 0)):
            raise ValueError("OffRankCouplings: the columns of a row must ascend")
        out = cls.__new__(cls)
        out._finish(
            n,
            np.asarray(rows, np.int32),
            row_ptr,
            local.astype(np.int32),
            np.asarray(k_values, np.float64),
            np.asarray(m_values, np.float64),
            ghosts,
            like,
            library,
            order,
        )
        return out

    def _finish(
        self,
        n: int,
        rows: np.ndarray,
        row_ptr: np.ndarray,
        columns: np.ndarray,
        k_values: np.ndarray,
        m_values: np.ndarray | None,
        ghosts: np.ndarray,
        like: PETSc.Vec,
        library: Any,
        order: np.ndarray | None,
    ) -> None:
        """The scatter of the ghost columns and the blocks (see the constructor)."""
        self.library = library
        #: the coupled rows (in the vectors' order), their CSR pointers and ghost columns (local indices)
        self.rows, self.row_ptr, self.columns = rows, row_ptr, columns
        self.k_values, self.m_values = k_values, m_values
        #: the values of ``O`` for the last :meth:`set_scale` (``K``'s without ``M``)
        self.values = k_values.copy() if m_values is not None else k_values
        self.ghost_values = PETSc.Vec().createSeq(ghosts.size, comm=PETSc.COMM_SELF)
        index_set = PETSc.IS().createGeneral(ghosts.astype(PETSc.IntType), comm=PETSc.COMM_SELF)
        self.scatter = PETSc.Scatter().create(like, index_set, self.ghost_values, None)
        index_set.destroy()
        if order is not None:  # the ghosts' positions in the permuted vectors: ask their owners
            inverse = np.empty(n, np.int64)
            inverse[order] = np.arange(n)
            positions = like.duplicate()
            positions.array[:] = like.getOwnershipRange()[0] + inverse
            self.scatter.scatter(
                positions, self.ghost_values, PETSc.InsertMode.INSERT_VALUES, PETSc.ScatterMode.FORWARD
            )
            permuted = np.rint(self.ghost_values.array_r).astype(PETSc.IntType)
            positions.destroy()
            self.scatter.destroy()
            index_set = PETSc.IS().createGeneral(permuted, comm=PETSc.COMM_SELF)
            self.scatter = PETSc.Scatter().create(like, index_set, self.ghost_values, None)
            index_set.destroy()
            self.rows = inverse[self.rows].astype(np.int32)
            ghosts = permuted
        #: the ghost columns' global indices (in the numbering of the vectors ``t``)
        self.ghost_indices = np.asarray(ghosts, dtype=np.int64)
        self.n = n
        self._q: np.ndarray | None = None
        self._on_rows = np.zeros(self.rows.size)
        self._iota = np.arange(self.rows.size, dtype=np.int32)

    @property
    def q(self) -> np.ndarray:
        """A vector of the rows' length for the products (made on first use: 8 B per row)."""
        if self._q is None:
            self._q = np.zeros(self.n)
        return self._q

    def set_scale(self, scale: float) -> None:
        """``O`` of ``K + scale M`` from ``K`` and ``M``'s values (without ``M``: nothing to do)."""
        if self.m_values is not None:
            np.multiply(self.m_values, scale, out=self.values)
            self.values += self.k_values

    def rows_product(
        self,
        values: np.ndarray,
        ghost_values: np.ndarray,
        out: np.ndarray,
        coupled: tuple[int, int] | None = None,
        positions: np.ndarray | None = None,
    ) -> None:
        """``out[positions] = B g`` for the block ``B`` with the entries ``values`` (this object's
        pattern) and the ghost columns' values ``g``, on the coupled rows ``rows[k0 .. k1 - 1]``
        (``coupled = (k0, k1)``; all of them by default); ``positions`` (int32, one per row; default
        the rows themselves) say where in ``out`` each row's value goes; the other entries of ``out``
        are left alone."""
        k0, k1 = coupled if coupled is not None else (0, self.rows.size)
        if not 0 <= k0 <= k1 <= self.rows.size:
            raise ValueError("OffRankCouplings.rows_product: coupled rows out of range")
        at = self.rows[k0:k1] if positions is None else positions
        if values.shape != (self.columns.size,) or ghost_values.shape != (self.ghost_indices.size,):
            raise ValueError("OffRankCouplings.rows_product: arrays of the wrong size")
        if (
            at.shape != (k1 - k0,)
            or at.dtype != np.int32
            or (at.size and not 0 <= int(at.min()) <= int(at.max()) < out.size)
        ):
            raise ValueError("OffRankCouplings.rows_product: positions do not fit out")
        arrays = (self.row_ptr[k0:], self.columns, values, ghost_values, at, out)
        if out.dtype != np.float64 or not all(a.flags.c_contiguous for a in arrays):
            raise ValueError("OffRankCouplings.rows_product: arrays must be contiguous (out float64)")
        self.library.fa_csr_rows_product(k1 - k0, *(a.ctypes.data for a in arrays))

    def mass_product_on_rows(self, t: PETSc.Vec) -> np.ndarray:
        """``M_off t`` on the coupled rows ``rows`` only (requires ``M``; an array owned by this
        object, overwritten by the next call)."""
        if self.m_values is None:
            raise ValueError("OffRankCouplings.mass_product_on_rows needs M")
        self.scatter.scatter(t, self.ghost_values, PETSc.InsertMode.INSERT_VALUES, PETSc.ScatterMode.FORWARD)
        self.rows_product(self.m_values, self.ghost_values.array_r, self._on_rows, positions=self._iota)
        return self._on_rows

    def mass_product(self, t: PETSc.Vec) -> np.ndarray:
        """``M_off t`` on this rank's rows (``M``'s couplings to other ranks' rows; requires ``M``;
        an array owned by this object, overwritten by the next call)."""
        if self.m_values is None:
            raise ValueError("OffRankCouplings.mass_product needs M")
        return self._apply(self.m_values, t)

    def product(self, t: PETSc.Vec) -> np.ndarray:
        """``O t`` on this rank's rows (an array owned by this object, overwritten by the next call)."""
        return self._apply(self.values, t)

    def _apply(self, values: np.ndarray, t: PETSc.Vec) -> np.ndarray:
        self.scatter.scatter(t, self.ghost_values, PETSc.InsertMode.INSERT_VALUES, PETSc.ScatterMode.FORWARD)
        self.rows_product(values, self.ghost_values.array_r, self.q)
        return self.q

    def destroy(self) -> None:
        self.scatter.destroy()
        self.ghost_values.destroy()


class LocalSweeps:
    """The sweeps of :class:`EisenstatCG` by a compiled kernel of each rank's own rows: SSOR on one
    rank, block-Jacobi SSOR on several (``B = D/omega + L`` of each rank's diagonal block). The
    couplings ``O`` between the ranks' rows then enter Eisenstat's operator as
    ``Â y = t + B^{-1} (y + (1 - 2/omega) D t + O t)`` (from ``A = B + B^T - (2/omega - 1) D + O``),
    one scatter of ``t``'s ghost columns per application; e.g. the CSR kernel of a P1 matrix.

    Args:
        comm: the matrix's communicator.
        kernel: the compiled kernel of this rank's rows (:class:`~fem_anode.fem.voxel_sweeps.CSRSweepKernel`,
            :class:`~fem_anode.fem.grid_stencil.GridStencilKernel`;
            a :class:`~fem_anode.fem.voxel_sweeps.VoxelSweepKernel` on one rank).
        off: the couplings to other ranks' rows (required on several ranks).
    """

    def __init__(
        self,
        comm: MPI.Comm,
        kernel: CSRSweepKernel | GridStencilKernel | VoxelSweepKernel,
        off: OffRankCouplings | None = None,
    ) -> None:
        if comm.size > 1 and (off is None or isinstance(kernel, VoxelSweepKernel)):
            raise ValueError("LocalSweeps on several ranks needs a CSR or grid kernel and the off-rank couplings")
        self.comm, self.kernel, self.omega, self.off = comm, kernel, kernel.omega, off

    def forward(self, b: PETSc.Vec, x: PETSc.Vec) -> None:
        """``x = B^{-1} b``."""
        self.kernel.forward(b.array_r, x.array)

    def backward(self, b: PETSc.Vec, x: PETSc.Vec) -> None:
        """``x = B^{-T} b``."""
        self.kernel.backward(b.array_r, x.array)

    def apply_upper(self, x: PETSc.Vec, y: PETSc.Vec) -> None:
        """``y = B^T x``."""
        self.kernel.apply_upper(x.array_r, y.array)

    def forward_eisenstat(self, y: PETSc.Vec, t: PETSc.Vec, d: PETSc.Vec, mid: float, z: PETSc.Vec) -> None:
        """``z = B^{-1} (y + mid D t + O t)``."""
        if self.off is None:
            self.kernel.forward_eisenstat(y.array_r, t.array_r, d.array_r, mid, z.array)
            return
        assert not isinstance(self.kernel, VoxelSweepKernel)
        self.kernel.forward_eisenstat(y.array_r, t.array_r, d.array_r, mid, z.array, q=self.off.product(t))

    def start(
        self, b: PETSc.Vec, x: PETSc.Vec, d: PETSc.Vec, mid: float, y: PETSc.Vec, r: PETSc.Vec, w: PETSc.Vec
    ) -> float | None:
        """The start of :meth:`EisenstatCG.solve` in one pass where the kernel has it (the grid
        stencil on one rank): ``y = B^T x``, ``r = B^{-1} b``, ``w = B^{-1} (y + mid D x)``; returns
        ``r . D r``, or ``None`` (then the caller makes the three passes)."""
        if self.off is not None or not isinstance(self.kernel, GridStencilKernel):
            return None
        return self.kernel.cg_start(b.array_r, x.array_r, d.array_r, mid, y.array, r.array, w.array)

    def cg_direction_backward(self, r: PETSc.Vec, d: PETSc.Vec, beta: float, p: PETSc.Vec, t: PETSc.Vec) -> None:
        """``p = D r + beta p``, then ``t = B^{-T} p``."""
        self.kernel.cg_direction_backward(r.array_r, d.array_r, beta, p.array, t.array)

    def cg_forward_product(self, p: PETSc.Vec, t: PETSc.Vec, d: PETSc.Vec, mid: float, w: PETSc.Vec) -> float:
        """``w = z + t``, ``z = B^{-1} (p + mid D t + O t)`` overwriting ``t``; returns this rank's
        part of ``p . w``."""
        if self.off is None:
            return self.kernel.cg_forward_product(p.array_r, t.array, d.array_r, mid, w.array)
        assert not isinstance(self.kernel, VoxelSweepKernel)
        q = self.off.product(t)
        return self.kernel.cg_forward_product(p.array_r, t.array, d.array_r, mid, w.array, q=q)


class EisenstatCG:
    r"""Conjugate gradients with SSOR by Eisenstat's trick, in fused passes of the compiled kernel
    (collective): ``A x = b`` for sweeps whose kernel holds ``A``'s stencil, on one rank or in the
    separator order (:class:`SeparatorSweeps`), or for each rank's rows of a CSR matrix
    (:class:`LocalSweeps`: SSOR on one rank, block-Jacobi SSOR on several).

    With ``B = D/omega + L``, CG runs on ``Â = B^{-1} A B^{-T}`` with the preconditioner ``D``
    (CG on ``A`` with SSOR, as PETSc's ``PCEISENSTAT``); ``Â y = t + B^{-1}(y + (1 - 2/omega) D t)``
    with ``t = B^{-T} y``. The right-hand side is ``b̂ = B^{-1} b``, the initial guess
    ``ŷ_0 = B^T x_0`` and the solution ``x = B^{-T} ŷ``.

    An iteration is three passes over the vectors instead of PETSc's eight (``KSPCG``'s five vector
    operations, the preconditioner's product with ``D`` and the ``+ t`` of ``Â``): ``p = D r + beta p``
    fused into the backward sweep, ``w = Â p`` and ``p . w`` into the forward sweep, ``ŷ += alpha p``,
    ``r -= alpha w`` and ``r . D r`` into one update. The initial residual needs no backward sweep
    (``B^{-T} ŷ_0 = x_0``). It is ``KSPCG``'s algorithm with the natural norm and
    ``KSPConvergedDefault`` with a nonzero initial guess: converged when
    ``sqrt(r . D r) <= rtol sqrt(b̂ . D b̂)``, PETSc's reasons on failure (``reason``); only the order
    of the sums in the dot products differs.

    Args:
        sweeps: the sweeps, with a compiled kernel (its ``omega`` is SSOR's).
        d: the diagonal of ``A`` (distributed like ``x``).
        rtol: relative tolerance.
        max_it: iteration limit.
        work: a vector to use for ``w`` (else one is made).
    """

    def __init__(
        self,
        sweeps: SeparatorSweeps | LocalSweeps | GridSeparatorSweeps | GridSlabSweeps,
        d: PETSc.Vec,
        rtol: float,
        max_it: int,
        work: PETSc.Vec | None = None,
    ) -> None:
        if sweeps.kernel is None:
            raise ValueError("EisenstatCG needs sweeps with a compiled kernel")
        self.sweeps, self.d, self.rtol, self.max_it = sweeps, d, float(rtol), int(max_it)
        self.mid = 1.0 - 2.0 / sweeps.omega  # Eisenstat's middle term: (1 - 2/omega) D
        self.r, self.y, self.t, self.p = (d.duplicate() for _ in range(4))
        self._own_w = work is None
        self.w = d.duplicate() if work is None else work
        #: PETSc's ``KSPConvergedReason`` of the last solve, its iterations and natural residual norms.
        self.reason, self.iterations = 0, 0
        self.history: np.ndarray = np.zeros(0)

    def solve(self, b: PETSc.Vec, x: PETSc.Vec) -> None:
        """Solve ``A x = b`` from the initial guess in ``x``."""
        sweeps, d, mid, comm = self.sweeps, self.d, self.mid, self.sweeps.comm
        kernel = sweeps.kernel
        assert kernel is not None  # checked in __init__
        r, y, t, w, p = self.r, self.y, self.t, self.w, self.p
        reasons = PETSc.KSP.ConvergedReason
        # b̂ = B^{-1} b, ŷ_0 = B^T x_0, w = B^{-1} (ŷ_0 + mid D x_0) and r = b̂ - Â ŷ_0 = b̂ - (w + x_0)
        # (Â ŷ_0 = t + B^{-1} (ŷ_0 + mid D t) with t = B^{-T} ŷ_0 = x_0)
        if isinstance(sweeps, SeparatorSweeps):  # in one pass; b̂ goes to t, free until the first iteration
            sums = comm.allreduce(np.array(sweeps.cg_start(b, x, d, mid, (y, t, w, r))))
            bnorm, rz = math.sqrt(abs(float(sums[0]))), float(sums[1])
        else:
            started = sweeps.start(b, x, d, mid, y, r, w) if isinstance(sweeps, LocalSweeps) else None
            if started is None:
                sweeps.forward(b, r)
                sweeps.apply_upper(x, y)
                started = kernel.weighted_dot(r.array_r, d.array_r, r.array_r)
                sweeps.forward_eisenstat(y, x, d, mid, w)
            bnorm = math.sqrt(abs(comm.allreduce(started)))
            w.axpy(1.0, x)
            r.axpy(-1.0, w)
            rz = comm.allreduce(kernel.weighted_dot(r.array_r, d.array_r, r.array_r))
        rnorm = math.sqrt(abs(rz))
        history = [rnorm]
        norm0 = bnorm if bnorm > 0.0 else rnorm
        tolerance = self.rtol * norm0
        reason, iterations, pw_old, rz_old = 0, 0, 0.0, 0.0
        # With the voxel kernel, ŷ += alpha p is deferred into the next iteration's first pass over p
        # (pending), which leaves the update pass r, w and D to read: the same values bit for bit.
        deferred = isinstance(sweeps, SeparatorSweeps)
        pending: tuple[float, PETSc.Vec] | None = None
        if not math.isfinite(rnorm):
            reason = int(reasons.DIVERGED_NANORINF)
        elif rnorm <= tolerance:
            reason = int(reasons.CONVERGED_RTOL)
        while reason == 0:
            if iterations == self.max_it:
                reason = int(reasons.DIVERGED_MAX_IT)
                break
            iterations += 1
            if rz == 0.0:
                reason = int(reasons.CONVERGED_ATOL)
                break
            beta = 0.0 if iterations == 1 else rz / rz_old
            if pending is not None:
                assert isinstance(sweeps, SeparatorSweeps)
                sweeps.cg_direction_backward(r, d, beta, p, t, pending=pending)
                pending = None
            else:
                sweeps.cg_direction_backward(r, d, beta, p, t)
            pw = comm.allreduce(sweeps.cg_forward_product(p, t, d, mid, w))
            if not math.isfinite(pw):
                reason = int(reasons.DIVERGED_NANORINF)
                break
            if pw == 0.0 or (iterations > 1 and pw * pw_old < 0.0):
                reason = int(reasons.DIVERGED_INDEFINITE_MAT)
                break
            pw_old, rz_old = pw, rz
            alpha = rz / pw
            if deferred:
                rz = comm.allreduce(kernel.cg_update_residual(alpha, w.array_r, d.array_r, r.array))
                pending = (alpha, y)
            else:
                rz = comm.allreduce(kernel.cg_update(alpha, p.array_r, w.array_r, d.array_r, y.array, r.array))
            rnorm = math.sqrt(abs(rz))
            history.append(rnorm)
            if not math.isfinite(rnorm):
                reason = int(reasons.DIVERGED_NANORINF)
            elif rnorm <= tolerance:
                reason = int(reasons.CONVERGED_RTOL)
            elif rnorm >= 1e5 * norm0:  # PETSc's default divergence tolerance
                reason = int(reasons.DIVERGED_DTOL)
        if pending is not None:  # the last iteration's ŷ += alpha p
            kernel.axpy(pending[0], p.array_r, y.array)
        sweeps.backward(y, x)
        if reason < 0:
            # A failed solve may leave NaN or inf in the work vectors, and the next solve reads
            # stale entries (times a zero coefficient at absent neighbours of the grid stencil, and
            # p times beta = 0): it starts from zeros instead.
            for vec in (r, y, t, w, p):
                vec.zeroEntries()
        self.reason, self.iterations, self.history = reason, iterations, np.array(history)

    def destroy(self) -> None:
        """Free the vectors made here (not the sweeps, ``d`` or a borrowed ``work``)."""
        for vec in (self.r, self.y, self.t, self.p, *((self.w,) if self._own_w else ())):
            vec.destroy()
