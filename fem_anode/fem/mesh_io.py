"""Loading tagged gmsh meshes into dolfinx, with physical-group names, on any communicator."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import dolfinx
from mpi4py import MPI

from fem_anode.errors import InputError

__all__ = ["TaggedMesh", "read_mesh"]


@dataclasses.dataclass
class TaggedMesh:
    """A distributed dolfinx mesh with its cell and facet tags and the group names.

    Attributes:
        mesh: the dolfinx mesh (coordinates as in the file, metres for fem_anode meshes).
        cell_tags: cell markers (phase tags).
        facet_tags: facet markers (interfaces and box sides).
        cell_groups: cell group name -> tag.
        facet_groups: facet group name -> tag.
    """

    mesh: dolfinx.mesh.Mesh
    cell_tags: dolfinx.mesh.MeshTags
    facet_tags: dolfinx.mesh.MeshTags
    cell_groups: dict[str, int]
    facet_groups: dict[str, int]

    @property
    def comm(self) -> MPI.Comm:
        return self.mesh.comm

    def facet_tag(self, name: str) -> int:
        """Tag of a facet group by name, or InputError listing the groups the mesh has."""
        try:
            return self.facet_groups[name]
        except KeyError:
            raise InputError(f"mesh has no facet group {name!r}; it has {', '.join(sorted(self.facet_groups)) or 'none'}") from None

    def cell_tag(self, name: str) -> int:
        """Tag of a cell group by name, or InputError listing the groups the mesh has."""
        try:
            return self.cell_groups[name]
        except KeyError:
            raise InputError(f"mesh has no cell group {name!r}; it has {', '.join(sorted(self.cell_groups)) or 'none'}") from None


def _open_on_root(path: Path) -> tuple[int, dict[str, int], dict[str, int]]:
    """Open ``path`` in the (initialised) gmsh session; return gdim and the named groups."""
    import gmsh

    gmsh.open(str(path))
    groups = gmsh.model.getPhysicalGroups()
    dim = max((d for d, _ in groups), default=gmsh.model.getDimension())
    cells = {gmsh.model.getPhysicalName(d, t) or str(t): t for d, t in groups if d == dim}
    facets = {gmsh.model.getPhysicalName(d, t) or str(t): t for d, t in groups if d == dim - 1}
    _, coords, _ = gmsh.model.mesh.getNodes()
    gdim = 3 if dim == 3 or (coords.size and abs(coords[2::3]).max() > 0) else 2
    return gdim, cells, facets


def read_mesh(path: str | Path, comm: MPI.Comm = MPI.COMM_WORLD) -> TaggedMesh:
    """Read a gmsh ``.msh`` file on rank 0 and distribute it over ``comm``.

    Raises:
        InputError: the file is missing, unreadable or has no cell physical groups.
    """
    import gmsh

    path = Path(path)
    meta: tuple | str | None = None
    if comm.rank == 0:
        gmsh.initialize(interruptible=False)
        gmsh.option.setNumber("General.Terminal", 0)
        if not path.is_file():
            meta = f"mesh file not found: {path}"
        else:
            try:
                meta = _open_on_root(path)
                if not meta[1]:
                    meta = f"{path}: mesh has no cell physical groups (tag the phases/regions)"
            except Exception as err:  # gmsh raises plain Exception
                meta = f"cannot read mesh {path}: {err}"
    try:
        meta = comm.bcast(meta, root=0)
        if isinstance(meta, str):
            raise InputError(meta)
        gdim, cell_groups, facet_groups = meta  # type: ignore[misc]
        mesh, cell_tags, facet_tags = dolfinx.io.gmshio.model_to_mesh(gmsh.model, comm, 0, gdim=gdim)
    finally:
        if comm.rank == 0:
            gmsh.finalize()
    cell_tags.name, facet_tags.name = "cell_tags", "facet_tags"
    return TaggedMesh(mesh, cell_tags, facet_tags, cell_groups, facet_groups)
