"""A complete diffusion run: settings -> mesh -> solve -> results.json, VTX fields, figures.

Used by ``fem-anode diffusion CONFIG.toml --out DIR`` and by the demo pipeline.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from mpi4py import MPI
from scipy import ndimage

from fem_anode.errors import InputError, Interrupted, SolverError
from fem_anode.faults import share_error
from fem_anode.fem.diffusion import DiffusionProblem, DiffusionSettings
from fem_anode.fem.mesh_io import TaggedMesh, read_mesh
from fem_anode.fem.sampling import facet_samples, sample_points
from fem_anode.io.checkpoint import Checkpoint, Checkpointer, CheckpointPolicy, CheckpointStore
from fem_anode.io.checkpoint import settings_fingerprint as checkpoint_fingerprint
from fem_anode.io.images import ImageLayers, VoxelImage, open_image_layers, read_image
from fem_anode.io.interrupt import SafeStop
from fem_anode.io.output import remove_stale_staging

if TYPE_CHECKING:
    import dolfinx.fem

__all__ = [
    "DiffusionRun",
    "GeometrySource",
    "fig8_settings",
    "run_diffusion",
    "simulate_diffusion",
    "load_geometry",
    "settings_fingerprint",
    "si_particle_report",
    "suggest_regions",
    "timescales",
]

logger = logging.getLogger(__name__)


#: What a diffusion solve runs on: an image in memory or opened by layers, a tagged mesh, or the
#: path of an image or of a gmsh ``.msh`` mesh.
GeometrySource = VoxelImage | ImageLayers | TaggedMesh | str | Path


@dataclasses.dataclass
class _Geometry:
    """The domain of a solve: a mesh (``None`` for finite volumes) and the image it came from
    (``None`` for a mesh file); ``mesh_files``: files the mesher wrote (rank 0, name -> bytes);
    ``voxel_mesh``: the mesh is the voxel mesh of the image (written as mesh.xdmf)."""

    tagged: TaggedMesh | None
    image: VoxelImage | ImageLayers | None
    mesh_files: dict[str, bytes] = dataclasses.field(default_factory=dict)
    voxel_mesh: bool = False


_HINT = "crop or coarsen the image, use mesh.order = 1 or solver.type = 'iterative', or run on more nodes"


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


def _prepare_geometry(
    settings: DiffusionSettings,
    source: GeometrySource | None,
    workdir: Path | None,
    comm: MPI.Comm,
    memory_check: bool = True,
) -> _Geometry:
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
            tagged = read_mesh(source, comm)
            _mesh_memory_check(tagged, settings, comm, memory_check)
            return _Geometry(tagged, None)
    if isinstance(source, TaggedMesh):
        if finite_volumes:
            raise UsageError("mesh.discretisation = 'fv' solves on the voxels of an image; a mesh needs 'fe'")
        _mesh_memory_check(source, settings, comm, memory_check)
        return _Geometry(source, None)
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
    if finite_volumes:
        from fem_anode.fem.diffusion_fv import estimate_fv_memory

        counts = _label_counts(image, comm)
        _check_phases(image, counts, settings)
        unknowns = counts[image.require_phases()[geometry.transport_phase]]
        check_memory(
            estimate_fv_memory(unknowns, comm.size),
            comm,
            hint="crop or coarsen the image, or run on more nodes",
            enabled=memory_check,
        )
        return _Geometry(None, image)
    if mesh_settings.method == "voxel":
        from fem_anode.fem.voxel_mesh import create_voxel_mesh

        counts = _label_counts(image, comm)
        _check_phases(image, counts, settings)
        cells = counts[image.require_phases()[geometry.transport_phase]]
        check_memory(
            estimate_voxel_diffusion_memory(cells, 1.2 * cells, image.shape, settings, ranks=comm.size),
            comm,
            hint=_HINT,
            enabled=memory_check,
        )
        return _Geometry(create_voxel_mesh(image, comm, [geometry.transport_phase]), image, voxel_mesh=True)
    if not isinstance(image, VoxelImage):
        image = read_image(image.source, voxel_size=image.voxel_size, phases=image.phases, kind="labels")
    if image.ndim != 2:
        raise InputError("mesh.method = 'smooth' is for 2D images; 3D volumes use 'voxel'")
    image.check_labels()
    _check_phases(image, {int(v): int(n) for v, n in zip(*np.unique(image.array, return_counts=True))}, settings)
    from fem_anode.resources import estimate_diffusion_memory

    check_memory(estimate_diffusion_memory(image, settings, ranks=comm.size), comm, hint=_HINT, enabled=memory_check)
    return _smooth_mesh(image, settings, workdir, comm, memory_check)


def _smooth_mesh(
    image: VoxelImage, settings: DiffusionSettings, workdir: Path | None, comm: MPI.Comm, memory_check: bool = True
) -> _Geometry:
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
        tagged = read_mesh(path, comm)
    finally:
        if comm.rank == 0 and workdir is None:
            import shutil

            shutil.rmtree(folder, ignore_errors=True)
    return _Geometry(tagged, image, files)


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
    geo = _prepare_geometry(settings, None, workdir, comm, memory_check)
    if geo.tagged is None:
        raise RuntimeError("an 'fe' geometry without a mesh")  # a bug, never bad input
    if geo.voxel_mesh and settings.output.mesh:
        from fem_anode.fem.mesh_io import write_xdmf

        write_xdmf(geo.tagged, workdir / "mesh.xdmf")
    return geo.tagged, geo.image


def _label_counts(image: VoxelImage | ImageLayers, comm: MPI.Comm) -> dict[int, int]:
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


def _check_phases(image: VoxelImage | ImageLayers, counts: dict[int, int], settings: DiffusionSettings) -> None:
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


def timescales(settings: DiffusionSettings, length: float) -> dict[str, float]:
    """Diffusion time eps L^2 / D_eff (s) and Biot number k_f L / D_eff for a length L (m)."""
    physics = settings.physics
    return {
        "length_m": length,
        "diffusion_time_s": physics.eps * length**2 / physics.D_eff,
        "biot_number": physics.k_f * length / physics.D_eff,
    }


def si_particle_report(problem: DiffusionProblem, image: VoxelImage | ImageLayers) -> list[dict[str, Any]]:
    """Per Si particle (connected Si component of the image, 8/26-connected): c statistics on its interface.

    Returns, per particle with an interface in the mesh: ``id`` (numbered as
    ``scipy.ndimage.label`` numbers the Si components of the whole image), ``interface_measure_m``
    (length in 2D, area in 3D), ``mean``, ``min``, ``max`` (mol/m^3) and
    ``fraction_above_half_bulk`` of its surface. Collective.

    On voxel meshes partitioned by slabs every rank labels the Si of its own slab
    (:func:`~fem_anode.imaging.slabs.label_slabs`) and takes each interface facet's particle from
    the Si voxel across it; on other meshes (smooth 2D) the image is labelled whole and each
    facet takes the particle of the nearest Si pixel.
    """
    geometry = problem.settings.geometry
    phases = image.require_phases()
    mesh, comm = problem.mesh, problem.comm
    tag = problem.tagged.facet_groups.get(problem.si_interface)
    if tag is None or geometry.si_phase not in phases:
        return []
    si_label = phases[geometry.si_phase]
    fdim = mesh.topology.dim - 1
    n_owned = mesh.topology.index_map(fdim).size_local
    facets = problem.tagged.facet_tags.find(tag)
    facets = facets[facets < n_owned]
    spacing = np.asarray(image.require_voxel_size())
    ndim = len(image.shape)
    from dolfinx.mesh import compute_midpoints

    midpoints = (
        compute_midpoints(mesh, fdim, facets)[:, :ndim][:, ::-1] / spacing if facets.size else np.zeros((0, ndim))
    )  # array order, voxel units
    connectivity = np.ones((3,) * ndim, dtype=bool)
    bounds = problem.tagged.slab_bounds
    if bounds is not None:
        from fem_anode.imaging.slabs import Slab, label_slabs

        slab = Slab.from_bounds(bounds, comm.rank)
        labels, n_particles, below, above = label_slabs(
            comm, slab, np.asarray(image.read_layers(slab.z0, slab.z1)) == si_label, connectivity
        )
        plane = np.zeros((1, *image.shape[1:]), dtype=np.int64)
        stack = np.concatenate(
            [plane if below is None else below[None], labels, plane if above is None else above[None]]
        )
        # Each facet lies on a voxel face: the Si voxel is on one side along its normal axis.
        axis = np.argmax(np.rint(2.0 * midpoints).astype(np.int64) % 2 == 0, axis=1)
        rows = np.arange(facets.size)
        owner = np.zeros(facets.size, dtype=np.int64)
        for side in (-0.5, 0.5):
            point = midpoints.copy()
            point[rows, axis] += side
            index = np.floor(point).astype(np.int64)
            index[:, 0] -= slab.z0 - 1
            index = np.clip(index, 0, np.asarray(stack.shape) - 1)
            owner = np.maximum(owner, stack[tuple(index.T)])
        owner -= 1
        if (owner < 0).any():
            raise RuntimeError("an Si interface facet has no Si voxel next to it")  # a bug, never bad input
    else:  # smooth meshes (2D, made on rank 0 from the image in memory)
        si = image.array == si_label  # type: ignore[union-attr]  # an in-memory image on this path
        particle_ids, n_particles = ndimage.label(si, structure=connectivity)
        nearest = ndimage.distance_transform_edt(~si, return_distances=False, return_indices=True)
        index = np.clip(np.floor(midpoints).astype(int), 0, np.asarray(image.shape) - 1)
        pixel = tuple(nearest[(axis, *index.T)] for axis in range(ndim))
        owner = particle_ids[pixel] - 1 if facets.size else np.zeros(0, int)
    c_bulk = problem.settings.physics.c_bulk
    c = cast("dolfinx.fem.Function", problem.concentration())  # a P1/P2 problem on this path
    measure, mean, low, high = facet_samples(c, facets)
    sums = np.zeros((3, n_particles))
    np.add.at(sums[0], owner, measure)
    np.add.at(sums[1], owner, measure * mean)
    np.add.at(sums[2], owner, measure * (mean > 0.5 * c_bulk))
    lows = np.full(n_particles, np.inf)
    highs = np.full(n_particles, -np.inf)
    np.minimum.at(lows, owner, low)
    np.maximum.at(highs, owner, high)
    for array, op in ((sums, MPI.SUM), (lows, MPI.MIN), (highs, MPI.MAX)):
        comm.Allreduce(MPI.IN_PLACE, array, op=op)  # element-wise buffer reductions
    report = []
    for i in np.flatnonzero(sums[0] > 0):
        report.append(
            {
                "id": int(i + 1),
                "interface_measure_m": float(sums[0, i]),
                "mean": float(sums[1, i] / sums[0, i]),
                "min": float(lows[i]),
                "max": float(highs[i]),
                "fraction_above_half_bulk": float(sums[2, i] / sums[0, i]),
            }
        )
    return report


def _max_distance_to_pore(image: VoxelImage | ImageLayers, settings: DiffusionSettings, comm: MPI.Comm) -> float:
    """Largest distance (m) from a transporting-phase voxel to the nearest pore voxel (collective;
    exact, from slabs of the image: :func:`~fem_anode.imaging.slabs.max_distance_to`)."""
    from fem_anode.imaging.slabs import Slab, max_distance_to

    phases = image.require_phases()
    transport, pore = phases[settings.geometry.transport_phase], phases[settings.geometry.pore_phase]
    layers = int(image.shape[0])
    slab = Slab.from_bounds(np.linspace(0, layers, comm.size + 1).round().astype(np.int64), comm.rank)
    return max_distance_to(
        comm, slab, image.read_layers, lambda a: a == transport, lambda a: a == pore, image.require_voxel_size()
    )


def _middle_section(image: VoxelImage | ImageLayers) -> VoxelImage:
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


def _image_grid_points(image: VoxelImage | ImageLayers) -> tuple[np.ndarray, tuple[int, ...]]:
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


@dataclasses.dataclass(eq=False)
class DiffusionRun:
    """A finished (or stopped) diffusion solve, in memory; :meth:`save` writes the CLI's files.

    The fields stay distributed: every rank holds its own part of each field (a dolfinx
    ``Function`` on the mesh, or for finite volumes a
    :class:`~fem_anode.fem.diffusion_fv.VectorField` of its voxels); nothing is gathered.

    Attributes:
        settings: the settings of the solve.
        results: the content of ``results.json`` (SI units; the same on every rank).
        comm: the communicator of the solve.
        fields: ``(t, c)`` at ``t = 0`` and at each output time reached, c in mol/m^3.
        image: the image the domain came from (``None`` for a mesh).
        tagged: the mesh (``None`` for finite volumes).
        status: ``"completed"``, ``"interrupted"`` or ``"failed"``.
    """

    settings: DiffusionSettings
    results: dict[str, Any]
    comm: MPI.Comm
    fields: list[tuple[float, Any]]
    image: VoxelImage | ImageLayers | None
    tagged: TaggedMesh | None
    snapshots: dict[float, np.ndarray]
    mesh_files: dict[str, bytes]
    voxel_mesh: bool
    field_writer: Any = None  # finite volumes: the problem whose voxel layout VoxelFieldWriter needs
    stopped: BaseException | None = None

    @property
    def status(self) -> str:
        return str(self.results["status"])

    @property
    def t90(self) -> dict[str, float | None]:
        """Time (s) at which each region's mean c, and the domain's (``"domain"``), first reaches
        0.9 ``physics.c_bulk`` (linear in time between steps), or ``None`` if not reached."""
        return dict(self.results["t90_s"])

    @property
    def times(self) -> np.ndarray:
        """Step end times (s), starting with 0."""
        return np.asarray(self.results["history"]["times"])

    @property
    def region_means(self) -> dict[str, np.ndarray]:
        """Region name -> mean c (mol/m^3) at :attr:`times`."""
        return {name: np.asarray(values) for name, values in self.results["history"]["regions"].items()}

    @property
    def domain_mean(self) -> np.ndarray:
        """Mean c (mol/m^3) over the transporting domain at :attr:`times`."""
        return np.asarray(self.results["history"]["domain_mean"])

    @property
    def output_times(self) -> list[float]:
        """Times (s) of :attr:`concentration`, starting with 0."""
        return [t for t, _ in self.fields]

    @property
    def concentration(self) -> dict[float, Any]:
        """Output time (s) -> c (mol/m^3) on this rank's part of the domain: a dolfinx
        ``Function`` (finite elements) or a ``VectorField`` (finite volumes, ``.x.array``).

        Empty if the run had ``output.fields = False`` (the fields are then not kept: a large
        run saves one vector per output time)."""
        return dict(self.fields)

    @property
    def mass_balance_rel_error(self) -> float:
        """Sum over the steps of the discrete Li balance residual, relative to the uptake."""
        return float(self.results["mass_balance_rel_error"])

    def to_dict(self) -> dict[str, Any]:
        """The content of ``results.json``."""
        return self.results

    def save(self, directory: str | Path, *, render: bool = True, metadata: bool = True) -> Path:
        """Write the files of ``fem-anode diffusion --out DIRECTORY`` (collective).

        ``results.json``, the fields at the output times (``c.bp``, VTX for ParaView; finite
        volumes: ``c.pvd`` with ``c_<k>.vti``), the mesh (``mesh.xdmf`` of a voxel mesh with
        ``output.mesh``, ``mesh.msh`` of a smooth one), the PNG figures and ``report.html`` as
        ``[output]`` asks; with ``metadata`` also ``config.toml`` and ``provenance.json``. Each
        rank writes its own part of the fields.

        Args:
            directory: created if missing; existing files of the same names are replaced.
            render: the 3D picture of c (pyvista, :mod:`fem_anode.io.render3d`).
            metadata: write ``config.toml`` and ``provenance.json`` (the CLI writes them first).

        Returns:
            The directory.
        """
        from fem_anode.io.output import write_json

        comm, settings, output = self.comm, self.settings, self.settings.output
        directory = Path(directory)
        if comm.rank == 0:
            directory.mkdir(parents=True, exist_ok=True)
            for name, data in self.mesh_files.items():
                (directory / name).write_bytes(data)
            if metadata:
                from fem_anode.commands._common import provenance

                settings.to_toml(directory / "config.toml")
                write_json(directory / "provenance.json", provenance("diffusion", settings, comm=comm))
        comm.barrier()
        if self.voxel_mesh and output.mesh and self.tagged is not None:
            from fem_anode.fem.mesh_io import write_xdmf

            write_xdmf(self.tagged, directory / "mesh.xdmf")
        if output.fields and self.fields:
            if self.field_writer is not None:
                from fem_anode.fem.diffusion_fv import VoxelFieldWriter

                voxels = VoxelFieldWriter(directory, self.field_writer)
                for t, field in self.fields:
                    voxels.write(t, field)
                voxels.close()
            else:
                from dolfinx import fem
                from dolfinx.io import VTXWriter

                c_out = fem.Function(self.fields[0][1].function_space, name="c")
                writer = VTXWriter(comm, str(directory / "c.bp"), [c_out], engine="BP4")
                try:
                    for t, field in self.fields:
                        c_out.x.array[:] = field.x.array
                        writer.write(t)
                finally:
                    writer.close()
        if comm.rank == 0:
            write_json(directory / "results.json", self.results)
            if output.figures:
                from fem_anode.fem.diffusion_plots import (
                    plot_concentration_fields,
                    plot_region_history,
                    render_and_report,
                )

                c_bulk = settings.physics.c_bulk
                plot_region_history(self.results, directory / "c_regions.png", c_bulk=c_bulk)
                if self.image is not None and self.snapshots:
                    plot_concentration_fields(
                        _middle_section(self.image), self.snapshots, settings, directory / "c_fields.png"
                    )
                # 3D figure from the written field files, report.html (fem_anode.fem.diffusion_plots)
                render_and_report(directory, self.results, render=render)
        comm.barrier()
        return directory


def simulate_diffusion(
    settings: DiffusionSettings,
    comm: MPI.Comm,
    geometry: GeometrySource | None = None,
    *,
    workdir: Path | None = None,
    checkpoint_dir: Path | None = None,
    resume: Checkpoint | None = None,
    memory_check: bool = True,
) -> DiffusionRun:
    """Solve the diffusion model in memory (collective); nothing is written but checkpoints.

    Args:
        settings: model settings (``[output]`` only matters for what :meth:`DiffusionRun.save`
            writes: the fields at the output times are kept only with ``output.fields``, the
            figures' sections only with ``output.figures``).
        comm: communicator.
        geometry: the domain (see :data:`GeometrySource`); ``None``: ``geometry.image`` or
            ``geometry.mesh`` of the settings.
        workdir: folder for the mesher's files of smooth meshes (default: a temporary one).
        checkpoint_dir: write checkpoints to ``checkpoint_dir/checkpoint/`` as set in
            ``[checkpoint]`` and stop at a safe point on SIGINT/SIGTERM (``None``: neither).
        resume: continue from this checkpoint (loaded with
            :class:`~fem_anode.io.checkpoint.CheckpointStore`); its settings must match.
        memory_check: refuse a problem whose estimated memory exceeds what is available.

    Returns:
        The run. If a stop signal or a solver failure ended it early, its ``status`` says so and
        ``stopped`` holds the :class:`~fem_anode.errors.Interrupted` or
        :class:`~fem_anode.errors.SolverError` (the caller raises it after saving).
    """
    from fem_anode.faults import fault_point

    fault_point("solve", comm.rank)  # test-only fault injection (FEM_ANODE_INJECT_FAULT)
    settings.check()
    start = time.perf_counter()
    finite_volumes = settings.mesh.discretisation == "fv"
    problem: DiffusionProblem
    geo = _prepare_geometry(settings, geometry, workdir, comm, memory_check)
    image = geo.image
    meshed = time.perf_counter()
    if geo.tagged is None:  # no mesh: the voxels are the cells (fem_anode.fem.diffusion_fv)
        from fem_anode.fem.diffusion_fv import VoxelFVProblem

        if image is None:
            raise RuntimeError("a finite-volume geometry without an image")  # a bug, never bad input
        # Before the assembly: the distance transform's temporaries (about 180 B per voxel of a
        # slab) then do not add to the solver's memory.
        scales: dict[str, float] | None = timescales(settings, _max_distance_to_pore(image, settings, comm))
        problem = VoxelFVProblem(image, settings, cast(MPI.Intracomm, comm))  # COMM_WORLD or a split of it
    else:
        scales = timescales(settings, _max_distance_to_pore(image, settings, comm)) if image is not None else None
        problem = DiffusionProblem(geo.tagged, settings)
    assembled = time.perf_counter()
    logger.info(
        "diffusion: %d cells, %d unknowns (%s), D_eff = %.3g m^2/s, %d rank(s)",
        problem.ncells,
        problem.ndofs,
        "finite volumes" if finite_volumes else f"P{settings.mesh.order}",
        settings.physics.D_eff,
        comm.size,
    )
    snapshots: dict[float, np.ndarray] = {}
    particles: dict[str, list[dict[str, Any]]] = {}
    fields: list[tuple[float, Any]] = []  # c at the output times (distributed), for save() and checkpoints
    checkpointer = (
        _checkpointer(
            settings,
            checkpoint_dir,
            comm,
            snapshots,
            particles,
            fields,
            lambda: time.perf_counter() - start,
            workdir,
        )
        if checkpoint_dir is not None
        else None
    )
    if resume is not None:
        if checkpointer is not None:
            checkpointer.check_meta(resume)
        start -= _restore_outputs(resume, problem, snapshots, particles, fields)
    figures = settings.output.figures
    grid = _image_grid_points(image) if image is not None and figures and not finite_volumes else None

    def on_output(t: float, prob: DiffusionProblem) -> None:
        if settings.output.fields:  # kept for save(): one vector per output time (8 B per unknown)
            fields.append((t, prob.concentration()))
        if finite_volumes and figures:
            snapshots[t] = prob.middle_section()  # type: ignore[attr-defined]  # finite volumes: VoxelFVProblem
        elif grid is not None:
            c = cast("dolfinx.fem.Function", prob.c)  # a finite-element problem here
            snapshots[t] = settings.physics.c_bulk * sample_points(c, grid[0]).reshape(grid[1])
        if image is not None and t > 0:
            particles[f"{t:g}"] = prob.si_particle_report() if finite_volumes else si_particle_report(prob, image)  # type: ignore[attr-defined]  # FV: VoxelFVProblem

    status, failure, stopped = "completed", None, None
    stop = SafeStop() if checkpointer is not None else contextlib.nullcontext()
    try:
        with stop:
            if checkpointer is not None:
                checkpointer.stop = stop
            result = problem.run(on_output, checkpointer=checkpointer, resume=resume)
    except (Interrupted, SolverError) as err:
        if getattr(err, "result", None) is None:
            problem.destroy()
            raise
        stopped = err
        result = err.result
        status = "interrupted" if isinstance(err, Interrupted) else "failed"
        failure = getattr(err, "report", None)
    c_bulk = settings.physics.c_bulk
    at_outputs = result.at_output_times()
    results: dict[str, Any] = {
        "status": status,
        "t_reached_s": result.times[-1],
        "failure": failure,
        "retries": result.retries,
        "resumed_from_step": result.resumed_from_step,
        "times": at_outputs["times"],
        "regions": at_outputs["regions"],
        "domain_mean": at_outputs["domain_mean"],
        "t90_s": result.t90(c_bulk),
        "mass_balance_rel_error": result.mass_balance_rel_error,
        "ndofs": result.ndofs,
        "ncells": result.ncells,
        "element_degree": None if finite_volumes else settings.mesh.order,
        "discretisation": settings.mesh.discretisation,
        "ranks": comm.size,
        "steps": result.steps,
        "factorisations": result.factorisations,
        "final_min_c": c_bulk * float(comm.allreduce(problem.c.x.array.min(initial=np.inf), op=MPI.MIN)),
        "final_max_c": c_bulk * float(comm.allreduce(problem.c.x.array.max(initial=-np.inf), op=MPI.MAX)),
        "history": {"times": result.times, "regions": result.region_means, "domain_mean": result.domain_mean},
        "si_particles": particles if image is not None else None,
        "timescales": scales,
        "wall_time_s": time.perf_counter() - start,
        "performance": {
            **_performance(comm, meshed - start, assembled - meshed, time.perf_counter() - assembled),
            # preconditioner 'auto': multigrid for a0 at or below this (1/s; None: SSOR
            # throughout), and False if its set-up did not fit into memory
            "multigrid_from_a0_per_s": problem.amg_from_a0,
            "multigrid_fits_memory": problem.multigrid_fits,
        },
        "settings": settings.to_dict(),
    }
    problem.destroy()
    if stopped is None:
        logger.info(
            "diffusion done in %.1f s: %d steps, %d factorisations, mass balance error %.1e",
            results["wall_time_s"],
            result.steps,
            result.factorisations,
            result.mass_balance_rel_error,
        )
    return DiffusionRun(
        settings=settings,
        results=results,
        comm=comm,
        fields=fields,
        image=image,
        tagged=geo.tagged,
        snapshots=snapshots,
        mesh_files=geo.mesh_files,
        voxel_mesh=geo.voxel_mesh,
        field_writer=problem if finite_volumes else None,
        stopped=stopped,
    )


def run_diffusion(
    settings: DiffusionSettings,
    staging: Path,
    comm: MPI.Comm,
    *,
    checkpoint_dir: Path | None = None,
    resume: Checkpoint | None = None,
    render: bool = True,
    memory_check: bool = True,
) -> dict[str, Any]:
    """A run from files (``fem-anode diffusion``): :func:`simulate_diffusion` on the settings'
    ``geometry.image``/``geometry.mesh``, then :meth:`DiffusionRun.save` into ``staging``.

    Returns the results dict (same on every rank). Only rank 0 writes JSON and figures.

    Args:
        settings: the run's settings.
        staging: directory for the results (see :func:`~fem_anode.io.output.output_directory`).
        comm: communicator.
        checkpoint_dir: write checkpoints to ``checkpoint_dir/checkpoint/`` as set in
            ``[checkpoint]`` and stop at a safe point on SIGINT/SIGTERM (``None``: neither).
        render: the 3D picture of c (pyvista, :mod:`fem_anode.io.render3d`; ``--no-render``).
        resume: continue from this checkpoint (loaded with
            :class:`~fem_anode.io.checkpoint.CheckpointStore`); its settings must match.
        memory_check: refuse a problem whose estimated memory exceeds what is available
            (``--no-memory-check``: ``False``).

    Raises:
        Interrupted: stopped on a signal; ``results.json`` (``"status": "interrupted"``) and
            the figures so far are in ``staging``, the checkpoint in ``checkpoint_dir``.
        SolverError: a step failed after every retry; ``results.json`` (``"status": "failed"``,
            with the failure report) is in ``staging``, the last good state in the checkpoint.
    """
    settings.check()  # the Python API as strict as the CLI: ranges and constraints before any work
    settings.check_source()
    run = simulate_diffusion(
        settings,
        comm,
        None,
        workdir=Path(staging),
        checkpoint_dir=checkpoint_dir,
        resume=resume,
        memory_check=memory_check,
    )
    run.save(staging, render=render, metadata=False)
    if run.stopped is not None:
        raise run.stopped
    return run.results


def _performance(comm: MPI.Comm, mesh_s: float, assembly_s: float, rest_s: float) -> dict[str, Any]:
    """Wall times of the phases (s, rank 0's) and the peak resident memory of every rank (bytes)."""
    from fem_anode.resources import peak_memory

    peak = peak_memory()
    return {
        "mesh_s": mesh_s,
        "assembly_s": assembly_s,
        "time_loop_and_output_s": rest_s,
        "peak_memory_bytes_per_rank": [float(p) for p in comm.allgather(peak)],
    }


def settings_fingerprint(settings: DiffusionSettings) -> dict[str, Any]:
    """The settings a resumed run must share with its checkpoint, as JSON types (absolute paths).

    ``[checkpoint]`` and ``[solver]`` are left out: a run may be resumed with another interval
    or, after a solver failure, with another linear solver.
    """
    return checkpoint_fingerprint(settings, free=("checkpoint", "solver"), paths=("image", "mesh"))


def _checkpointer(
    settings: DiffusionSettings,
    directory: Path,
    comm: MPI.Comm,
    snapshots: dict[float, np.ndarray],
    particles: dict[str, Any],
    fields: list[tuple[float, Any]],
    elapsed: Callable[[], float],
    staging: Path | None,
) -> Checkpointer:
    """Checkpoints in ``directory/checkpoint`` with the driver's outputs so far as extras."""
    fingerprint = settings_fingerprint(settings)
    absolute = settings.replace(
        geometry=settings.geometry.replace(
            **{k: Path(v) for k, v in fingerprint["geometry"].items() if k in ("image", "mesh")}
        )
    )
    policy = CheckpointPolicy(interval_s=settings.checkpoint.interval_s, every_steps=settings.checkpoint.every_steps)

    def extra() -> tuple[dict[str, Any], dict[str, Any]]:
        snapshot_times = sorted(snapshots)
        state = {
            "staging": None if staging is None else str(staging),
            "snapshot_times": snapshot_times,
            "particles": particles,
            "field_times": [t for t, _ in fields],
            "wall_time_s": elapsed(),
        }
        arrays: dict[str, Any] = {f"snapshot.{i}": snapshots[t] for i, t in enumerate(snapshot_times)}
        arrays.update({f"field.{i}": field for i, (_, field) in enumerate(fields)})
        return state, arrays

    meta = {"model": "diffusion", "fingerprint": fingerprint, "settings_toml": absolute.to_toml()}
    return Checkpointer(CheckpointStore(directory, comm), policy, meta=meta, extra=extra, comm=comm)


def _restore_outputs(
    checkpoint: Checkpoint,
    problem: DiffusionProblem,
    snapshots: dict[float, np.ndarray],
    particles: dict[str, Any],
    fields: list[tuple[float, Any]],
) -> float:
    """Put the driver's outputs of a checkpoint back; returns the wall time spent before it (s).

    Also removes the staging directory a killed run left behind (a hidden ``.NAME.partial-*``
    sibling of the current one, recorded in the checkpoint).
    """
    driver = checkpoint.state.get("driver", {})
    if problem.comm.rank == 0 and driver.get("staging"):
        remove_stale_staging(Path(driver["staging"]))
    for i, t in enumerate(driver.get("snapshot_times", [])):
        snapshots[t] = checkpoint.arrays[f"driver.snapshot.{i}"]
    particles.update(driver.get("particles", {}))
    for i, t in enumerate(driver.get("field_times", [])):
        field = problem.concentration()
        checkpoint.restore(f"driver.field.{i}", field)
        fields.append((t, field))
    return float(driver.get("wall_time_s", 0.0))


def suggest_regions(
    image: VoxelImage,
    settings: DiffusionSettings,
    *,
    size: float = 0.6e-6,
    names: tuple[str, ...] = ("I", "II", "III", "IV"),
) -> list:
    """Square regions (edge ``size``, m) from near a pore channel (I) to deep in the SEI/C/B (IV).

    Centres are transporting-phase pixels whose distance to the nearest pore is at evenly spaced
    quantiles (5 % ... 100 %) of that distance, so region I sits next to a pore and the last
    one at the point farthest from any pore, as regions I-IV of the paper's Fig. 8.
    Deterministic; 2D images only.
    """
    from fem_anode.fem.diffusion import Region

    if image.ndim != 2:
        raise InputError("suggest_regions works on 2D images; give [[regions]] explicitly in 3D")
    phases = image.require_phases()
    geometry = settings.geometry
    spacing = np.asarray(image.require_voxel_size())
    transport = image.array == phases[geometry.transport_phase]
    distance = ndimage.distance_transform_edt(image.array != phases[geometry.pore_phase], sampling=spacing)
    candidates = np.flatnonzero(transport)
    order = candidates[np.argsort(distance.ravel()[candidates], kind="stable")]
    regions = []
    extent = np.asarray(image.extent)
    for name, quantile in zip(names, np.linspace(0.05, 1.0, len(names))):
        flat = order[min(int(quantile * (len(order) - 1)), len(order) - 1)]
        row, col = np.unravel_index(flat, image.shape)
        centre = np.array([(col + 0.5) * spacing[1], (row + 0.5) * spacing[0]])
        low = np.clip(centre - size / 2, 0, extent[::-1] - size)
        regions.append(
            Region(name=name, box=[float(low[0]), float(low[1]), float(low[0] + size), float(low[1] + size)])
        )
    return regions


def fig8_settings(image_path: Path, *, quick: bool = False) -> DiffusionSettings:
    """The paper's Fig. 8 set-up on a 2D ROI: its parameters, regions I-IV from
    :func:`suggest_regions`, outputs at 2, 10, 100 s plus early times where the physics happens."""
    from fem_anode.fem.diffusion import GeometrySettings, TimeSettings

    times = [0.01, 2.0, 10.0, 100.0] if quick else [0.001, 0.003, 0.01, 2.0, 10.0, 100.0]
    settings = DiffusionSettings(
        geometry=GeometrySettings(image=Path(image_path)), time=TimeSettings(output_times=times)
    )
    return settings.replace(regions=suggest_regions(read_image(image_path, kind="labels"), settings))
