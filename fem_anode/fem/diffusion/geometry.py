"""The domain of a diffusion solve: an image opened by layers, a voxel or smooth mesh, or a mesh file.

Collective functions; dolfinx is imported only on the paths that build or read a mesh, so a
finite-volume solve (``mesh.discretisation = "fv"``) runs without it.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias, TypeGuard

import numpy as np
from mpi4py import MPI

from fem_anode.errors import InputError
from fem_anode.faults import share_error
from fem_anode.fem.diffusion.settings import DiffusionSettings, uses_voxel_p1
from fem_anode.io.images import ImageLayers, VoxelImage, open_image_layers, read_image

if TYPE_CHECKING:
    from fem_anode.fem.mesh_io import TaggedMesh

__all__ = [
    "Geometry",
    "GeometrySource",
    "check_phases",
    "image_grid_points",
    "label_counts",
    "load_geometry",
    "max_distance_to_pore",
    "middle_section",
    "prepare_geometry",
]

logger = logging.getLogger(__name__)

#: What a diffusion solve runs on: an image in memory or opened by layers, a tagged mesh, or the
#: path of an image or of a gmsh ``.msh`` mesh.
GeometrySource: TypeAlias = "VoxelImage | ImageLayers | TaggedMesh | str | Path"


@dataclasses.dataclass
class Geometry:
    """The domain of a solve: a mesh (``None`` for finite volumes) and the image it came from
    (``None`` for a mesh file); ``mesh_files``: files the mesher wrote (rank 0, name -> bytes);
    ``voxel_mesh``: the mesh is the voxel mesh of the image (written as mesh.xdmf)."""

    tagged: TaggedMesh | None
    image: VoxelImage | ImageLayers | None
    mesh_files: dict[str, bytes] = dataclasses.field(default_factory=dict)
    voxel_mesh: bool = False


_HINT = (
    "crop or coarsen the image, use mesh.order = 1 or solver.type = 'iterative' (3D voxel images: "
    "mesh.discretisation = 'fv', about 15x less memory), or run on more nodes"
)


def _mesh_memory_check(tagged: TaggedMesh, settings: DiffusionSettings, comm: MPI.Comm, enabled: bool) -> None:
    from fem_anode.resources import check_memory, estimate_diffusion_memory

    ncells = tagged.mesh.topology.index_map(tagged.mesh.topology.dim).size_global
    check_memory(
        estimate_diffusion_memory(
            None, settings, ranks=comm.size, cells=ncells, cell_type=tagged.mesh.topology.cell_type.name
        ),
        comm,
        hint=_HINT,
        enabled=enabled,
    )


def _is_mesh_path(path: Path) -> bool:
    return path.suffix.lower() == ".msh"


def _is_tagged_mesh(source: object) -> TypeGuard[TaggedMesh]:
    """Whether ``source`` is a :class:`~fem_anode.fem.mesh_io.TaggedMesh` (without importing dolfinx:
    a TaggedMesh exists only once its module is loaded)."""
    mesh_io = sys.modules.get("fem_anode.fem.mesh_io")
    return mesh_io is not None and isinstance(source, mesh_io.TaggedMesh)


def prepare_geometry(
    settings: DiffusionSettings,
    source: GeometrySource | None,
    workdir: Path | None,
    comm: MPI.Comm,
    memory_check: bool = True,
) -> Geometry:
    """Open, check and mesh the domain of a solve (collective).

    ``source`` ``None`` takes ``geometry.image`` or ``geometry.mesh`` of the settings; a path
    ending in ``.msh`` is a mesh, any other path an image. ``geometry.pixel_size`` and
    ``geometry.phases`` override an image's metadata. Voxel meshes and finite volumes open a
    file image by layers (every rank reads its own slab); smooth 2D meshes are made by gmsh on
    rank 0 into ``workdir`` (or a temporary folder) and distributed. ``memory_check``: refuse a
    problem whose estimated memory exceeds what is available (the CLI's ``--no-memory-check``
    turns it off).

    Raises:
        UsageError: no source, or one that does not fit ``mesh.method``/``mesh.discretisation``.
        InputError: unreadable input, phases missing from the phase map or the image.
    """
    from fem_anode.errors import UsageError
    from fem_anode.resources import check_memory, estimate_voxel_diffusion_memory

    geometry, mesh_settings = settings.geometry, settings.mesh
    finite_volumes = mesh_settings.discretisation == "fv"
    if source is None:
        settings.check_source()
        source = geometry.mesh if geometry.mesh is not None else geometry.image
    if isinstance(source, (str, Path)):
        source = Path(source)
        if _is_mesh_path(source):
            if finite_volumes:
                raise UsageError("mesh.discretisation = 'fv' solves on the voxels of an image; a mesh needs 'fe'")
            from fem_anode.fem.mesh_io import read_mesh

            tagged = read_mesh(source, comm)
            _mesh_memory_check(tagged, settings, comm, memory_check)
            return Geometry(tagged, None)
    if not isinstance(source, (Path, VoxelImage, ImageLayers)) and _is_tagged_mesh(source):
        if finite_volumes:
            raise UsageError("mesh.discretisation = 'fv' solves on the voxels of an image; a mesh needs 'fe'")
        _mesh_memory_check(source, settings, comm, memory_check)
        return Geometry(source, None)
    image: VoxelImage | ImageLayers
    if isinstance(source, Path):
        if mesh_settings.method == "smooth" and not finite_volumes:
            image = read_image(source, voxel_size=geometry.pixel_size, phases=geometry.phases, kind="labels")
        else:  # distributed: every rank reads its own slab of layers
            image = open_image_layers(source, voxel_size=geometry.pixel_size, phases=geometry.phases)
    elif isinstance(source, (VoxelImage, ImageLayers)):
        image = source
        if geometry.pixel_size is not None or geometry.phases is not None:
            if isinstance(image, ImageLayers):
                raise UsageError(
                    "geometry.pixel_size/phases override the metadata of an image file, not of open layers"
                )
            image = image.with_metadata(geometry.pixel_size, geometry.phases)
    else:
        raise UsageError(
            f"the geometry must be a VoxelImage, ImageLayers, TaggedMesh or a path, got {type(source).__name__}"
        )
    if not finite_volumes and mesh_settings.method == "voxel" and uses_voxel_p1(settings, len(image.shape)):
        from fem_anode.fem.diffusion.voxel_elements import estimate_voxel_p1_memory

        counts = label_counts(image, comm)
        check_phases(image, counts, settings)
        cells = counts[image.require_phases()[geometry.transport_phase]]
        check_memory(
            estimate_voxel_p1_memory(1.2 * cells, settings, comm.size),
            comm,
            hint="crop or coarsen the image, run on more nodes, or use mesh.discretisation = 'fv' (1.5x less memory)",
            enabled=memory_check,
        )
        return Geometry(None, image, voxel_mesh=True)
    if finite_volumes:
        from fem_anode.fem.diffusion.finite_volume import estimate_fv_memory

        counts = label_counts(image, comm)
        check_phases(image, counts, settings)
        unknowns = counts[image.require_phases()[geometry.transport_phase]]
        check_memory(
            estimate_fv_memory(unknowns, settings, comm.size),
            comm,
            hint="crop or coarsen the image, or run on more nodes",
            enabled=memory_check,
        )
        return Geometry(None, image)
    if mesh_settings.method == "voxel":
        from fem_anode.fem.voxel_mesh import create_voxel_mesh

        counts = label_counts(image, comm)
        check_phases(image, counts, settings)
        cells = counts[image.require_phases()[geometry.transport_phase]]
        check_memory(
            estimate_voxel_diffusion_memory(cells, 1.2 * cells, image.shape, settings, ranks=comm.size),
            comm,
            hint=_HINT,
            enabled=memory_check,
        )
        return Geometry(create_voxel_mesh(image, comm, [geometry.transport_phase]), image, voxel_mesh=True)
    if not isinstance(image, VoxelImage):
        image = read_image(image.source, voxel_size=image.voxel_size, phases=image.phases, kind="labels")
    if image.ndim != 2:
        raise InputError("mesh.method = 'smooth' is for 2D images; 3D volumes use 'voxel'")
    image.check_labels()
    check_phases(image, {int(v): int(n) for v, n in zip(*np.unique(image.array, return_counts=True))}, settings)
    from fem_anode.resources import estimate_diffusion_memory

    check_memory(estimate_diffusion_memory(image, settings, ranks=comm.size), comm, hint=_HINT, enabled=memory_check)
    return _smooth_mesh(image, settings, workdir, comm, memory_check)


def _smooth_mesh(
    image: VoxelImage, settings: DiffusionSettings, workdir: Path | None, comm: MPI.Comm, memory_check: bool = True
) -> Geometry:
    """Mesh a 2D image with smooth interfaces by gmsh on rank 0 (into ``workdir`` or a temporary
    folder), distribute it, and keep the mesher's files for :meth:`DiffusionRun.save`."""
    import tempfile

    from fem_anode.errors import FemAnodeError

    names = ("mesh.msh", "mesh.quality.json")
    made = None
    if comm.rank == 0:
        made = tempfile.mkdtemp(prefix="fem_anode_mesh_") if workdir is None else str(workdir)
    folder = Path(comm.bcast(made, root=0))  # rank 0 meshes and reads the file; the others only receive
    path = folder / "mesh.msh"
    error: FemAnodeError | None = None
    files: dict[str, bytes] = {}
    if comm.rank == 0:
        from fem_anode.meshing.build import mesh_image
        from fem_anode.meshing.smooth2d import SmoothMeshOptions

        try:
            options = SmoothMeshOptions(size=settings.mesh.size, order=settings.mesh.order)
            mesh_image(
                image,
                path,
                method="smooth",
                keep=[settings.geometry.transport_phase],
                options=options,
                quality_path=folder / "mesh.quality.json",
                memory_check=memory_check,
            )
            files = {name: (folder / name).read_bytes() for name in names if (folder / name).is_file()}
        except FemAnodeError as err:  # every rank must fail, not only the one that meshed
            error = err
    try:
        share_error(comm, error)
        from fem_anode.fem.mesh_io import read_mesh

        tagged = read_mesh(path, comm)
    finally:
        if comm.rank == 0 and workdir is None:
            import shutil

            shutil.rmtree(folder, ignore_errors=True)
    return Geometry(tagged, image, files)


def load_geometry(
    settings: DiffusionSettings, workdir: Path, comm: MPI.Comm, *, memory_check: bool = True
) -> tuple[TaggedMesh, VoxelImage | ImageLayers | None]:
    """Mesh the image's transporting phase or read the mesh of the settings' ``geometry``.

    Voxel meshes are built distributed (:func:`~fem_anode.fem.voxel_mesh.create_voxel_mesh`):
    a 3D image is opened by layers (:func:`~fem_anode.io.images.open_image_layers`) and every
    rank reads its own slab only; the mesh goes to ``workdir/mesh.xdmf`` (with
    ``output.mesh``). Smooth 2D meshes are made by gmsh on rank 0, written to
    ``workdir/mesh.msh`` and distributed.

    Returns:
        The tagged mesh and the image (``None`` for a mesh file).
    """
    from fem_anode.errors import UsageError

    if settings.mesh.discretisation == "fv":
        raise UsageError("load_geometry makes a mesh; mesh.discretisation = 'fv' needs none")
    meshed = settings.replace(mesh=settings.mesh.replace(voxel_p1="mesh"))  # a mesh even where P1 needs none
    geo = prepare_geometry(meshed, None, workdir, comm, memory_check)
    if geo.tagged is None:
        raise RuntimeError("an 'fe' geometry without a mesh")  # a bug, never bad input
    if geo.voxel_mesh and settings.output.mesh:
        from fem_anode.fem.mesh_io import write_xdmf

        write_xdmf(geo.tagged, workdir / "mesh.xdmf")
    return geo.tagged, geo.image


def label_counts(image: VoxelImage | ImageLayers, comm: MPI.Comm) -> dict[int, int]:
    """Voxels per label value of the whole image; each rank counts an equal share of the layers,
    a few layers at a time (collective).

    Raises:
        InputError: the labels are not integers (on every rank).
    """
    from fem_anode.imaging.slabs import Slab

    layers = int(image.shape[0])
    slab = Slab.from_bounds(np.linspace(0, layers, comm.size + 1).round().astype(np.int64), comm.rank)
    local: dict[int, int] = {}
    bad = None
    for start in range(slab.z0, slab.z1, 16):
        block = np.asarray(image.read_layers(start, min(start + 16, slab.z1)))
        if not np.issubdtype(block.dtype, np.integer):
            bad = f"{image.source}: labels must be integers, got {block.dtype}"
            break
        values, numbers = np.unique(block, return_counts=True)
        for value, number in zip(values.tolist(), numbers.tolist()):
            local[value] = local.get(value, 0) + number
    for message in comm.allgather(bad):
        if message is not None:
            raise InputError(message)
    counts: dict[int, int] = {}
    for part in comm.allgather(local):
        for value, number in part.items():
            counts[value] = counts.get(value, 0) + number
    return counts


def check_phases(image: VoxelImage | ImageLayers, counts: dict[int, int], settings: DiffusionSettings) -> None:
    """The phase map covers every label and every phase has voxels (as ``read_image(kind="labels")``
    checks), and the transporting and pore phases exist (InputError naming what is wrong)."""
    from fem_anode.io.images import format_phase_map

    geometry = settings.geometry
    phases = image.require_phases()
    image.require_voxel_size()
    unknown = sorted(v for v, n in counts.items() if n and v not in set(phases.values()))
    if unknown:
        raise InputError(
            f"{image.source}: label values {unknown[:10]} are not in the phase map {format_phase_map(phases)}"
        )
    empty = [name for name, v in phases.items() if counts.get(v, 0) == 0]
    if empty:
        raise InputError(f"{image.source}: phase(s) {', '.join(empty)} have no voxels in the image")
    for role, name in (("transport_phase", geometry.transport_phase), ("pore_phase", geometry.pore_phase)):
        if name not in phases:
            raise InputError(f"geometry.{role} {name!r} is not in the phase map {phases}")


def max_distance_to_pore(image: VoxelImage | ImageLayers, settings: DiffusionSettings, comm: MPI.Comm) -> float:
    """Largest distance (m) from a transporting-phase voxel to the nearest pore voxel (collective;
    exact, from slabs of the image: :func:`~fem_anode.imaging.slabs.max_distance_to`)."""
    from fem_anode.imaging.slabs import Slab, max_distance_to

    phases = image.require_phases()
    transport, pore = phases[settings.geometry.transport_phase], phases[settings.geometry.pore_phase]
    layers = int(image.shape[0])
    slab = Slab.from_bounds(np.linspace(0, layers, comm.size + 1).round().astype(np.int64), comm.rank)
    return max_distance_to(
        comm,
        slab,
        image.read_layers,
        lambda a: a == transport,
        lambda a: a == pore,
        image.require_voxel_size(),
        squared_distance=_compiled_squared_distance(comm, settings),
    )


def _compiled_squared_distance(
    comm: MPI.Comm, settings: DiffusionSettings
) -> Callable[[np.ndarray, tuple[float, ...]], np.ndarray] | None:
    """The compiled exact distance transform (8 B per voxel and no scipy: about 70 B per voxel less
    than ``scipy.ndimage``'s at the peak of a run's set-up), or ``None`` where the compiled kernels
    are unavailable or not wanted (``solver.sweep_kernel = "petsc"``). Collective."""
    if settings.solver.sweep_kernel == "petsc":
        return None
    from fem_anode.fem.voxel_sweeps import SweepKernelUnavailable, load_sweep_library, squared_distance

    try:
        library = load_sweep_library(comm)
    except SweepKernelUnavailable:
        return None

    def transform(targets: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
        if targets.ndim == 2:  # one layer of unit thickness
            return squared_distance(targets[None], (1.0, *spacing), library)[0]
        return squared_distance(targets, spacing, library)

    return transform


def middle_section(image: VoxelImage | ImageLayers) -> VoxelImage:
    """The image itself (2D) or its middle axis-0 layer as a one-layer 3D image (for figures)."""
    if isinstance(image, VoxelImage) and image.ndim == 2:
        return image
    middle = int(image.shape[0]) // 2
    return VoxelImage(
        np.asarray(image.read_layers(middle, middle + 1)),
        image.require_voxel_size(),
        image.require_phases(),
        image.source,
    )


def image_grid_points(image: VoxelImage | ImageLayers) -> tuple[np.ndarray, tuple[int, ...]]:
    """Pixel centres of a 2D image (or the middle z slice of a 3D one) in mesh coordinates."""
    spacing = image.require_voxel_size()
    if image.ndim == 2:
        ny, nx = image.shape
        y, x = np.meshgrid((np.arange(ny) + 0.5) * spacing[0], (np.arange(nx) + 0.5) * spacing[1], indexing="ij")
        points = np.column_stack([x.ravel(), y.ravel(), np.zeros(x.size)])
        return points, (ny, nx)
    nz, ny, nx = image.shape
    y, x = np.meshgrid((np.arange(ny) + 0.5) * spacing[1], (np.arange(nx) + 0.5) * spacing[2], indexing="ij")
    z = np.full(x.size, (nz // 2 + 0.5) * spacing[0])
    return np.column_stack([x.ravel(), y.ravel(), z]), (ny, nx)
