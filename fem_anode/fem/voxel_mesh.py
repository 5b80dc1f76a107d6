"""Distributed voxel meshes straight from a label image: no gmsh, no rank holding the whole mesh.

Every rank takes a slab of consecutive axis-0 layers of the image (plus one or two halo layers
read for the node numbering and the tags), numbers the face-connected node copies of its slab
(:class:`~fem_anode.meshing.voxel.SlabNumbering`, global numbers from an exclusive scan of the
slabs' node counts), makes the hexahedra (quadrilaterals in 2D) of its kept voxels, and dolfinx
builds the distributed mesh with a partitioner that keeps every cell on the rank that made it
(``partition="slab"``; ghost cells across slab faces for ``ghost_mode="shared_facet"``) or with
dolfinx's graph partitioner (``partition="graph"``). Cell and facet tags come from the voxel
labels on either side of each cell and facet, read from the rank's own slab: no communication.

The mesh (cells, nodes, tags and group names) is the one of the serial
:func:`~fem_anode.meshing.voxel.voxel_mesh_data` on any number of ranks; only the partition
differs. Input cell ``i`` is the ``i``-th kept voxel in C order, whatever the number of ranks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol, cast

import basix.ufl
import dolfinx
import numpy as np
import ufl
from mpi4py import MPI

from fem_anode.errors import InputError, UsageError
from fem_anode.faults import first_error
from fem_anode.fem.mesh_io import TaggedMesh, cell_partitioner
from fem_anode.imaging.slabs import balanced_bounds as slab_bounds
from fem_anode.imaging.slabs import layer_counts
from fem_anode.meshing.tags import BOX_SIDE_TAGS, INTERFACE_TAG_OFFSET, interface_name, phase_tag
from fem_anode.meshing.voxel import SlabNumbering, corner_offsets, keep_values

__all__ = ["LayeredImage", "create_voxel_mesh", "slab_bounds"]

logger = logging.getLogger(__name__)

_SIDES = {2: [("top", "bottom"), ("left", "right")], 3: [("top", "bottom"), ("front", "back"), ("left", "right")]}
_PARTITIONS = ("slab", "graph")
_GHOST_MODES = ("none", "shared_facet")


class LayeredImage(Protocol):
    """A label image that can be read a few axis-0 layers at a time.

    :class:`~fem_anode.io.images.VoxelImage` (in memory or memory-mapped) and
    :class:`~fem_anode.io.images.ImageLayers` (pages/slices read on demand) both are.
    """

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def source(self) -> str: ...

    def require_voxel_size(self) -> tuple[float, ...]: ...

    def require_phases(self) -> dict[str, int]: ...

    def read_layers(self, start: int, stop: int) -> np.ndarray: ...


def create_voxel_mesh(
    image: LayeredImage,
    comm: MPI.Comm,
    keep: Sequence[str] | None = None,
    *,
    ghost_mode: str = "none",
    partition: str = "slab",
) -> TaggedMesh:
    """The face-connected voxel mesh of the kept phases, built distributed (collective).

    Args:
        image: label image with voxel size (m) and phase map; each rank reads only its slab of
            axis-0 layers plus two halo layers on each side.
        comm: communicator.
        keep: phases to mesh (default all).
        ghost_mode: ``"none"`` (enough for cell and exterior-facet integrals) or
            ``"shared_facet"`` (ghost cells across process faces, needed for ``dS`` integrals).
        partition: ``"slab"`` (cells stay on the rank that made them: no graph partitioning,
            minimal memory) or ``"graph"`` (dolfinx's graph partitioner; better balanced when
            the kept voxels are unevenly spread over the layers).

    Returns:
        The tagged mesh: phase cell groups, interface (``"a|b"``) and box-side facet groups with
        the tags of :mod:`fem_anode.meshing.tags`, coordinates in metres.

    Raises:
        UsageError: unknown phases to keep, bad options, or the kept phases have no voxels.
        InputError: label values missing from the phase map.
    """
    if ghost_mode not in _GHOST_MODES:
        raise UsageError(f"ghost_mode must be one of {', '.join(_GHOST_MODES)}, got {ghost_mode!r}")
    if partition not in _PARTITIONS:
        raise UsageError(f"partition must be one of {', '.join(_PARTITIONS)}, got {partition!r}")
    start = time.perf_counter()
    shape = tuple(int(n) for n in image.shape)
    ndim = len(shape)
    spacing = np.asarray(image.require_voxel_size(), dtype=np.float64)
    phases = image.require_phases()
    kept = keep_values(phases, keep)
    kept_labels = np.array(sorted(kept.values()))
    bounds = (
        slab_bounds(layer_counts(image, kept_labels, comm), comm.size) if comm.size > 1 else np.array([0, shape[0]])
    )
    z0, z1 = int(bounds[comm.rank]), int(bounds[comm.rank + 1])
    halo = 2
    lo, hi = max(z0 - halo, 0), min(z1 + halo, shape[0])
    error: Exception | None = None
    labels = np.zeros((0, *shape[1:]), dtype=np.int16)
    try:
        raw = np.asarray(image.read_layers(lo, hi))
        if raw.size and not np.issubdtype(raw.dtype, np.integer):
            raise InputError(f"{image.source}: labels must be integers, got {raw.dtype}")
        unknown = np.setdiff1d(np.unique(raw), list(phases.values()))
        if unknown.size:
            raise InputError(f"{image.source}: label values {unknown[:10].tolist()} are not in the phase map {phases}")
        labels = raw.astype(np.int16, copy=False)  # phase labels are 0..255
        del raw
    except (InputError, UsageError) as err:
        error = err
    first_error(comm, error)  # the lowest rank's bad input, raised on every rank
    is_kept = np.isin(labels, kept_labels)
    n_cells_local = int(np.count_nonzero(is_kept[z0 - lo : z1 - lo]))
    cell_offset = _intra(comm).exscan(n_cells_local) or 0
    if comm.allreduce(n_cells_local) == 0:
        raise UsageError(f"the kept phases {', '.join(kept)} have no voxels in {image.source}")

    # One halo layer for the numbering (False outside the image).
    kept_halo = np.zeros((z1 - z0 + 2, *shape[1:]), dtype=bool)
    kept_halo[max(lo, z0 - 1) - (z0 - 1) : min(hi, z1 + 1) - (z0 - 1)] = is_kept[
        max(lo, z0 - 1) - lo : min(hi, z1 + 1) - lo
    ]
    last = z1 == shape[0] and z1 > z0
    numbering = SlabNumbering(kept_halo, owns_last_plane=last)
    numbering.number(_intra(comm).exscan(numbering.owned) or 0)
    del kept_halo
    voxels = np.argwhere(is_kept[z0 - lo : z1 - lo])
    cells = numbering.corner_nodes(voxels, corner_offsets(ndim))
    points = numbering.owned_points(spacing, z0)
    del numbering

    cell_name = "hexahedron" if ndim == 3 else "quadrilateral"
    element = basix.ufl.element("Lagrange", cell_name, 1, shape=(ndim,))
    if partition == "slab" and comm.size > 1:
        partitioner = _slab_partitioner(comm, voxels, is_kept, z0, lo, bounds, ghost_mode)
    elif comm.size > 1:
        partitioner = cell_partitioner(ghost_mode)
    else:
        partitioner = None
    del voxels
    mesh = dolfinx.mesh.create_mesh(comm, cells, points, ufl.Mesh(element), partitioner=partitioner)
    del cells, points
    cell_tags, facet_tags, cell_groups, facet_groups = _tags(mesh, labels, lo, spacing, kept, phases)
    n_global = mesh.topology.index_map(ndim).size_global
    logger.info(
        "voxel mesh: %d cells on %d rank(s) in %.2f s (input cells from %d on this rank)",
        n_global,
        comm.size,
        time.perf_counter() - start,
        cell_offset,
    )
    return TaggedMesh(mesh, cell_tags, facet_tags, cell_groups, facet_groups, bounds if partition == "slab" else None)


def _intra(comm: MPI.Comm) -> MPI.Intracomm:
    """``comm`` as the intra-communicator it is (mpi4py types ``exscan`` on ``Intracomm`` only)."""
    return cast(MPI.Intracomm, comm)


def _slab_partitioner(
    comm: MPI.Comm, voxels: np.ndarray, is_kept: np.ndarray, z0: int, lo: int, bounds: np.ndarray, ghost_mode: str
) -> Callable[..., Any]:
    """Partitioner keeping every cell on its rank; with ``shared_facet``, cells with a kept face
    neighbour in the next or previous slab are ghosted there."""
    rank = comm.rank
    owner = np.full(voxels.shape[0], rank, dtype=np.int32)
    if ghost_mode == "none":
        destinations, offsets = owner, np.arange(voxels.shape[0] + 1, dtype=np.int32)
    else:
        layer = voxels[:, 0] + z0  # global layer of each cell
        slab_of = np.searchsorted(bounds, np.arange(is_kept.shape[0]) + lo, side="right") - 1
        lists = [[rank] for _ in range(voxels.shape[0])]
        for step in (-1, 1):
            neighbour = layer + step
            inside = (neighbour >= lo) & (neighbour < lo + is_kept.shape[0])
            rows = np.flatnonzero(inside)
            face = is_kept[(neighbour[rows] - lo, *voxels[rows, 1:].T)]
            rows = rows[face]
            other = slab_of[neighbour[rows] - lo]
            for row, dest in zip(rows[other != rank], other[other != rank]):
                lists[row].append(int(dest))
        offsets = np.zeros(len(lists) + 1, dtype=np.int32)
        np.cumsum([len(item) for item in lists], out=offsets[1:])
        destinations = np.fromiter((d for item in lists for d in item), dtype=np.int32, count=int(offsets[-1]))
    adjacency = dolfinx.graph.adjacencylist(destinations, offsets)

    def partition(comm_: MPI.Comm, nparts: int, cell_types: Any, cells: Any) -> Any:
        return adjacency._cpp_object if hasattr(adjacency, "_cpp_object") else adjacency

    return partition


def _side_labels(
    points: np.ndarray, spacing: np.ndarray, labels: np.ndarray, lo: int, axis: np.ndarray | None = None
) -> np.ndarray:
    """Label of the voxel containing each point (array-index order), -1 outside the image."""
    index = np.floor(points / spacing).astype(np.int64)
    index[:, 0] -= lo
    shape = np.array(labels.shape)
    inside = np.all((index >= 0) & (index < shape), axis=1)
    out = np.full(points.shape[0], -1, dtype=np.int64)
    out[inside] = labels[tuple(index[inside].T)]
    return out


def _tags(
    mesh: dolfinx.mesh.Mesh,
    labels: np.ndarray,
    lo: int,
    spacing: np.ndarray,
    kept: dict[str, int],
    phases: dict[str, int],
) -> tuple[dolfinx.mesh.MeshTags, dolfinx.mesh.MeshTags, dict[str, int], dict[str, int]]:
    """Cell tags (phase of the voxel) and facet tags (labels on both sides) from the rank's slab."""
    comm = mesh.comm
    tdim = mesh.topology.dim
    fdim = tdim - 1
    n_cells = mesh.topology.index_map(tdim).size_local + mesh.topology.index_map(tdim).num_ghosts
    all_cells = np.arange(n_cells, dtype=np.int32)
    centres = dolfinx.mesh.compute_midpoints(mesh, tdim, all_cells)[:, :tdim][:, ::-1]  # array order
    cell_values = np.array([phase_tag(v) if v >= 0 else 0 for v in range(256)])[
        _side_labels(centres, spacing, labels, lo)
    ]
    cell_tags = dolfinx.mesh.meshtags(mesh, tdim, all_cells, cell_values.astype(np.int32))
    del centres

    # Candidates: facets with one local cell (the image boundary, interfaces with dropped phases
    # and faces shared with another rank) and, between kept phases, facets whose two cells differ.
    mesh.topology.create_connectivity(fdim, tdim)
    f2c = mesh.topology.connectivity(fdim, tdim)
    offsets = f2c.offsets
    cells_per_facet = np.diff(offsets)
    candidates = np.flatnonzero(cells_per_facet == 1).astype(np.int32)
    if len(kept) > 1:
        two = np.flatnonzero(cells_per_facet == 2)
        first, second = f2c.array[offsets[two]], f2c.array[offsets[two] + 1]
        inner = two[cell_values[first] != cell_values[second]].astype(np.int32)
        candidates = np.union1d(candidates, inner).astype(np.int32)
    del cells_per_facet
    centres = dolfinx.mesh.compute_midpoints(mesh, fdim, candidates)[:, :tdim][:, ::-1] / spacing
    # The facet's normal axis is the one where its centre lies on a grid plane.
    twice = np.rint(2.0 * centres).astype(np.int64)
    axis = np.argmax(twice % 2 == 0, axis=1)
    rows = np.arange(candidates.size)
    below, above = centres.copy(), centres.copy()
    below[rows, axis] -= 0.5
    above[rows, axis] += 0.5
    a = _side_labels(below * spacing, spacing, labels, lo)
    b = _side_labels(above * spacing, spacing, labels, lo)
    low, high = np.minimum(a, b), np.maximum(a, b)
    values = np.where(low >= 0, INTERFACE_TAG_OFFSET + 256 * low + high, 0)
    ndim = tdim
    for k in range(ndim):
        low_side, high_side = _SIDES[ndim][k]
        values[(axis == k) & (a < 0)] = BOX_SIDE_TAGS[low_side]
        values[(axis == k) & (b < 0)] = BOX_SIDE_TAGS[high_side]
    keep_facet = (a != b) & (values > 0)
    order = np.argsort(candidates[keep_facet])
    facet_tags = dolfinx.mesh.meshtags(
        mesh, fdim, candidates[keep_facet][order], values[keep_facet][order].astype(np.int32)
    )

    # Group names: every tag any rank has, named the same way as the serial mesher.
    label_to_name = {v: n for n, v in phases.items()}
    present_cells = set().union(*comm.allgather(set(np.unique(cell_values).tolist())))
    present_facets = set().union(*comm.allgather(set(np.unique(values[keep_facet]).tolist())))
    cell_groups = {name: phase_tag(v) for name, v in kept.items() if phase_tag(v) in present_cells}
    side_names = {tag: name for name, tag in BOX_SIDE_TAGS.items()}
    facet_groups: dict[str, int] = {}
    for tag in sorted(present_facets):
        if tag in side_names:
            facet_groups[side_names[tag]] = tag
        else:
            va, vb = divmod(tag - INTERFACE_TAG_OFFSET, 256)
            facet_groups[interface_name(label_to_name[va], label_to_name[vb])] = tag
    cell_tags.name, facet_tags.name = "cell_tags", "facet_tags"
    return cell_tags, facet_tags, cell_groups, facet_groups
