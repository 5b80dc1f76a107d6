"""A complete phase-field run: settings -> mesh -> half-cycles -> results.json, VTX, PNG.

Used by ``fem-anode phasefield CONFIG.toml --out DIR``, the demo and the tests.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mpi4py import MPI

from fem_anode.errors import Interrupted, SolverError
from fem_anode.fem.mesh_io import TaggedMesh, read_mesh
from fem_anode.fem.phasefield.settings import PhaseFieldSettings
from fem_anode.io.checkpoint import Checkpoint, Checkpointer, CheckpointPolicy, CheckpointStore
from fem_anode.io.checkpoint import settings_fingerprint as checkpoint_fingerprint
from fem_anode.io.interrupt import SafeStop
from fem_anode.io.output import remove_stale_staging

__all__ = ["load_geometry", "run_phasefield", "settings_fingerprint", "HALF_CYCLE_KINDS"]

logger = logging.getLogger(__name__)

#: Half-cycle i (0-based) is HALF_CYCLE_KINDS[i % 2].
HALF_CYCLE_KINDS = ("lithiation", "delithiation")


def load_geometry(settings: PhaseFieldSettings, workdir: Path | None, comm: MPI.Comm) -> TaggedMesh:
    """Read ``geometry.mesh`` or mesh the disk (written to ``workdir/mesh.msh`` if given)."""
    geometry = settings.geometry
    if geometry.mesh is not None:
        return read_mesh(geometry.mesh, comm)
    from fem_anode.fem.phasefield.geometry import disk_mesh

    return disk_mesh(geometry.radius, settings.mesh.size, comm, path=None if workdir is None else workdir / "mesh.msh")


def run_phasefield(
    settings: PhaseFieldSettings,
    staging: Path | None,
    comm: MPI.Comm = MPI.COMM_WORLD,
    tagged: TaggedMesh | None = None,
    on_half_cycle_end: Callable[[Any, dict[str, Any]], None] | None = None,
    *,
    checkpoint_dir: Path | None = None,
    resume: Checkpoint | None = None,
) -> dict[str, Any]:
    """Run the half-cycles; write ``results.json``, ``fields.bp``/``stress.bp`` and PNGs to ``staging``.

    With ``vacancy.enabled`` (default) the problem is a
    :class:`~fem_anode.fem.phasefield.vacancy.VacancyPhaseFieldProblem`: the records gain the
    void metrics, and ``morphology_NN_<kind>.png`` (each half-cycle's end, colours of Fig. 5)
    and ``morphology_montage.png`` (all of them) are written.

    Args:
        settings: the run's settings.
        staging: output directory (``None``: nothing is written, only the results returned).
        comm: communicator.
        tagged: a mesh to use instead of the settings' geometry (coordinates in metres).
        on_half_cycle_end: called as ``on_half_cycle_end(problem, record)`` after every
            half-cycle (e.g. to keep fields for a convergence study).
        checkpoint_dir: write checkpoints to ``checkpoint_dir/checkpoint/`` as set in
            ``[checkpoint]`` (after accepted steps) and stop at a safe point on
            SIGINT/SIGTERM/SIGUSR1 (``None``: neither).
        resume: continue from this checkpoint; its settings must match (except ``[solver]``,
            ``[checkpoint]`` and ``[output]``).

    Returns:
        The results dict (same on every rank).

    Raises:
        SolverError: a half-cycle could not be completed (``results.json`` with
            ``"status": "failed"`` and the failure report is written first, and with
            ``checkpoint_dir`` the last good state is saved).
        Interrupted: stopped by a signal; partial ``results.json`` (``"status": "interrupted"``)
            and a checkpoint were written.
    """
    from fem_anode.fem.phasefield.output import FieldWriter, gather_snapshot, plot_morphology, plot_snapshot
    from fem_anode.fem.phasefield.problem import HalfCycleProgress, PhaseFieldProblem
    from fem_anode.fem.phasefield.vacancy import VacancyPhaseFieldProblem
    from fem_anode.io.output import write_json

    settings.check()  # the Python API as strict as the CLI: ranges and constraints before any work
    start = time.perf_counter()
    if tagged is None:
        tagged = load_geometry(settings, staging, comm)
    vacancies = settings.vacancy.enabled
    problem = (VacancyPhaseFieldProblem if vacancies else PhaseFieldProblem)(tagged, settings)
    ncells = tagged.mesh.topology.index_map(2).size_global
    ndofs = problem.W.dofmap.index_map.size_global + 1
    logger.info(
        "phasefield: %d cells, %d unknowns, %s, %d rank(s)", ncells, ndofs, settings.model.kinematics, comm.size
    )
    out = settings.output
    mat = settings.material
    c_mid = 0.5 * (mat.c_min + mat.c_max)
    run = _RunState()
    checkpointer = (
        _checkpointer(settings, checkpoint_dir, comm, run, lambda: time.perf_counter() - start, staging)
        if checkpoint_dir is not None
        else None
    )
    progress: HalfCycleProgress | None = None
    if resume is not None:
        if checkpointer is not None:
            checkpointer.check_meta(resume)
        problem.restore(resume.state["problem"], resume)
        start -= run.restore(resume, comm)
        progress = (
            HalfCycleProgress(**resume.state["driver"]["progress"]) if resume.state["driver"]["progress"] else None
        )
        logger.info("resumed at t = %g (half-cycle %d) from %s", problem.t, len(run.records) + 1, resume.path)
    writer = FieldWriter(problem, staging) if (out.fields and staging is not None) else None
    current: dict[str, Any] = {}

    def on_output(prob: PhaseFieldProblem, t: float) -> None:
        if writer is not None:
            writer.write(t)
        if out.figures and staging is not None:
            snap = gather_snapshot(prob)
            if comm.rank == 0 and snap is not None:
                kind = current["kind"]
                name = f"snapshot_{current['index']:02d}_{kind}_t{t:08.4f}.png"
                mean_c = float(snap["c"].mean())
                title = (
                    f"half-cycle {current['index']} ({kind}), t = {t:g}, corner-mean c = {mean_c:.3f}, axial stretch "
                    f"{float(prob.lam.value):.3f}"
                )
                plot_snapshot(snap, staging / name, title, (mat.c_min, mat.c_max), vm_max=mat.yield_strength)
                run.snapshots.append(name)

    def on_step(prob: PhaseFieldProblem, p: HalfCycleProgress) -> None:
        if checkpointer is None:
            return
        save_now, stop_now = checkpointer.poll(run.steps + p.steps)
        if save_now:
            run.progress = _global_progress(p, comm)
            checkpointer.save(run.steps + p.steps, *prob.checkpoint_state())
            prob.newton.invalidate()  # a resumed run starts with a fresh factorisation too: same results
        if stop_now:
            raise Interrupted(
                f"stopped by {checkpointer.stop_reason()} at t = {prob.t:.6g} (half-cycle {p.index}, step {p.steps})"
            )

    status, failure = "completed", None
    stopped: Interrupted | SolverError | None = None
    stop = SafeStop() if checkpointer is not None else contextlib.nullcontext()
    try:
        with stop:
            if checkpointer is not None:
                checkpointer.stop = stop
            if writer is not None and resume is None:
                writer.write(0.0)
            for i in range(len(run.records), settings.cycling.half_cycles):
                kind = HALF_CYCLE_KINDS[i % 2]
                current.update(kind=kind, index=i + 1)
                record = problem.run_half_cycle(
                    i + 1,
                    kind,
                    settings.cycling.half_cycle_time,
                    on_output,
                    out.snapshots_per_half_cycle,
                    out.times,
                    progress=progress,
                    on_step=on_step,
                )
                progress = None
                run.records.append(record)
                run.steps += record["steps"]
                if vacancies and out.figures and staging is not None:
                    snap = gather_snapshot(problem)
                    if comm.rank == 0 and snap is not None:
                        cycle = (i + 2) // 2
                        panel = (
                            f"cycle {cycle}, {kind}\nvoids {100 * record['void_fraction']:.1f} %, SEI depth "
                            f"{record['sei_penetration_depth_m'] * 1e9:.1f} nm"
                        )
                        run.morphology.append((snap, panel))
                        name = f"morphology_{i + 1:02d}_{kind}.png"
                        plot_morphology([run.morphology[-1]], staging / name, c_mid, settings.vacancy.threshold)
                        run.snapshots.append(name)
                if on_half_cycle_end is not None:
                    on_half_cycle_end(problem, record)
    except Interrupted as err:
        status, stopped = "interrupted", err
    except SolverError as err:
        status, stopped, failure = "failed", err, getattr(err, "report", None)
        failed_at = getattr(err, "progress", None)
        if (
            checkpointer is not None and failed_at is not None
        ):  # the last good state, to resume e.g. with other solver settings
            run.progress = _global_progress(failed_at, comm)
            state, arrays = problem.checkpoint_state()
            checkpointer.save(run.steps + failed_at.steps, {**state, "failure": failure}, arrays)
    finally:
        if writer is not None:
            writer.close()
    if run.morphology and status == "completed" and staging is not None:
        plot_morphology(
            run.morphology,
            staging / "morphology_montage.png",
            c_mid,
            settings.vacancy.threshold,
            suptitle=f"Si nanowire cross-section over {len(run.morphology)} half-cycles (green Si, yellow Li_xSi, "
            "white void, turquoise electrolyte, blue SEI)",
        )
        run.snapshots.append("morphology_montage.png")
    results: dict[str, Any] = {
        "status": status,
        "t_reached": problem.t,
        "failure": failure,
        "resumed": resume is not None,
        "half_cycles": run.records,
        "ncells": ncells,
        "unknowns": ndofs,
        "ranks": comm.size,
        "kinematics": settings.model.kinematics,
        "vacancy_model": vacancies,
        "length_scale_m": problem.l0,
        "pin_points_m": [p.tolist() for p in problem.pin_points],
        "snapshots": run.snapshots,
        "wall_time_s": time.perf_counter() - start,
        "units": {
            "lengths": "m",
            "stresses": "normalised by c_max R T (Supplementary Table 1)",
            "time": "normalised (characteristic step 1 s)",
            "mean_c_li": "normalised concentration, mean over the reference (unlithiated) section",
            "void_fraction": "area fractions of the reference section (void: c_v > vacancy.threshold)",
            "sei_penetration_depth_m": "m, reference configuration",
        },
        "settings": settings.to_dict(),
    }
    problem.destroy()
    if staging is not None and comm.rank == 0:
        write_json(staging / "results.json", results)
    if stopped is not None:
        raise stopped
    logger.info("phasefield done in %.1f s", results["wall_time_s"])
    return results


def _global_progress(progress: Any, comm: MPI.Comm) -> dict[str, Any]:
    """The progress as stored by rank 0, with the running peaks (rank-local maxima) reduced first."""
    progress.peak_vm = comm.allreduce(progress.peak_vm, op=MPI.MAX)
    progress.peak_ep = comm.allreduce(progress.peak_ep, op=MPI.MAX)
    return dataclasses.asdict(progress)


class _RunState:
    """What the driver has produced so far (records, figure names, morphology panels)."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.snapshots: list[str] = []
        self.morphology: list[tuple[dict[str, Any], str]] = []
        self.steps = 0
        self.progress: dict[str, Any] | None = None

    def checkpoint(self, staging: Path | None, wall_time_s: float) -> tuple[dict[str, Any], dict[str, Any]]:
        state = {
            "records": self.records,
            "snapshots": self.snapshots,
            "steps": self.steps,
            "progress": self.progress,
            "morphology_titles": [title for _, title in self.morphology],
            "staging": str(staging) if staging is not None else None,
            "wall_time_s": wall_time_s,
        }
        arrays = {
            f"morphology.{i}.{key}": value for i, (snap, _) in enumerate(self.morphology) for key, value in snap.items()
        }
        return state, arrays

    def restore(self, checkpoint: Checkpoint, comm: MPI.Comm) -> float:
        """Put the driver state back; remove a killed run's staging folder. Returns its wall time (s)."""
        driver = checkpoint.state["driver"]
        self.records = list(driver["records"])
        self.snapshots = list(driver["snapshots"])
        self.steps = int(driver["steps"])
        for i, title in enumerate(driver["morphology_titles"]):
            prefix = f"driver.morphology.{i}."
            snap = {key[len(prefix) :]: value for key, value in checkpoint.arrays.items() if key.startswith(prefix)}
            self.morphology.append((snap, title))
        if comm.rank == 0 and driver["staging"]:
            remove_stale_staging(Path(driver["staging"]))
        return float(driver["wall_time_s"])


def settings_fingerprint(settings: PhaseFieldSettings) -> dict[str, Any]:
    """The settings a resumed run must share with its checkpoint (JSON types, absolute mesh path);
    ``[solver]``, ``[checkpoint]`` and ``[output]`` may change."""
    return checkpoint_fingerprint(settings, free=("solver", "checkpoint", "output"), paths=("mesh",))


def _checkpointer(
    settings: PhaseFieldSettings,
    directory: Path,
    comm: MPI.Comm,
    run: _RunState,
    elapsed: Callable[[], float],
    staging: Path | None,
) -> Checkpointer:
    fingerprint = settings_fingerprint(settings)
    absolute = (
        settings
        if settings.geometry.mesh is None
        else settings.replace(geometry=settings.geometry.replace(mesh=Path(fingerprint["geometry"]["mesh"])))
    )
    meta = {"model": "phasefield", "fingerprint": fingerprint, "settings_toml": absolute.to_toml()}
    policy = CheckpointPolicy(interval_s=settings.checkpoint.interval_s, every_steps=settings.checkpoint.every_steps)
    return Checkpointer(
        CheckpointStore(directory, comm), policy, meta=meta, extra=lambda: run.checkpoint(staging, elapsed()), comm=comm
    )
