"""The nanowire cross-section: a disk meshed with gmsh's built-in (geo) kernel.

Built in nanometres (gmsh tolerances are absolute, see docs/PLATFORM notes) and scaled to
metres before it is handed to dolfinx. Groups follow :mod:`fem_anode.meshing.tags`: the cells
form the phase group ``si``, the outer boundary the facet group ``surface``.
"""

from __future__ import annotations

from pathlib import Path

from mpi4py import MPI

from fem_anode.errors import UsageError
from fem_anode.faults import share_error
from fem_anode.fem.mesh_io import TaggedMesh, model_to_tagged_mesh

__all__ = ["build_disk_model", "disk_mesh", "SI_TAG", "SURFACE_TAG"]

#: Cell tag of the Si phase (phase tag offset 100 + label 1) and facet tag of the outer surface.
SI_TAG = 101
SURFACE_TAG = 7
_NM = 1e-9


def build_disk_model(radius: float, size: float) -> None:
    """Mesh a disk of ``radius`` (m) with element size ``size`` (m) in the current gmsh session."""
    import gmsh

    if not 0 < size <= radius:
        raise UsageError(f"mesh.size ({size:g} m) must be positive and not larger than the radius ({radius:g} m)")
    if radius / size > 2000:
        raise UsageError(f"radius / mesh.size = {radius / size:.0f} is too fine for a 2D cross-section (max 2000)")
    r, h = radius / _NM, size / _NM
    geo = gmsh.model.geo
    gmsh.model.add("nanowire")
    centre = geo.addPoint(0, 0, 0, h)
    corners = [geo.addPoint(r * x, r * y, 0, h) for x, y in ((1, 0), (0, 1), (-1, 0), (0, -1))]
    arcs = [geo.addCircleArc(corners[i], centre, corners[(i + 1) % 4]) for i in range(4)]
    loop = geo.addCurveLoop(arcs)
    surface = geo.addPlaneSurface([loop])
    geo.synchronize()
    gmsh.model.addPhysicalGroup(2, [surface], SI_TAG, name="si")
    gmsh.model.addPhysicalGroup(1, arcs, SURFACE_TAG, name="surface")
    gmsh.option.setNumber("Mesh.CharacteristicLengthMin", h)
    gmsh.option.setNumber("Mesh.CharacteristicLengthMax", h)
    gmsh.option.setNumber("Mesh.Algorithm", 6)
    gmsh.model.mesh.generate(2)
    gmsh.model.mesh.affineTransform([_NM, 0, 0, 0, 0, _NM, 0, 0, 0, 0, _NM, 0])


def disk_mesh(
    radius: float, size: float, comm: MPI.Comm = MPI.COMM_WORLD, path: str | Path | None = None
) -> TaggedMesh:
    """The tagged disk mesh (coordinates in metres), distributed over ``comm``.

    Args:
        radius: disk radius (m).
        size: target element size (m).
        comm: communicator.
        path: also write the mesh there (``.msh``, rank 0).
    """
    import gmsh

    error: UsageError | None = None
    if comm.rank == 0:
        gmsh.initialize(interruptible=False)
        gmsh.option.setNumber("General.Terminal", 0)
        try:
            build_disk_model(radius, size)
            if path is not None:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                gmsh.write(str(path))
        except UsageError as err:
            error = err
    try:
        share_error(comm, error)
        return model_to_tagged_mesh(comm)
    finally:
        if comm.rank == 0:
            gmsh.finalize()
