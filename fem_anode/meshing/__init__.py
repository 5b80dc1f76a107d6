"""Image-to-mesh conversion (gmsh/meshio) with named physical groups; see :mod:`.tags`."""

from fem_anode.meshing.tags import BOX_SIDE_TAGS, interface_name, interface_tag, phase_tag
from fem_anode.meshing.voxel import VoxelMeshData, voxel_mesh_data, write_voxel_mesh

__all__ = ["BOX_SIDE_TAGS", "VoxelMeshData", "interface_name", "interface_tag", "phase_tag", "voxel_mesh_data", "write_voxel_mesh"]
