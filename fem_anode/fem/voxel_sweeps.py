r"""Compiled SOR sweeps of the face-neighbour operator of a voxel image, about twice as fast as
PETSc's ``MatSOR``.

The finite-volume matrices of the transient diffusion and of the tortuosity factor are
``A = D - G``: a diagonal ``D`` and ``-g_axis`` for every face between two voxels of the
transporting phase (``g_axis`` the same for every face normal to an axis). A sweep of
``D/omega + L`` is a recurrence along the rows; PETSc's general ``MatSOR`` for AIJ matrices reads
each row's entries and the previous row's result back through memory, so a sweep of a 7-point
matrix takes as long as a whole mat-vec. The kernels in ``voxel_sweeps.c`` store only what the
stencil needs (the y and z neighbours' rows, 2 x 4 B each way, and a byte of flags per row; the x
neighbours are the adjacent rows) and keep the previous row in a register: one fused multiply-add
per row on the critical path.

They are compiled with the system's C compiler (``$CC`` or ``cc``, the one dolfinx's form
compiler uses) on first use and cached in ``$FEM_ANODE_CACHE_DIR`` (default
``$XDG_CACHE_HOME/fem_anode`` or ``~/.cache/fem_anode``); without a compiler the callers fall back
to PETSc's sweeps (``solver.sweep_kernel``).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from mpi4py import MPI

from fem_anode.fem.compiled import CompileError, compiled_library, load_collectively

__all__ = [
    "CSRSweepKernel",
    "SplitCSRSweepKernel",
    "SweepKernelUnavailable",
    "VoxelSweepKernel",
    "face_diagonal",
    "load_sweep_library",
    "mpiaij_off_block",
    "seqaij_arrays",
    "geodesic_distance",
    "squared_distance",
    "step_lengths",
]

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("voxel_sweeps.c")
# Functions and loops on cache-line boundaries: the sweeps are recurrences whose speed otherwise
# moved by 5-8 % with the code placed before them in the file (measured on the 128^3 electrode).
_FLAGS = ("-O3", "-falign-functions=64", "-falign-loops=64", "-std=c99", "-fPIC", "-shared")
_library: ctypes.CDLL | None = None


class SweepKernelUnavailable(RuntimeError):
    """The sweep kernels could not be compiled or loaded (the message says why)."""


def _load_local() -> ctypes.CDLL:
    """The kernels on this rank (raises :class:`CompileError`, which the collective caller turns
    into :class:`SweepKernelUnavailable` on every rank)."""
    library = compiled_library(_SOURCE, os.environ.get("CC", "cc"), _FLAGS, ("-lm",), native=True)
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    library.fa_apply_upper.argtypes = [size, *[pointer] * 6]
    library.fa_apply_upper.restype = None
    for name in ("fa_forward", "fa_backward"):
        function = getattr(library, name)
        function.argtypes = [size, size, *[pointer] * 6]
        function.restype = None
    for name in ("fa_forward_layer", "fa_backward_layer"):
        function = getattr(library, name)
        function.argtypes = [size, size, pointer, pointer, pointer, pointer, pointer, pointer]
        function.restype = None
    library.fa_mult.argtypes = [size, *[pointer] * 7]
    library.fa_mult.restype = None
    library.fa_forward_eisenstat.argtypes = [size, size, pointer, pointer, pointer, ctypes.c_double, *[pointer] * 5]
    library.fa_forward_eisenstat.restype = None
    double = ctypes.c_double
    library.fa_cg_direction_backward.argtypes = [size, size, pointer, pointer, double, pointer, double, *[pointer] * 6]
    library.fa_cg_direction_backward.restype = None
    library.fa_cg_forward_product.argtypes = [size, size, pointer, pointer, pointer, double, *[pointer] * 5]
    library.fa_cg_forward_product.restype = double
    library.fa_cg_update.argtypes = [size, double, *[pointer] * 5]
    library.fa_cg_update_residual.argtypes = [size, double, pointer, pointer, pointer]
    library.fa_cg_update_residual.restype = double
    library.fa_axpy.argtypes = [size, double, pointer, pointer]
    library.fa_axpy.restype = None
    library.fa_cg_update.restype = double
    library.fa_weighted_dot.argtypes = [size, pointer, pointer, pointer]
    library.fa_weighted_dot.restype = double
    library.fa_csr_split_pattern.argtypes = [size, *[pointer] * 5]
    library.fa_csr_split_pattern.restype = None
    library.fa_csr_split_values.argtypes = [size, pointer, pointer, pointer, pointer, double, pointer, pointer, pointer]
    library.fa_csr_split_values.restype = None
    library.fa_csr_diagonal_positions.argtypes = [size, pointer, pointer, pointer]
    library.fa_csr_diagonal_positions.restype = size
    for name in ("fa_csr_forward", "fa_csr_backward", "fa_csr_apply_upper"):
        function = getattr(library, name)
        function.argtypes = [size, *[pointer] * 7]
        function.restype = None
    library.fa_csr_forward_eisenstat.argtypes = [size, pointer, pointer, pointer, double, *[pointer] * 7]
    library.fa_csr_forward_eisenstat.restype = None
    library.fa_csr_cg_direction_backward.argtypes = [size, pointer, pointer, double, *[pointer] * 7]
    library.fa_csr_cg_direction_backward.restype = None
    library.fa_csr_cg_forward_product.argtypes = [size, pointer, pointer, pointer, double, *[pointer] * 7]
    library.fa_csr_cg_forward_product.restype = double
    for name in ("fa_st_forward", "fa_st_backward", "fa_st_apply_upper"):
        function = getattr(library, name)
        function.argtypes = [pointer, pointer, pointer, pointer]
        function.restype = None
    library.fa_st_mult.argtypes = [pointer, pointer, pointer]
    library.fa_st_mult.restype = None
    library.fa_st_forward_eisenstat.argtypes = [pointer, pointer, pointer, pointer, double, pointer, pointer]
    library.fa_st_forward_eisenstat.restype = None
    library.fa_st_cg_direction_backward.argtypes = [pointer, pointer, pointer, double, pointer, pointer, pointer]
    library.fa_st_cg_direction_backward.restype = None
    library.fa_st_cg_forward_product.argtypes = [pointer, pointer, pointer, pointer, double, pointer, pointer]
    library.fa_st_cg_forward_product.restype = double
    library.fa_st_row_keys.argtypes = [size, *[pointer] * 7, double, double, *[pointer] * 4]
    library.fa_st_row_keys.restype = size
    library.fa_st_cg_start.argtypes = [pointer, pointer, pointer, pointer, double, pointer, pointer, pointer]
    library.fa_st_cg_start.restype = double
    library.fa_csr_rows_product.argtypes = [size, *[pointer] * 6]
    library.fa_csr_rows_product.restype = None
    library.fa_gather.argtypes = [size, pointer, pointer, pointer]
    library.fa_gather.restype = None
    library.fa_edt_squared.argtypes = [size, size, size, double, double, double, pointer]
    library.fa_edt_squared.restype = size
    library.fa_geodesic.argtypes = [size, size, size, pointer, pointer, size, size, size, pointer, pointer]
    library.fa_geodesic.restype = size
    library.fa_cg_start.argtypes = [size, *[pointer] * 3, double, *[pointer] * 5, size, pointer, size, *[pointer] * 5]
    library.fa_cg_start.restype = None
    return library


def load_sweep_library(comm: MPI.Comm) -> ctypes.CDLL:
    """The compiled kernels (collective): rank 0 compiles them into the cache first, the other
    ranks then load them (or compile their own where the cache is not shared). Raises
    :class:`SweepKernelUnavailable` on every rank if any rank cannot have them."""
    global _library
    if _library is None:
        try:
            _library = load_collectively(comm, _load_local)
        except CompileError as exc:
            raise SweepKernelUnavailable(str(exc)) from exc
    assert _library is not None
    return _library


def squared_distance(targets: np.ndarray, spacing: tuple[float, ...], library: Any) -> np.ndarray:
    """Squared Euclidean distance (in the unit of ``spacing``, one edge per axis) from every voxel of a
    3D grid to the nearest ``True`` voxel of ``targets`` (``inf`` without any), exact, by the
    compiled separable transform (Felzenszwalb and Huttenlocher 2012; ``fa_edt_squared`` in
    ``voxel_sweeps.c``): 8 B per voxel, no index arrays (``scipy.ndimage.distance_transform_edt``
    needs about 70 B per voxel)."""
    if targets.ndim != 3 or len(spacing) != 3:
        raise ValueError("squared_distance: a 3D mask and three spacings")
    out = np.where(targets, 0.0, np.inf)
    nz, ny, nx = targets.shape
    if out.size and library.fa_edt_squared(nz, ny, nx, *(float(h) for h in spacing), _ptr(out)) != 0:
        raise MemoryError("squared_distance: no memory for the scratch lines")
    return out


def step_lengths(spacing: tuple[float, ...]) -> np.ndarray:
    """Length of each of the 27 steps ``(dz, dy, dx)`` in -1..1 on a grid of voxel edges ``spacing``
    (index ``9 (dz + 1) + 3 (dy + 1) + dx + 1``), computed as ``skimage.graph.MCP_Geometric`` does."""
    offsets = np.array(np.meshgrid(*[[-1, 0, 1]] * 3, indexing="ij")).reshape(3, -1).T
    return np.sqrt(np.sum((offsets * np.asarray(spacing, dtype=np.float64)) ** 2, axis=1))


def geodesic_distance(
    passable: np.ndarray,
    spacing: tuple[float, ...],
    distance: np.ndarray,
    seeds: np.ndarray,
    library: Any,
    layers: tuple[int, int] | None = None,
) -> int:
    """Shortest-path distances through the ``passable`` voxels of a 3D grid, in place (Dijkstra on
    the 26-neighbour graph; ``fa_geodesic`` in ``voxel_sweeps.c``).

    ``distance`` (float64, C order, ``inf`` = not reached) is lowered to the fixed point
    ``d(i) = min(d(i), min_j d(j) + |step j->i|)`` over the passable voxels of ``layers``
    (axis-0 range; default all); the search starts from the flat indices ``seeds`` with their
    current values. Values outside ``layers`` are sources only. No scratch per voxel: a heap of
    the search front.

    Returns:
        The number of times a distance fell.
    """
    if passable.ndim != 3 or distance.shape != passable.shape or len(spacing) != 3:
        raise ValueError("geodesic_distance: a 3D mask, a distance array of its shape and three spacings")
    if distance.dtype != np.float64 or not distance.flags.c_contiguous:
        raise ValueError("geodesic_distance: distance must be C-contiguous float64")
    mask = (
        np.ascontiguousarray(passable, dtype=np.uint8) if passable.dtype != np.uint8 else np.ascontiguousarray(passable)
    )
    seeds = np.ascontiguousarray(seeds, dtype=np.int64)
    steps = step_lengths(spacing)
    first, last = (0, passable.shape[0]) if layers is None else layers
    nz, ny, nx = passable.shape
    if not distance.size:
        return 0
    lowered = int(
        library.fa_geodesic(
            nz, ny, nx, _ptr(mask), _ptr(steps), int(first), int(last), seeds.size, _ptr(seeds), _ptr(distance)
        )
    )
    if lowered < 0:
        raise MemoryError("geodesic_distance: no memory for the heap")
    return lowered


def _ptr(array: np.ndarray) -> int:
    return int(array.ctypes.data)


def _ptr_or_null(array: np.ndarray | None) -> int | None:
    return None if array is None else int(array.ctypes.data)


class _SweepKernel:
    """What the compiled kernels of a voxel stencil and of a CSR matrix share: ``n`` rows,
    ``omega``, ``dinv = omega / d`` and the vector passes of the fused CG that need no matrix."""

    n: int
    omega: float
    library: Any
    dinv: np.ndarray

    def _check(self, name: str, **vectors: np.ndarray) -> None:
        """Every vector must hold one float64 value per row (the kernels take raw pointers)."""
        for label, vec in vectors.items():
            if vec.shape != (self.n,) or vec.dtype != np.float64:
                raise ValueError(f"{name}: {label} must hold {self.n} float64 values")

    def cg_update(
        self, alpha: float, p: np.ndarray, w: np.ndarray, d: np.ndarray, y: np.ndarray, r: np.ndarray
    ) -> float:
        """``y += alpha p``, ``r -= alpha w``; returns this rank's part of ``r . (d r)``."""
        self._check("cg_update", p=p, w=w, d=d, y=y, r=r)
        return float(self.library.fa_cg_update(self.n, float(alpha), _ptr(p), _ptr(w), _ptr(d), _ptr(y), _ptr(r)))

    def cg_update_residual(self, alpha: float, w: np.ndarray, d: np.ndarray, r: np.ndarray) -> float:
        """``r -= alpha w``; returns this rank's part of ``r . (d r)`` (:meth:`cg_update` with the
        solution's update left to the next direction pass, the same sum bit for bit)."""
        self._check("cg_update_residual", w=w, d=d, r=r)
        return float(self.library.fa_cg_update_residual(self.n, float(alpha), _ptr(w), _ptr(d), _ptr(r)))

    def axpy(self, alpha: float, p: np.ndarray, y: np.ndarray) -> None:
        """``y += alpha p`` (each value as :meth:`cg_update` computes it)."""
        self._check("axpy", p=p, y=y)
        self.library.fa_axpy(self.n, float(alpha), _ptr(p), _ptr(y))

    def weighted_dot(self, a: np.ndarray, d: np.ndarray, b: np.ndarray) -> float:
        """This rank's part of ``a . (d b)``."""
        self._check("weighted_dot", a=a, d=d, b=b)
        return float(self.library.fa_weighted_dot(self.n, _ptr(a), _ptr(d), _ptr(b)))


class VoxelSweepKernel(_SweepKernel):
    """SOR sweeps of ``A = D - G`` on one rank's rows (its slab's voxels of the phase, C order).

    Args:
        transport: which voxels of the slab have rows, shape ``(layers, ny, nx)``.
        conductance: ``(g_z, g_y, g_x)``, the off-diagonal magnitude of a face normal to each axis.
        omega: relaxation factor.
        library: from :func:`load_sweep_library`.
        with_matrix: also keep ``d`` for :meth:`mult` (the kernel is then the whole matrix).

    Couplings to voxels outside the slab are not in the sweeps (they are the off-rank part the
    caller handles). Memory: 25 B per row (4 neighbour indices, flags, ``omega/d``), 33 B with
    ``with_matrix``.
    """

    def __init__(
        self,
        transport: np.ndarray,
        conductance: tuple[float, float, float],
        omega: float,
        library: Any,
        *,
        with_matrix: bool = False,
    ):
        layers = transport.shape[0]
        counts = np.count_nonzero(transport.reshape(layers, -1), axis=1) if layers else np.zeros(0, np.int64)
        n = int(counts.sum())
        if n >= 2**31:
            raise SweepKernelUnavailable(f"{n} rows on one rank exceed the kernels' 32-bit indices")
        self.n, self.omega, self.library = n, float(omega), library
        self.g = np.array([conductance[2], conductance[1], conductance[0]], dtype=np.float64)
        self.lower = np.zeros((n, 2), np.int32)
        self.upper = np.zeros((n, 2), np.int32)
        self.mask = np.zeros(n, np.uint8)
        self.dinv = np.zeros(n)
        self.d: np.ndarray | None = np.zeros(n) if with_matrix else None
        starts = np.concatenate(([0], np.cumsum(counts)))
        previous: np.ndarray | None = None  # row numbers of the layer below (-1: no row)
        current = self._layer_rows(transport[0], 0) if layers else None
        for k in range(layers):
            assert current is not None
            following = self._layer_rows(transport[k + 1], int(starts[k + 1])) if k + 1 < layers else None
            inside = transport[k]
            rows = slice(int(starts[k]), int(starts[k + 1]))
            self._neighbours(rows, inside, current, previous, following)
            previous, current = current, following

    @staticmethod
    def _layer_rows(inside: np.ndarray, start: int) -> np.ndarray:
        rows = np.full(inside.shape, -1, np.int64)
        rows[inside] = np.arange(start, start + np.count_nonzero(inside))
        return rows

    def _neighbours(
        self,
        rows: slice,
        inside: np.ndarray,
        current: np.ndarray,
        previous: np.ndarray | None,
        following: np.ndarray | None,
    ) -> None:
        """Fill the neighbour rows and flags of one layer's rows."""
        mask = np.zeros(current.shape, np.uint8)
        shifted = np.full(current.shape, -1, np.int64)
        shifted[:, 1:] = current[:, :-1]
        mask |= (shifted >= 0).astype(np.uint8)  # x lower
        shifted.fill(-1)
        shifted[:, :-1] = current[:, 1:]
        mask |= (shifted >= 0).astype(np.uint8) << 3  # x upper
        pairs = (
            (self.lower, 0, 1, np.s_[1:, :], np.s_[:-1, :], current),  # y lower
            (self.upper, 0, 4, np.s_[:-1, :], np.s_[1:, :], current),  # y upper
            (self.lower, 1, 2, np.s_[:, :], np.s_[:, :], previous),  # z lower
            (self.upper, 1, 5, np.s_[:, :], np.s_[:, :], following),  # z upper
        )
        for target, column, bit, to, src, other in pairs:
            shifted.fill(-1)
            if other is not None:
                shifted[to] = other[src]
            present = shifted >= 0
            mask |= present.astype(np.uint8) << bit
            target[rows, column] = np.where(present, shifted, 0)[inside]
        self.mask[rows] = mask[inside]

    @property
    def nbytes(self) -> int:
        """Bytes held (indices, flags and ``omega/d``)."""
        extra = self.d.nbytes if self.d is not None else 0
        return int(self.lower.nbytes + self.upper.nbytes + self.mask.nbytes + self.dinv.nbytes + extra)

    def set_diagonal(self, d: np.ndarray) -> None:
        """Use the diagonal ``d`` of ``A`` (one value per row)."""
        if self.d is not None and d is not self.d:
            self.d[:] = d
        np.divide(self.omega, d, out=self.dinv)

    def _range(self, name: str, rows: tuple[int, int] | None) -> tuple[int, int]:
        """The rows a sweep covers: all, or ``rows = (lo, hi)``, which must start and end at z layers
        (no x line crosses them); a forward sweep of ``lo .. hi`` needs the rows before ``lo`` swept,
        a backward one the rows from ``hi`` on."""
        if rows is None:
            return 0, self.n
        lo, hi = int(rows[0]), int(rows[1])
        if not 0 <= lo <= hi <= self.n:
            raise ValueError(f"{name}: rows {lo}..{hi} outside 0..{self.n}")
        return lo, hi

    def _call(
        self, name: str, b: np.ndarray, x: np.ndarray, neighbours: np.ndarray, rows: tuple[int, int] | None
    ) -> None:
        if b.shape != (self.n,) or x.shape != (self.n,) or b.dtype != np.float64 or x.dtype != np.float64:
            raise ValueError(f"{name}: vectors of {self.n} float64 values expected")
        lo, hi = self._range(name, rows)
        getattr(self.library, name)(
            lo, hi, _ptr(b), _ptr(self.dinv), _ptr(neighbours), _ptr(self.mask), _ptr(self.g), _ptr(x)
        )

    def forward(self, b: np.ndarray, x: np.ndarray, rows: tuple[int, int] | None = None) -> None:
        """``x = (D/omega + L)^{-1} b`` (on ``rows``: see :meth:`_range`)."""
        self._call("fa_forward", b, x, self.lower, rows)

    def backward(self, b: np.ndarray, x: np.ndarray, rows: tuple[int, int] | None = None) -> None:
        """``x = (D/omega + U)^{-1} b`` (on ``rows``: see :meth:`_range`)."""
        self._call("fa_backward", b, x, self.upper, rows)

    def forward_eisenstat(
        self,
        y: np.ndarray,
        t: np.ndarray,
        d: np.ndarray,
        mid: float,
        z: np.ndarray,
        rows: tuple[int, int] | None = None,
    ) -> None:
        """``z = (D/omega + L)^{-1} (y + mid d t)``, ``d`` the diagonal of ``A`` (Eisenstat's
        forward sweep with its middle term; ``mid = 1 - 2/omega``; on ``rows``: see :meth:`_range`)."""
        self._check("forward_eisenstat", y=y, t=t, d=d, z=z)
        self.library.fa_forward_eisenstat(
            *self._range("forward_eisenstat", rows),
            _ptr(y),
            _ptr(t),
            _ptr(d),
            float(mid),
            _ptr(self.dinv),
            _ptr(self.lower),
            _ptr(self.mask),
            _ptr(self.g),
            _ptr(z),
        )

    def apply_upper(self, x: np.ndarray, y: np.ndarray) -> None:
        """``y = (D/omega + U) x``."""
        if x.shape != (self.n,) or y.shape != (self.n,) or x.dtype != np.float64 or y.dtype != np.float64:
            raise ValueError(f"fa_apply_upper: vectors of {self.n} float64 values expected")
        self.library.fa_apply_upper(
            self.n, _ptr(x), _ptr(self.dinv), _ptr(self.upper), _ptr(self.mask), _ptr(self.g), _ptr(y)
        )

    def mult(self, x: np.ndarray, y: np.ndarray) -> None:
        """``y = A x`` on these rows (requires ``with_matrix``)."""
        if self.d is None:
            raise ValueError("mult needs a kernel made with with_matrix=True")
        self._check("mult", x=x, y=y)
        self.library.fa_mult(
            self.n, _ptr(x), _ptr(self.d), _ptr(self.lower), _ptr(self.upper), _ptr(self.mask), _ptr(self.g), _ptr(y)
        )

    def cg_direction_backward(
        self,
        r: np.ndarray,
        d: np.ndarray,
        beta: float,
        p: np.ndarray,
        t: np.ndarray,
        rows: tuple[int, int] | None = None,
        pending: tuple[float, np.ndarray] | None = None,
    ) -> None:
        """``p = d r + beta p`` (CG's new search direction with the preconditioner ``d``), then
        ``t = (D/omega + U)^{-1} p``, in one pass (on ``rows``: see :meth:`_range`). With
        ``pending = (alpha, y)`` the pass first does the previous iteration's ``y += alpha p``
        (deferred from :meth:`cg_update_residual`) on each row before ``p`` changes there."""
        self._check("cg_direction_backward", r=r, d=d, p=p, t=t)
        alpha, y = pending if pending is not None else (0.0, None)
        if y is not None:
            self._check("cg_direction_backward", y=y)
        self.library.fa_cg_direction_backward(
            *self._range("cg_direction_backward", rows),
            _ptr(r),
            _ptr(d),
            float(beta),
            _ptr(p),
            float(alpha),
            _ptr_or_null(y),
            _ptr(self.dinv),
            _ptr(self.upper),
            _ptr(self.mask),
            _ptr(self.g),
            _ptr(t),
        )

    def cg_forward_product(
        self,
        p: np.ndarray,
        t: np.ndarray,
        d: np.ndarray,
        mid: float,
        w: np.ndarray,
        rows: tuple[int, int] | None = None,
    ) -> float:
        """``w = z + t`` with ``z = (D/omega + L)^{-1} (p + mid d t)`` (Eisenstat's operator applied
        to ``p``, given ``t`` from :meth:`cg_direction_backward`); ``z`` overwrites ``t``. Returns
        this rank's part of ``p . w`` (over ``rows``: see :meth:`_range`)."""
        self._check("cg_forward_product", p=p, t=t, d=d, w=w)
        return float(
            self.library.fa_cg_forward_product(
                *self._range("cg_forward_product", rows),
                _ptr(p),
                _ptr(t),
                _ptr(d),
                float(mid),
                _ptr(self.dinv),
                _ptr(self.lower),
                _ptr(self.mask),
                _ptr(self.g),
                _ptr(w),
            )
        )

    def cg_start(
        self,
        b: np.ndarray,
        x: np.ndarray,
        d: np.ndarray,
        mid: float,
        out: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
        q: np.ndarray | None = None,
        summed: int | None = None,
    ) -> tuple[float, float]:
        """The start of the fused CG in one pass: into ``out = (y, bh, z, r)``, ``y = (D/omega + U) x``
        (plus ``q`` on the first ``len(q)`` rows), ``bh = (D/omega + L)^{-1} b``,
        ``z = (D/omega + L)^{-1} (y + mid d x)`` and ``r = bh - (z + x)``. Returns this rank's
        ``bh . (d bh)`` and ``r . (d r)`` over the first ``summed`` rows (default: all), summed as
        :meth:`weighted_dot` does."""
        y, bh, z, r = out
        self._check("cg_start", b=b, x=x, d=d, y=y, bh=bh, z=z, r=r)
        nq = 0 if q is None else int(q.shape[0])
        if q is not None and (nq > self.n or q.dtype != np.float64 or not q.flags.c_contiguous):
            raise ValueError(f"cg_start: q must hold at most {self.n} contiguous float64 values")
        nsum = self.n if summed is None else int(summed)
        if not 0 <= nsum <= self.n:
            raise ValueError(f"cg_start: summed rows {nsum} outside 0..{self.n}")
        sums = np.zeros(2)
        self.library.fa_cg_start(
            self.n,
            _ptr(b),
            _ptr(x),
            _ptr(d),
            float(mid),
            _ptr(self.dinv),
            _ptr(self.lower),
            _ptr(self.upper),
            _ptr(self.mask),
            _ptr(self.g),
            nq,
            _ptr_or_null(q),
            nsum,
            _ptr(y),
            _ptr(bh),
            _ptr(z),
            _ptr(r),
            _ptr(sums),
        )
        return float(sums[0]), float(sums[1])

    def layer_sweep(self, first: int, b: np.ndarray, x: np.ndarray, *, forward: bool) -> None:
        """``x = (D/omega + T)^{-1} b`` on the rows ``first .. first + len(b) - 1``, one whole z
        layer, with ``T`` its x and y couplings only (lower: ``forward``; upper: backward)."""
        m = b.shape[0]
        if first < 0 or first + m > self.n or x.shape != (m,) or b.dtype != np.float64 or x.dtype != np.float64:
            raise ValueError(f"layer_sweep: rows {first}..{first + m} of {self.n}, two float64 vectors of {m}")
        name, neighbours = ("fa_forward_layer", self.lower) if forward else ("fa_backward_layer", self.upper)
        getattr(self.library, name)(
            first, m, _ptr(b), _ptr(self.dinv), _ptr(neighbours), _ptr(self.mask), _ptr(self.g), _ptr(x)
        )


@functools.cache
def _petsc_library() -> ctypes.CDLL:
    """The PETSc shared library petsc4py loaded (from the process's maps, else petsc4py's config;
    looked up once)."""
    candidates: list[str] = []
    try:
        with open("/proc/self/maps") as maps:
            candidates = [line.split()[-1] for line in maps if "/libpetsc" in line]
    except OSError:
        pass
    if not candidates:
        import glob

        import petsc4py

        config = petsc4py.get_config()
        candidates = sorted(
            glob.glob(os.path.join(config["PETSC_DIR"], config.get("PETSC_ARCH", ""), "lib", "libpetsc*.so*"))
        )
    for path in candidates:
        try:
            return ctypes.CDLL(path)
        except OSError:
            continue
    raise SweepKernelUnavailable("the PETSc library petsc4py uses was not found")


def _csr_views(library: ctypes.CDLL, handle: ctypes.c_void_p, rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(indptr, indices, data)`` of the SeqAIJ matrix ``handle`` as views of PETSc's storage."""
    n = ctypes.c_int32(0)
    ia, ja = ctypes.POINTER(ctypes.c_int32)(), ctypes.POINTER(ctypes.c_int32)()
    done = ctypes.c_int(0)
    args = (handle, 0, 0, 0, ctypes.byref(n), ctypes.byref(ia), ctypes.byref(ja), ctypes.byref(done))
    if library.MatGetRowIJ(*args) != 0 or not done.value:
        raise SweepKernelUnavailable("MatGetRowIJ failed")
    if not bool(ia) or n.value != rows:
        library.MatRestoreRowIJ(*args)
        raise SweepKernelUnavailable("MatGetRowIJ gave no arrays")
    indptr = np.ctypeslib.as_array(ia, shape=(rows + 1,))
    nnz = int(indptr[-1])
    indices = np.ctypeslib.as_array(ja, shape=(nnz,)) if nnz else np.zeros(0, np.int32)
    # A SeqAIJ's own arrays (shift 0, not symmetrised): the restore only resets the pointers.
    library.MatRestoreRowIJ(*args)
    values = ctypes.POINTER(ctypes.c_double)()
    if library.MatSeqAIJGetArrayRead(handle, ctypes.byref(values)) != 0:
        raise SweepKernelUnavailable("MatSeqAIJGetArrayRead failed")
    data = np.ctypeslib.as_array(values, shape=(nnz,)) if nnz else np.zeros(0)
    library.MatSeqAIJRestoreArrayRead(handle, ctypes.byref(values))
    return indptr, indices, data


def seqaij_arrays(matrix: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The CSR arrays ``(indptr, indices, data)`` of an assembled PETSc ``SeqAIJ`` matrix, as NumPy
    views of PETSc's own storage (no copies: ``MatGetRowIJ`` and ``MatSeqAIJGetArrayRead``).

    The views are valid while the matrix exists and keeps its nonzero pattern; they follow every
    change of its values (``MatCopy``, ``MatAXPY`` with the same pattern). Raises
    :class:`SweepKernelUnavailable` if the matrix is not ``seqaij`` or PETSc's library cannot be reached.
    """
    if matrix.getType() != "seqaij":
        raise SweepKernelUnavailable(f"CSR sweeps need a seqaij matrix, not {matrix.getType()}")
    return _csr_views(_petsc_library(), ctypes.c_void_p(matrix.handle), matrix.getSize()[0])


def mpiaij_off_block(matrix: Any) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], np.ndarray]:
    """The couplings of an assembled ``MPIAIJ`` matrix's rows to other ranks' columns: the CSR
    arrays of its off-diagonal block (columns numbered by the ghost columns) and the global indices
    of those columns, as views of PETSc's storage (``MatMPIAIJGetSeqAIJ``); valid as
    :func:`seqaij_arrays`'s. The diagonal block is ``matrix.getDiagonalBlock()``."""
    if matrix.getType() != "mpiaij":
        raise SweepKernelUnavailable(f"the off-rank block needs an mpiaij matrix, not {matrix.getType()}")
    library = _petsc_library()
    diagonal, off = ctypes.c_void_p(), ctypes.c_void_p()
    colmap = ctypes.POINTER(ctypes.c_int32)()
    if library.MatMPIAIJGetSeqAIJ(
        ctypes.c_void_p(matrix.handle), ctypes.byref(diagonal), ctypes.byref(off), ctypes.byref(colmap)
    ):
        raise SweepKernelUnavailable("MatMPIAIJGetSeqAIJ failed")
    rows = matrix.getLocalSize()[0]
    views = _csr_views(library, off, rows)
    columns = int(views[1].max()) + 1 if views[1].size else 0
    if columns and not bool(colmap):
        raise SweepKernelUnavailable("MatMPIAIJGetSeqAIJ gave no column map")
    ghosts = np.ctypeslib.as_array(colmap, shape=(columns,)) if columns else np.zeros(0, np.int32)
    return views, ghosts


class CSRSweepKernel(_SweepKernel):
    """SOR sweeps and the fused CG passes of a general sparse matrix held in CSR form on one rank.

    The arrays are used in place, not copied: ``data`` may be the values of a PETSc ``SeqAIJ``
    matrix made with ``createAIJWithArrays``, so the kernel follows every change of its values
    (call :meth:`set_diagonal` after one). Column indices must be sorted in every row (PETSc's
    AIJ keeps them so) and every row needs a diagonal entry. Memory: 4 B per row (the positions
    of the diagonal entries) and ``dinv``, 8 B per row.

    Args:
        indptr, indices: the CSR pattern (int32; ``indptr`` has ``n + 1`` entries).
        data: the values (float64), one per entry of ``indices``.
        omega: relaxation factor.
        library: from :func:`load_sweep_library`.
    """

    def __init__(self, indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, omega: float, library: Any):
        n = indptr.shape[0] - 1
        for name, array, dtype in (
            ("indptr", indptr, np.int32),
            ("indices", indices, np.int32),
            ("data", data, np.float64),
        ):
            if array.dtype != dtype or array.ndim != 1 or not array.flags.c_contiguous:
                raise ValueError(f"CSRSweepKernel: {name} must be a contiguous 1D {np.dtype(dtype).name} array")
        if n < 0 or indices.shape != data.shape or int(indptr[-1]) != indices.shape[0]:
            raise ValueError("CSRSweepKernel: indptr, indices and data do not describe one CSR matrix")
        self.n, self.omega, self.library = n, float(omega), library
        self.indptr, self.indices, self.data = indptr, indices, data
        self.diag = np.empty(n, np.int32)
        missing = library.fa_csr_diagonal_positions(n, _ptr(indptr), _ptr(indices), _ptr(self.diag))
        if missing:
            raise ValueError(f"CSRSweepKernel: {missing} rows have no diagonal entry")
        self.dinv = np.zeros(n)
        # (indptr, indices, data, diag) as the kernels take them: a row's lower part is
        # indptr[i] .. diag[i] - 1, its upper part diag[i] + 1 .. indptr[i + 1] - 1
        self._lower = self._upper = (_ptr(indptr), _ptr(indices), _ptr(data), _ptr(self.diag))

    @property
    def nbytes(self) -> int:
        """Bytes held beyond the matrix (the diagonal positions and ``omega/d``)."""
        return int(self.diag.nbytes + self.dinv.nbytes)

    def diagonal(self) -> np.ndarray:
        """The diagonal of the matrix (a new array)."""
        return self.data[self.diag]

    def set_diagonal(self, d: np.ndarray) -> None:
        """Use the diagonal ``d`` of the matrix (one value per row), after its values changed."""
        np.divide(self.omega, d, out=self.dinv)

    def _sweep(self, name: str, b: np.ndarray, x: np.ndarray) -> None:
        self._check(name, b=b, x=x)
        part = self._lower if name == "fa_csr_forward" else self._upper
        getattr(self.library, name)(self.n, _ptr(b), _ptr(self.dinv), *part, _ptr(x))

    def forward(self, b: np.ndarray, x: np.ndarray) -> None:
        """``x = (D/omega + L)^{-1} b``."""
        self._sweep("fa_csr_forward", b, x)

    def backward(self, b: np.ndarray, x: np.ndarray) -> None:
        """``x = (D/omega + U)^{-1} b``."""
        self._sweep("fa_csr_backward", b, x)

    def apply_upper(self, x: np.ndarray, y: np.ndarray) -> None:
        """``y = (D/omega + U) x``."""
        self._sweep("fa_csr_apply_upper", x, y)

    def forward_eisenstat(
        self, y: np.ndarray, t: np.ndarray, d: np.ndarray, mid: float, z: np.ndarray, q: np.ndarray | None = None
    ) -> None:
        """``z = (D/omega + L)^{-1} (y + mid d t + q)`` (as :meth:`VoxelSweepKernel.forward_eisenstat`;
        ``q``: the couplings to other ranks' rows in block-Jacobi SSOR, or none)."""
        self._check("forward_eisenstat", y=y, t=t, d=d, z=z, **({"q": q} if q is not None else {}))
        self.library.fa_csr_forward_eisenstat(
            self.n, _ptr(y), _ptr(t), _ptr(d), float(mid), _ptr_or_null(q), _ptr(self.dinv), *self._lower, _ptr(z)
        )

    def cg_direction_backward(self, r: np.ndarray, d: np.ndarray, beta: float, p: np.ndarray, t: np.ndarray) -> None:
        """``p = d r + beta p``, then ``t = (D/omega + U)^{-1} p``, in one pass."""
        self._check("cg_direction_backward", r=r, d=d, p=p, t=t)
        self.library.fa_csr_cg_direction_backward(
            self.n, _ptr(r), _ptr(d), float(beta), _ptr(p), _ptr(self.dinv), *self._upper, _ptr(t)
        )

    def cg_forward_product(
        self, p: np.ndarray, t: np.ndarray, d: np.ndarray, mid: float, w: np.ndarray, q: np.ndarray | None = None
    ) -> float:
        """``w = z + t`` with ``z = (D/omega + L)^{-1} (p + mid d t + q)``, ``z`` overwriting ``t``;
        returns ``p . w`` (as :meth:`VoxelSweepKernel.cg_forward_product`; ``q`` as in
        :meth:`forward_eisenstat`)."""
        self._check("cg_forward_product", p=p, t=t, d=d, w=w, **({"q": q} if q is not None else {}))
        return float(
            self.library.fa_csr_cg_forward_product(
                self.n, _ptr(p), _ptr(t), _ptr(d), float(mid), _ptr_or_null(q), _ptr(self.dinv), *self._lower, _ptr(w)
            )
        )


class SplitCSRSweepKernel(CSRSweepKernel):
    """:class:`CSRSweepKernel` of ``A = K + s M`` for two matrices of one CSR pattern (the diffusion's
    ``K + R`` and ``M``), with ``A``'s strict lower part, diagonal and strict upper part in arrays
    of their own: a forward sweep streams only the lower part and a backward sweep only the upper
    part. (Reading half of each row of one CSR array fetches the whole row: the sweeps of
    :class:`CSRSweepKernel` on a 27-point P1 matrix take as long as a mat-vec of the whole
    lower part *and* upper part.) The values follow ``s`` by :meth:`set_scale`, from ``K`` and
    ``M`` read in place. Memory: 12 B per off-diagonal entry and 24 B per row (indices, values,
    row offsets, ``d`` and ``omega/d``).

    Args:
        indptr, indices: the common CSR pattern (int32, sorted columns, every row with a diagonal entry).
        k_values, m_values: the values of ``K`` and ``M`` (float64, used in place).
        omega: relaxation factor.
        library: from :func:`load_sweep_library`.
    """

    def __init__(
        self,
        indptr: np.ndarray,
        indices: np.ndarray,
        k_values: np.ndarray,
        m_values: np.ndarray,
        omega: float,
        library: Any,
    ):
        super().__init__(indptr, indices, k_values, omega, library)
        if m_values.shape != k_values.shape or m_values.dtype != np.float64 or not m_values.flags.c_contiguous:
            raise ValueError("SplitCSRSweepKernel: M's values must match K's pattern (contiguous float64)")
        self.m_values = m_values
        n = self.n
        lower_counts = self.diag - indptr[:-1]
        upper_counts = indptr[1:] - self.diag - 1
        self.lower_indptr = np.zeros(n + 1, np.int32)
        self.upper_indptr = np.zeros(n + 1, np.int32)
        np.cumsum(lower_counts, out=self.lower_indptr[1:])
        np.cumsum(upper_counts, out=self.upper_indptr[1:])
        del lower_counts, upper_counts
        self.lower_indices = np.empty(int(self.lower_indptr[-1]), np.int32)
        self.upper_indices = np.empty(int(self.upper_indptr[-1]), np.int32)
        library.fa_csr_split_pattern(
            n, _ptr(indptr), _ptr(indices), _ptr(self.diag), _ptr(self.lower_indices), _ptr(self.upper_indices)
        )
        self.lower_values = np.zeros(self.lower_indices.size)
        self.upper_values = np.zeros(self.upper_indices.size)
        self.d = np.zeros(n)
        # the kernels' (indptr, indices, data, diag): lower rows run lower_indptr[i] .. lower_indptr[i+1] - 1,
        # upper rows (diag[i] + 1 ..) upper_indptr[i] .. upper_indptr[i+1] - 1
        self._upper_start = self.upper_indptr[:-1] - 1
        self._lower = (
            _ptr(self.lower_indptr),
            _ptr(self.lower_indices),
            _ptr(self.lower_values),
            _ptr(self.lower_indptr[1:]),
        )
        self._upper = (
            _ptr(self.upper_indptr),
            _ptr(self.upper_indices),
            _ptr(self.upper_values),
            _ptr(self._upper_start),
        )
        self.scale: float | None = None

    @property
    def nbytes(self) -> int:
        """Bytes held (the split pattern and values, ``d``, ``omega/d``; not ``K`` and ``M``)."""
        arrays = (
            self.lower_indptr,
            self.upper_indptr,
            self.lower_indices,
            self.upper_indices,
            self.lower_values,
            self.upper_values,
            self._upper_start,
            self.d,
            self.dinv,
            self.diag,
        )
        return int(sum(a.nbytes for a in arrays))

    def set_scale(self, scale: float) -> None:
        """Take ``A = K + scale M`` from ``K`` and ``M``'s current values (lower, upper, ``d``, ``omega/d``)."""
        self.library.fa_csr_split_values(
            self.n,
            _ptr(self.indptr),
            _ptr(self.diag),
            _ptr(self.data),
            _ptr(self.m_values),
            float(scale),
            _ptr(self.lower_values),
            _ptr(self.upper_values),
            _ptr(self.d),
        )
        np.divide(self.omega, self.d, out=self.dinv)
        self.scale = float(scale)

    def diagonal(self) -> np.ndarray:
        """The diagonal of ``A`` for the last :meth:`set_scale` (a new array)."""
        return self.d.copy()

    def set_diagonal(self, d: np.ndarray) -> None:
        raise TypeError("SplitCSRSweepKernel takes its diagonal from K and M: use set_scale")


def face_diagonal(comm: MPI.Comm, slab: Any, transport: np.ndarray, kernel: VoxelSweepKernel) -> tuple[np.ndarray, int]:
    """``sum_faces g`` per row, over the faces to rows of the phase on this rank and on the
    neighbouring slabs (the diagonal of ``A = D - G`` without other terms), and the number of
    off-diagonal entries of this rank's rows (collective over the ranks with non-empty slabs).

    Args:
        comm: the communicator of the slabs.
        slab: this rank's slab (:class:`~fem_anode.imaging.slabs.Slab`).
        transport: the rows' voxels of the slab, shape ``(layers, ny, nx)``, as given to ``kernel``.
        kernel: the slab's kernel.
    """
    from fem_anode.imaging.slabs import exchange_layers

    gx, gy, gz = (float(v) for v in kernel.g)
    mask = kernel.mask
    counts = [((mask >> bit) & 1) + ((mask >> (bit + 3)) & 1) for bit in range(3)]
    diagonal = gx * counts[0].astype(np.float64) + gy * counts[1] + gz * counts[2]
    entries = int(sum(int(c.sum()) for c in counts))
    layers = transport.shape[0]
    empty = np.zeros(transport.shape[1:], bool)
    first, last = (transport[0], transport[-1]) if layers else (empty, empty)
    below, above = exchange_layers(comm, slab, first, last)
    if layers:
        per_first, per_last = int(np.count_nonzero(first)), int(np.count_nonzero(last))
        if below is not None:  # faces to the last layer of the slab below
            coupled = below[first]
            diagonal[:per_first] += gz * coupled
            entries += int(coupled.sum())
        if above is not None:
            coupled = above[last]
            diagonal[kernel.n - per_last :] += gz * coupled
            entries += int(coupled.sum())
    return diagonal, entries
