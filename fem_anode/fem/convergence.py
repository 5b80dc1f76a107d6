r"""Mesh-convergence studies: observed order, Richardson extrapolation and Roache's GCI.

For three solutions ``f1`` (finest), ``f2``, ``f3`` on meshes with spacing ratio ``r``
(Roache 1998; Celik et al., *J. Fluids Eng.* 130, 078001, 2008):

.. math::

    p = \frac{\ln|(f_3 - f_2)/(f_2 - f_1)|}{\ln r},\qquad
    f_\mathrm{ext} = \frac{r^p f_1 - f_2}{r^p - 1},\qquad
    \mathrm{GCI}_{21} = \frac{F_s\,|(f_1 - f_2)/f_1|}{r^p - 1},\quad F_s = 1.25,

and the asymptotic-range check ``GCI_32 / (r^p GCI_21) ~ 1``. Oscillatory convergence
(differences of opposite sign) gives ``p = NaN`` and is reported, not hidden.

:func:`richardson` is pure NumPy; :func:`run_diffusion_study` runs the diffusion model on a
sequence of meshes of the same image and compares fields between levels by non-matching
interpolation: voxel meshes refined by subdividing every pixel (the geometry is identical on
every level), or smooth meshes (``mesh.method = "smooth"``) made with the global size ``H``
divided by the refinement factor, every size field scaled with it and the boundary curves fixed.
Settings a study does not use are refused (:func:`check_study_settings`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fem_anode.errors import UsageError

__all__ = [
    "richardson",
    "ConvergenceRecord",
    "STUDY_UNUSED_SETTINGS",
    "check_study_settings",
    "format_table",
    "level_changes",
    "mesh_independence",
    "plot_study",
    "run_diffusion_study",
    "run_phasefield_study",
    "smooth_base_size",
]

logger = logging.getLogger(__name__)

SAFETY_FACTOR = 1.25
#: Level differences below this fraction of the value count as round-off (converged).
ROUND_OFF = 1e-9


def richardson(h: Sequence[float] | np.ndarray, values: Sequence[float] | np.ndarray) -> dict[str, Any]:
    """Observed order, extrapolated value and GCI from the three finest of ``values``.

    Args:
        h: mesh sizes (any order; a constant ratio between successive sizes is assumed and checked).
        values: the quantity on those meshes.

    Returns:
        ``observed_order``, ``extrapolated``, ``gci`` (relative, fine grid),
        ``gci_coarse``, ``asymptotic_ratio`` (about 1 in the asymptotic range), ``ratio`` r,
        ``converging`` ("monotone", "oscillatory", "exact" or "insufficient").
    """
    h = np.asarray(h, dtype=float)
    values = np.asarray(values, dtype=float)
    if h.shape != values.shape or h.size < 2:
        raise UsageError("richardson needs matching h and values with at least two levels")
    order = np.argsort(h)  # finest first
    h, values = h[order], values[order]
    out: dict[str, Any] = {
        "observed_order": math.nan,
        "extrapolated": math.nan,
        "gci": math.nan,
        "gci_coarse": math.nan,
        "asymptotic_ratio": math.nan,
    }
    if h.size < 3:
        out["converging"] = "insufficient"
        out["ratio"] = float(h[1] / h[0])
        return out
    f1, f2, f3 = values[:3]
    r21, r32 = h[1] / h[0], h[2] / h[1]
    if not math.isclose(r21, r32, rel_tol=1e-6):
        raise UsageError(f"levels must have a constant refinement ratio, got {r21:.4g} and {r32:.4g}")
    r = r21
    e21, e32 = f2 - f1, f3 - f2
    out["ratio"] = float(r)
    scale = max(abs(f1), abs(f2), abs(f3))
    if max(abs(e21), abs(e32)) <= ROUND_OFF * scale:  # differences at round-off: converged
        out.update(extrapolated=float(f1), gci=0.0, gci_coarse=0.0, converging="exact")
        return out
    if e21 == 0 or e32 / e21 <= 0:
        out["converging"] = "oscillatory"
        return out
    p = math.log(e32 / e21) / math.log(r)
    if p <= 0:  # differences do not shrink with h
        out["converging"] = "diverging"
        return out
    rp = r**p
    extrapolated = (rp * f1 - f2) / (rp - 1)
    gci21 = SAFETY_FACTOR * abs(e21 / f1) / (rp - 1) if f1 != 0 else math.inf
    gci32 = SAFETY_FACTOR * abs(e32 / f2) / (rp - 1) if f2 != 0 else math.inf
    out.update(
        observed_order=float(p),
        extrapolated=float(extrapolated),
        gci=float(gci21),
        gci_coarse=float(gci32),
        asymptotic_ratio=float(gci32 / (rp * gci21)) if gci21 > 0 else math.nan,
        converging="monotone",
    )
    return out


@dataclasses.dataclass
class ConvergenceRecord:
    """A quantity of interest over the levels of a study (finest last)."""

    name: str
    h: list[float]
    values: list[float]

    def analyse(self) -> dict[str, Any]:
        return {"h": self.h, "values": self.values, **richardson(self.h, self.values)}


def mesh_independence(
    records: dict[str, dict[str, Any]], cells: list[int], h: list[float], tolerance: float = 0.01
) -> dict[str, Any]:
    """Coarsest level at which every converging quantity is within ``tolerance`` of its limit.

    The limit is the Richardson extrapolation (or the common value of an ``exact`` quantity).
    Quantities without a convergence estimate (oscillatory, diverging, noise at round-off such
    as the stress of a stress-free state) cannot be judged and are listed under ``excluded``.
    """
    judged = {
        k: r
        for k, r in records.items()
        if r.get("converging", "monotone") in ("monotone", "exact") and math.isfinite(r["extrapolated"])
    }
    excluded = sorted(set(records) - set(judged))
    for level in range(len(h)):
        ok = True
        for record in judged.values():
            reference, value = record["extrapolated"], record["values"][level]
            if abs(value - reference) > tolerance * abs(reference):
                ok = False
                break
        if ok:
            return {
                "tolerance": tolerance,
                "level": level,
                "h_m": h[level],
                "cells": cells[level],
                "excluded": excluded,
            }
    return {"tolerance": tolerance, "level": None, "h_m": None, "cells": None, "excluded": excluded}


def level_changes(
    records: dict[str, dict[str, Any]], cells: list[int], h: list[float], tolerance: float = 0.01
) -> dict[str, Any]:
    """Coarsest level from which every quantity changes by less than ``tolerance`` (relative) to the
    next finer level, with the largest change per pair of levels and the quantity that has it.

    Needs no convergence estimate (unlike :func:`mesh_independence`), so it also judges
    quantities that converge non-monotonically; the finest level cannot be judged.
    """
    names = [k for k, r in records.items() if len(r["values"]) == len(h)]
    largest: list[dict[str, Any]] = []
    for level in range(len(h) - 1):
        worst, which = 0.0, None
        for name in names:
            a, b = records[name]["values"][level], records[name]["values"][level + 1]
            scale = max(abs(a), abs(b))
            change = abs(b - a) / scale if scale > 0 else 0.0
            if which is None or change > worst:
                worst, which = change, name
        largest.append({"level": level, "largest_change": worst, "quantity": which})
    chosen = None
    for level in range(len(h) - 1):
        if all(entry["largest_change"] < tolerance for entry in largest[level:]):
            chosen = level
            break
    result = {"tolerance": tolerance, "level": chosen, "h_m": None, "cells": None, "changes": largest}
    if chosen is not None:
        result.update(h_m=h[chosen], cells=cells[chosen])
    return result


#: Settings of each model that a convergence study does not use (dotted keys): a study writes
#: only convergence.json and convergence.png and checkpoints after every finished level.
STUDY_UNUSED_SETTINGS: dict[str, tuple[str, ...]] = {
    "diffusion": ("output.fields", "output.figures", "output.mesh", "checkpoint.interval_s", "checkpoint.every_steps"),
    "phasefield": ("output.fields", "output.figures", "checkpoint.interval_s", "checkpoint.every_steps"),
}


def check_study_settings(settings: Any, model: str) -> None:
    """Refuse settings a convergence study of ``model`` would ignore.

    A setting counts when its value differs from its default (configs written by
    ``Settings.to_toml`` list every default, and a default asks for nothing the study skips).

    Args:
        settings: the model's settings.
        model: a key of :data:`STUDY_UNUSED_SETTINGS`.

    Raises:
        UsageError: naming every unused setting that is not at its default.
    """
    defaults = type(settings)()
    unused = []
    for key in STUDY_UNUSED_SETTINGS.get(model, ()):
        section, name = key.split(".")
        if getattr(getattr(settings, section), name) != getattr(getattr(defaults, section), name):
            unused.append(key)
    discretisation = getattr(settings.mesh, "discretisation", "fe")
    if model == "diffusion" and discretisation != "fe":
        unused.append(f"mesh.discretisation = {discretisation!r} (a study refines finite-element meshes)")
    if unused:
        raise UsageError(
            f"{', '.join(unused)}: not used by a convergence study (it writes convergence.json and convergence.png "
            "only and checkpoints after every finished level); remove them from the configuration or set them to their "
            "defaults"
        )


def smooth_base_size(settings: Any, image: Any) -> float:
    """Global size ``H`` (m) of level 0 of a smooth study: ``mesh.size`` or 4 pixels."""
    return float(settings.mesh.size) if settings.mesh.size is not None else 4.0 * float(min(image.require_voxel_size()))


def _upsample(image: Any, factor: int) -> Any:
    """The same image with every pixel split into ``factor`` per axis (identical geometry)."""
    from fem_anode.io.images import VoxelImage

    array = image.array
    for axis in range(array.ndim):
        array = np.repeat(array, factor, axis=axis)
    return VoxelImage(
        array, tuple(v / factor for v in image.require_voxel_size()), image.phases, f"{image.source} x{factor}"
    )


def run_diffusion_study(
    settings: Any,
    *,
    levels: int,
    refine_factor: float = 2,
    orders: Sequence[int] | None = None,
    comm: Any,
    checkpoint_dir: Path | None = None,
    resume: Any = None,
) -> dict[str, Any]:
    """Run the diffusion model on ``levels`` successively refined meshes of its image.

    The level meshes are built in memory and distributed. ``mesh.method = "voxel"``: level k
    subdivides every pixel into ``refine_factor**k`` cells per axis (an integer factor), so h
    halves (for factor 2) while the geometry stays exactly that of the image
    (:mod:`fem_anode.fem.voxel_mesh`). ``mesh.method = "smooth"`` (2D): level k is the smooth
    mesh of global size ``H_k = H_0 / refine_factor**k`` (``H_0`` = ``mesh.size`` or 4 pixels);
    the refinement at interfaces and in gaps is a factor of ``H`` that depends on the image
    only, so every element size scales with ``H``, and the boundary curves (splines through the
    sub-pixel contour) are the same on every level; h is ``H_k``. Quantities: region means at
    every output time, t90 per region and the domain mean; fields: relative L2 difference of
    c at the first output time between successive levels (coarse interpolated onto the fine mesh).

    Args:
        checkpoint_dir: after every finished level, checkpoint the study in
            ``checkpoint_dir/checkpoint/`` (the level records and the field the next level is
            compared with); SIGINT/SIGTERM stop the level in progress at its next time step
            (:class:`~fem_anode.errors.Interrupted`; finished levels are kept).
        resume: a loaded :class:`~fem_anode.io.checkpoint.Checkpoint` of the same study:
            finished levels are skipped, the report is the same.
    """
    from fem_anode.io.images import read_image

    if settings.geometry.image is None:
        raise UsageError("a diffusion convergence study refines the mesh of an image: give geometry.image")
    check_study_settings(settings, "diffusion")
    smooth = settings.mesh.method == "smooth"
    if levels < 2 or not refine_factor > 1:
        raise UsageError("a convergence study needs --levels >= 2 (3 for an observed order) and --refine-factor > 1")
    if not smooth and (refine_factor < 2 or refine_factor != int(refine_factor)):
        raise UsageError(
            f"--refine-factor {refine_factor:g}: voxel meshes are refined by subdividing pixels, use an integer >= 2"
        )
    geometry = settings.geometry
    image = read_image(geometry.image, voxel_size=geometry.pixel_size, phases=geometry.phases, kind="labels")
    if smooth and image.ndim != 2:
        raise UsageError("mesh.method = 'smooth' is for 2D images; study a 3D volume with method = 'voxel'")
    orders = list(orders or [settings.mesh.order])
    c_bulk = settings.physics.c_bulk
    solver_logger = logging.getLogger("fem_anode.fem.diffusion")
    solver_level = solver_logger.level
    solver_logger.setLevel(max(logging.WARNING, solver_level))  # one line per level, not per output
    from fem_anode.fem.diffusion.run import settings_fingerprint

    study = {"levels": levels, "refine_factor": refine_factor, "orders": orders, "method": settings.mesh.method}
    checkpointer = _study_checkpointer(
        checkpoint_dir,
        comm,
        {"model": "convergence-diffusion", "fingerprint": {**study, "settings": settings_fingerprint(settings)}},
    )
    try:
        with _safe_stop(checkpointer):
            return _diffusion_levels(settings, image, levels, refine_factor, orders, comm, c_bulk, checkpointer, resume)
    finally:
        solver_logger.setLevel(solver_level)


def _study_checkpointer(directory: Path | None, comm: Any, meta: dict[str, Any]) -> Any:
    """Level-granularity checkpoints of a study (saved explicitly after each level), or None."""
    if directory is None:
        return None
    from fem_anode.io.checkpoint import Checkpointer, CheckpointPolicy, CheckpointStore

    return Checkpointer(
        CheckpointStore(directory, comm), CheckpointPolicy(interval_s=0.0, every_steps=0), meta=meta, comm=comm
    )


def _safe_stop(checkpointer: Any) -> Any:
    """SafeStop for a checkpointed study (its flag is polled by the time loops); else a no-op."""
    import contextlib

    if checkpointer is None:
        return contextlib.nullcontext()
    from fem_anode.io.interrupt import SafeStop

    checkpointer.stop = SafeStop()
    return checkpointer.stop


def _level_stopper(checkpointer: Any, comm: Any) -> Any:
    """Poll-only checkpointer for the time loop of one level: honours SIGINT/SIGTERM, never saves."""
    if checkpointer is None:
        return None
    from fem_anode.io.checkpoint import Checkpointer, CheckpointPolicy

    return Checkpointer(None, CheckpointPolicy(interval_s=0.0, every_steps=0), stop=checkpointer.stop, comm=comm)


def _level_interrupted(err: Exception, level: int, name: str, checkpointer: Any) -> Exception:
    from fem_anode.errors import Interrupted

    saved = f"finished levels are saved in {checkpointer.store.path}" if checkpointer.saves else "no level had finished"
    return Interrupted(f"{err} in level {level} of {name}; {saved}")


def _diffusion_levels(
    settings: Any,
    image: Any,
    levels: int,
    refine_factor: float,
    orders: list[int],
    comm: Any,
    c_bulk: float,
    checkpointer: Any = None,
    resume: Any = None,
) -> dict[str, Any]:
    from dolfinx import fem

    from fem_anode.errors import Interrupted
    from fem_anode.fem.diffusion import DiffusionProblem
    from fem_anode.fem.voxel_mesh import create_voxel_mesh

    geometry = settings.geometry
    smooth = settings.mesh.method == "smooth"
    report: dict[str, Any] = {
        "model": "diffusion",
        "mesh_method": settings.mesh.method,
        "levels": levels,
        "refine_factor": refine_factor,
        "orders": {},
    }
    if smooth:
        base = smooth_base_size(settings, image)
        report["h_definition"] = "global element size H of the smooth mesh (every size field scales with it)"
    else:
        report["h_definition"] = "pixel edge of the subdivided image (one cell per sub-pixel)"

    def level_mesh(order: int, level: int) -> tuple[float, Any]:
        """(h in m, tagged mesh) of a level."""
        if smooth:
            from fem_anode.fem.mesh_io import image_to_tagged_mesh
            from fem_anode.meshing.smooth2d import SmoothMeshOptions

            size = base / refine_factor**level
            options = SmoothMeshOptions(size=size, order=order)
            return size, image_to_tagged_mesh(
                image, comm, method="smooth", keep=[geometry.transport_phase], options=options
            )
        refined = _upsample(image, int(refine_factor) ** level)
        return min(refined.require_voxel_size()), create_voxel_mesh(refined, comm, [geometry.transport_phase])

    saved: dict[str, Any] = {}
    if resume is not None:
        if checkpointer is not None:
            checkpointer.check_meta(resume)
        saved = resume.state["problem"]
        report["orders"] = saved["finished"]
        logger.info(
            "resuming the study after %s",
            f"P{saved['order']} level {saved['level']}" if saved.get("order") else "the finished orders",
        )
    for order in orders:
        if f"P{order}" in report["orders"]:
            continue
        level_settings = settings.replace(mesh=settings.mesh.replace(order=order))
        h, cells, dofs, seconds = [], [], [], []
        quantities: dict[str, list[float]] = {}
        previous: Any = None
        l2_differences: list[float | None] = []
        first_level = 0
        if saved.get("order") == order:  # the order in progress when the checkpoint was written
            h, cells, dofs, seconds, l2_differences = (
                saved[k] for k in ("h", "cells", "dofs", "seconds", "l2_differences")
            )
            quantities = saved["quantities"]
            first_level = saved["level"] + 1
            if not smooth:  # gmsh does not remake a smooth mesh node for node: no field to compare with
                _, tagged_previous = level_mesh(order, saved["level"])
                previous = fem.Function(fem.functionspace(tagged_previous.mesh, ("Lagrange", order)))
                resume.restore("problem.previous", previous)
        for level in range(first_level, levels):
            h_level, tagged = level_mesh(order, level)
            start = time.perf_counter()
            problem = DiffusionProblem(tagged, level_settings)
            snapshot: dict[str, Any] = {}

            def keep_first_output(t: float, prob: DiffusionProblem, snapshot: dict[str, Any] = snapshot) -> None:
                if t > 0 and not snapshot:  # fields compared at the first output time, where c varies
                    snapshot.update(c=prob.concentration(), t=t)

            try:
                result = problem.run(keep_first_output, checkpointer=_level_stopper(checkpointer, comm))
            except Interrupted as err:
                problem.destroy()
                raise _level_interrupted(err, level, f"P{order}", checkpointer) from None
            seconds.append(time.perf_counter() - start)
            h.append(h_level)
            cells.append(result.ncells)
            dofs.append(result.ndofs)
            at = result.at_output_times()
            for i, t in enumerate(at["times"]):
                quantities.setdefault(f"domain_mean@{t:g}s", []).append(at["domain_mean"][i])
                for name, values in at["regions"].items():
                    quantities.setdefault(f"region_{name}@{t:g}s", []).append(values[i])
            for name, t90 in result.t90(c_bulk).items():
                quantities.setdefault(f"t90_{name}", []).append(math.nan if t90 is None else t90)
            c = snapshot["c"]
            if previous is None:
                l2_differences.append(None)
            else:
                padding = PADDING_PER_H * h[-2] if smooth else 1e-14
                l2_differences.append(_relative_l2_difference(c, previous, padding=padding, comm=comm))
            previous = c
            problem.destroy()
            logger.info(
                "P%d level %d: h = %.3g m, %d cells, %d dofs, %.1f s",
                order,
                level,
                h[-1],
                cells[-1],
                dofs[-1],
                seconds[-1],
            )
            if checkpointer is not None and level < levels - 1:
                progress = {
                    "finished": report["orders"],
                    "order": order,
                    "level": level,
                    "h": h,
                    "cells": cells,
                    "dofs": dofs,
                    "seconds": seconds,
                    "quantities": quantities,
                    "l2_differences": l2_differences,
                }
                checkpointer.save(level, progress, {"previous": previous})
        records = {
            name: ConvergenceRecord(name, h, values).analyse()
            for name, values in quantities.items()
            if all(map(math.isfinite, values))
        }
        report["orders"][f"P{order}"] = {
            "h": h,
            "cells": cells,
            "ndofs": dofs,
            "seconds": seconds,
            "quantities": records,
            "field_l2_difference": {
                "h": h,
                "values": l2_differences,
                "description": f"||c_k - I c_(k-1)|| / ||c_k|| at t = {min(settings.time.outputs()):g} s",
            },
            "mesh_independent_1pct": mesh_independence(records, cells, h),
            "level_changes_1pct": level_changes(records, cells, h),
        }
        if checkpointer is not None and order != orders[-1]:
            checkpointer.save(levels, {"finished": report["orders"], "order": None}, {})
    return report


#: Padding (relative to the coarse h) of the point search of non-matching interpolation between
#: meshes of one curved boundary. Fine boundary points lie outside the coarse polygon by its
#: sagitta (~h^2/(8 R)), which this covers; a padding of the order of h makes dolfinx 0.9 accept
#: a neighbouring cell whose padded box holds the point and extrapolate from it (measured on a
#: disc: max error 0.047 with padding h against 0.006, the interpolation error, with 0.02 h).
PADDING_PER_H = 0.02


def _relative_l2_difference(fine: Any, coarse: Any, *, padding: float, comm: Any) -> float:
    """||fine - I coarse|| / ||fine|| with I the non-matching interpolation onto fine's space.

    Points of the fine mesh just outside the coarse one (a finer polygon of a curved boundary)
    are evaluated in a coarse cell within ``padding`` (m; see :data:`PADDING_PER_H`).
    """
    import scifem
    import ufl
    from dolfinx import fem

    V = fine.function_space
    n_cells = V.mesh.topology.index_map(V.mesh.topology.dim).size_local
    cells = np.arange(n_cells, dtype=np.int32)
    coarse_on_fine = fem.Function(V)
    data = fem.create_interpolation_data(V, coarse.function_space, cells, padding=padding)
    coarse_on_fine.interpolate_nonmatching(coarse, cells, data)
    diff = scifem.assemble_scalar(ufl.inner(fine - coarse_on_fine, fine - coarse_on_fine) * ufl.dx)
    norm = scifem.assemble_scalar(ufl.inner(fine, fine) * ufl.dx)
    return float(math.sqrt(diff / norm)) if norm > 0 else 0.0


#: Per-half-cycle record keys that are bookkeeping, not physical quantities of interest.
PHASEFIELD_NOT_QUANTITIES = frozenset(
    {
        "index",
        "kind",
        "t",
        "steps",
        "rejected_steps",
        "newton_iterations_total",
        "wall_time_s",
        "factorisations",
        "linear_iterations",
        "single_precision_failures",
        "equivalent_real_cycles",
    }
)


def run_phasefield_study(
    settings: Any,
    *,
    levels: int,
    refine_factor: float = 2.0,
    workdir: Path,
    comm: Any,
    checkpoint_dir: Path | None = None,
    resume: Any = None,
) -> dict[str, Any]:
    """Run the phase-field model on disk meshes with ``mesh.size / refine_factor**k``.

    Quantities: every physical scalar of every half-cycle record (outer radius, deformed area,
    axial stretch, mean/min/max c, von Mises stress and equivalent plastic strain at the end and
    their peaks during the half-cycle, energies; a void fraction joins by itself once the
    model reports one). The adaptive time steps
    follow each mesh, so peak values carry time-step effects as well. Needs the built-in disk geometry (an image mesh
    has a fixed size).

    ``checkpoint_dir``/``resume`` as in :func:`run_diffusion_study`: the study is checkpointed
    after every finished level and resumes after the last one. The phase-field run itself has
    no safe-stop hook yet, so a signal ends the level in progress at once (it restarts on resume).
    """
    from fem_anode.fem.phasefield.run import run_phasefield

    if settings.geometry.mesh is not None:
        raise UsageError("a phase-field convergence study refines the built-in disk mesh: remove geometry.mesh")
    check_study_settings(settings, "phasefield")
    if levels < 2 or refine_factor <= 1:
        raise UsageError("a convergence study needs --levels >= 2 (3 for an observed order) and --refine-factor > 1")
    h, cells, dofs, seconds = [], [], [], []
    quantities: dict[str, list[float]] = {}
    previous: dict[str, Any] = {}
    differences: dict[str, list[float | None]] = {"c_li": []}
    checkpointer = _study_checkpointer(
        checkpoint_dir,
        comm,
        {
            "model": "convergence-phasefield",
            "fingerprint": json.loads(
                json.dumps({"levels": levels, "refine_factor": refine_factor, "settings": settings.to_dict()})
            ),
        },
    )
    first_level = 0
    if resume is not None:
        from dolfinx import fem

        from fem_anode.fem.phasefield.geometry import disk_mesh

        if checkpointer is not None:
            checkpointer.check_meta(resume)
        saved = resume.state["problem"]
        h, cells, dofs, seconds, quantities, differences = (
            saved[k] for k in ("h", "cells", "dofs", "seconds", "quantities", "differences")
        )
        first_level = saved["level"] + 1
        if saved.get("c_li_degree"):
            tagged = disk_mesh(settings.geometry.radius, h[-1], comm)
            previous = {"c_li": fem.Function(fem.functionspace(tagged.mesh, ("Lagrange", saved["c_li_degree"])))}
            resume.restore("problem.c_li", previous["c_li"])
        logger.info("resuming the phase-field study after level %d", saved["level"])
    for level in range(first_level, levels):
        size = settings.mesh.size / refine_factor**level
        level_settings = settings.replace(
            mesh=settings.mesh.replace(size=size), output=settings.output.replace(fields=False, figures=False)
        )
        kept: dict[str, Any] = {}

        def keep_first_half_cycle(problem: Any, record: dict[str, Any], kept: dict[str, Any] = kept) -> None:
            if record["index"] == 1:  # fields compared at the end of the first lithiation
                # c only: u carries each mesh's own rigid-body pinning, not comparable as is
                kept["c_li"] = problem.w.sub(0).collapse()

        start = time.perf_counter()
        results = run_phasefield(level_settings, None, comm, on_half_cycle_end=keep_first_half_cycle)
        seconds.append(time.perf_counter() - start)
        h.append(size)
        cells.append(results["ncells"])
        dofs.append(results["unknowns"])
        for record in results["half_cycles"]:
            for key, value in record.items():  # every physical scalar the model reports
                if (
                    key not in PHASEFIELD_NOT_QUANTITIES
                    and isinstance(value, (int, float))
                    and not isinstance(value, bool)
                ):
                    quantities.setdefault(f"{key}[half-cycle {record['index']}]", []).append(float(value))
        for name in differences:
            coarse = previous.get(name)
            differences[name].append(
                None
                if coarse is None or name not in kept
                else _relative_l2_difference(
                    kept[name], coarse, padding=PADDING_PER_H * size * refine_factor, comm=comm
                )
            )
        previous = kept
        logger.info(
            "phasefield level %d: h = %.3g m, %d cells, %d unknowns, %.1f s",
            level,
            size,
            cells[-1],
            dofs[-1],
            seconds[-1],
        )
        if checkpointer is not None and level < levels - 1:
            degree = kept["c_li"].function_space.ufl_element().basix_element.degree if "c_li" in kept else None
            progress = {
                "level": level,
                "h": h,
                "cells": cells,
                "dofs": dofs,
                "seconds": seconds,
                "quantities": quantities,
                "differences": differences,
                "c_li_degree": degree,
            }
            checkpointer.save(level, progress, {"c_li": kept["c_li"]} if "c_li" in kept else {})
    records = {
        name: ConvergenceRecord(name, h, values).analyse()
        for name, values in quantities.items()
        if len(values) == levels and all(map(math.isfinite, values))
    }
    order = f"P{settings.mesh.displacement_degree}u"
    return {
        "model": "phasefield",
        "levels": levels,
        "refine_factor": refine_factor,
        "orders": {
            order: {
                "h": h,
                "cells": cells,
                "ndofs": dofs,
                "seconds": seconds,
                "quantities": records,
                "field_l2_difference": {
                    "h": h,
                    "values": differences["c_li"],
                    "description": (
                        "||c_k - I c_(k-1)|| / ||c_k|| of c_Li at the end of the first half-cycle, "
                        "reference configuration"
                    ),
                },
                "mesh_independent_1pct": mesh_independence(records, cells, h),
            }
        },
    }


def format_table(report: dict[str, Any]) -> str:
    """A plain-text table of a study: one row per quantity and element order."""
    lines = []
    for order, data in report["orders"].items():
        lines.append(
            f"{order}: h = {', '.join(f'{v:.3g}' for v in data['h'])} m; cells = {', '.join(map(str, data['cells']))}"
        )
        width = max([28, *(len(name) for name in data["quantities"])])
        lines.append(
            f"  {'quantity':<{width}} {'values, coarse to fine':>36} {'extrapolated':>13} {'order':>6} "
            f"{'GCI %':>8} {'asympt.':>8}  behaviour"
        )
        for name, record in data["quantities"].items():
            values = " ".join(f"{v:.5g}" for v in record["values"])
            lines.append(
                f"  {name:<{width}} {values:>36} {record['extrapolated']:>13.6g} "
                f"{record['observed_order']:>6.2f} {100 * record['gci']:>8.3g} {record['asymptotic_ratio']:>8.3g}  "
                f"{record.get('converging', '')}"
            )
        independence = data["mesh_independent_1pct"]
        if independence["level"] is None:
            lines.append("  no level is within 1 % of the extrapolated values for every quantity")
        else:
            lines.append(
                f"  every quantity within 1 % from level {independence['level']}: h = {independence['h_m']:.3g} m, "
                f"{independence['cells']} cells"
            )
        changes = data.get("level_changes_1pct")
        if changes:
            steps = ", ".join(f"{100 * c['largest_change']:.3g} % ({c['quantity']})" for c in changes["changes"])
            chosen = "none" if changes["level"] is None else f"level {changes['level']} ({changes['cells']} cells)"
            lines.append(f"  largest change to the next level: {steps}; every change < 1 % from {chosen}")
    return "\n".join(lines)


def plot_study(report: dict[str, Any], path: Path) -> Path:
    """Log-log plot of |value - extrapolated| and the field L2 differences versus h (PNG)."""
    from fem_anode.io.figures import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    for order, data in report["orders"].items():
        for name, record in data["quantities"].items():
            if not math.isfinite(record["extrapolated"]):
                continue
            error = np.abs(np.asarray(record["values"]) - record["extrapolated"]) / max(
                abs(record["extrapolated"]), 1e-300
            )
            if np.any(error > 0):
                axes[0].loglog(
                    np.asarray(data["h"]) * 1e9, np.maximum(error, 1e-16), "o-", ms=3, lw=0.8, label=f"{order} {name}"
                )
        field = data["field_l2_difference"]
        pairs = [(h, v) for h, v in zip(field["h"], field["values"]) if v]
        if pairs:
            axes[1].loglog([p[0] * 1e9 for p in pairs], [p[1] for p in pairs], "s-", label=order)
    axes[0].set_xlabel("h (nm)")
    axes[0].set_ylabel("|f - f_extrapolated| / |f_extrapolated|")
    axes[0].set_title("Quantities of interest")
    if len(axes[0].lines) <= 12:
        axes[0].legend(fontsize=6)
    axes[1].set_xlabel("h (nm)")
    axes[1].set_ylabel("relative L2 difference to the previous level")
    axes[1].set_title("Fields")
    if axes[1].lines:
        axes[1].legend(fontsize=8)
    else:
        axes[1].text(0.5, 0.5, "no field comparison for this model", ha="center", transform=axes[1].transAxes)
    return save_figure(fig, path)
