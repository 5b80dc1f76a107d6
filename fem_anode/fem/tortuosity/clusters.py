"""Distributed face-connected clusters of a voxel phase that span the volume along z.

Every rank holds a slab of consecutive z layers (:class:`~fem_anode.imaging.slabs.Slab`). The
clusters are the connected components of the whole volume, labelled slab by slab with
:func:`~fem_anode.imaging.slabs.label_slabs` (6-connectivity, i.e. through faces only; only the
label pairs facing each other across slab interfaces are exchanged), and a cluster spans z when
its label appears in the ``z = 0`` and in the ``z = end`` layer (those labels are allgathered):
no rank ever sees the whole volume.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fem_anode.imaging.slabs import Slab, exchange_layers, label_slabs

__all__ = ["Slab", "exchange_layers", "slab_bounds", "spanning_clusters"]


def slab_bounds(comm: Any, nz: int) -> Slab:
    """This rank's slab when ``nz`` layers are split into contiguous slabs of (nearly) equal size."""
    return Slab.from_bounds(np.array([(nz * r) // comm.size for r in range(comm.size + 1)]), comm.rank)


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
    labels, count, _, _ = label_slabs(comm, slab, np.asarray(mask, dtype=bool))
    top = np.unique(labels[0]) if slab.z0 == 0 and slab.layers else np.zeros(0, np.int64)
    bottom = np.unique(labels[-1]) if slab.z1 == slab.nz and slab.layers else np.zeros(0, np.int64)
    if comm.size > 1:
        ends = comm.allgather((top, bottom))
        top = np.concatenate([t for t, _ in ends])
        bottom = np.concatenate([b for _, b in ends])
    spans = np.zeros(count + 1, dtype=bool)
    spans[np.intersect1d(top, bottom)] = True
    spans[0] = False  # background
    return spans[labels]
