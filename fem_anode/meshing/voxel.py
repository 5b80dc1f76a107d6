"""Voxel meshes: one hexahedron (3D) or quadrilateral (2D) per voxel of the kept phases.

The simplest exact image-to-mesh map: every voxel of a kept phase becomes a cell tagged with
its phase, every voxel face between different phases (or on the image box) becomes a tagged
facet. Names and tag numbers follow :mod:`fem_anode.meshing.tags`. Coordinates are in metres.
Used for tortuosity/effective-transport solves on voxel data and as a reference for smoothed
meshes.
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

__all__ = ["VoxelMeshData", "voxel_mesh_data", "write_voxel_mesh", "add_voxel_model", "MAX_VOXEL_CELLS"]

logger = logging.getLogger(__name__)

#: Refuse voxel meshes above this many cells (about 1 GB of mesh data in gmsh and dolfinx).
MAX_VOXEL_CELLS = 20_000_000

# Corner offsets in array index order ((row, col) or (z, y, x)) in gmsh's node order.
_QUAD_CORNERS = np.array([(0, 0), (0, 1), (1, 1), (1, 0)])
_HEX_CORNERS = np.array([(0, 0, 0), (0, 0, 1), (0, 1, 1), (0, 1, 0), (1, 0, 0), (1, 0, 1), (1, 1, 1), (1, 1, 0)])
# Box side names per array axis: (side at index 0, side at the end).
_SIDES = {2: [("top", "bottom"), ("left", "right")], 3: [("top", "bottom"), ("front", "back"), ("left", "right")]}
# (entity dim, nodes per element) -> gmsh element type: lines, triangles, quads, tets, hexes.
_GMSH_TYPE_BY_NODES = {(1, 2): 1, (2, 3): 2, (2, 4): 3, (3, 4): 4, (3, 8): 5}


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


def _keep_mask(image: VoxelImage, keep: Sequence[str] | None) -> tuple[dict[str, int], np.ndarray]:
    phases = image.require_phases()
    image.check_labels(require_all_phases=False)
    names = list(phases) if keep is None else list(keep)
    unknown = [n for n in names if n not in phases]
    if unknown:
        raise UsageError(f"cannot keep phase(s) {', '.join(unknown)}: not in the phase map ({', '.join(phases)})")
    kept = {n: phases[n] for n in names}
    mask = np.isin(image.array, list(kept.values()))
    if not mask.any():
        raise UsageError(f"the kept phases {', '.join(names)} have no voxels in {image.source}")
    return kept, mask


def voxel_mesh_data(image: VoxelImage, keep: Sequence[str] | None = None) -> VoxelMeshData:
    """Build the voxel mesh of the kept phases (all phases if ``keep`` is None)."""
    kept, mask = _keep_mask(image, keep)
    phases = image.require_phases()
    spacing = np.asarray(image.require_voxel_size())
    ndim = image.ndim
    n_cells = int(np.count_nonzero(mask))
    if n_cells > MAX_VOXEL_CELLS:
        raise UsageError(
            f"voxel mesh would have {n_cells:,} cells (limit {MAX_VOXEL_CELLS:,}, about "
            f"{n_cells * 300 / 1e9:.1f} GB); crop or coarsen the image"
        )
    shape = np.array(image.shape)
    node_shape = tuple(shape + 1)
    corners = _HEX_CORNERS if ndim == 3 else _QUAD_CORNERS
    labels = image.array.astype(np.int32)

    voxel_index = np.argwhere(mask)  # (m, ndim)
    cell_nodes = np.stack(
        [np.ravel_multi_index(tuple((voxel_index + c).T), node_shape) for c in corners], axis=1
    )
    label_to_name = {v: n for n, v in phases.items()}
    cell_tags = np.array([phase_tag(v) for v in range(256)])[labels[mask]] if n_cells else np.zeros(0, int)

    groups: dict[str, tuple[int, int]] = {name: (ndim, phase_tag(value)) for name, value in kept.items()}
    keep_lut = np.zeros(257, dtype=bool)  # index label + 1; -1 (outside) -> index 0
    keep_lut[np.array(list(kept.values())) + 1] = True
    padded = np.pad(labels, 1, constant_values=-1)
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
        others = [ax for ax in range(ndim) if ax != axis]
        face_corners = _QUAD_CORNERS if ndim == 3 else np.array([(0,), (1,)])
        nodes = []
        for corner in face_corners:
            idx = where.copy()
            for k, ax in enumerate(others):
                idx[:, ax] += corner[k]
            nodes.append(np.ravel_multi_index(tuple(idx.T), node_shape))
        facet_blocks.append(np.stack(nodes, axis=1))
        tag_blocks.append(tags)
        for side, side_mask in ((low_side, a < 0), (high_side, b < 0)):
            if side_mask.any():
                groups[side] = (ndim - 1, BOX_SIDE_TAGS[side])
        inner_pairs = np.unique(np.stack([np.minimum(a, b), np.maximum(a, b)], axis=1)[(a >= 0) & (b >= 0)], axis=0)
        for va, vb in inner_pairs:
            groups[interface_name(label_to_name[int(va)], label_to_name[int(vb)])] = (ndim - 1, interface_tag(int(va), int(vb)))
    facets = np.concatenate(facet_blocks)
    facet_tags = np.concatenate(tag_blocks)

    used, inverse = np.unique(np.concatenate([cell_nodes.ravel(), facets.ravel()]), return_inverse=True)
    cells = inverse[: cell_nodes.size].reshape(cell_nodes.shape)
    facets = inverse[cell_nodes.size :].reshape(facets.shape)
    grid = np.stack(np.unravel_index(used, node_shape), axis=1) * spacing  # array-axis order
    points = grid[:, ::-1].copy()  # x = last axis, y = previous, z = axis 0
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
