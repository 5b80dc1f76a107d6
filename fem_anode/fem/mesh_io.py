"""Loading tagged gmsh meshes into dolfinx, with physical-group names, on any communicator.

* :func:`read_mesh` reads a ``.msh`` file on rank 0 and distributes it;
* :func:`image_to_tagged_mesh` meshes a label image in memory, without a file: voxel meshes
  distributed (:func:`fem_anode.fem.voxel_mesh.create_voxel_mesh`, every rank its slab), the
  other methods of :mod:`fem_anode.meshing.build` on rank 0, then distributed;
* :func:`model_to_tagged_mesh` distributes the current gmsh model (rank 0) with its names;
* :func:`write_xdmf` writes the mesh with its cell and facet tags for ParaView.

The mesh is distributed with ghost mode ``shared_facet`` by default, so that integrals over
interior interfaces (``dS``) are right on any number of ranks.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dolfinx
import numpy as np
from mpi4py import MPI

from fem_anode.errors import FemAnodeError, InputError, UsageError
from fem_anode.faults import share_error

if TYPE_CHECKING:
    from fem_anode.io.images import VoxelImage

#: gdim, cell groups and facet groups (name -> tag) of a gmsh model.
_Groups = tuple[int, dict[str, int], dict[str, int]]

__all__ = ["TaggedMesh", "cell_partitioner", "read_mesh", "model_to_tagged_mesh", "image_to_tagged_mesh", "write_xdmf"]


@dataclasses.dataclass
class TaggedMesh:
    """A distributed dolfinx mesh with its cell and facet tags and the group names.

    Attributes:
        mesh: the dolfinx mesh (coordinates as in the file, metres for fem_anode meshes).
        cell_tags: cell markers (phase tags).
        facet_tags: facet markers (interfaces and box sides).
        cell_groups: cell group name -> tag.
        facet_groups: facet group name -> tag.
        slab_bounds: for voxel meshes partitioned by slabs of image layers
            (:mod:`fem_anode.fem.voxel_mesh`): rank r owns the cells of layers
            ``slab_bounds[r] ... slab_bounds[r + 1] - 1``; else ``None``.
    """

    mesh: dolfinx.mesh.Mesh
    cell_tags: dolfinx.mesh.MeshTags
    facet_tags: dolfinx.mesh.MeshTags
    cell_groups: dict[str, int]
    facet_groups: dict[str, int]
    slab_bounds: np.ndarray | None = None

    @property
    def comm(self) -> MPI.Comm:
        return self.mesh.comm

    def facet_tag(self, name: str) -> int:
        """Tag of a facet group by name, or InputError listing the groups the mesh has."""
        try:
            return self.facet_groups[name]
        except KeyError:
            raise InputError(
                f"mesh has no facet group {name!r}; it has {', '.join(sorted(self.facet_groups)) or 'none'}"
            ) from None

    def cell_tag(self, name: str) -> int:
        """Tag of a cell group by name, or InputError listing the groups the mesh has."""
        try:
            return self.cell_groups[name]
        except KeyError:
            raise InputError(
                f"mesh has no cell group {name!r}; it has {', '.join(sorted(self.cell_groups)) or 'none'}"
            ) from None


def _groups_on_root() -> tuple[int, dict[str, int], dict[str, int]]:
    """gdim and the named cell/facet groups of the current gmsh model."""
    import gmsh

    groups = gmsh.model.getPhysicalGroups()
    dim = max((d for d, _ in groups), default=gmsh.model.getDimension())
    cells = {gmsh.model.getPhysicalName(d, t) or str(t): t for d, t in groups if d == dim}
    facets = {gmsh.model.getPhysicalName(d, t) or str(t): t for d, t in groups if d == dim - 1}
    _, coords, _ = gmsh.model.mesh.getNodes()
    gdim = 3 if dim == 3 or (coords.size and abs(coords[2::3]).max() > 0) else 2
    return gdim, cells, facets


def _open_on_root(path: Path) -> tuple[int, dict[str, int], dict[str, int]]:
    """Open ``path`` in the (initialised) gmsh session; return gdim and the named groups."""
    import gmsh

    gmsh.open(str(path))
    return _groups_on_root()


def cell_partitioner(ghost_mode: str) -> Callable[..., Any]:
    """dolfinx's cell partitioner (PT-SCOTCH) that partitions the same mesh the same way in every
    run: PT-SCOTCH's threads made the 2-rank partition of the 0.5 nm wire differ from run to run
    (5843/5939, 5800/5982, ... cells), and with it the rounding of every parallel solve, which
    float32 factorisations turn into different Krylov counts. One thread
    (``SCOTCH_PTHREAD_NUMBER=1``, unless the environment sets it) makes it reproducible."""
    modes = {"none": dolfinx.mesh.GhostMode.none, "shared_facet": dolfinx.mesh.GhostMode.shared_facet}
    if ghost_mode not in modes:
        raise UsageError(f"ghost_mode must be one of {', '.join(modes)}, got {ghost_mode!r}")
    os.environ.setdefault("SCOTCH_PTHREAD_NUMBER", "1")  # read by SCOTCH at each partitioning
    return dolfinx.mesh.create_cell_partitioner(modes[ghost_mode])


def _distribute(meta: _Groups | None, error: FemAnodeError | None, comm: MPI.Comm, ghost_mode: str) -> TaggedMesh:
    """Raise rank 0's error on every rank, or broadcast its groups and build the dolfinx mesh from gmsh's model."""
    import gmsh

    share_error(comm, error)
    gdim, cell_groups, facet_groups = comm.bcast(meta, root=0)
    mesh, cell_tags, facet_tags = dolfinx.io.gmshio.model_to_mesh(
        gmsh.model, comm, 0, gdim=gdim, partitioner=cell_partitioner(ghost_mode)
    )
    cell_tags.name, facet_tags.name = "cell_tags", "facet_tags"
    return TaggedMesh(mesh, cell_tags, facet_tags, cell_groups, facet_groups)


def model_to_tagged_mesh(comm: MPI.Comm = MPI.COMM_WORLD, ghost_mode: str = "shared_facet") -> TaggedMesh:
    """Distribute the current gmsh model of rank 0 (session initialised there) over ``comm``.

    Raises:
        InputError: the model has no cell physical groups.
    """
    meta: _Groups | None = None
    error: FemAnodeError | None = None
    if comm.rank == 0:
        meta = _groups_on_root()
        if not meta[1]:
            error = InputError("gmsh model has no cell physical groups (tag the phases/regions)")
    return _distribute(meta, error, comm, ghost_mode)


def read_mesh(path: str | Path, comm: MPI.Comm = MPI.COMM_WORLD, ghost_mode: str = "shared_facet") -> TaggedMesh:
    """Read a gmsh ``.msh`` file on rank 0 and distribute it over ``comm``.

    Args:
        path: the ``.msh`` file (coordinates as stored: metres for fem_anode meshes).
        comm: communicator to distribute over.
        ghost_mode: ``shared_facet`` (default; needed for ``dS`` on interfaces) or ``none``.

    Raises:
        InputError: the file is missing, unreadable or has no cell physical groups.
    """
    import gmsh

    path = Path(path)
    meta: _Groups | None = None
    error: FemAnodeError | None = None
    if comm.rank == 0:
        gmsh.initialize(interruptible=False)
        gmsh.option.setNumber("General.Terminal", 0)
        if not path.is_file():
            error = InputError(f"mesh file not found: {path}")
        else:
            try:
                meta = _open_on_root(path)
                if not meta[1]:
                    error = InputError(f"{path}: mesh has no cell physical groups (tag the phases/regions)")
            except Exception as err:  # gmsh raises plain Exception
                error = InputError(f"cannot read mesh {path}: {err}")
    try:
        return _distribute(meta, error, comm, ghost_mode)
    finally:
        if comm.rank == 0:
            gmsh.finalize()


def image_to_tagged_mesh(
    image: VoxelImage,
    comm: MPI.Comm = MPI.COMM_WORLD,
    *,
    ghost_mode: str = "shared_facet",
    **build_args: Any,
) -> TaggedMesh:
    """Mesh a label image in memory over ``comm`` (voxel: distributed; else on rank 0).

    Args:
        image: :class:`~fem_anode.io.images.VoxelImage` with voxel size and phase map.
        comm: communicator.
        ghost_mode: see :func:`read_mesh`.
        **build_args: ``method``, ``keep``, ``options``, ``order`` of
            :func:`fem_anode.meshing.build.build_model`.

    Raises:
        UsageError, InputError: as :func:`~fem_anode.meshing.build.build_model`, on every rank.
    """
    import gmsh

    from fem_anode.meshing.build import build_model, default_method

    if build_args.get("method") == "voxel" or ("method" not in build_args and default_method(image) == "voxel"):
        if set(build_args) - {"method", "keep"}:
            raise UsageError(f"voxel meshes take no {', '.join(sorted(set(build_args) - {'method', 'keep'}))}")
        from fem_anode.fem.voxel_mesh import create_voxel_mesh

        return create_voxel_mesh(image, comm, build_args.get("keep"), ghost_mode=ghost_mode)
    meta: _Groups | None = None
    error: FemAnodeError | None = None
    if comm.rank == 0:
        gmsh.initialize(interruptible=False)
        gmsh.option.setNumber("General.Terminal", 0)
        try:
            build_model(image, **build_args)
            meta = _groups_on_root()
        except FemAnodeError as err:
            error = err
        except Exception as err:  # never leave the other ranks waiting in the broadcast
            error = InputError(f"meshing failed on rank 0: {type(err).__name__}: {err}")
    try:
        return _distribute(meta, error, comm, ghost_mode)
    finally:
        if comm.rank == 0:
            gmsh.finalize()


def write_xdmf(tagged: TaggedMesh, path: str | Path) -> Path:
    """Write the mesh and its cell and facet tags to an XDMF/HDF5 pair (collective).

    Coordinates are those of the mesh (metres). Quadratic geometry is written as such.
    """
    path = Path(path)
    if path.suffix != ".xdmf":
        raise UsageError(f"XDMF output {path} must end in .xdmf")
    mesh = tagged.mesh
    tdim = mesh.topology.dim
    mesh.topology.create_connectivity(tdim - 1, tdim)
    if tagged.comm.rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
    tagged.comm.barrier()
    with dolfinx.io.XDMFFile(tagged.comm, str(path), "w") as xdmf:
        xdmf.write_mesh(mesh)
        xdmf.write_meshtags(tagged.cell_tags, mesh.geometry)
        xdmf.write_meshtags(tagged.facet_tags, mesh.geometry)
    return path
