"""Image-to-mesh conversion (gmsh/meshio) with named physical groups; see :mod:`.tags`.

The names below load their module on first use (SPEC 1 lazy loading): a solver that only needs
:mod:`.tags` does not pay for SciPy and gmsh.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fem_anode._lazy import attach

#: Public name -> the module of this package that defines it.
_EXPORTS = {
    "BOX_SIDE_TAGS": "tags",
    "interface_name": "tags",
    "interface_tag": "tags",
    "phase_tag": "tags",
    "VoxelMeshData": "voxel",
    "voxel_mesh_data": "voxel",
    "write_voxel_mesh": "voxel",
    # smooth 2D meshes, tetrahedral voxel meshes, the common entry point and the quality report
    "METHODS": "build",
    "MeshResult": "build",
    "build_model": "build",
    "mesh_image": "build",
    "BoundaryNetwork": "contours",
    "boundary_network": "contours",
    "clean_labels": "contours",
    "SmoothMeshOptions": "smooth2d",
    "build_smooth_model_2d": "smooth2d",
    "tet_mesh_data": "tet3d",
}

__all__ = [
    "BOX_SIDE_TAGS",
    "METHODS",
    "BoundaryNetwork",
    "MeshResult",
    "SmoothMeshOptions",
    "VoxelMeshData",
    "boundary_network",
    "build_model",
    "build_smooth_model_2d",
    "clean_labels",
    "interface_name",
    "interface_tag",
    "mesh_image",
    "phase_tag",
    "tet_mesh_data",
    "voxel_mesh_data",
    "write_voxel_mesh",
]

if TYPE_CHECKING:
    from fem_anode.meshing.build import METHODS, MeshResult, build_model, mesh_image
    from fem_anode.meshing.contours import BoundaryNetwork, boundary_network, clean_labels
    from fem_anode.meshing.smooth2d import SmoothMeshOptions, build_smooth_model_2d
    from fem_anode.meshing.tags import BOX_SIDE_TAGS, interface_name, interface_tag, phase_tag
    from fem_anode.meshing.tet3d import tet_mesh_data
    from fem_anode.meshing.voxel import VoxelMeshData, voxel_mesh_data, write_voxel_mesh


__getattr__, __dir__ = attach(__name__, _EXPORTS)
