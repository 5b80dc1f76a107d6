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

from fem_anode.commands._common import add_out_argument, is_root, provenance, world_comm

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction, name: str) -> None:
    parser = subparsers.add_parser(
        name,
        help="run the main job on the built-in example data",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
    )
    add_out_argument(parser, default="fem_anode_demo", what="demo results")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic examples (default 0)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
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
        "roi_2d": fib_sem_roi(seed=args.seed),
        "real_electrode": real_electrode(),
    }
    summary: dict[str, Any] = {"provenance": provenance("demo"), "examples": {}}
    with output_directory(args.out, comm) as staging:
        for name, image in examples.items():
            logger.info("metrics of %s %s", name, "x".join(map(str, image.shape)))
            metrics = compute_metrics(image)
            if root:
                write_image(staging / "data" / f"{name}.npy", image)
                write_json(staging / "metrics" / f"{name}.json", {"provenance": provenance("demo"), **metrics})
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
        if root:
            write_json(staging / "summary.json", summary)
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
    lines.append(f"results in {out}/ ({elapsed:.1f} s)")
    logger.info("\n".join(lines))
