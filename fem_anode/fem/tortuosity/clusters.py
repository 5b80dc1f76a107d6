"""Distributed face-connected clusters of a voxel phase that span the volume along z.

Every rank holds a slab of consecutive z layers. Each slab is labelled on its own with
:func:`scipy.ndimage.label` (6-connectivity, i.e. through faces only); the labels are made global
by an exclusive scan of the label counts, and clusters are merged across the slab interfaces by
a union-find over the pairs of labels that face each other there. Only one layer of labels goes
to the next rank, and only the interface label pairs and the labels touching ``z = 0`` or
``z = end`` are allgathered: no rank ever sees the whole volume.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from scipy import ndimage

__all__ = ["Slab", "slab_bounds", "spanning_clusters"]

_FACES = ndimage.generate_binary_structure(3, 1)


@dataclasses.dataclass(frozen=True)
class Slab:
    """The z layers ``[z0, z1)`` of an ``nz``-layer volume held by one rank.

    Attributes:
        z0, z1: first and one-past-last global layer of this rank.
        nz: number of layers of the whole volume.
        prev, next: the nearest ranks below/above with a non-empty slab (``None`` at the ends).
    """

    z0: int
    z1: int
    nz: int
    prev: int | None
    next: int | None

    @property
    def layers(self) -> int:
        return self.z1 - self.z0


def slab_bounds(comm: Any, nz: int) -> Slab:
    """Split ``nz`` layers into contiguous slabs of (nearly) equal size, one per rank."""
    bounds = [(nz * r) // comm.size for r in range(comm.size + 1)]
    z0, z1 = bounds[comm.rank], bounds[comm.rank + 1]
    nonempty = [r for r in range(comm.size) if bounds[r + 1] > bounds[r]]
    prev = max((r for r in nonempty if r < comm.rank), default=None)
    nxt = min((r for r in nonempty if r > comm.rank), default=None)
    if z1 == z0:
        prev = nxt = None
    return Slab(z0, z1, nz, prev, nxt)


def _layer_exchange(comm: Any, slab: Slab, first: np.ndarray, last: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Send ``last`` to the next rank and ``first`` to the previous one; receive theirs.

    Returns:
        ``(below, above)``: the previous rank's last layer and the next rank's first layer
        (``None`` where there is no such rank).
    """
    requests = []
    below = above = None
    if slab.next is not None:
        requests.append(comm.Isend(np.ascontiguousarray(last), dest=slab.next, tag=811))
        above = np.empty_like(last)
        requests.append(comm.Irecv(above, source=slab.next, tag=812))
    if slab.prev is not None:
        requests.append(comm.Isend(np.ascontiguousarray(first), dest=slab.prev, tag=812))
        below = np.empty_like(first)
        requests.append(comm.Irecv(below, source=slab.prev, tag=811))
    if requests:
        from mpi4py import MPI

        MPI.Request.Waitall(requests)
    return below, above


def spanning_clusters(comm: Any, slab: Slab, mask: np.ndarray) -> np.ndarray:
    """Voxels of this rank's slab that belong to face-connected clusters touching both z ends.

    Collective over ``comm``.

    Args:
        comm: MPI communicator.
        slab: this rank's layers (from :func:`slab_bounds`).
        mask: boolean ``(slab.layers, ny, nx)`` array of the phase in this rank's slab.

    Returns:
        Boolean array of the shape of ``mask``: True where the voxel's cluster (merged over all
        slabs) touches the ``z = 0`` and the ``z = nz - 1`` layers.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if slab.layers:
        labels, count = ndimage.label(mask, structure=_FACES)
    else:
        labels, count = np.zeros(mask.shape, dtype=np.int32), 0
    offset = comm.exscan(count) if comm.size > 1 else 0
    offset = int(offset or 0)
    ny, nx = mask.shape[1:]
    empty = np.zeros((ny, nx), dtype=np.int64)
    first = np.where(labels[0] > 0, labels[0] + offset, 0) if slab.layers else empty
    last = np.where(labels[-1] > 0, labels[-1] + offset, 0) if slab.layers else empty
    below, _ = _layer_exchange(comm, slab, first.astype(np.int64), last.astype(np.int64))
    pairs = np.zeros((0, 2), dtype=np.int64)
    if below is not None:
        both = (below > 0) & (first > 0)
        pairs = np.unique(np.stack([below[both], first[both]], axis=1), axis=0)
    top = np.unique(first[first > 0]) if slab.z0 == 0 and slab.layers else np.zeros(0, np.int64)
    bottom = np.unique(last[last > 0]) if slab.z1 == slab.nz and slab.layers else np.zeros(0, np.int64)
    gathered = comm.allgather((pairs, top, bottom))
    pairs = np.concatenate([g[0] for g in gathered])
    top = np.concatenate([g[1] for g in gathered])
    bottom = np.concatenate([g[2] for g in gathered])
    # Union-find over the labels that matter (on an interface or an end), as graph components.
    nodes, inverse = np.unique(np.concatenate([pairs.ravel(), top, bottom]), return_inverse=True)
    n_pairs = pairs.shape[0]
    edges = inverse[: 2 * n_pairs].reshape(n_pairs, 2)
    graph = coo_matrix((np.ones(n_pairs), (edges[:, 0], edges[:, 1])), shape=(nodes.size, nodes.size))
    n_components, component = connected_components(graph, directed=False)
    at_top = np.zeros(n_components, bool)
    at_bottom = np.zeros(n_components, bool)
    at_top[component[inverse[2 * n_pairs : 2 * n_pairs + top.size]]] = True
    at_bottom[component[inverse[2 * n_pairs + top.size :]]] = True
    spans = (at_top & at_bottom)[component]
    mine = nodes[spans]
    mine = mine[(mine > offset) & (mine <= offset + count)] - offset
    keep = np.zeros(count + 1, dtype=bool)
    keep[mine] = True
    return keep[labels]
