"""Image-to-mesh conversion (gmsh/meshio) with named physical groups; see :mod:`.tags`."""

from fem_anode.meshing.tags import BOX_SIDE_TAGS, interface_name, interface_tag, phase_tag
from fem_anode.meshing.voxel import VoxelMeshData, voxel_mesh_data, write_voxel_mesh

__all__ = [
    "BOX_SIDE_TAGS",
    "VoxelMeshData",
    "interface_name",
    "interface_tag",
    "phase_tag",
    "voxel_mesh_data",
    "write_voxel_mesh",
]

# Smooth 2D meshes, tetrahedral voxel meshes, the common entry point and the quality report.
from fem_anode.meshing.build import METHODS, MeshResult, build_model, mesh_image
from fem_anode.meshing.contours import BoundaryNetwork, boundary_network, clean_labels
from fem_anode.meshing.smooth2d import SmoothMeshOptions, build_smooth_model_2d
from fem_anode.meshing.tet3d import tet_mesh_data

__all__ += [
    "METHODS",
    "MeshResult",
    "build_model",
    "mesh_image",
    "BoundaryNetwork",
    "boundary_network",
    "clean_labels",
    "SmoothMeshOptions",
    "build_smooth_model_2d",
    "tet_mesh_data",
]
