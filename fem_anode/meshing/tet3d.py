"""Conforming tetrahedral meshes of 3D label volumes (six tetrahedra per voxel).

Every voxel of a kept phase is split into the six Kuhn (Freudenthal) tetrahedra around its
main diagonal, and every tagged voxel face into the two triangles along its min-max diagonal.
All voxels use the same split, so neighbouring voxels share their face triangles and the mesh
is conforming; phase volumes equal the voxel counts times the voxel volume exactly. Names and
tags follow :mod:`fem_anode.meshing.tags` (coordinates in metres: x = axis 2, y = axis 1,
z = axis 0). This gives P1/P2 simplicial spaces on voxel data; the hexahedral mesh of
:mod:`fem_anode.meshing.voxel` has six times fewer cells.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence

import numpy as np

from fem_anode.io.images import VoxelImage
from fem_anode.meshing.voxel import VoxelMeshData, voxel_mesh_data

__all__ = ["tet_mesh_data", "MAX_TET_CELLS"]

logger = logging.getLogger(__name__)

#: Refuse tetrahedral meshes above this many cells.
MAX_TET_CELLS = 60_000_000

# Hex corner (dz, dy, dx) -> local index in voxel.py's gmsh hex node order.
_HEX = [(0, 0, 0), (0, 0, 1), (0, 1, 1), (0, 1, 0), (1, 0, 0), (1, 0, 1), (1, 1, 1), (1, 1, 0)]
_LOCAL: dict[tuple[int, ...], int] = {c: i for i, c in enumerate(_HEX)}


def _kuhn_tets() -> np.ndarray:
    """(6, 4) local hex corner indices of the Kuhn tetrahedra along the (0,0,0)-(1,1,1) diagonal."""
    tets = []
    for perm in itertools.permutations(range(3)):
        corner = [0, 0, 0]
        path = [tuple(corner)]
        for axis in perm:
            corner[axis] = 1
            path.append(tuple(corner))
        tets.append([_LOCAL[p] for p in path])
    return np.array(tets)


_TETS = _kuhn_tets()


def tet_mesh_data(image: VoxelImage, keep: Sequence[str] | None = None) -> VoxelMeshData:
    """Tetrahedral mesh (6 tets per voxel) of the kept phases of a 3D label image.

    Returns:
        A :class:`VoxelMeshData` with tetrahedral cells (m, 4) and triangular facets (k, 3);
        tetrahedra are positively oriented.
    """
    from fem_anode.errors import InputError, UsageError

    if image.ndim != 3:
        raise InputError(f"{image.source}: tetrahedral voxel meshes need a 3D image, got {image.ndim}D")
    hexes = voxel_mesh_data(image, keep)
    if 6 * hexes.cells.shape[0] > MAX_TET_CELLS:
        raise UsageError(
            f"tetrahedral mesh would have {6 * hexes.cells.shape[0]:,} cells (limit {MAX_TET_CELLS:,}); crop the "
            "volume or use --method voxel"
        )
    cells = hexes.cells[:, _TETS].reshape(-1, 4)
    cell_tags = np.repeat(hexes.cell_tags, 6)
    # Orientation: the coordinate swap (z, y, x) -> (x, y, z) may flip some; fix by the sign of the volume.
    p = hexes.points
    vol = np.einsum(
        "ij,ij->i",
        np.cross(p[cells[:, 1]] - p[cells[:, 0]], p[cells[:, 2]] - p[cells[:, 0]]),
        p[cells[:, 3]] - p[cells[:, 0]],
    )
    neg = vol < 0
    cells[neg] = cells[neg][:, [0, 2, 1, 3]]
    quads = hexes.facets  # corners (0,0),(0,1),(1,1),(1,0) in the face's two axes: split along q0-q2
    facets = np.concatenate([quads[:, [0, 1, 2]], quads[:, [0, 2, 3]]])
    facet_tags = np.concatenate([hexes.facet_tags, hexes.facet_tags])
    logger.info(
        "tetrahedral voxel mesh: %d tetrahedra, %d triangles, %d nodes", cells.shape[0], facets.shape[0], p.shape[0]
    )
    return VoxelMeshData(p, cells, cell_tags, facets, facet_tags, hexes.groups)
