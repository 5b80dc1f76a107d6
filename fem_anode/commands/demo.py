"""``fem-anode demo``: the main job on the built-in example data.

Generates the seeded synthetic examples (pristine and aged 3D anode volumes, a 2D FIB-SEM-like
ROI), loads the bundled real electrode volume, computes their image metrics and runs the paper's
Fig. 8 Li-diffusion model in the ROI's SEI/C/B domain (pores and Si as tagged boundaries) as the
paper did: smooth quadratic (P2) triangles refined at the pore and Si surfaces and in narrow
gaps, after a mesh-independence check on three meshes (global size H divided, every size field
with it, by sqrt(2) per level) that picks the coarsest mesh from which every reported
quantity changes by less than 1 % (``--mesh voxel``: one P1 square per pixel, no check). Needs dolfinx for the
diffusion (without it only the mesh is written). Everything lands in ``--out DIR``: ``data/``
(inputs, reusable with the other subcommands), ``metrics/``, ``meshes/``,
``mesh_independence/`` (the other levels), ``diffusion/`` (the chosen level), ``figures/``,
``summary.json`` and ``report.md``/``report.html``.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fem_anode.commands._common import (
    add_out_argument,
    add_render_argument,
    check_int,
    is_root,
    provenance,
    require_comm,
    world_comm,
)

if TYPE_CHECKING:
    from mpi4py import MPI

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction, name: str) -> None:
    parser = subparsers.add_parser(
        name,
        help="run the main job on the built-in example data",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
    )
    add_out_argument(parser, default="fem_anode_demo", what="demo results")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic examples (default 0)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="coarser ROI (40 nm pixels), coarser meshes and fewer output times, for tests",
    )
    parser.add_argument(
        "--mesh",
        choices=["smooth", "voxel"],
        default="smooth",
        help="smooth: P2 triangles refined at interfaces and in gaps, after a 3-level mesh-independence check "
        "(default); voxel: one P1 square per pixel, no check",
    )
    add_render_argument(parser)
    parser.set_defaults(func=run)


#: H ratio between the levels of the demo's mesh-independence check: sqrt(2), about twice the
#: elements per level (a ratio of 2 puts 150k P2 unknowns on the finest level of the full ROI and
#: the demo over a minute; docs/convergence.md has that study, same outcome).
CHECK_RATIO = 2.0**0.5
#: Global element sizes H (m) of the mesh-independence check on smooth P2 meshes, coarsest first
#: (by ``--quick``). Each level divides H, and every size field with it (interfaces: H/2, gaps:
#: in proportion to their width, down to H/10), by CHECK_RATIO, on the same boundary curves.
CHECK_SIZES: dict[bool, tuple[float, ...]] = {
    quick: tuple(middle * CHECK_RATIO**k for k in (1, 0, -1)) for quick, middle in ((False, 80e-9), (True, 160e-9))
}
#: Largest relative change of any reported quantity to the next finer level for a mesh to count
#: as mesh-independent.
CHECK_TOLERANCE = 0.01


def run(args: argparse.Namespace) -> int:
    from fem_anode.errors import UsageError

    if args.seed < 0:
        raise UsageError(f"--seed must be a non-negative integer, got {args.seed}")
    check_int(args.seed, "--seed", 0)
    from fem_anode.data import real_electrode
    from fem_anode.imaging.metrics import compute_metrics
    from fem_anode.imaging.plots import plot_per_slice
    from fem_anode.imaging.synthetic import anode_volume, fib_sem_roi
    from fem_anode.io.images import write_image
    from fem_anode.io.output import output_directory, write_json

    comm = world_comm()
    root = is_root(comm)
    start = time.perf_counter()
    examples = {
        "anode_pristine": anode_volume(seed=args.seed),
        "anode_aged": anode_volume(seed=args.seed, aged=True),
        "roi_2d": fib_sem_roi(seed=args.seed, pixel_size=40e-9 if args.quick else 20e-9),
        "real_electrode": real_electrode(),
    }
    summary: dict[str, Any] = {"provenance": provenance("demo", comm=comm, args=args, seed=args.seed), "examples": {}}
    with output_directory(args.out, comm) as staging:
        for name, image in examples.items():
            logger.info("metrics of %s %s", name, "x".join(map(str, image.shape)))
            metrics = compute_metrics(image)
            if root:
                write_image(staging / "data" / f"{name}.npy", image)
                write_json(staging / "metrics" / f"{name}.json", {"provenance": summary["provenance"], **metrics})
                plot_per_slice(metrics["per_slice"], staging / "figures" / f"{name}_per_slice.png", title=name)
            summary["examples"][name] = {"shape": list(image.shape), "phase_fractions": metrics["phase_fractions"]}
        pristine, aged = (summary["examples"][k]["phase_fractions"] for k in ("anode_pristine", "anode_aged"))
        summary["ageing_relative_change"] = {
            p: (aged[p] - pristine[p]) / pristine[p] for p in pristine if pristine[p] > 0
        }
        mesh_path = staging / "meshes" / "roi_sei.msh"
        if args.mesh == "smooth" and _has_dolfinx():
            summary["mesh_independence"], summary["diffusion"], summary["mesh"] = _smooth_diffusion(
                staging, require_comm(comm, "the demo's diffusion"), quick=args.quick
            )
            summary["mesh_check"] = _check_mesh_in_dolfinx(mesh_path, comm)
        else:
            if root:
                summary["mesh"] = _write_roi_mesh(examples["roi_2d"], mesh_path, args.mesh)
            summary["mesh_check"] = _check_mesh_in_dolfinx(mesh_path, comm)
            if "skipped" not in summary["mesh_check"]:
                summary["diffusion"] = _run_diffusion(
                    staging, require_comm(comm, "the demo's diffusion"), quick=args.quick
                )
        if root:
            write_json(staging / "summary.json", summary)
            write_report(staging / "report.md", summary, render=args.render)
    elapsed = time.perf_counter() - start
    _log_summary(summary, args.out, elapsed)
    return 0


def _has_dolfinx() -> bool:
    try:
        import dolfinx  # noqa: F401
    except ImportError:
        return False
    return True


#: Why the demo's mesh has fewer elements than the paper's (for the report).
PAPER_ELEMENTS_NOTE = (
    "The paper reports mesh-independent results with 430k P2 elements (COMSOL, Supplementary Note 4; its "
    "refinement levels and criterion are not given). Here every reported quantity (region means at the output "
    "times, t90 per region and of the domain) changes by less than 1 % from the chosen mesh to the next finer one. "
    "Fewer elements suffice because (1) with the paper's parameters c saturates within milliseconds: the solution "
    "is smooth by the first output and the 2, 10 and 100 s values are c_bulk on every mesh; (2) the element count "
    "scales with the ROI area over the element area: 430k P2 triangles on the paper's 5 x 8 um ROI are about 93 nm^2 "
    "each, an edge of about 14 nm, below the 20 nm pixel, which resolves nothing the image holds; (3) a COMSOL count "
    "may include the pore and Si domains, here only the SEI/C/B domain is meshed."
)


def _write_roi_mesh(image: Any, path: Path, method: str) -> dict[str, Any]:
    """The ROI's SEI/C/B mesh without a diffusion run (rank 0): smooth P2 at the check's middle
    size, or one square per pixel."""
    if method == "voxel":
        from fem_anode.meshing.voxel import write_voxel_mesh

        logger.info("meshing the ROI's SEI/C/B domain, one square per pixel (pores and Si as boundaries)")
        data = write_voxel_mesh(image, path, keep=["sei"])
        return {
            "file": "meshes/roi_sei.msh",
            "method": "voxel",
            "order": 1,
            "cells": len(data.cells),
            "groups": {k: list(v) for k, v in data.groups.items()},
        }
    from fem_anode.meshing.build import mesh_image
    from fem_anode.meshing.smooth2d import SmoothMeshOptions

    size = CHECK_SIZES[False][1] if min(image.require_voxel_size()) < 30e-9 else CHECK_SIZES[True][1]
    logger.info("meshing the ROI's SEI/C/B domain, smooth P2 with H = %.3g m (pores and Si as boundaries)", size)
    result = mesh_image(
        image,
        path,
        method="smooth",
        keep=["sei"],
        options=SmoothMeshOptions(size=size, order=2),
        quality_path=path.with_name("roi_sei.quality.json"),
    )
    return {
        "file": "meshes/roi_sei.msh",
        "method": "smooth",
        "order": 2,
        "size_m": size,
        "cells": result.quality["cells"],
        "groups": {k: list(v) for k, v in result.groups.items()},
    }


def _level_quantities(results: dict[str, Any]) -> dict[str, float]:
    """The quantities the report gives for a diffusion run: region and domain means at the output
    times and t90 per region and of the domain (mol/m^3, s)."""
    out: dict[str, float] = {}
    for i, t in enumerate(results["times"]):
        out[f"domain_mean@{t:g}s"] = results["domain_mean"][i]
        for name, values in results["regions"].items():
            out[f"region_{name}@{t:g}s"] = values[i]
    for name, t90 in results["t90_s"].items():
        if t90 is not None:
            out[f"t90_{name}"] = t90
    return out


def _smooth_diffusion(
    staging: Path, comm: MPI.Comm, *, quick: bool
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Mesh-independence check and the diffusion on smooth P2 meshes of the ROI (collective).

    Runs the full Fig. 8 model (:func:`_run_diffusion`'s settings) on the meshes of
    :data:`CHECK_SIZES`, each in ``mesh_independence/level<k>_H<H>nm/``; the coarsest level
    from which every reported quantity changes by less than :data:`CHECK_TOLERANCE` to the next
    finer level (the finest if none) becomes ``diffusion/``, its mesh ``meshes/roi_sei.msh``.

    Returns:
        The check's summary, the chosen run's diffusion summary and the mesh summary.
    """
    import shutil

    from fem_anode.fem.convergence import level_changes
    from fem_anode.fem.diffusion.settings import MeshSettings

    sizes = CHECK_SIZES[quick]
    check_dir = staging / "mesh_independence"
    runs: list[dict[str, Any]] = []
    folders: list[str] = []
    for level, size in enumerate(sizes):
        folder = f"level{level}_H{1e9 * size:.0f}nm"
        logger.info(
            "mesh-independence check, level %d of %d: smooth P2 mesh with H = %.3g m", level + 1, len(sizes), size
        )
        runs.append(
            _run_diffusion(
                staging,
                comm,
                quick=quick,
                mesh=MeshSettings(method="smooth", order=2, size=size),
                workdir=check_dir / folder,
            )
        )
        folders.append(folder)
    per_level = [_level_quantities(run) for run in runs]
    names = [k for k in per_level[0] if all(k in q for q in per_level)]
    records = {name: {"values": [q[name] for q in per_level]} for name in names}
    cells = [run["ncells"] for run in runs]
    changes = level_changes(records, cells, list(sizes), tolerance=CHECK_TOLERANCE)
    chosen = changes["level"] if changes["level"] is not None else len(sizes) - 1
    if changes["level"] is None:
        logger.warning(
            "no level of the mesh-independence check is within %g %% of the next: using the finest",
            100 * CHECK_TOLERANCE,
        )
    if comm.rank == 0:
        shutil.move(check_dir / folders[chosen], staging / "diffusion")
        (staging / "meshes").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(staging / "diffusion" / "mesh.msh", staging / "meshes" / "roi_sei.msh")
        shutil.copyfile(staging / "diffusion" / "mesh.quality.json", staging / "meshes" / "roi_sei.quality.json")
    comm.barrier()
    levels = []
    for level, (size, run) in enumerate(zip(sizes, runs)):
        change = changes["changes"][level] if level < len(changes["changes"]) else None
        levels.append(
            {
                "level": level,
                "H_m": size,
                "cells": run["ncells"],
                "dofs": run["ndofs"],
                "wall_time_s": run["wall_time_s"],
                "largest_change_to_next": None if change is None else change["largest_change"],
                "quantity_with_largest_change": None if change is None else change["quantity"],
                "results": "diffusion/results.json"
                if level == chosen
                else f"mesh_independence/{folders[level]}/results.json",
            }
        )
    check = {
        "element": "P2 triangles (curved at the interfaces)",
        "tolerance": CHECK_TOLERANCE,
        "criterion": "largest relative change of any reported quantity to the next finer level "
        f"(H divided by {CHECK_RATIO:.3g})",
        "ratio": CHECK_RATIO,
        "quantities": len(names),
        "levels": levels,
        "chosen_level": chosen,
        "mesh_independent": changes["level"] is not None,
        "chosen_cells": cells[chosen],
        "paper_cells": 430_000,
        "why_fewer_than_paper": PAPER_ELEMENTS_NOTE,
    }
    quality = runs[chosen].get("mesh_quality") or {}
    mesh = {
        "file": "meshes/roi_sei.msh",
        "method": "smooth",
        "order": 2,
        "size_m": sizes[chosen],
        "cells": cells[chosen],
        "mesh_independence": f"level {chosen} of {len(sizes)}: every quantity changes by "
        f"< {100 * CHECK_TOLERANCE:g} % with H divided by {CHECK_RATIO:.3g}"
        if changes["level"] is not None
        else "not reached: finest level used",
    }
    mesh.update({k: quality[k] for k in ("min_angle_deg",) if k in quality})
    logger.info(
        "mesh-independence check: level %d (H = %.3g m, %d P2 cells) chosen; largest changes to the next level: %s",
        chosen,
        sizes[chosen],
        cells[chosen],
        ", ".join(f"{100 * c['largest_change']:.2f} %" for c in changes["changes"]),
    )
    diffusion = _diffusion_summary(runs[chosen])
    return check, diffusion, mesh


def _check_mesh_in_dolfinx(path: Path, comm: MPI.Comm | None) -> dict[str, Any]:
    """Load the mesh with dolfinx on all ranks and integrate its area and tagged boundaries."""
    if not _has_dolfinx():
        logger.warning("dolfinx not installed: skipping the FEniCSx mesh check")
        return {"skipped": "dolfinx not installed"}
    comm = require_comm(comm, "the dolfinx mesh check")
    from fem_anode.fem.mesh_io import read_mesh
    from fem_anode.fem.mesh_measures import mesh_measures

    measures = mesh_measures(read_mesh(path, comm))
    logger.info("dolfinx loaded the mesh on %d rank(s): %d cells", measures["ranks"], measures["cells"])
    return {
        "ranks": measures["ranks"],
        "cells": measures["cells"],
        "area_m2": measures["measure"],
        "boundary_length_m": measures["facet_groups"],
    }


def _run_diffusion(
    staging: Path, comm: MPI.Comm, *, quick: bool, mesh: Any = None, workdir: Path | None = None
) -> dict[str, Any]:
    """The paper's Fig. 8 workflow on the example ROI: regions I-IV, c(t), t90, fields.

    Args:
        mesh: :class:`~fem_anode.fem.diffusion.settings.MeshSettings` (default: the voxel mesh).
        workdir: output folder (default ``staging/diffusion``).

    Returns:
        The run's results (as in ``results.json``) plus ``region_boxes_m``; :func:`_diffusion_summary`
        gives the part the demo's summary keeps.
    """
    from fem_anode.fem.diffusion.run import fig8_settings, run_diffusion

    image_path = staging / "data" / "roi_2d.npy"
    comm.barrier()
    settings = fig8_settings(image_path, quick=quick)
    if mesh is not None:
        settings = settings.replace(mesh=mesh)
    logger.info("Li diffusion in the ROI's SEI/C/B domain to t = %g s (paper parameters)", settings.time.t_end)
    workdir = workdir or staging / "diffusion"
    if comm.rank == 0:
        workdir.mkdir(parents=True, exist_ok=True)
    comm.barrier()
    results = run_diffusion(settings, workdir, comm)
    if comm.rank == 0:
        settings.to_toml(workdir / "config.toml")
        quality = workdir / "mesh.quality.json"
        if quality.is_file():
            import json

            results["mesh_quality"] = json.loads(quality.read_text())
    results["region_boxes_m"] = {r.name: r.box for r in settings.regions}
    return results if mesh is not None else _diffusion_summary(results)


def _diffusion_summary(results: dict[str, Any]) -> dict[str, Any]:
    """The part of a run's results the demo's summary keeps."""
    keys = (
        "times",
        "regions",
        "t90_s",
        "mass_balance_rel_error",
        "ndofs",
        "ncells",
        "element_degree",
        "steps",
        "factorisations",
        "timescales",
        "wall_time_s",
        "region_boxes_m",
    )
    return {k: results[k] for k in keys if k in results}


def write_report(path: Path, summary: dict[str, Any], *, render: bool = True) -> Path:
    """The demo's report: ``path`` (Markdown) and the self-contained ``.html`` beside it (figures
    embedded), with the key numbers, the paper's values side by side, the 2D figures, the 3D
    figures of the pristine and aged example volumes (rendered into ``figures/3d/`` unless
    ``render`` is False; see :mod:`fem_anode.io.render3d`) and the provenance. Call on one rank."""
    import json

    from fem_anode.io.report_html import demo_report

    directory = path.parent
    if render:
        from fem_anode.imaging.metrics import tortuosity_field
        from fem_anode.io.images import read_image
        from fem_anode.io.render3d import render_metrics_figures

        volumes = {}
        for name in ("anode_pristine", "anode_aged"):
            image_path, metrics_path = directory / "data" / f"{name}.npy", directory / "metrics" / f"{name}.json"
            if image_path.is_file() and metrics_path.is_file():
                image = read_image(image_path, kind="labels")
                volumes[name] = (
                    image,
                    {"tortuosity": tortuosity_field(image)[1]},
                    json.loads(metrics_path.read_text()),
                )
        render_metrics_figures(volumes, directory / "figures" / "3d")
    demo_report(directory, summary, name=path.stem)
    return path


def _log_summary(summary: dict[str, Any], out: Path, elapsed: float) -> None:
    lines = ["", f"{'example':<16} {'shape':<12} phase fractions"]
    for name, info in summary["examples"].items():
        fractions = "  ".join(f"{k} {100 * v:5.1f}%" for k, v in info["phase_fractions"].items())
        lines.append(f"{name:<16} {'x'.join(map(str, info['shape'])):<12} {fractions}")
    changes = "  ".join(f"{k} {100 * v:+.1f}%" for k, v in summary["ageing_relative_change"].items())
    lines.append(f"ageing (aged vs pristine volume): {changes}")
    if "mesh" in summary:
        lines.append(f"mesh: {out / summary['mesh']['file']} with {summary['mesh']['cells']} cells")
    if "diffusion" in summary:
        t90 = ", ".join(f"{k} {'-' if v is None else f'{v:.3g} s'}" for k, v in summary["diffusion"]["t90_s"].items())
        lines.append(f"diffusion: t90 per region {t90}")
        lines.append(f"report: {out / 'report.md'}")
    lines.append(f"results in {out}/ ({elapsed:.1f} s)")
    logger.info("\n".join(lines))
