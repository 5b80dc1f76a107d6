"""``fem-anode demo``: the main job on the built-in example data.

Generates the seeded synthetic examples (pristine and aged 3D anode volumes, a 2D FIB-SEM-like
ROI), loads the bundled real electrode volume, computes their image metrics, meshes the ROI's
SEI/C/B domain (pores and Si as tagged boundaries, as the diffusion model needs) and, when
dolfinx is available, loads that mesh on all ranks and checks its tags. Everything lands in
``--out DIR``: ``data/`` (inputs, reusable with the other subcommands), ``metrics/``,
``meshes/``, ``figures/`` and ``summary.json``.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

from fem_anode.commands._common import add_out_argument, check_int, is_root, provenance, world_comm

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction, name: str) -> None:
    parser = subparsers.add_parser(
        name,
        help="run the main job on the built-in example data",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
    )
    add_out_argument(parser, default="fem_anode_demo", what="demo results")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic examples (default 0)")
    parser.add_argument("--quick", action="store_true", help="coarser ROI (40 nm pixels) and fewer output times, for tests")
    parser.set_defaults(func=run)


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
    from fem_anode.meshing.voxel import write_voxel_mesh

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
        summary["ageing_relative_change"] = {p: (aged[p] - pristine[p]) / pristine[p] for p in pristine if pristine[p] > 0}
        mesh_path = staging / "meshes" / "roi_sei.msh"
        if root:
            logger.info("meshing the ROI's SEI/C/B domain (pores and Si as boundaries)")
            data = write_voxel_mesh(examples["roi_2d"], mesh_path, keep=["sei"])
            summary["mesh"] = {"file": "meshes/roi_sei.msh", "cells": len(data.cells), "groups": {k: list(v) for k, v in data.groups.items()}}
        summary["mesh_check"] = _check_mesh_in_dolfinx(mesh_path, comm)
        if "skipped" not in summary["mesh_check"]:
            summary["diffusion"] = _run_diffusion(staging, comm, quick=args.quick)
        if root:
            write_json(staging / "summary.json", summary)
            write_report(staging / "report.md", summary)
    elapsed = time.perf_counter() - start
    _log_summary(summary, args.out, elapsed)
    return 0


def _check_mesh_in_dolfinx(path: Path, comm: Any) -> dict[str, Any]:
    """Load the mesh with dolfinx on all ranks and integrate its area and tagged boundaries."""
    try:
        import dolfinx  # noqa: F401
    except ImportError:
        logger.warning("dolfinx not installed: skipping the FEniCSx mesh check")
        return {"skipped": "dolfinx not installed"}
    import ufl
    from dolfinx import fem

    from fem_anode.fem.mesh_io import read_mesh

    tagged = read_mesh(path, comm)
    ds = ufl.Measure("ds", domain=tagged.mesh, subdomain_data=tagged.facet_tags)

    def integral(form: Any) -> float:
        return float(comm.allreduce(fem.assemble_scalar(fem.form(form)), op=_sum()))

    one = fem.Constant(tagged.mesh, 1.0)
    result = {
        "ranks": comm.size,
        "cells": tagged.mesh.topology.index_map(tagged.mesh.topology.dim).size_global,
        "area_m2": integral(one * ufl.dx(domain=tagged.mesh)),
        "boundary_length_m": {name: integral(one * ds(tag)) for name, tag in sorted(tagged.facet_groups.items())},
    }
    logger.info("dolfinx loaded the mesh on %d rank(s): %d cells", comm.size, result["cells"])
    return result


def _run_diffusion(staging: Path, comm: Any, *, quick: bool) -> dict[str, Any]:
    """The paper's Fig. 8 workflow on the example ROI: regions I-IV, c(t), t90, fields."""
    from fem_anode.fem.diffusion_run import fig8_settings, run_diffusion

    image_path = staging / "data" / "roi_2d.npy"
    comm.barrier()
    settings = fig8_settings(image_path, quick=quick)
    logger.info("Li diffusion in the ROI's SEI/C/B domain to t = %g s (paper parameters)", settings.time.t_end)
    workdir = staging / "diffusion"
    if comm.rank == 0:
        workdir.mkdir(parents=True, exist_ok=True)
    comm.barrier()
    results = run_diffusion(settings, workdir, comm)
    if comm.rank == 0:
        settings.to_toml(workdir / "config.toml")
    keys = ("times", "regions", "t90_s", "mass_balance_rel_error", "ndofs", "ncells", "steps", "factorisations", "timescales", "wall_time_s")
    return {k: results[k] for k in keys} | {"region_boxes_m": {r.name: r.box for r in settings.regions}}


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
                volumes[name] = (image, {"tortuosity": tortuosity_field(image)[1]}, json.loads(metrics_path.read_text()))
        render_metrics_figures(volumes, directory / "figures" / "3d")
    demo_report(directory, summary, name=path.stem)
    return path


def _sum() -> Any:
    from mpi4py import MPI

    return MPI.SUM


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
