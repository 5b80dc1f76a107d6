"""The public Python API of fem_anode: what a notebook, a demo, the CLI and the tests call.

::

    import fem_anode as fa

    img = fa.read_image("roi.npy", voxel_size="20nm", phases="pore=0,si=1,sei=3")
    m = fa.compute_metrics(img)                 # Metrics: attributes, .to_dict(), .plot(), .save()
    res = fa.solve_diffusion(img, fa.DiffusionSettings(time={"t_end": 1.0, "output_times": [0.1, 1.0]}))
    res.t90["domain"], res.region_means, res.concentration   # in memory
    res.save("out/")                            # the files `fem-anode diffusion --out out/` writes
    pf = fa.solve_phasefield(fa.PhaseFieldSettings(cycling={"half_cycles": 2}))
    tau = fa.tortuosity_factor(img, "pore")

SI units throughout (lengths in m, times in s, concentrations in mol/m^3) unless a docstring says
otherwise. Bad input raises :class:`~fem_anode.errors.UsageError` (arguments, settings) or
:class:`~fem_anode.errors.InputError` (files, images); a failed solve
:class:`~fem_anode.errors.SolverError`. The solvers are collective over ``comm`` (default
``MPI.COMM_WORLD``) and keep fields distributed; importing this module needs neither dolfinx
nor MPI (they are imported by the functions that solve).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import numpy as np

from fem_anode.errors import FemAnodeError, InputError, Interrupted, SolverError, UsageError
from fem_anode.fem.diffusion.settings import DiffusionSettings
from fem_anode.fem.phasefield.settings import PhaseFieldSettings
from fem_anode.imaging.metrics import Metrics
from fem_anode.io.images import ImageLayers, VoxelImage, open_image_layers
from fem_anode.io.images import read_image as _read_image
from fem_anode.settings import Settings

if TYPE_CHECKING:
    from mpi4py import MPI

    from fem_anode.fem.diffusion.run import DiffusionRun, GeometrySource
    from fem_anode.fem.tortuosity.result import TortuosityResult
    from fem_anode.io.checkpoint import Checkpoint

__all__ = [
    "DiffusionRun",
    "DiffusionSettings",
    "FemAnodeError",
    "InputError",
    "Interrupted",
    "Metrics",
    "PhaseFieldRun",
    "PhaseFieldSettings",
    "SolverError",
    "TortuosityResult",
    "UsageError",
    "VoxelImage",
    "compute_metrics",
    "read_image",
    "solve_diffusion",
    "solve_phasefield",
    "tortuosity_factor",
]

logger = logging.getLogger(__name__)


def __getattr__(name: str) -> Any:
    # Result types whose modules import dolfinx/PETSc: resolved on first use.
    if name == "DiffusionRun":
        from fem_anode.fem.diffusion.run import DiffusionRun

        return DiffusionRun
    if name == "TortuosityResult":
        from fem_anode.fem.tortuosity.result import TortuosityResult

        return TortuosityResult
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _world(comm: MPI.Comm | None) -> MPI.Comm:
    if comm is not None:
        return comm
    from mpi4py import MPI

    return MPI.COMM_WORLD


# ----------------------------------------------------------------------------------- images


def read_image(
    path: str | Path,
    *,
    voxel_size: str | float | Sequence[float] | None = None,
    phases: str | Mapping[str, int] | None = None,
    kind: Literal["auto", "labels", "gray", "any"] = "auto",
) -> VoxelImage:
    """Read a 2D or 3D image with its voxel size (m) and phase map.

    Args:
        path: ``.npy``, ``.npz``, ``.tif``/``.tiff``, ``.png`` or a folder of numbered slices;
            3D axes (z, y, x) with z = 0 at the electrode surface.
        voxel_size: overrides the stored one: metres, or text with a unit (``"20nm"``,
            ``"40nm,20nm,20nm"``), one value or one per axis.
        phases: overrides the stored phase map: ``"pore=0,si=1,sei=3"`` or a dict.
        kind: ``"labels"`` checks integer labels that match the phase map and that every phase
            has voxels; ``"gray"`` returns float64; ``"any"`` checks only dimension and
            finiteness; ``"auto"`` (default) is ``"labels"`` when a phase map is known.

    Raises:
        InputError: missing or unreadable file, wrong dimension, labels that do not match.
        UsageError: malformed voxel size or phase map.
    """
    if kind not in ("auto", "labels", "gray", "any"):
        raise UsageError(f"kind must be one of 'auto', 'labels', 'gray', 'any', got {kind!r}")
    image = _read_image(path, voxel_size=voxel_size, phases=phases, kind="any" if kind == "auto" else kind)
    if kind == "auto" and image.phases is not None:
        image = image.check_labels()
    return image


def _as_image(image: VoxelImage | str | Path, what: str = "image") -> VoxelImage:
    if isinstance(image, VoxelImage):
        return image
    if isinstance(image, (str, Path)):
        return read_image(image, kind="labels")
    raise UsageError(f"{what} must be a VoxelImage or the path of an image, got {type(image).__name__}")


def _as_layers(image: VoxelImage | ImageLayers | str | Path, what: str = "image") -> VoxelImage | ImageLayers:
    """An image, or a 3D image file opened for reading by layers (integer labels required)."""
    if isinstance(image, (VoxelImage, ImageLayers)):
        layers = image
    elif isinstance(image, (str, Path)):
        layers = open_image_layers(image)
    else:
        raise UsageError(f"{what} must be a VoxelImage or the path of an image, got {type(image).__name__}")
    dtype = layers.dtype if isinstance(layers, ImageLayers) else layers.array.dtype
    if not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.bool_)):
        raise InputError(f"{layers.source}: a label image must hold integers, got {dtype}")
    return layers


# ---------------------------------------------------------------------------------- metrics


def compute_metrics(
    image: VoxelImage | ImageLayers | str | Path,
    *,
    reference: VoxelImage | ImageLayers | Metrics | str | Path | None = None,
    pore_phase: str = "pore",
    si_phase: str = "si",
    bins: int = 30,
    fields: bool = True,
    tortuosity_factor: str | Sequence[str] | bool | None = None,
    tortuosity_method: str = "fv",
    comm: MPI.Comm | None = None,
    memory_check: bool = True,
    require_all_phases: bool = False,
) -> Metrics:
    """Image metrics of a label image (Vorauer et al. 2020, Figs. 4-7), as a :class:`Metrics`.

    Phase fractions and their profile over the depth, Si particles, pore surface area (2D:
    perimeter), the geodesic tortuosity of the pores from the surface (slice 0), surface-
    connected pore channels per slice, pore-Si distances; with ``reference`` the relative
    change; with ``tortuosity_factor`` the tortuosity factor eps D / D_eff along z from a steady
    diffusion solve (3D only, needs petsc4py; :func:`tortuosity_factor`).

    A 3D image is split into slabs of z layers over the ranks of ``comm``: each rank reads and
    holds its own layers only (from the file, for an :class:`~fem_anode.io.images.ImageLayers`
    or a path), and the metrics are the same on any number of ranks.

    Args:
        image: 2D or 3D label image with voxel size (m) and phase map, or its path (a 3D
            ``.npy``, multi-page TIFF or folder of slices is read layer by layer).
        reference: a reference sample (image, path or its metrics); adds ``relative_change``.
        pore_phase, si_phase: names of the pore and the Si phase.
        bins: histogram bins of the distributions.
        fields: keep the tortuosity and geodesic-distance arrays (``Metrics.fields``; under MPI
            the rank's own layers of a 3D image).
        tortuosity_factor: phase name(s) whose tortuosity factor to compute, ``True`` for the
            pore phase; ``None``/``False``: none.
        tortuosity_method: ``"fv"`` (default), ``"fe"`` or ``"fe-extrapolated"``.
        comm: communicator of the slabs and of the tortuosity-factor solve (default
            ``MPI.COMM_WORLD`` if MPI is in use, else one process).
        memory_check: refuse an image whose estimated memory needs exceed what is available.
        require_all_phases: refuse a phase map naming a phase without voxels (otherwise the
            metrics that need it are ``null``, with the reason in ``not_applicable``).

    Raises:
        UsageError: unknown phases, bad ``bins`` or method. InputError: unusable image.
    """
    from fem_anode.imaging.metrics import _in_memory, _world_if_initialised
    from fem_anode.resources import check_memory, estimate_metrics_memory

    image = _as_layers(image)
    if isinstance(reference, (str, Path)):
        reference = _as_layers(reference, "reference")
    if not isinstance(bins, int) or isinstance(bins, bool) or bins < 1:
        raise UsageError(f"bins must be a positive integer, got {bins!r}")
    if comm is None:
        comm = _world_if_initialised()
    check_memory(
        estimate_metrics_memory(image.shape, 1 if comm is None else comm.size),
        comm,
        hint="crop or bin the image first, or run on more ranks",
        enabled=memory_check,
    )
    phases = image.require_phases()
    for role, name, default in (("pore_phase", pore_phase, "pore"), ("si_phase", si_phase, "si")):
        if name != default and name not in phases:
            raise UsageError(f"{role} {name!r} is not a phase of {image.source} ({', '.join(phases)})")
    if tortuosity_factor is True:
        names: list[str] = [pore_phase]
    elif tortuosity_factor is None or tortuosity_factor is False:
        names = []
    elif isinstance(tortuosity_factor, str):
        names = [n.strip() for n in tortuosity_factor.split(",") if n.strip()] or [pore_phase]
    else:
        names = list(tortuosity_factor)
    unknown = [n for n in names if n not in phases]
    if unknown:
        raise UsageError(f"tortuosity factor: {', '.join(unknown)} not in the phase map ({', '.join(phases)})")
    if names:
        from fem_anode.fem.tortuosity.result import METHODS

        if tortuosity_method not in METHODS:
            raise UsageError(f"tortuosity method must be one of {', '.join(METHODS)}, got {tortuosity_method!r}")
    metrics = Metrics.compute(
        image,
        reference=reference,
        pore_phase=pore_phase,
        si_phase=si_phase,
        bins=bins,
        fields=fields,
        comm=comm,
        require_all_phases=require_all_phases,
    )
    if names:
        if image.ndim != 3:
            metrics.not_applicable["tortuosity_factor"] = "2D image: the tortuosity factor needs a 3D volume"
        else:
            whole = _in_memory(image)
            results = {
                name: _tortuosity_factor(whole, name, method=tortuosity_method, comm=comm, memory_check=memory_check)
                for name in names
            }
            metrics.add_tortuosity_factors(results, tortuosity_method)
    return metrics


def tortuosity_factor(
    image: VoxelImage | str | Path,
    phase: str = "pore",
    *,
    method: str = "fv",
    comm: MPI.Comm | None = None,
    rtol: float = 1e-5,
    petsc_options: Mapping[str, Any] | None = None,
    memory_check: bool = True,
) -> TortuosityResult:
    """Tortuosity factor ``tau = eps D / D_eff`` of ``phase`` along z of a 3D label image.

    Steady diffusion through the face-connected phase with ``c = 1`` at z = 0 and ``c = 0`` at
    the far end (:mod:`fem_anode.fem.tortuosity`). Checks the memory first. Collective.

    Args:
        image: 3D label image with voxel size (m) and phase map, or its path.
        phase: the phase diffusion goes through.
        method: ``"fv"`` (cell-centred finite volumes, the value TauFactor, PoreSpy and
            OpenImpala report; default), ``"fe"`` (trilinear finite elements) or
            ``"fe-extrapolated"``.
        comm: communicator (default ``MPI.COMM_WORLD``).
        rtol: relative residual tolerance of CG.
        petsc_options: extra PETSc options (e.g. ``{"pc_type": "hypre"}``).
        memory_check: refuse a solve whose estimated memory exceeds what is available.

    Returns:
        The :class:`~fem_anode.fem.tortuosity.result.TortuosityResult` (``tau`` is ``inf`` when
        the phase does not percolate along z), the same on every rank.

    Raises:
        UsageError: not 3D, unknown phase or method, or petsc4py missing. SolverError: CG failed.
    """
    from fem_anode.fem.tortuosity.result import METHODS
    from fem_anode.resources import check_memory

    image = _as_image(image)
    if method not in METHODS:
        raise UsageError(f"tortuosity method must be one of {', '.join(METHODS)}, got {method!r}")
    if image.ndim != 3:
        raise UsageError(f"the tortuosity factor needs a 3D volume, {image.source} is {image.ndim}D")
    phases = image.require_phases()
    if phase not in phases:
        raise UsageError(f"phase {phase!r} is not in the phase map ({', '.join(phases)})")
    try:
        from fem_anode.fem.tortuosity import tortuosity_factor as solve
        from fem_anode.fem.tortuosity.fe import estimate_memory as estimate_fe_tortuosity_memory
        from fem_anode.fem.tortuosity.fv import estimate_memory as estimate_fv_memory
    except ImportError as err:
        raise UsageError(
            f"the tortuosity factor needs petsc4py (and dolfinx for method 'fe'), which is not importable: {err}"
        ) from None
    comm = _world(comm)
    if method == "fv":
        estimate = estimate_fv_memory(image, phase, comm)
    else:
        refine = 3 if method == "fe-extrapolated" else 1  # the largest of its three solves
        pc_type = str(dict(petsc_options or {}).get("pc_type", "ssor"))
        estimate = estimate_fe_tortuosity_memory(image, phase, comm, refine=refine, pc_type=pc_type)
    check_memory(estimate, comm, hint="crop or bin the image, or run on more nodes", enabled=memory_check)
    return solve(image, phase, comm, method=method, rtol=rtol, petsc_options=dict(petsc_options or {}))


_tortuosity_factor = tortuosity_factor  # compute_metrics has an argument of this name


# -------------------------------------------------------------------------------- diffusion


_S = TypeVar("_S", bound=Settings)


def _settings(settings: _S | Mapping[str, Any] | str | Path | None, cls: type[_S], what: str) -> _S:
    """Settings of ``cls`` from an object (checked again: fields may have changed since it was
    made), a dict of sections, a TOML file (paths relative to it) or ``None`` (the defaults)."""
    if settings is None:
        return cls()
    if isinstance(settings, cls):
        settings.check()
        return settings
    if isinstance(settings, Mapping):
        return cls.from_dict(settings)
    if isinstance(settings, (str, Path)):
        return cls.from_toml(settings).resolve_paths(Path(settings).parent)
    raise UsageError(
        f"{what} must be a {cls.__name__}, a dict or the path of a TOML file, got {type(settings).__name__}"
    )


def solve_diffusion(
    geometry: GeometrySource | None,
    settings: DiffusionSettings | Mapping[str, Any] | str | Path | None = None,
    *,
    comm: MPI.Comm | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: Checkpoint | None = None,
    memory_check: bool = True,
) -> DiffusionRun:
    r"""Transient Li diffusion in the transporting phase (Vorauer et al. 2020), in memory.

    Solves :math:`\varepsilon\,\partial_t c = \nabla\cdot(\varepsilon^b D\nabla c)` from c = 0
    with inflow :math:`k_f (c_\mathrm{bulk} - c)` at pore interfaces; see
    :mod:`fem_anode.fem.diffusion`. Nothing is written; :meth:`DiffusionRun.save` writes the
    files of ``fem-anode diffusion``. Collective over ``comm``; the fields stay distributed.

    Args:
        geometry: a label :class:`~fem_anode.io.images.VoxelImage` (meshed as
            ``settings.mesh`` says: voxels, smooth 2D, or finite volumes), a tagged mesh
            (:class:`~fem_anode.fem.mesh_io.TaggedMesh`), the path of an image or a ``.msh``
            mesh, or ``None`` for ``settings.geometry.image``/``mesh``.
        settings: :class:`DiffusionSettings`, a dict of its sections, a TOML file, or ``None``
            (the defaults: the paper's parameters, t_end = 100 s).
        comm: communicator (default ``MPI.COMM_WORLD``).
        checkpoint_dir: write checkpoints to ``checkpoint_dir/checkpoint/`` as
            ``settings.checkpoint`` says and stop at a safe point on SIGINT/SIGTERM.
        resume: continue from a checkpoint (:class:`~fem_anode.io.checkpoint.CheckpointStore`).
        memory_check: refuse a problem whose estimated memory exceeds what is available.

    Returns:
        The :class:`~fem_anode.fem.diffusion.run.DiffusionRun`: ``t90``, ``times``,
        ``region_means``, ``domain_mean``, ``concentration`` (output time -> field),
        ``to_dict()`` (results.json) and ``save(directory)``.

    Raises:
        UsageError: bad settings or geometry. InputError: unusable image or mesh.
        SolverError, Interrupted: the solve failed or was stopped; ``err.run`` is the partial
            :class:`~fem_anode.fem.diffusion.run.DiffusionRun` (save it to keep what was done).
    """
    try:
        from fem_anode.fem.diffusion.run import simulate_diffusion
    except ImportError as err:
        raise UsageError(
            f"solve_diffusion needs FEniCSx (dolfinx, petsc4py, mpi4py), which is not importable: {err}"
        ) from None
    settings = _settings(settings, DiffusionSettings, "settings")
    run = simulate_diffusion(
        settings,
        _world(comm),
        geometry,
        checkpoint_dir=None if checkpoint_dir is None else Path(checkpoint_dir),
        resume=resume,
        memory_check=memory_check,
    )
    if run.stopped is not None:
        setattr(run.stopped, "run", run)  # noqa: B010 (an attribute the exception classes do not declare)
        raise run.stopped
    return run


# ------------------------------------------------------------------------------ phase field


@dataclasses.dataclass(eq=False)
class PhaseFieldRun:
    """A finished phase-field run (:func:`solve_phasefield`): one record per half-cycle.

    Attributes:
        settings: the settings of the run.
        results: the content of ``results.json`` (lengths in m; stresses and time normalised as
            in the settings' module docstring), the same on every rank.
    """

    settings: PhaseFieldSettings
    results: dict[str, Any]

    @property
    def status(self) -> str:
        return str(self.results["status"])

    @property
    def half_cycles(self) -> list[dict[str, Any]]:
        """One record per half-cycle: ``kind``, ``t``, ``mean_c_li``, ``outer_radius_m``,
        ``axial_stretch``, stresses, plastic strain and, with vacancies, the void metrics."""
        return list(self.results["half_cycles"])

    def series(self, key: str) -> list[Any]:
        """``key`` of every half-cycle record, e.g. ``series("outer_radius_m")``."""
        records = self.results["half_cycles"]
        if records and key not in records[0]:
            raise UsageError(f"half-cycle records have no {key!r}; keys: {', '.join(records[0])}")
        return [record[key] for record in records]

    def to_dict(self) -> dict[str, Any]:
        """The content of ``results.json``."""
        return self.results

    def save(self, directory: str | Path, comm: MPI.Comm | None = None) -> Path:
        """Write ``results.json`` and ``config.toml`` into ``directory`` (rank 0). The fields and
        figures are written during the run: pass ``out=`` to :func:`solve_phasefield`."""
        from fem_anode.io.output import write_json

        directory = Path(directory)
        comm = _world(comm)
        if comm.rank == 0:
            directory.mkdir(parents=True, exist_ok=True)
            write_json(directory / "results.json", self.results)
            self.settings.to_toml(directory / "config.toml")
        comm.barrier()
        return directory


def solve_phasefield(
    settings: PhaseFieldSettings | Mapping[str, Any] | str | Path | None = None,
    *,
    mesh: Any = None,
    comm: MPI.Comm | None = None,
    out: str | Path | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: Checkpoint | None = None,
) -> PhaseFieldRun:
    """Cycle a Si nanowire cross-section: Li (and vacancy) Cahn-Hilliard with finite-strain
    elasto-plasticity (see :mod:`fem_anode.fem.phasefield`). Collective over ``comm``.

    Args:
        settings: :class:`PhaseFieldSettings`, a dict of its sections, a TOML file or ``None``
            (the defaults).
        mesh: a tagged 2D mesh (:class:`~fem_anode.fem.mesh_io.TaggedMesh`, metres) instead of
            ``settings.geometry``.
        comm: communicator (default ``MPI.COMM_WORLD``).
        out: write the files of ``fem-anode phasefield --out`` here (VTX fields, PNG snapshots,
            mesh, results.json); ``None``: nothing is written.
        checkpoint_dir: write checkpoints to ``checkpoint_dir/checkpoint/`` as
            ``settings.checkpoint`` says and stop at a safe point on a signal.
        resume: continue from a checkpoint.

    Raises:
        UsageError: bad settings. SolverError, Interrupted: the run failed or was stopped
            (with ``out``, the partial results are written first).
    """
    try:
        from fem_anode.fem.phasefield.run import run_phasefield
    except ImportError as err:
        raise UsageError(
            f"solve_phasefield needs FEniCSx (dolfinx, petsc4py, mpi4py), which is not importable: {err}"
        ) from None
    settings = _settings(settings, PhaseFieldSettings, "settings")
    comm = _world(comm)
    staging = None
    if out is not None:
        staging = Path(out)
        if comm.rank == 0:
            staging.mkdir(parents=True, exist_ok=True)
        comm.barrier()
    results = run_phasefield(
        settings,
        staging,
        comm,
        mesh,
        checkpoint_dir=None if checkpoint_dir is None else Path(checkpoint_dir),
        resume=resume,
    )
    return PhaseFieldRun(settings, results)
