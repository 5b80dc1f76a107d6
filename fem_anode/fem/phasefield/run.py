"""A complete phase-field run: settings -> mesh -> half-cycles -> results.json, VTX, PNG.

Used by ``fem-anode phasefield CONFIG.toml --out DIR``, the demo and the tests.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mpi4py import MPI

from fem_anode.fem.mesh_io import TaggedMesh, read_mesh
from fem_anode.fem.phasefield.settings import PhaseFieldSettings

__all__ = ["load_geometry", "run_phasefield", "HALF_CYCLE_KINDS"]

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

    Returns:
        The results dict (same on every rank).

    Raises:
        SolverError: a half-cycle could not be completed.
    """
    from fem_anode.fem.phasefield.output import FieldWriter, gather_snapshot, plot_morphology, plot_snapshot
    from fem_anode.fem.phasefield.problem import PhaseFieldProblem
    from fem_anode.fem.phasefield.vacancy import VacancyPhaseFieldProblem
    from fem_anode.io.output import write_json

    start = time.perf_counter()
    if tagged is None:
        tagged = load_geometry(settings, staging, comm)
    vacancies = settings.vacancy.enabled
    problem = (VacancyPhaseFieldProblem if vacancies else PhaseFieldProblem)(tagged, settings)
    ncells = tagged.mesh.topology.index_map(2).size_global
    ndofs = problem.W.dofmap.index_map.size_global + 1
    logger.info("phasefield: %d cells, %d unknowns, %s, %d rank(s)", ncells, ndofs, settings.model.kinematics, comm.size)
    out = settings.output
    writer = FieldWriter(problem, staging) if (out.fields and staging is not None) else None
    snapshots: list[str] = []
    morphology: list[tuple[dict[str, Any], str]] = []
    mat = settings.material
    c_mid = 0.5 * (mat.c_min + mat.c_max)
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
                title = f"half-cycle {current['index']} ({kind}), t = {t:g}, corner-mean c = {mean_c:.3f}, axial stretch {float(prob.lam.value):.3f}"
                plot_snapshot(snap, staging / name, title, (mat.c_min, mat.c_max), vm_max=mat.yield_strength)
                snapshots.append(name)

    records = []
    try:
        if writer is not None:
            writer.write(0.0)
        for i in range(settings.cycling.half_cycles):
            kind = HALF_CYCLE_KINDS[i % 2]
            current.update(kind=kind, index=i + 1)
            record = problem.run_half_cycle(i + 1, kind, settings.cycling.half_cycle_time, on_output, out.snapshots_per_half_cycle, out.times)
            records.append(record)
            if vacancies and out.figures and staging is not None:
                snap = gather_snapshot(problem)
                if comm.rank == 0 and snap is not None:
                    cycle = (i + 2) // 2
                    panel = f"cycle {cycle}, {kind}\nvoids {100 * record['void_fraction']:.1f} %, SEI depth {record['sei_penetration_depth_m'] * 1e9:.1f} nm"
                    morphology.append((snap, panel))
                    name = f"morphology_{i + 1:02d}_{kind}.png"
                    plot_morphology([morphology[-1]], staging / name, c_mid, settings.vacancy.threshold)
                    snapshots.append(name)
            if on_half_cycle_end is not None:
                on_half_cycle_end(problem, record)
    finally:
        if writer is not None:
            writer.close()
    if morphology:
        plot_morphology(morphology, staging / "morphology_montage.png", c_mid, settings.vacancy.threshold,
                        suptitle=f"Si nanowire cross-section over {len(morphology)} half-cycles (green Si, yellow Li_xSi, white void, turquoise electrolyte, blue SEI)")
        snapshots.append("morphology_montage.png")
    results: dict[str, Any] = {
        "half_cycles": records,
        "ncells": ncells,
        "unknowns": ndofs,
        "ranks": comm.size,
        "kinematics": settings.model.kinematics,
        "vacancy_model": vacancies,
        "length_scale_m": problem.l0,
        "pin_points_m": [p.tolist() for p in problem.pin_points],
        "snapshots": snapshots,
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
    logger.info("phasefield done in %.1f s", results["wall_time_s"])
    return results
