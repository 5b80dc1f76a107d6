"""Image metrics of a 3D label volume split into slabs of z layers, one per MPI rank.

The same metrics as :mod:`fem_anode.imaging.metrics` (phase fractions and profiles, Si particles,
pore surface area, geodesic tortuosity, surface-connected channels, pore-Si distances), computed
so that no rank holds more than its own layers and a few halo layers: each rank reads its window
of the image from the source (:meth:`~fem_anode.io.images.ImageLayers.read_layers`), and the
ranks exchange only layers, interface label pairs and per-layer sums.

Every number is independent of the number of ranks, bit for bit: counts and histograms are
integers; floating-point totals are per-layer sums (NumPy's, of the same numbers on any
partition) added with :func:`math.fsum`
(:meth:`~fem_anode.imaging.partition.Slabs.sum_layers`); medians are exact order statistics;
the surface area is summed per layer of marching cubes; the distances are exact (Euclidean
distance transform on windows whose halo grows until no nearer voxel can lie outside; Dijkstra
on the 26-neighbour graph iterated over the slab interfaces to its fixed point). On one process
this is also the serial path for 3D images: the compiled kernels (``voxel_sweeps.c``) use 8 B
per voxel where ``scipy.ndimage.distance_transform_edt`` and ``skimage.graph.MCP_Geometric``
use 40-70 B, and the geodesic search is about 6x faster than ``MCP_Geometric`` (the same bits).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import numpy as np
from scipy import ndimage

from fem_anode.errors import InputError
from fem_anode.imaging.partition import Slabs
from fem_anode.imaging.slabs import Slab, exchange_layers, label_slabs
from fem_anode.io.images import format_phase_map

__all__ = ["SlabMetrics"]

logger = logging.getLogger(__name__)

#: Layers of the window around a slab for the smoothed pore surface: the Gaussian of 0.7 voxels
#: reaches 3 layers (truncated at 4 sigma) and the marching cubes above the slab's last layer 1.
_SURFACE_HALO = 4


def _face() -> np.ndarray:
    return ndimage.generate_binary_structure(3, 1)


def _in_slice() -> np.ndarray:
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True
    return structure


class SlabMetrics:
    """The metrics of one 3D label volume on the slabs of a communicator (collective methods).

    Args:
        image: the volume: anything with ``shape``, ``read_layers(start, stop)``,
            ``require_voxel_size()``, ``require_phases()`` and ``source``
            (:class:`~fem_anode.io.images.VoxelImage` or :class:`~fem_anode.io.images.ImageLayers`).
        comm: communicator (``None``: one process).
        library: the compiled voxel kernels (:func:`~fem_anode.fem.voxel_sweeps.load_sweep_library`).
    """

    def __init__(self, image: Any, comm: Any, library: Any) -> None:
        self.image = image
        self.shape = tuple(int(n) for n in image.shape)
        if len(self.shape) != 3:
            raise ValueError("SlabMetrics needs a 3D volume")
        self.spacing = tuple(float(h) for h in image.require_voxel_size())
        self.phases = image.require_phases()
        self.slabs = Slabs.even(comm, self.shape[0])
        self.slab = Slab.from_bounds(np.asarray(self.slabs.bounds), self.slabs.rank)
        self.library = library
        self.labels = np.asarray(image.read_layers(self.slabs.z0, self.slabs.z1))
        self.plane = int(self.shape[1] * self.shape[2])

    # -- helpers -----------------------------------------------------------------------------
    @property
    def _comm(self) -> Any:
        return self.slabs.comm if self.slabs.distributed else _SelfComm()

    def mask(self, phase: str, labels: np.ndarray | None = None) -> np.ndarray:
        return (self.labels if labels is None else labels) == self.phases[phase]

    def window(self, width: int) -> tuple[np.ndarray, int]:
        """Labels of the slab plus up to ``width`` layers each side, read from the source."""
        lo, hi = self.slabs.window_range(width)
        return np.asarray(self.image.read_layers(lo, hi)), lo

    def gather_layers(self, per_layer: np.ndarray) -> np.ndarray:
        """The per-layer values of all ranks, in layer order (``(nz, ...)``)."""
        if not self.slabs.distributed:
            return per_layer
        return np.concatenate(self.slabs.comm.allgather(per_layer))

    def _reduce(self, local: np.ndarray, op: str) -> np.ndarray:
        """Element-wise ``"sum"`` (of integers: exact), ``"min"`` or ``"max"`` over the ranks."""
        if not self.slabs.distributed:
            return local
        from mpi4py import MPI

        out = np.empty_like(local)
        operation = {"sum": MPI.SUM, "min": MPI.MIN, "max": MPI.MAX}[op]
        self.slabs.comm.Allreduce(np.ascontiguousarray(local), out, op=operation)
        return out

    def _fsum(self, per_layer: np.ndarray) -> float:
        return float(self.slabs.sum_layers(np.asarray(per_layer, dtype=np.float64).reshape(-1, 1))[0])

    # -- phases ------------------------------------------------------------------------------
    def label_counts(self) -> dict[int, int]:
        """Voxels per label value of the whole volume (collective); unknown labels are an error."""
        if self.labels.dtype in (np.uint8, np.uint16, np.bool_):  # one pass, no sort
            histogram = np.bincount(self.labels.ravel(), minlength=1)
            local = {int(v): int(histogram[v]) for v in np.flatnonzero(histogram)}
        else:
            values, counts = np.unique(self.labels, return_counts=True)
            local = {int(v): int(c) for v, c in zip(values, counts)}
        everything: dict[int, int] = {}
        for part in self.slabs.comm.allgather(local) if self.slabs.distributed else [local]:
            for v, c in part.items():
                everything[v] = everything.get(v, 0) + c
        unknown = sorted(set(everything) - set(self.phases.values()))
        if unknown:
            raise InputError(
                f"{self.image.source}: label values {unknown[:10]} are not in the phase map "
                f"{format_phase_map(self.phases)}"
            )
        return everything

    def phase_fractions(self, counts: dict[int, int]) -> dict[str, float]:
        total = int(np.prod(self.shape))
        return {name: counts.get(value, 0) / total for name, value in self.phases.items()}

    def per_slice(self) -> dict[str, Any]:
        """As :func:`~fem_anode.imaging.metrics.per_slice_fractions`."""
        flat = self.labels.reshape(self.labels.shape[0], self.plane)
        local = np.stack([np.count_nonzero(flat == v, axis=1) for v in self.phases.values()], axis=1)
        counts = self.gather_layers(local.astype(np.int64))
        result: dict[str, Any] = {}
        for column, name in enumerate(self.phases):
            profile = counts[:, column] / self.plane
            result[name] = {
                "mean": float(profile.mean()),
                "min": float(profile.min()),
                "max": float(profile.max()),
                "profile": profile.tolist(),
            }
        result["depth_m"] = ((np.arange(self.shape[0]) + 0.5) * self.spacing[0]).tolist()
        return result

    # -- Si particles ------------------------------------------------------------------------
    def si_particles(self, si_phase: str, bins: int) -> tuple[dict[str, Any], np.ndarray, int]:
        """As :func:`~fem_anode.imaging.metrics.si_particles`; also the particle labels of the slab
        and the number of particles."""
        from fem_anode.imaging.metrics import _particle_summary, _stats

        vs = np.asarray(self.spacing)
        si = self.mask(si_phase)
        labels, n, _, _ = label_slabs(self._comm, self.slab, si, _face())
        sizes = self._reduce(np.bincount(labels.ravel(), minlength=n + 1).astype(np.int64), "sum")[1:]
        diameters = np.cbrt(6.0 * sizes.astype(np.float64) * float(np.prod(vs)) / np.pi)
        low = np.full((n + 1, 3), np.iinfo(np.int64).max, dtype=np.int64)
        high = np.full((n + 1, 3), -1, dtype=np.int64)
        for label, box in enumerate(ndimage.find_objects(labels, max_label=n), start=1):
            if box is not None:
                low[label] = [box[0].start + self.slabs.z0, box[1].start, box[2].start]
                high[label] = [box[0].stop + self.slabs.z0, box[1].stop, box[2].stop]
        first_voxel, past_last = self._reduce(low, "min")[1:], self._reduce(high, "max")[1:]
        extents = ((past_last - first_voxel) * vs).max(axis=1) if n else np.zeros(0)
        result = _particle_summary(diameters, extents, bins)
        # Sections: connected Si in each slice (they never span two slices: local to a slab).
        sections, n_sections = ndimage.label(si, _in_slice())
        per_layer_count: np.ndarray = np.zeros(self.slabs.layers, dtype=np.int64)
        per_layer_sum: np.ndarray = np.zeros(self.slabs.layers)
        if n_sections:
            section_sizes = np.bincount(sections.ravel(), minlength=n_sections + 1)[1:]
            layer_of = _first_layers(sections, n_sections)
            section_d = np.sqrt(4.0 * section_sizes * vs[1] * vs[2] / np.pi)
            per_layer_count = np.bincount(layer_of, minlength=self.slabs.layers).astype(np.int64)
            # Sections are numbered in raster order: those of one layer are consecutive.
            per_layer_sum = np.array([piece.sum() for piece in np.split(section_d, np.cumsum(per_layer_count)[:-1])])
        counts = self.gather_layers(per_layer_count)
        total_sections = int(counts.sum())
        mean_d = self._fsum(per_layer_sum) / total_sections if total_sections else math.nan
        area = float(self.shape[1] * vs[1] * self.shape[2] * vs[2])
        per_area = counts / area
        result["count_per_area_m2"] = float(per_area.mean())
        result["per_slice"] = {
            "count": {**_stats(counts.astype(np.float64)), "profile": counts.tolist()},
            "count_per_area_m2": {**_stats(per_area), "profile": per_area.tolist()},
            "mean_equivalent_diameter_m": mean_d,
            "depth_m": ((np.arange(self.shape[0]) + 0.5) * vs[0]).tolist(),
        }
        return result, labels, n

    # -- pore surface ------------------------------------------------------------------------
    def pore_surface_area(self, pore_phase: str, smoothing: float = 0.7) -> float:
        """As :func:`~fem_anode.imaging.metrics.pore_surface_area`, summed per layer of cubes."""
        from skimage import measure

        window, lo = self.window(_SURFACE_HALO)
        pore = self.mask(pore_phase, window)
        field = (
            ndimage.gaussian_filter(pore.astype(np.float32), smoothing) if smoothing > 0 else pore.astype(np.float32)
        )
        del pore, window
        # The cubes between layers k and k + 1 belong to the rank owning layer k.
        a, b = self.slabs.z0 - lo, min(self.slabs.z1 + 1, self.shape[0]) - lo
        piece = field[a:b]
        pad = [(0, 1 if n < 2 else 0) for n in self.shape]  # marching cubes needs 2 samples per axis
        if any(p[1] for p in pad):
            piece = np.pad(piece, pad, mode="edge")
        per_layer = np.zeros(self.slabs.layers)
        for k in range(min(self.slabs.layers, piece.shape[0] - 1)):
            pair = piece[k : k + 2]
            if pair.min() >= 0.5 or pair.max() <= 0.5:
                continue
            verts, faces, _, _ = measure.marching_cubes(pair, 0.5, spacing=self.spacing)
            per_layer[k] = measure.mesh_surface_area(verts, faces)
        return self._fsum(per_layer)

    # -- geodesic tortuosity -----------------------------------------------------------------
    def geodesic(self, pore_phase: str) -> tuple[np.ndarray, int]:
        """Geodesic distance (m) from the pore voxels of slice 0 through pore voxels, on the slab's
        layers (``inf`` unreachable or solid), and the rounds over the rank interfaces it took.

        The front advances from slice 0 into the depth, so on slabs of z layers the ranks would take
        their turns: on several ranks the search runs on columns instead (rank r the y rows
        ``[r ny / N, (r+1) ny / N)`` of every layer, read a few layers at a time) and its result
        is sent to the z slabs by one all-to-all exchange."""
        if self.slabs.distributed and self.shape[1] >= self.slabs.comm.size:
            return self._geodesic_by_columns(pore_phase)
        window, lo = self.window(1)
        pore = self.mask(pore_phase, window)
        del window
        distance = np.full(pore.shape, np.inf)
        a, b = self.slabs.z0 - lo, self.slabs.z1 - lo
        if self.slabs.z0 == 0 and self.slabs.layers:
            distance[0][pore[0]] = 0.0
        rounds = self._relax(pore, self.spacing, distance, a, b, self.slab)
        return distance[a:b], rounds

    def _relax(
        self, passable: np.ndarray, spacing: tuple[float, ...], distance: np.ndarray, a: int, b: int, part: Slab
    ) -> int:
        """Geodesic search on a block whose axis-0 rows ``a ... b - 1`` are this rank's part ``part``
        of the split axis and the rows around them its neighbours' (sources only), to the fixed point
        over all ranks (collective); ``distance`` holds the sources and is lowered in place. Returns
        the rounds: each rank searches from the voxels that became nearer, then the ranks exchange
        their boundary rows, until no rank's halo changes."""
        from fem_anode.fem.voxel_sweeps import geodesic_distance

        seeds = np.flatnonzero(np.isfinite(distance))
        plane = int(np.prod(passable.shape[1:]))
        rounds = 0
        while True:
            rounds += 1
            if seeds.size and b > a:
                geodesic_distance(passable, spacing, distance, seeds, self.library, layers=(a, b))
            if not self.slabs.distributed:
                return rounds
            empty = np.full(passable.shape[1:], np.inf)
            below, above = exchange_layers(
                self.slabs.comm, part, distance[a] if b > a else empty, distance[b - 1] if b > a else empty
            )
            new_seeds = []
            for received, row in ((below, a - 1), (above, b)):
                if received is None or not 0 <= row < passable.shape[0]:
                    continue
                better = (received < distance[row]) & passable[row]
                if better.any():
                    distance[row][better] = received[better]
                    new_seeds.append(row * plane + np.flatnonzero(better))
            seeds = np.concatenate(new_seeds) if new_seeds else np.zeros(0, dtype=np.int64)
            if not self.slabs.any(bool(seeds.size)):
                return rounds

    def _geodesic_by_columns(self, pore_phase: str) -> tuple[np.ndarray, int]:
        """:meth:`geodesic` on y columns of the whole depth, returned on this rank's z slab."""
        from mpi4py import MPI

        comm = self.slabs.comm
        nz, ny, nx = self.shape
        y_bounds = np.array([ny * r // comm.size for r in range(comm.size + 1)], dtype=np.int64)
        columns = Slab.from_bounds(y_bounds, comm.rank)
        lo, hi = max(columns.z0 - 1, 0), min(columns.z1 + 1, ny)
        value = self.phases[pore_phase]
        passable = np.empty((hi - lo, nz, nx), dtype=bool)  # axes (y, z, x): the split axis first
        for start in range(0, nz, 16):
            stop = min(start + 16, nz)
            layers = np.asarray(self.image.read_layers(start, stop))[:, lo:hi, :]
            passable[:, start:stop, :] = (layers == value).transpose(1, 0, 2)
        del layers
        distance = np.full(passable.shape, np.inf)
        distance[:, 0, :][passable[:, 0, :]] = 0.0
        a, b = columns.z0 - lo, columns.z1 - lo
        spacing = (self.spacing[1], self.spacing[0], self.spacing[2])
        rounds = self._relax(passable, spacing, distance, a, b, columns)
        del passable
        # Columns -> slabs: rank s gets the rows of its layers from every rank.
        own = distance[a:b]
        z_bounds = self.slabs.bounds
        send = np.concatenate([own[:, z_bounds[s] : z_bounds[s + 1], :].ravel() for s in range(comm.size)])
        send_counts = [int(b - a) * (z_bounds[s + 1] - z_bounds[s]) * nx for s in range(comm.size)]
        del own, distance
        rows = np.diff(y_bounds)
        receive_counts = [int(rows[s]) * self.slabs.layers * nx for s in range(comm.size)]
        received = np.empty(sum(receive_counts))
        comm.Alltoallv([send, send_counts, MPI.DOUBLE], [received, receive_counts, MPI.DOUBLE])
        del send
        geodesic = np.empty((self.slabs.layers, ny, nx))
        offset = 0
        for s in range(comm.size):
            piece = received[offset : offset + receive_counts[s]].reshape(int(rows[s]), self.slabs.layers, nx)
            geodesic[:, y_bounds[s] : y_bounds[s + 1], :] = piece.transpose(1, 0, 2)
            offset += receive_counts[s]
        return geodesic, rounds

    def tortuosity(self, geodesic: np.ndarray, pore: np.ndarray) -> tuple[dict[str, Any], np.ndarray]:
        """As :func:`~fem_anode.imaging.metrics.geodesic_tortuosity`, from the slab's geodesic
        distances; also the tortuosity of the slab (inf unreachable, NaN solid)."""
        z = np.arange(self.slabs.z0, self.slabs.z1)
        depth = (z * self.spacing[0]).reshape(-1, 1, 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            tau = geodesic / depth
        if self.slabs.z0 == 0 and self.slabs.layers:
            tau[0] = np.where(np.isfinite(geodesic[0]), 1.0, np.inf)
        tau[~pore] = np.nan
        finite = np.isfinite(tau)
        rows = tau.shape[0]
        pore_per_z = pore.reshape(rows, self.plane).sum(axis=1)
        finite_per_z = finite.reshape(rows, self.plane).sum(axis=1)
        sums = np.array([tau[k][finite[k]].sum() for k in range(rows)]) if rows else np.zeros(0)
        per_layer = self.gather_layers(np.column_stack([pore_per_z, finite_per_z]).astype(np.int64))
        all_sums = self.gather_layers(sums)
        pore_all, finite_all = per_layer[:, 0], per_layer[:, 1]
        unreach_all = pore_all - finite_all
        with np.errstate(divide="ignore", invalid="ignore"):
            per_depth = np.where(finite_all > 0, all_sums / finite_all, np.nan)
            unreach_frac = np.where(pore_all > 0, unreach_all / pore_all, np.nan)
        below = finite.copy()
        if self.slabs.z0 == 0 and rows:
            below[0] = False
        values = tau[below]
        count = int(self.slabs.sum_int(int(values.size)))
        below_sums = sums.copy()
        if self.slabs.z0 == 0 and rows:
            below_sums[0] = 0.0
        n_pore = int(pore_all.sum())
        unreachable = int(unreach_all.sum())
        record = {
            "per_depth_mean": per_depth.tolist(),
            "unreachable_fraction": {
                "per_depth": unreach_frac.tolist(),
                "overall": float(unreachable / n_pore) if n_pore else math.nan,
            },
            "mean": self._fsum(below_sums) / count if count else math.nan,
            "median": self.slabs.median(values) if count else math.nan,
            "max_finite": self.slabs.max(float(values.max()) if values.size else -math.inf) if count else math.nan,
            "reachable_voxels": int(finite_all.sum()),
            "unreachable_voxels": unreachable,
            "depth_m": (np.arange(self.shape[0]) * self.spacing[0]).tolist(),
            "method": "geodesic path length through pore voxels from slice 0 / straight distance z*h_z "
            "(Dijkstra on the 26-neighbour voxel graph, anisotropic step lengths, the arithmetic of "
            "skimage.graph.MCP_Geometric); unreachable = inf, reported in unreachable_fraction and excluded "
            "from means (null in JSON where undefined)",
        }
        return record, tau

    def connections(self, pore: np.ndarray, reachable: np.ndarray) -> dict[str, Any]:
        """As :func:`~fem_anode.imaging.metrics.connections_per_depth`."""
        from fem_anode.imaging.metrics import _stats

        sections, n_sections = ndimage.label(pore, _in_slice())
        connected = np.zeros(n_sections + 1, dtype=bool)
        connected[sections[reachable]] = True
        layer_of = _first_layers(sections, n_sections)
        rows = self.slabs.layers
        local = np.column_stack(
            [
                np.bincount(layer_of[connected[1:]], minlength=rows)[:rows],
                np.bincount(layer_of, minlength=rows)[:rows],
            ]
        ).astype(np.int64)
        both = self.gather_layers(local.reshape(rows, 2))
        profile, total = both[:, 0], both[:, 1]
        return {
            **_stats(profile.astype(np.float64)),
            "profile": profile.tolist(),
            "total_profile": total.tolist(),
            "depth_m": (np.arange(self.shape[0]) * self.spacing[0]).tolist(),
        }

    # -- distances ---------------------------------------------------------------------------
    def nearest_distance(
        self, target: Callable[[np.ndarray], np.ndarray], sources: np.ndarray, halo: int = 16
    ) -> np.ndarray:
        """Exact Euclidean distance (m) from every voxel of the slab to the nearest ``target`` voxel of
        the whole volume, valid where ``sources`` (a mask of the slab) is true (collective): the
        transform of a window whose halo doubles until no source is farther from its nearest target
        than from the first layer outside the window."""
        from fem_anode.fem.voxel_sweeps import squared_distance

        hz = self.spacing[0]
        nz = self.shape[0]
        result = np.zeros(sources.shape)
        exact = not sources.any()
        while True:
            if not exact:
                lo, hi = self.slabs.window_range(halo)
                window = np.asarray(self.image.read_layers(lo, hi))
                squared = squared_distance(target(window), self.spacing, self.library)
                del window
                own = squared[self.slabs.z0 - lo : self.slabs.z1 - lo]
                del squared
                np.sqrt(own, out=own)
                z = np.arange(self.slabs.z0, self.slabs.z1)
                reach = np.minimum(
                    np.where(lo > 0, (z - lo + 1) * hz, np.inf), np.where(hi < nz, (hi - z) * hz, np.inf)
                )
                farthest = np.where(sources, own, 0.0).reshape(own.shape[0], self.plane).max(axis=1, initial=0.0)
                result = own
                exact = bool((farthest <= reach).all()) or (lo == 0 and hi == nz)
            if self.slabs.distributed:
                from mpi4py import MPI

                exact_everywhere = bool(self.slabs.comm.allreduce(exact, op=MPI.LAND))
            else:
                exact_everywhere = exact
            if exact_everywhere:
                return result
            halo *= 2

    def _surface(self, phase: str) -> np.ndarray:
        """Voxels of ``phase`` in the slab with a face neighbour of another phase (the volume's
        border does not count)."""
        window, lo = self.window(1)
        mask = self.mask(phase, window)
        del window
        inner = ndimage.binary_erosion(mask, _face(), border_value=1)
        a, b = self.slabs.z0 - lo, self.slabs.z1 - lo
        return mask[a:b] & ~inner[a:b]

    def pore_si_distance(
        self, pore_phase: str, si_phase: str, bins: int, particles: np.ndarray, n: int
    ) -> dict[str, Any]:
        """As :func:`~fem_anode.imaging.metrics.pore_si_distance`. The nearest approach of a particle
        to the pores is taken over its surface voxels: from an inner voxel one face step toward its
        nearest pore voxel stays in the particle and comes nearer, so the minimum lies on the surface."""
        pore_value, si_value = self.phases[pore_phase], self.phases[si_phase]
        si_surface = self._surface(si_phase)
        pore_surface = self._surface(pore_phase)
        to_pore = self.nearest_distance(lambda a: a == pore_value, si_surface)
        d = to_pore[si_surface]
        nearest: np.ndarray = np.full(n + 1, np.inf)
        np.minimum.at(nearest, particles[si_surface], d)
        del to_pore
        to_si = self.nearest_distance(lambda a: a == si_value, pore_surface)
        hausdorff_pore = float(to_si[pore_surface].max()) if pore_surface.any() else 0.0
        del to_si
        nearest = self._reduce(nearest, "min")[1:]
        count = int(self.slabs.sum_int(int(d.size)))
        rows = si_surface.shape[0]
        pieces = _split_by_layer(d, si_surface) if rows else []
        mean = self._fsum(np.array([v.sum() for v in pieces])) / count
        squares = np.array([((v - mean) ** 2).sum() for v in pieces])
        largest = self.slabs.max(float(d.max()) if d.size else 0.0)
        counts, edges = np.histogram(d, bins=bins, range=(0.0, largest if largest > 0 else 1.0))
        counts = self._reduce(counts.astype(np.int64), "sum")
        return {
            "mean_m": mean,
            "max_m": largest,
            "median_m": self.slabs.median(d),
            "std_m": math.sqrt(self._fsum(squares) / count),
            "hausdorff_m": max(largest, self.slabs.max(hausdorff_pore)),
            "per_particle_min": {"mean_m": float(nearest.mean()), "max_m": float(nearest.max())},
            "histogram": {"bin_edges_m": edges.tolist(), "counts": counts.tolist()},
            "surface_points": count,
        }


def _first_layers(sections: np.ndarray, count: int) -> np.ndarray:
    """The layer of each labelled section ``1 ... count`` (sections never span two layers)."""
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    return np.array([box[0].start for box in ndimage.find_objects(sections, max_label=count)], dtype=np.int64)


def _split_by_layer(values: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
    """``values`` (``= x[mask]`` in C order) split into the pieces of each axis-0 layer of ``mask``."""
    counts = mask.reshape(mask.shape[0], int(np.prod(mask.shape[1:]))).sum(axis=1)
    return np.split(values, np.cumsum(counts)[:-1])


class _SelfComm:
    """A one-process stand-in for the communicator of :func:`label_slabs` (no MPI import)."""

    size = 1
    rank = 0


def owned_rows(bounds: np.ndarray, rank: int, stride: int) -> slice:
    """The rows of a rank's layers ``bounds[rank] ... bounds[rank + 1] - 1`` whose global index is a
    multiple of ``stride``."""
    z0 = int(bounds[rank])
    return slice((-z0) % stride, int(bounds[rank + 1]) - z0, stride)


def gather_picture_data(
    comm: Any, bounds: np.ndarray, layers: np.ndarray, stride: int, section: bool = False
) -> np.ndarray | None:
    """On rank 0, a picture's worth of a field whose layers are split over the ranks: every
    ``stride``-th voxel per axis (``section``: the central x-z section, ``y = ny // 2``, in full);
    ``None`` on the other ranks. Collective; never more than the picture is sent."""
    if section:
        piece = np.ascontiguousarray(layers[:, layers.shape[1] // 2, :])
    else:
        piece = np.ascontiguousarray(layers[owned_rows(bounds, comm.rank, stride), ::stride, ::stride])
    pieces = comm.gather(piece, root=0)
    if comm.rank != 0:
        return None
    return np.concatenate([p for p in pieces if p.shape[0]] or [pieces[0]])
