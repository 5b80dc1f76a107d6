"""Voxel meshes: one hexahedron (3D) or quadrilateral (2D) per voxel of the kept phases.

The simplest exact image-to-mesh map: every voxel of a kept phase becomes a cell tagged with
its phase, every voxel face between different phases (or on the image box) becomes a tagged
facet. Names and tag numbers follow :mod:`fem_anode.meshing.tags`. Coordinates are in metres.

**Connectivity rule: voxels connect through shared faces only** (the convention of TauFactor,
PoreSpy and OpenImpala). Where kept voxels meet only along an edge or at a corner, the grid node
there is duplicated, one copy per face-connected group of the voxels around it, so no Li
diffuses through a contact of zero area. Concretely, the ``2^d`` voxels around a grid node
(``d`` = 2 or 3) form a small graph (two voxels are adjacent if they differ in one index);
every connected component of the kept voxels in it gets its own node.

Nodes are numbered by grid position (axis 0 slowest, then the next axes, then the component),
counting only nodes that a kept voxel uses, so a slab of consecutive axis-0 layers numbers its
own nodes without looking beyond one layer on either side: :class:`SlabNumbering` is shared by
the serial ``.msh`` writer here and by the distributed mesh builder
(:mod:`fem_anode.fem.voxel_mesh`), which gives the same mesh on any number of ranks.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fem_anode.errors import UsageError
from fem_anode.io.images import VoxelImage
from fem_anode.io.output import atomic_path
from fem_anode.meshing.tags import BOX_SIDE_TAGS, interface_name, interface_tag, phase_tag

__all__ = [
    "SlabNumbering",
    "VoxelMeshData",
    "add_voxel_model",
    "corner_offsets",
    "keep_values",
    "resolve_keep",
    "voxel_mesh_data",
    "write_voxel_mesh",
]

logger = logging.getLogger(__name__)

# Box side names per array axis: (side at index 0, side at the end).
_SIDES = {2: [("top", "bottom"), ("left", "right")], 3: [("top", "bottom"), ("front", "back"), ("left", "right")]}
# (entity dim, nodes per element) -> gmsh element type: lines, triangles, quads, tets, hexes.
_GMSH_TYPE_BY_NODES = {(1, 2): 1, (2, 3): 2, (2, 4): 3, (3, 4): 4, (3, 8): 5}
# dolfinx corner order -> gmsh corner order (quadrilateral, hexahedron).
_GMSH_FROM_DOLFINX = {2: np.array([0, 1, 3, 2]), 3: np.array([0, 1, 3, 2, 4, 5, 7, 6])}


def corner_offsets(ndim: int) -> np.ndarray:
    """Corner offsets in array-index order ((dy, dx) or (dz, dy, dx)) in dolfinx's cell order.

    dolfinx numbers the corners of quadrilaterals and hexahedra as a tensor product with x
    (the last array axis) fastest: corner ``a = sum_k offset_k 2^(d-1-k)``.
    """
    return np.array([[(a >> (ndim - 1 - k)) & 1 for k in range(ndim)] for a in range(2**ndim)], dtype=np.int64)


def _block_tables(ndim: int) -> tuple[np.ndarray, np.ndarray]:
    """Face-connected components of the kept voxels among the ``2^d`` voxels around a node.

    Block position ``p`` has bit ``d-1-k`` set when the voxel lies on the high side of the node
    along axis k. For every occupancy pattern (bit p set: voxel p kept) returns the component
    ordinal of each kept position (-1 where not kept; components ordered by their smallest
    position) and the number of components.
    """
    n = 2**ndim
    ordinal = np.full((2**n, n), -1, dtype=np.int8)
    count = np.zeros(2**n, dtype=np.uint8)
    for config in range(2**n):
        label = list(range(n))
        for _ in range(ndim):  # the block graph (a square or a cube) has diameter ndim
            for p in range(n):
                if not config >> p & 1:
                    continue
                for k in range(ndim):
                    q = p ^ (1 << k)
                    if config >> q & 1:
                        label[p] = label[q] = min(label[p], label[q])
        roots = sorted({label[p] for p in range(n) if config >> p & 1})
        count[config] = len(roots)
        for p in range(n):
            if config >> p & 1:
                ordinal[config, p] = roots.index(label[p])
    return ordinal, count


_TABLES = {ndim: _block_tables(ndim) for ndim in (2, 3)}


class SlabNumbering:
    """Global numbers of the face-connected node copies of a slab of axis-0 layers.

    Args:
        kept: boolean kept-voxel mask of layers ``z0 - 1 ... z1`` (one halo layer on each side of
            the slab's own layers ``z0 ... z1 - 1``; ``False`` where outside the image).
        owns_last_plane: the slab also owns the node plane ``z1`` (the last slab of the image).

    The slab owns the node planes ``z0 ... z1 - 1`` (and ``z1`` if ``owns_last_plane``): their
    :attr:`owned` node copies get the numbers ``node_offset ...`` once :meth:`number` is given
    the offset (the nodes of the slabs before this one); the numbers of plane ``z1`` continue
    after the slab's own, as the next slab numbers them.
    """

    def __init__(self, kept: np.ndarray, owns_last_plane: bool) -> None:
        kept = np.asarray(kept, dtype=bool)
        self.ndim = kept.ndim
        self.layers = kept.shape[0] - 2
        if self.layers < 0:
            raise ValueError("kept needs one halo layer on each side of the slab")
        ordinal, count = _TABLES[self.ndim]
        self._ordinal = ordinal
        padded = np.pad(kept, [(0, 0)] + [(1, 1)] * (self.ndim - 1)).view(np.uint8)
        plane_shape = tuple(s + 1 for s in kept.shape[1:])
        self.node_shape = (self.layers + 1, *plane_shape)
        # Occupancy pattern of the voxel block around every node (planes z0 ... z1): voxel
        # (K - 1 + dz, J - 1 + dy, ...) of the node (K, J, ...) is padded[K + dz, J + dy, ...]
        # in slab-local indices, since padded starts one layer (and one pixel) before.
        self.config = np.zeros(self.node_shape, dtype=np.uint8)
        for position, offset in enumerate(corner_offsets(self.ndim)):
            index = tuple(slice(o, o + n) for o, n in zip(offset, self.node_shape))
            self.config |= (padded[index] << position).astype(np.uint8, copy=False)
        copies = count[self.config]
        plane = int(np.prod(plane_shape))
        owned_planes = self.layers + (1 if owns_last_plane else 0)
        #: Node copies this slab owns.
        self.owned = int(copies[:owned_planes].sum(dtype=np.int64))
        self._copies = copies.ravel()
        self._owned_grid = owned_planes * plane
        self._first = np.zeros(0, dtype=np.int64)

    def number(self, node_offset: int) -> SlabNumbering:
        """Number the owned copies from ``node_offset`` (global); returns self."""
        # First global number of every grid node's copies (planes z0 ... z1).
        self._first = np.empty(self._copies.size, dtype=np.int64)
        self._first[0] = node_offset
        np.cumsum(self._copies[:-1], dtype=np.int64, out=self._first[1:])
        self._first[1:] += node_offset
        return self

    def corner_nodes(self, voxels: np.ndarray, corners: np.ndarray) -> np.ndarray:
        """Global node numbers of ``corners`` (offsets, (k, d)) of kept ``voxels`` (slab-local
        indices, axis 0 counted from ``z0``; (m, d)). Returns (m, k) int64."""
        out = np.empty((voxels.shape[0], corners.shape[0]), dtype=np.int64)
        weights = 1 << np.arange(self.ndim - 1, -1, -1)
        for j, offset in enumerate(corners):
            flat = np.ravel_multi_index(tuple((voxels + offset).T), self.node_shape)
            position = int(((1 - offset) * weights).sum())  # the voxel's place in the node's block
            rank = self._ordinal[self.config.ravel()[flat], position]
            out[:, j] = self._first[flat] + rank
        return out

    def owned_points(self, spacing: Sequence[float] | np.ndarray, z0: int) -> np.ndarray:
        """Coordinates (x, y[, z]) in metres of the owned node copies, in numbering order."""
        n_grid = self._owned_grid
        grid = np.repeat(np.arange(n_grid, dtype=np.int64), self._copies[:n_grid])
        index = np.stack(np.unravel_index(grid, self.node_shape), axis=1)
        index[:, 0] += z0
        return (index * np.asarray(spacing, dtype=np.float64))[:, ::-1].copy()


@dataclasses.dataclass
class VoxelMeshData:
    """Nodes, cells and facets of a voxel mesh with gmsh-style physical groups.

    Attributes:
        points: node coordinates (n, gdim) in metres, columns x, y[, z].
        cells: cell node indices (m, 4 or 8), gmsh node order.
        cell_tags: phase tag per cell.
        facets: facet node indices (k, 2 or 4).
        facet_tags: interface or box-side tag per facet.
        groups: physical group name -> (dimension, tag).
    """

    points: np.ndarray
    cells: np.ndarray
    cell_tags: np.ndarray
    facets: np.ndarray
    facet_tags: np.ndarray
    groups: dict[str, tuple[int, int]]

    @property
    def gdim(self) -> int:
        return int(self.points.shape[1])


def keep_values(phases: dict[str, int], keep: Sequence[str] | None) -> dict[str, int]:
    """The kept phases (all if ``keep`` is None) as name -> label, or UsageError naming unknown ones."""
    names = list(phases) if keep is None else list(keep)
    unknown = [n for n in names if n not in phases]
    if unknown:
        raise UsageError(f"cannot keep phase(s) {', '.join(unknown)}: not in the phase map ({', '.join(phases)})")
    return {n: phases[n] for n in names}


def _present_labels(array: np.ndarray) -> set[int]:
    """Label values that occur in ``array``."""
    a = np.asarray(array)
    if a.dtype.kind == "u" and a.dtype.itemsize <= 2:  # one counting pass instead of a sort
        return {int(v) for v in np.flatnonzero(np.bincount(a.ravel()))}
    return {int(v) for v in np.unique(a)}


def resolve_keep(image: VoxelImage, keep: Sequence[str] | None) -> dict[str, int]:
    """The phases to mesh that occur in the image, name -> label (the check every mesher uses).

    Args:
        image: labelled image with its phase map.
        keep: phase names to mesh; ``None``: every phase of the map that has voxels.

    Raises:
        UsageError: ``keep`` is empty or names a phase that is not in the phase map or has no
            voxels, or no phase to mesh has voxels.
        InputError: label values that are not in the phase map.
    """
    phases = image.require_phases()
    image.check_labels(require_all_phases=False)
    if keep is not None and not list(keep):
        raise UsageError("no phases to mesh: --keep is empty")
    kept = keep_values(phases, keep)
    present = _present_labels(image.array)
    missing = [name for name, value in kept.items() if value not in present]
    if (keep is not None and missing) or len(missing) == len(kept):
        raise UsageError(f"the kept phase(s) {', '.join(missing)} have no voxels in {image.source}")
    return {name: value for name, value in kept.items() if value in present}


def _keep_mask(image: VoxelImage, keep: Sequence[str] | None) -> tuple[dict[str, int], np.ndarray]:
    resolve_keep(image, keep)
    kept = keep_values(image.require_phases(), keep)  # absent phases of the map keep their (empty) groups
    return kept, np.isin(image.array, list(kept.values()))


def voxel_mesh_data(image: VoxelImage, keep: Sequence[str] | None = None) -> VoxelMeshData:
    """Build the face-connected voxel mesh of the kept phases (all phases if ``keep`` is None)."""
    kept, mask = _keep_mask(image, keep)
    phases = image.require_phases()
    spacing = np.asarray(image.require_voxel_size())
    ndim = image.ndim
    labels = image.array.astype(np.int32)
    numbering = SlabNumbering(np.pad(mask, [(1, 1)] + [(0, 0)] * (ndim - 1)), owns_last_plane=True).number(0)
    voxels = np.argwhere(mask)
    cells = numbering.corner_nodes(voxels, corner_offsets(ndim)[_GMSH_FROM_DOLFINX[ndim]])
    cell_tags = np.array([phase_tag(v) for v in range(256)])[labels[mask]]
    label_to_name = {v: n for n, v in phases.items()}

    groups: dict[str, tuple[int, int]] = {name: (ndim, phase_tag(value)) for name, value in kept.items()}
    keep_lut = np.zeros(257, dtype=bool)  # index label + 1; -1 (outside) -> index 0
    keep_lut[np.array(list(kept.values())) + 1] = True
    padded = np.pad(labels, 1, constant_values=-1)
    face_corners = corner_offsets(ndim - 1)[_GMSH_FROM_DOLFINX[ndim - 1]] if ndim == 3 else corner_offsets(1)
    facet_blocks, tag_blocks = [], []
    for axis in range(ndim):
        # Faces perpendicular to `axis` at planes 0..n between padded voxels (lo, hi).
        inner = [slice(1, -1)] * ndim
        lo_idx, hi_idx = list(inner), list(inner)
        lo_idx[axis] = slice(0, -1)
        hi_idx[axis] = slice(1, None)
        lo, hi = padded[tuple(lo_idx)], padded[tuple(hi_idx)]
        emit = (lo != hi) & (keep_lut[lo + 1] | keep_lut[hi + 1])
        where = np.argwhere(emit)  # plane index along axis; voxel index along the others
        a, b = lo[emit], hi[emit]
        tags = np.where(np.minimum(a, b) >= 0, 10000 + 256 * np.minimum(a, b) + np.maximum(a, b), 0)
        low_side, high_side = _SIDES[ndim][axis]
        tags[a < 0] = BOX_SIDE_TAGS[low_side]
        tags[b < 0] = BOX_SIDE_TAGS[high_side]
        # The facet's nodes are those of a kept voxel on one side (the low one if kept): a face
        # shared by two kept voxels has the same node copies from both.
        low_kept = keep_lut[a + 1]
        voxel = where.copy()
        voxel[low_kept, axis] -= 1
        others = [ax for ax in range(ndim) if ax != axis]
        corners = np.zeros((face_corners.shape[0], ndim), dtype=np.int64)
        corners[:, others] = face_corners
        nodes = np.empty((voxel.shape[0], corners.shape[0]), dtype=np.int64)
        for side_is_low in (True, False):
            rows = low_kept if side_is_low else ~low_kept
            side_corners = corners.copy()
            side_corners[:, axis] = 1 if side_is_low else 0
            nodes[rows] = numbering.corner_nodes(voxel[rows], side_corners)
        facet_blocks.append(nodes)
        tag_blocks.append(tags)
        for side, side_mask in ((low_side, a < 0), (high_side, b < 0)):
            if side_mask.any():
                groups[side] = (ndim - 1, BOX_SIDE_TAGS[side])
        inner_pairs = np.unique(np.stack([np.minimum(a, b), np.maximum(a, b)], axis=1)[(a >= 0) & (b >= 0)], axis=0)
        for va, vb in inner_pairs:
            groups[interface_name(label_to_name[int(va)], label_to_name[int(vb)])] = (
                ndim - 1,
                interface_tag(int(va), int(vb)),
            )
    facets = np.concatenate(facet_blocks)
    facet_tags = np.concatenate(tag_blocks)
    points = numbering.owned_points(spacing, 0)
    logger.info("voxel mesh: %d cells, %d facets, %d nodes", cells.shape[0], facets.shape[0], points.shape[0])
    return VoxelMeshData(points, cells, cell_tags, facets, facet_tags, groups)


def add_voxel_model(data: VoxelMeshData, name: str = "voxel_mesh") -> None:
    """Add ``data`` as a new model (discrete entities, one per group) to the current gmsh session."""
    import gmsh

    gdim = data.gdim
    xyz = np.zeros((data.points.shape[0], 3))
    xyz[:, :gdim] = data.points
    gmsh.model.add(name)
    node_tags = np.arange(1, xyz.shape[0] + 1)
    element_tag = 1
    first = True
    cell_dim = gdim
    facet_nodes = data.facets.shape[1]
    cell_nodes = data.cells.shape[1]
    for group, (dim, tag) in sorted(data.groups.items(), key=lambda item: (-item[1][0], item[1][1])):
        gmsh.model.addDiscreteEntity(dim, tag)
        if first:
            gmsh.model.mesh.addNodes(dim, tag, node_tags, xyz.ravel())
            first = False
        conn, tags = (data.cells, data.cell_tags) if dim == cell_dim else (data.facets, data.facet_tags)
        selected = conn[tags == tag] + 1
        elements = np.arange(element_tag, element_tag + selected.shape[0])
        element_tag += selected.shape[0]
        nodes_per = cell_nodes if dim == cell_dim else facet_nodes
        gmsh.model.mesh.addElementsByType(tag, _GMSH_TYPE_BY_NODES[(dim, nodes_per)], elements, selected.ravel())
        gmsh.model.addPhysicalGroup(dim, [tag], tag, name=group)


def write_voxel_mesh(image: VoxelImage, path: str | Path, keep: Sequence[str] | None = None) -> VoxelMeshData:
    """Build the voxel mesh and write it as a gmsh ``.msh`` (format 4.1) file, atomically."""
    import gmsh

    path = Path(path)
    if path.suffix != ".msh":
        raise UsageError(f"mesh output {path} must end in .msh")
    data = voxel_mesh_data(image, keep)
    gmsh.initialize(interruptible=False)
    try:
        gmsh.option.setNumber("General.Terminal", 0)
        add_voxel_model(data)
        gmsh.option.setNumber("Mesh.MshFileVersion", 4.1)
        with atomic_path(path) as tmp:
            gmsh.write(str(tmp))
    finally:
        gmsh.finalize()
    return data
