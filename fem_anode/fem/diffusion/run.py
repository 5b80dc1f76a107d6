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

from fem_anode.errors import InputError, Interrupted, SolverError
from fem_anode.fem.diffusion.geometry import (
    GeometrySource,
    image_grid_points,
    max_distance_to_pore,
    middle_section,
    prepare_geometry,
)
from fem_anode.fem.diffusion.results import DiffusionResult
from fem_anode.fem.diffusion.settings import DiffusionSettings
from fem_anode.fem.diffusion.transient import TransientDiffusion
from fem_anode.io.checkpoint import Checkpoint, Checkpointer, CheckpointPolicy, CheckpointStore
from fem_anode.io.checkpoint import settings_fingerprint as checkpoint_fingerprint
from fem_anode.io.images import ImageLayers, VoxelImage, read_image
from fem_anode.io.interrupt import SafeStop
from fem_anode.io.output import remove_stale_staging

if TYPE_CHECKING:
    from fem_anode.fem.mesh_io import TaggedMesh

__all__ = [
    "DiffusionRun",
    "GeometrySource",
    "fig8_settings",
    "run_diffusion",
    "simulate_diffusion",
    "settings_fingerprint",
    "suggest_regions",
    "timescales",
]

logger = logging.getLogger(__name__)


def timescales(settings: DiffusionSettings, length: float) -> dict[str, float]:
    """Diffusion time eps L^2 / D_eff (s) and Biot number k_f L / D_eff for a length L (m)."""
    physics = settings.physics
    return {
        "length_m": length,
        "diffusion_time_s": physics.eps * length**2 / physics.D_eff,
        "biot_number": physics.k_f * length / physics.D_eff,
    }


@dataclasses.dataclass(eq=False)
class DiffusionRun:
    """A finished (or stopped) diffusion solve, in memory; :meth:`save` writes the CLI's files.

    The fields stay distributed: every rank holds its own part of each field (a dolfinx
    ``Function`` on the mesh, or for finite volumes a
    :class:`~fem_anode.fem.diffusion.finite_volume.VectorField` of its voxels); nothing is gathered.

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
    field_writer: Any = (
        None  # no mesh (finite volumes, P1 on the voxels): the problem whose layout VoxelFieldWriter needs
    )
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
                from fem_anode.fem.diffusion.finite_volume import VoxelFieldWriter

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
                from fem_anode.fem.diffusion.plots import (
                    plot_concentration_fields,
                    plot_region_history,
                    render_and_report,
                )

                c_bulk = settings.physics.c_bulk
                plot_region_history(self.results, directory / "c_regions.png", c_bulk=c_bulk)
                if self.image is not None and self.snapshots:
                    plot_concentration_fields(
                        middle_section(self.image), self.snapshots, settings, directory / "c_fields.png"
                    )
                # 3D figure from the written field files, report.html (fem_anode.fem.diffusion.plots)
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
    problem: TransientDiffusion
    geo = prepare_geometry(settings, geometry, workdir, comm, memory_check)
    image = geo.image
    meshed = time.perf_counter()
    figures = settings.output.figures
    #: At each output time: the middle section of c for the figures, the Si-particle report.
    section: Callable[[], np.ndarray] | None = None
    particle_report: Callable[[], list[dict[str, Any]]] | None = None
    scales: dict[str, float] | None
    if geo.tagged is None and not finite_volumes:  # P1 on the voxels, no mesh (fem_anode.fem.diffusion.voxel_elements)
        from fem_anode.fem.diffusion.voxel_elements import VoxelP1Problem

        if image is None:
            raise RuntimeError("a voxel geometry without an image")  # a bug, never bad input
        scales = timescales(settings, max_distance_to_pore(image, settings, comm))
        nodal = VoxelP1Problem(image, settings, cast(MPI.Intracomm, comm))
        problem = nodal
        section = nodal.middle_section if figures else None
        particle_report = nodal.si_particle_report
    elif geo.tagged is None:  # no mesh: the voxels are the cells (fem_anode.fem.diffusion.finite_volume)
        from fem_anode.fem.diffusion.finite_volume import VoxelFVProblem

        if image is None:
            raise RuntimeError("a finite-volume geometry without an image")  # a bug, never bad input
        # Before the assembly: the distance transform's temporaries (about 180 B per voxel of a
        # slab) then do not add to the solver's memory.
        scales = timescales(settings, max_distance_to_pore(image, settings, comm))
        volumes = VoxelFVProblem(image, settings, cast(MPI.Intracomm, comm))  # COMM_WORLD or a split of it
        problem = volumes
        section = volumes.middle_section if figures else None
        particle_report = volumes.si_particle_report
    else:
        from fem_anode.fem.diffusion.finite_element import DiffusionProblem
        from fem_anode.fem.diffusion.particles import si_particle_report
        from fem_anode.fem.sampling import sample_points

        scales = timescales(settings, max_distance_to_pore(image, settings, comm)) if image is not None else None
        elements = DiffusionProblem(geo.tagged, settings)
        problem = elements
        if image is not None:
            grid = image_grid_points(image)
            c_bulk = settings.physics.c_bulk
            if figures:
                section = lambda: c_bulk * sample_points(elements.c, grid[0]).reshape(grid[1])  # noqa: E731
            particle_report = lambda: si_particle_report(elements, image)  # noqa: E731
    assembled = time.perf_counter()
    logger.info(
        "diffusion: %d cells, %d unknowns (%s), D_eff = %.3g m^2/s, %d rank(s)",
        problem.ncells,
        problem.ndofs,
        "finite volumes" if finite_volumes else f"P{settings.mesh.order}",
        settings.physics.D_eff,
        comm.size,
    )
    if (
        geo.voxel_mesh
        and geo.tagged is not None
        and not finite_volumes
        and problem.dim == 3
        and problem.ncells >= 100_000
    ):
        logger.info(
            "diffusion: a 3D voxel mesh with Lagrange elements; [mesh] discretisation = 'fv' solves the same "
            "physics on the voxels about 10x faster with about 15x less memory (docs/diffusion.md)"
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

    def on_output(t: float, prob: TransientDiffusion) -> None:
        if settings.output.fields:  # kept for save(): one vector per output time (8 B per unknown)
            fields.append((t, prob.concentration()))
        if section is not None:
            snapshots[t] = section()
        if particle_report is not None and t > 0:
            particles[f"{t:g}"] = particle_report()

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
        # the extremes of c over every accepted step (the exact solution stays in [0, c_bulk])
        "min_c": {"c": c_bulk * result.c_extremes[0], "t_s": result.c_extremes[1]},
        "max_c": {"c": c_bulk * result.c_extremes[2], "t_s": result.c_extremes[3]},
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
    if stopped is None:  # (a stopped run's excursions are reported when its resumed run completes)
        _warn_about_excursions(result, settings, comm)
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
        field_writer=problem if geo.tagged is None else None,
        stopped=stopped,
    )


#: The over- or undershoot (relative to c_bulk) from which a run warns (``DiffusionResult.excursion``).
EXCURSION_WARNING = 1e-3


def _warn_about_excursions(result: DiffusionResult, settings: DiffusionSettings, comm: Any) -> None:
    """Warn if c left [0, c_bulk] by more than :data:`EXCURSION_WARNING` at any accepted step (on
    rank 0: the extremes are global, the same on every rank)."""
    if result.excursion() <= EXCURSION_WARNING or comm.rank != 0:
        return
    c_bulk = settings.physics.c_bulk
    low, t_low, high, t_high = result.c_extremes
    if settings.mesh.discretisation == "fv":
        remedy = 'time.scheme = "euler" (BDF2 is not positivity-preserving)'
    else:
        remedy = (
            'mesh.mass_lumping = true (P1 on the voxels of a 3D image) or mesh.discretisation = "fv" (finite '
            "volumes), both with a diagonal mass matrix, for early-time fields, or smaller voxels or elements: the "
            "consistent mass matrix of the finite elements over- and undershoots while the steps are shorter than "
            "the diffusion time of an element"
        )
    logger.warning(
        "c left [0, c_bulk] during the run, which the exact solution does not: min %.4g mol/m^3 at t = %.3g s, "
        "max %.4g mol/m^3 at t = %.3g s (%.2g %% of c_bulk beyond the bounds). Use %s (docs/diffusion.md, "
        "'Over- and undershoots')",
        c_bulk * low,
        t_low,
        c_bulk * high,
        t_high,
        100 * result.excursion(),
        remedy,
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
    problem: TransientDiffusion,
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
    from scipy import ndimage

    from fem_anode.fem.diffusion.settings import Region

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


def fig8_settings(image: Path | str | VoxelImage, *, quick: bool = False) -> DiffusionSettings:
    """The paper's Fig. 8 set-up on a 2D ROI: its parameters, regions I-IV from
    :func:`suggest_regions`, outputs at 2, 10, 100 s plus early times where the physics happens.

    ``image``: the ROI's label image in memory (the settings then name no file: pass the image to
    :func:`fem_anode.solve_diffusion`), or its path (``geometry.image``, as ``fem-anode diffusion`` needs).
    """
    from fem_anode.fem.diffusion.settings import GeometrySettings, TimeSettings

    times = [0.01, 2.0, 10.0, 100.0] if quick else [0.001, 0.003, 0.01, 2.0, 10.0, 100.0]
    if isinstance(image, VoxelImage):
        geometry, labels = GeometrySettings(), image
    else:
        geometry, labels = GeometrySettings(image=Path(image)), read_image(image, kind="labels")
    settings = DiffusionSettings(geometry=geometry, time=TimeSettings(output_times=times))
    return settings.replace(regions=suggest_regions(labels, settings))
