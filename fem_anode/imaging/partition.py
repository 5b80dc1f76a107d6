"""Slabs of axis-0 layers of an image, one per MPI rank: halos and reproducible reductions.

A :class:`Slabs` object is the decomposition every distributed image filter of the multistage
segmentation works on: rank ``r`` owns the layers ``bounds[r] ... bounds[r+1] - 1`` (axis 0:
z of a volume, rows of a 2D image) and obtains the layers around them from their owners
(:meth:`Slabs.window`). Every reduction is *reproducible*: it gives the same bits on any
number of ranks, so a distributed computation gives the labels of one process voxel for voxel:

* integer counts and histograms are exact (``allreduce``);
* floating-point sums are formed per layer (the same numbers on any partition) and added with
  :func:`math.fsum` (exactly rounded, so independent of the order, :meth:`Slabs.sum_layers`);
* medians are exact order statistics (:meth:`Slabs.kth_smallest`).

``Slabs.whole(n)`` is the one-process case (no MPI): the same code paths, no communication.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from fem_anode.errors import InputError

__all__ = ["Slabs"]

_TAG = 7311


@dataclasses.dataclass(frozen=True)
class Slabs:
    """The axis-0 layers each rank owns.

    Attributes:
        comm: communicator (``None``: one process).
        bounds: ``size + 1`` increasing layer indices; rank ``r`` owns ``bounds[r] .. bounds[r+1]-1``.
        rank: this rank.
    """

    comm: Any
    bounds: tuple[int, ...]
    rank: int = 0

    @classmethod
    def whole(cls, n0: int) -> Slabs:
        """One process owning all ``n0`` layers."""
        return cls(None, (0, int(n0)), 0)

    @classmethod
    def even(cls, comm: Any, n0: int) -> Slabs:
        """Layers split as evenly as possible: rank ``r`` owns ``[r n0 / N, (r+1) n0 / N)``."""
        if comm is None or comm.size == 1:
            return cls.whole(n0)
        return cls(comm, tuple(n0 * r // comm.size for r in range(comm.size + 1)), comm.rank)

    @classmethod
    def on_root(cls, comm: Any, n0: int) -> Slabs:
        """All layers on rank 0 (e.g. a 2D image whose filters need the whole plane)."""
        if comm is None or comm.size == 1:
            return cls.whole(n0)
        return cls(comm, (0,) + (int(n0),) * comm.size, comm.rank)

    @property
    def distributed(self) -> bool:
        return self.comm is not None and self.comm.size > 1

    @property
    def n0(self) -> int:
        return self.bounds[-1]

    @property
    def z0(self) -> int:
        return self.bounds[self.rank]

    @property
    def z1(self) -> int:
        return self.bounds[self.rank + 1]

    @property
    def layers(self) -> int:
        return self.z1 - self.z0

    def window_range(self, width: int, rank: int | None = None) -> tuple[int, int]:
        """Layers ``[lo, hi)`` of the owned slab plus ``width`` layers each side (clipped)."""
        r = self.rank if rank is None else rank
        a, b = self.bounds[r], self.bounds[r + 1]
        if b == a:
            return a, a
        return max(0, a - width), min(self.n0, b + width)

    def window(self, owned: np.ndarray, width: int) -> tuple[np.ndarray, int]:
        """The owned layers plus up to ``width`` layers of the neighbours' on each side (collective).

        Args:
            owned: this rank's layers, shape ``(layers, ...)``.
            width: halo layers per side (the same on every rank).

        Returns:
            ``(window, lo)``: the layers ``lo ... lo + len(window) - 1`` of the whole array.
        """
        lo, hi = self.window_range(width)
        if not self.distributed:
            return owned, self.z0
        from mpi4py import MPI

        out = np.empty((hi - lo, *owned.shape[1:]), dtype=owned.dtype)
        out[self.z0 - lo : self.z1 - lo] = owned
        requests = []
        for r in range(self.comm.size):
            if r == self.rank:
                continue
            a, b = max(self.bounds[r], lo), min(self.bounds[r + 1], hi)
            if b > a and self.layers:
                requests.append(self.comm.Irecv(out[a - lo : b - lo], source=r, tag=_TAG))
            rlo, rhi = self.window_range(width, r)
            a, b = max(self.z0, rlo), min(self.z1, rhi)
            if b > a:
                piece = np.ascontiguousarray(owned[a - self.z0 : b - self.z0])
                requests.append(self.comm.Isend(piece, dest=r, tag=_TAG))
        MPI.Request.Waitall(requests)
        return out, lo

    def owned_part(self, window: np.ndarray, lo: int) -> np.ndarray:
        """The owned layers of a window starting at layer ``lo``."""
        return window[self.z0 - lo : self.z1 - lo]

    # -- reductions (identical results on every partition) ----------------------------------
    def sum_int(self, value: int | np.ndarray) -> Any:
        """Exact sum of integers (or integer arrays) over the ranks."""
        if not self.distributed:
            return value
        return self.comm.allreduce(value)

    def any(self, flag: bool) -> bool:
        return bool(self.sum_int(int(bool(flag))))

    def min(self, value: float) -> float:
        from mpi4py import MPI

        return float(self.comm.allreduce(float(value), op=MPI.MIN)) if self.distributed else float(value)

    def max(self, value: float) -> float:
        from mpi4py import MPI

        return float(self.comm.allreduce(float(value), op=MPI.MAX)) if self.distributed else float(value)

    def sum_layers(self, per_layer: np.ndarray) -> np.ndarray:
        """Sum over all layers of per-layer partial sums, exactly rounded (:func:`math.fsum`).

        Args:
            per_layer: ``(rows, k)`` float64 sums of layers this rank owns (each layer's sum is
                the same number on any partition; every layer summed by exactly one rank).

        Returns:
            ``(k,)`` totals, bitwise the same on every partition.
        """
        part = np.asarray(per_layer, dtype=np.float64)
        k = part.shape[1]
        if self.distributed:
            gathered = [p.reshape(-1, k) for p in self.comm.allgather(part) if p.size]
            part = np.concatenate(gathered) if gathered else np.zeros((0, k))
        return np.array([math.fsum(part[:, j]) for j in range(k)])

    def kth_smallest(self, values: np.ndarray, k: int) -> float:
        """The ``k``-th smallest (0-based) of the non-negative float64 ``values`` of all ranks (exact)."""
        v = np.asarray(values, dtype=np.float64).ravel()
        if not self.distributed:
            return float(np.partition(v, k)[k])
        bits = v.view(np.int64)  # monotone for non-negative floats
        vmax = self.max(float(v.max()) if v.size else 0.0)
        lo, hi = 0, int(np.float64(vmax).view(np.int64))
        while lo < hi:
            mid = (lo + hi) // 2
            if int(self.sum_int(int(np.count_nonzero(bits <= mid)))) >= k + 1:
                hi = mid
            else:
                lo = mid + 1
        return float(np.int64(lo).view(np.float64))

    def median(self, values: np.ndarray) -> float:
        """Median of the non-negative values of all ranks (as :func:`numpy.median`; exact)."""
        n = int(self.sum_int(int(np.size(values))))
        if n == 0:
            raise InputError("median of an empty set of values")
        if n % 2:
            return self.kth_smallest(values, n // 2)
        if not self.distributed:
            v = np.partition(np.asarray(values, dtype=np.float64).ravel(), [n // 2 - 1, n // 2])
            return float((v[n // 2 - 1] + v[n // 2]) / 2.0)
        return (self.kth_smallest(values, n // 2 - 1) + self.kth_smallest(values, n // 2)) / 2.0

    def histogram(self, values: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Histogram of the values of all ranks over their global range (``bins`` equal bins).

        Returns:
            ``(counts as float64, bin centres, bin edges)``.
        """
        v = np.asarray(values, dtype=np.float64).ravel()
        total = int(self.sum_int(int(v.size)))
        if total == 0:
            raise InputError("cannot threshold an empty set of gray values")
        lo = self.min(float(v.min()) if v.size else math.inf)
        hi = self.max(float(v.max()) if v.size else -math.inf)
        if hi <= lo:
            raise InputError(f"gray image is constant ({lo}); nothing to threshold")
        hist, edges = np.histogram(v, bins=bins, range=(lo, hi))
        hist = np.asarray(self.sum_int(hist.astype(np.int64)))
        centres = 0.5 * (edges[1:] + edges[:-1])
        return hist.astype(np.float64), centres, edges

    def alltoall(self, objects: list[Any]) -> list[Any]:
        """``objects[r]`` goes to rank ``r``; returns what every rank sent to this one."""
        if not self.distributed:
            return objects
        return list(self.comm.alltoall(objects))
