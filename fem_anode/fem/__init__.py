"""FEniCSx (dolfinx 0.9) solvers on tagged image meshes. Importing this needs dolfinx."""

from fem_anode.fem.mesh_io import TaggedMesh, read_mesh

__all__ = ["TaggedMesh", "read_mesh"]
