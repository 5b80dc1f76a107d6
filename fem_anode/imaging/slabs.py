"""Image analysis on a volume split into slabs of axis-0 layers, one per MPI rank.

No rank ever holds the whole volume: each works on its own layers plus a few halo layers, and
the ranks exchange one layer with their neighbours or allgather what lies on the slab
interfaces only.

* :func:`label_slabs` labels connected components exactly as :func:`scipy.ndimage.label` does
  on the whole volume (same numbering: order of first appearance in a raster scan);
* :func:`max_distance_to` is the largest Euclidean distance from the voxels of one set to the
  nearest voxel of another (the exact EDT of the whole volume, computed on slabs with a halo
  that grows until it provably contains every nearest voxel).

mpi4py is imported lazily: on one process (``comm`` with ``size == 1``) these are plain SciPy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = [
    "Slab",
    "balanced_bounds",
    "exchange_layers",
    "label_slabs",
    "layer_counts",
    "max_distance_to",
    "node_plane_counts",
]

#: Reads layers ``start ... stop - 1`` of the volume (any integer or boolean array).
LayerReader = Callable[[int, int], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Slab:
    """This rank's layers ``z0 ... z1 - 1`` of an ``nz``-layer volume, and its neighbours.

    Attributes:
        z0, z1: first and one-past-last layer of the slab.
        nz: layers of the whole volume.
        prev, next: nearest ranks below/above with a non-empty slab (``None`` at the ends and
            for an empty slab).
    """

    z0: int
    z1: int
    nz: int
    prev: int | None
    next: int | None

    @classmethod
    def from_bounds(cls, bounds: np.ndarray, rank: int) -> Slab:
        """Rank ``rank``'s slab of the partition ``bounds`` (slab r is ``[b[r], b[r+1])``)."""
        edges = [int(b) for b in bounds]
        z0, z1 = edges[rank], edges[rank + 1]
        nonempty = [r for r in range(len(edges) - 1) if edges[r + 1] > edges[r]]
        if z1 == z0:
            return cls(z0, z1, edges[-1], None, None)
        prev = max((r for r in nonempty if r < rank), default=None)
        nxt = min((r for r in nonempty if r > rank), default=None)
        return cls(z0, z1, edges[-1], prev, nxt)

    @property
    def layers(self) -> int:
        return self.z1 - self.z0


def exchange_layers(
    comm: Any, slab: Slab, first: np.ndarray, last: np.ndarray
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Send the slab's first layer down and its last layer up; return (layer below, layer above).

    ``None`` where there is no neighbour (the ends of the volume, one process, an empty slab).
    Collective over the ranks with non-empty slabs."""
    if comm.size == 1:
        return None, None
    from mpi4py import MPI

    requests, below, above = [], None, None
    if slab.next is not None:
        requests.append(comm.Isend(np.ascontiguousarray(last), dest=slab.next, tag=921))
        above = np.empty_like(last)
        requests.append(comm.Irecv(above, source=slab.next, tag=922))
    if slab.prev is not None:
        requests.append(comm.Isend(np.ascontiguousarray(first), dest=slab.prev, tag=922))
        below = np.empty_like(first)
        requests.append(comm.Irecv(below, source=slab.prev, tag=921))
    MPI.Request.Waitall(requests)
    return below, above


def label_slabs(
    comm: Any, slab: Slab, mask: np.ndarray, structure: np.ndarray | None = None
) -> tuple[np.ndarray, int, np.ndarray | None, np.ndarray | None]:
    """Connected components of a distributed boolean volume, numbered as on the whole volume.

    Collective. Each slab is labelled with :func:`scipy.ndimage.label`; the labels become global
    by an exclusive scan of the counts (so they are ordered by the first voxel of each piece in
    raster order), pieces touching across a slab interface are merged by connected components
    of the graph of the facing label pairs (allgathered: interface-sized), and each component
    takes the smallest label of its pieces, renumbered consecutively. That is the numbering of
    ``ndimage.label`` on the whole volume.

    Args:
        comm: communicator (the slabs of all ranks, in rank order, make the volume).
        slab: this rank's layers.
        mask: boolean ``(slab.layers, ...)`` array.
        structure: connectivity as in ``ndimage.label`` (default: faces only).

    Returns:
        ``(labels, count, below, above)``: int64 labels of the slab (0 outside), the number of
        components of the whole volume, and the labels of the layer just below and just above
        the slab (``None`` at the ends of the volume), for voxels one layer off the slab.
    """
    from scipy import ndimage  # here, not at import: 30 MB per process that only some runs need

    ndim = mask.ndim
    structure = ndimage.generate_binary_structure(ndim, 1) if structure is None else np.asarray(structure, dtype=bool)
    if slab.layers:
        local, count = ndimage.label(mask, structure=structure)
        local = local.astype(np.int64)
    else:
        local, count = np.zeros(mask.shape, dtype=np.int64), 0
    offset = int(comm.exscan(count) or 0) if comm.size > 1 else 0
    total = int(comm.allreduce(count)) if comm.size > 1 else count
    local[local > 0] += offset
    plane = mask.shape[1:]
    empty = np.zeros(plane, dtype=np.int64)
    below, _ = exchange_layers(comm, slab, local[0] if slab.layers else empty, local[-1] if slab.layers else empty)
    pairs = np.zeros((0, 2), dtype=np.int64)
    if below is not None:
        mine = local[0]
        found = []
        for offset_index in np.argwhere(structure[0]):  # neighbours one layer down
            shift = offset_index - 1  # in -1..1 per in-plane axis
            theirs = below
            for axis, s in enumerate(shift):
                theirs = np.roll(theirs, -s, axis=axis)
                if s:  # no wrap-around: blank the rolled-in edge
                    edge = [slice(None)] * theirs.ndim
                    edge[axis] = slice(-1, None) if s > 0 else slice(0, 1)
                    theirs[tuple(edge)] = 0
            both = (mine > 0) & (theirs > 0)
            found.append(np.stack([theirs[both], mine[both]], axis=1))
        pairs = np.unique(np.concatenate(found), axis=0) if found else pairs
    if comm.size > 1:
        pairs = np.concatenate(comm.allgather(pairs))
    roots = _component_roots(pairs)
    nonroots = np.sort(np.array([g for g, r in roots.items() if g != r], dtype=np.int64))

    # Every label's final number in one table (labels are 0 ... total): its component's smallest
    # label, less the labels below that which are not the smallest of theirs; one lookup per voxel.
    table = np.arange(total + 1, dtype=np.int64)
    if roots:
        table[np.fromiter(roots.keys(), dtype=np.int64)] = np.fromiter(roots.values(), dtype=np.int64)
    table -= np.searchsorted(nonroots, table)
    labels = table[local]
    del table
    # The neighbouring layers, in final numbers (their owners computed them the same way).
    layer_below, layer_above = exchange_layers(
        comm, slab, labels[0] if slab.layers else empty, labels[-1] if slab.layers else empty
    )
    return labels, total - nonroots.size, layer_below, layer_above


def _component_roots(pairs: np.ndarray) -> dict[int, int]:
    """Label -> smallest label of its component, for the labels in ``pairs`` (an edge list)."""
    if pairs.size == 0:
        return {}
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    nodes, inverse = np.unique(pairs.ravel(), return_inverse=True)
    edges = inverse.reshape(-1, 2)
    graph = coo_matrix((np.ones(edges.shape[0]), (edges[:, 0], edges[:, 1])), shape=(nodes.size, nodes.size))
    _, component = connected_components(graph, directed=False)
    smallest = np.full(component.max() + 1, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(smallest, component, nodes)
    return dict(zip(nodes.tolist(), smallest[component].tolist()))


def max_distance_to(
    comm: Any,
    slab: Slab,
    read_layers: LayerReader,
    source: Callable[[np.ndarray], np.ndarray],
    target: Callable[[np.ndarray], np.ndarray],
    spacing: tuple[float, ...],
    halo: int = 16,
    squared_distance: Callable[[np.ndarray, tuple[float, ...]], np.ndarray] | None = None,
) -> float:
    """Largest distance (in the unit of ``spacing``) from a ``source`` voxel to the nearest ``target`` voxel.

    Collective. Each rank computes the Euclidean distance transform of its slab plus ``halo``
    layers on each side; a source voxel's distance is exact once it is no larger than the
    distance to the first layer outside the window (no target outside can be nearer). Ranks
    with an inexact voxel double their halo and recompute, up to the whole volume.

    Args:
        read_layers: reads layers of the label volume.
        source, target: label layers -> boolean masks (e.g. ``lambda a: a == 3``).
        spacing: voxel size per axis.
        halo: first halo thickness in layers.
        squared_distance: ``(targets, spacing) -> squared distance to the nearest target voxel``
            (e.g. :func:`~fem_anode.fem.voxel_sweeps.squared_distance`, 8 B per voxel); default
            ``scipy.ndimage.distance_transform_edt`` (about 70 B per voxel of the window).

    Returns:
        The largest distance, ``inf`` if there are source voxels but no target voxel at all, 0
        if there are no source voxels.
    """
    from mpi4py import MPI

    hz = float(spacing[0])
    local_max, exact = 0.0, slab.layers == 0
    while True:
        if not exact:
            lo, hi = max(slab.z0 - halo, 0), min(slab.z1 + halo, slab.nz)
            window = np.asarray(read_layers(lo, hi))
            sources = source(window[slab.z0 - lo : slab.z1 - lo])
            targets = target(window)
            del window
            if not sources.any():
                local_max, exact = 0.0, True
            elif not targets.any():
                local_max, exact = np.inf, lo == 0 and hi == slab.nz
            else:
                if squared_distance is not None:
                    squared = squared_distance(targets, tuple(float(h) for h in spacing))[slab.z0 - lo : slab.z1 - lo]
                else:
                    from scipy import ndimage

                    squared = ndimage.distance_transform_edt(~targets, sampling=spacing)[slab.z0 - lo : slab.z1 - lo]
                    squared *= squared
                del targets
                z = np.arange(slab.z0, slab.z1)
                reach = np.minimum(
                    np.where(lo > 0, (z - lo + 1) * hz, np.inf), np.where(hi < slab.nz, (hi - z) * hz, np.inf)
                )
                np.multiply(squared, sources, out=squared)  # 0 away from the sources
                per_layer = np.sqrt(squared.reshape(squared.shape[0], -1).max(axis=1))
                local_max = float(per_layer.max(initial=0.0))
                exact = bool((per_layer <= reach).all())
        all_exact = comm.allreduce(exact, op=MPI.LAND) if comm.size > 1 else exact
        if all_exact:
            return float(comm.allreduce(local_max, op=MPI.MAX)) if comm.size > 1 else local_max
        halo *= 2


def balanced_bounds(cells_per_layer: np.ndarray, size: int) -> np.ndarray:
    """Layer boundaries of ``size`` slabs with about equal numbers of cells: slab r is ``[b[r], b[r+1])``.

    Args:
        cells_per_layer: kept voxels in each axis-0 layer.
        size: number of slabs (ranks).
    """
    counts = np.asarray(cells_per_layer, dtype=np.float64)
    cumulative = np.concatenate([[0.0], np.cumsum(counts)])
    if cumulative[-1] == 0:
        return np.linspace(0, counts.size, size + 1).round().astype(np.int64)
    targets = cumulative[-1] * np.arange(size + 1) / size
    above = np.minimum(np.searchsorted(cumulative, targets, side="left"), counts.size)
    below = np.maximum(above - 1, 0)
    nearer_below = np.abs(cumulative[below] - targets) <= np.abs(cumulative[above] - targets)
    bounds = np.where(nearer_below, below, above).astype(np.int64)  # the layer boundary nearest each share
    bounds[0], bounds[-1] = 0, counts.size
    return np.maximum.accumulate(np.minimum(bounds, counts.size))


def layer_counts(image: Any, kept_labels: np.ndarray, comm: Any) -> np.ndarray:
    """Voxels with one of ``kept_labels`` in each axis-0 layer of the whole image (an image with
    ``read_layers``, or an array such as a memory-mapped ``.npy``; collective: each rank counts an
    equal share of the layers, a few at a time)."""
    layers = int(image.shape[0])
    read = image.read_layers if hasattr(image, "read_layers") else lambda a, b: image[a:b]
    equal = np.linspace(0, layers, comm.size + 1).round().astype(np.int64)
    lo, hi = int(equal[comm.rank]), int(equal[comm.rank + 1])
    local = np.zeros(hi - lo, dtype=np.int64)
    for start in range(lo, hi, 16):  # a few layers at a time: never the whole slab as a mask
        block = np.asarray(read(start, min(start + 16, hi)))
        local[start - lo : start - lo + block.shape[0]] = (
            np.isin(block, kept_labels).reshape(block.shape[0], -1).sum(axis=1)
        )
    return np.concatenate(comm.allgather(local))


def node_plane_counts(image: Any, kept_labels: np.ndarray, comm: Any) -> np.ndarray:
    """Per axis-0 layer ``z`` of the whole image, the nodes of node plane ``z`` (between voxel layers
    ``z - 1`` and ``z``) that are a corner of a voxel with one of ``kept_labels``; the last layer also
    counts the last plane. These are the unknowns of P1 on those voxels that a slab starting at layer
    ``z`` owns (without the extra copies of split nodes), so slabs of equal sums hold about equal
    numbers of unknowns. Collective: each rank counts an equal share of the planes, a few at a time."""
    layers = int(image.shape[0])
    read = image.read_layers if hasattr(image, "read_layers") else lambda a, b: image[a:b]
    equal = np.linspace(0, layers, comm.size + 1).round().astype(np.int64)
    lo, hi = int(equal[comm.rank]), int(equal[comm.rank + 1])
    local = np.zeros(hi - lo, dtype=np.int64)
    below = np.asarray(np.isin(read(lo - 1, lo), kept_labels))[0] if lo > 0 else None
    for start in range(lo, hi, 16):
        stop = min(start + 16, hi)
        kept = np.isin(np.asarray(read(start, stop)), kept_labels)
        empty = np.zeros(kept.shape[1:], bool)
        previous = np.concatenate([(below if below is not None else empty)[None], kept[:-1]])
        for k, (lower, upper) in enumerate(zip(previous, kept)):
            local[start - lo + k] = _corner_nodes(lower | upper)
        below = kept[-1]
        if stop == layers:  # the last node plane: the corners of the last layer's voxels
            local[-1] += _corner_nodes(kept[-1])
    return np.concatenate(comm.allgather(local))


def _corner_nodes(voxels: np.ndarray) -> int:
    """Nodes of a plane that are a corner of one of the marked ``voxels`` (a 2D mask)."""
    padded = np.pad(voxels, 1)
    nodes = padded[:-1, :-1] | padded[1:, :-1] | padded[:-1, 1:] | padded[1:, 1:]
    return int(np.count_nonzero(nodes))


def balanced_slab(comm: Any, image: Any, kept_labels: Any, weights: str = "voxels") -> Slab:
    """This rank's slab when the axis-0 layers are split into slabs of about equal numbers of voxels
    with one of ``kept_labels`` (the work of a voxel solver), cut at the layer boundaries nearest
    equal shares (:func:`balanced_bounds` of :func:`layer_counts`: one counting pass shared by the
    ranks); equal numbers of layers instead if that left a slab thinner than two layers (the
    separator and slab-face orders need two). Collective.

    Args:
        comm: the communicator (one slab per rank).
        image: an image with ``read_layers`` and ``shape``, or an array.
        kept_labels: the label value(s) of the voxels that carry work.
        weights: what is balanced: ``"voxels"`` (cell-centred unknowns) or ``"nodes"`` (the
            corners of those voxels: P1 unknowns, :func:`node_plane_counts`).
    """
    layers = int(image.shape[0])
    equal = np.array([(layers * r) // comm.size for r in range(comm.size + 1)])
    if comm.size == 1:
        return Slab.from_bounds(equal, 0)
    count = {"voxels": layer_counts, "nodes": node_plane_counts}[weights]
    bounds = balanced_bounds(count(image, np.atleast_1d(np.asarray(kept_labels)), comm), comm.size)
    return Slab.from_bounds(bounds if np.diff(bounds).min() >= 2 else equal, comm.rank)
