"""``fem-anode metrics``: image metrics of a segmented 2D/3D image -> metrics.json + figures.

Computes the quantities of the paper's Figs. 4-7 (see :mod:`fem_anode.imaging.metrics`):
phase fractions and per-slice profiles, Si particles, pore surface area, geodesic tortuosity
from the electrode surface (z index 0), surface-connected pore channels per depth and pore-Si
distances; with ``--reference`` also the relative change versus a reference sample.
"""

from __future__ import annotations

import argparse
import logging

from fem_anode.commands._common import (
    add_image_arguments,
    add_render_argument,
    check_int,
    add_out_argument,
    is_root,
    load_image,
    provenance,
    world_comm,
)

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction, name: str) -> None:
    parser = subparsers.add_parser(
        name,
        help="image metrics of a segmented image (fractions, profiles, Si particles, tortuosity, distances)",
        description="Compute image metrics of a segmented label image. Writes DIR/metrics.json (SI units; "
        "null = undefined or infinite, see docs/imaging.md), PNG figures of each profile and distribution, for 3D "
        "images 3D pictures (pyvista: cut-away volume, pores and Si, tortuosity, pore surface, pore-Si distance; "
        "see docs/figures.md) and DIR/report.html (self-contained, with the paper's values) beside DIR/report.md.",
    )
    add_image_arguments(parser)
    parser.add_argument(
        "--reference",
        metavar="IMAGE",
        help="reference label image (e.g. the pristine sample); adds relative_change and comparison figures. "
        "Its stored voxel size/phase map are used, else those of --voxel-size/--phases",
    )
    parser.add_argument("--pore-phase", default="pore", metavar="NAME", help="name of the pore phase (default pore)")
    parser.add_argument("--si-phase", default="si", metavar="NAME", help="name of the Si phase (default si)")
    parser.add_argument("--bins", type=int, default=30, help="histogram bins of the distributions (default 30)")
    parser.add_argument(
        "--fields",
        action="store_true",
        help="also write tortuosity.npy and geodesic_m.npy (float32; inf = unreachable pore voxel, NaN = solid)",
    )
    parser.add_argument(
        "--tortuosity-factor",
        nargs="?",
        const="",
        default=None,
        metavar="PHASES",
        help="also compute the tortuosity factor tau = eps D / D_eff along z (3D only; steady diffusion through "
        "the face-connected phase, needs petsc4py) of the comma-separated phases (default: the pore phase); adds "
        "tortuosity_factor = {phase: tau} (null = not percolating) and tortuosity_factor_method to metrics.json",
    )
    parser.add_argument(
        "--tortuosity-method",
        default="fv",
        metavar="METHOD",
        help="discretisation of --tortuosity-factor: fv (default; cell-centred finite volumes, the value TauFactor, "
        "PoreSpy and OpenImpala report), fe (nodal trilinear finite elements on the voxel mesh, lies below fv), "
        "fe-extrapolated (fe on voxels split into 1, 8, 27, Richardson-extrapolated; 36x the work of fe)",
    )
    add_render_argument(parser)
    add_out_argument(parser)
    parser.set_defaults(func=run)


def _tortuosity_factor(args: argparse.Namespace, image, metrics: dict, comm) -> None:  # type: ignore[no-untyped-def]
    """Add ``tortuosity_factor`` (and its solve details) to ``metrics``; collective."""
    from fem_anode.errors import UsageError

    names = [n.strip() for n in args.tortuosity_factor.split(",") if n.strip()] or [args.pore_phase]
    phases = image.require_phases()
    unknown = [n for n in names if n not in phases]
    if unknown:
        raise UsageError(f"--tortuosity-factor: {', '.join(unknown)} not in the phase map ({', '.join(phases)})")
    if image.ndim != 3:
        metrics["not_applicable"]["tortuosity_factor"] = "2D image: the tortuosity factor needs a 3D volume"
        return
    from fem_anode.fem.tortuosity.result import METHODS

    method = args.tortuosity_method
    if method not in METHODS:
        raise UsageError(f"--tortuosity-method must be one of {', '.join(METHODS)}, got {method!r}")
    try:
        from fem_anode.fem.tortuosity import tortuosity_factor
    except ImportError as err:
        raise UsageError(
            f"--tortuosity-factor needs petsc4py (and dolfinx for --tortuosity-method fe), which is not importable: {err}"
        ) from None
    from fem_anode.fem.tortuosity.fv import estimate_memory as estimate_fv_memory
    from fem_anode.resources import check_memory, estimate_fe_memory, estimate_mesh_memory

    for name in names:
        if method == "fv":
            estimate = estimate_fv_memory(image, name, comm)
        else:  # sized as a dolfinx P1 solve with AMG: an upper bound of the NumPy-assembled voxel operator
            mesh = estimate_mesh_memory(image, "voxel", [name])
            refine = 27 if method == "fe-extrapolated" else 1
            estimate = estimate_fe_memory(
                cells=refine * mesh.details["cells"],
                dofs=refine * mesh.details["nodes"],
                ndim=3,
                cell_type="hexahedron",
                degree=1,
                solver="iterative",
                ranks=comm.size if comm is not None else 1,
                what=f"tortuosity factor of {name!r}",
            )
        check_memory(estimate, comm, hint="crop or bin the image, or run on more nodes")
    results = {name: tortuosity_factor(image, name, comm, method=method) for name in names}
    metrics["tortuosity_factor"] = {name: r.to_json()["tau"] for name, r in results.items()}
    metrics["tortuosity_factor_method"] = method
    metrics["tortuosity_factor_details"] = {name: r.to_json() for name, r in results.items()}
    metrics["timings_s"]["tortuosity_factor"] = sum(r.timings_s["total"] for r in results.values())


def _load_reference(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from pathlib import Path

    from fem_anode.errors import UsageError
    from fem_anode.io.images import read_image

    ref = read_image(Path(args.reference), kind="any")
    voxel_size = args.voxel_size if ref.voxel_size is None else None
    phases = args.phases if ref.phases is None else None
    ref = ref.with_metadata(voxel_size, phases)
    if ref.voxel_size is None or ref.phases is None:
        raise UsageError(
            f"reference {args.reference}: voxel size or phase map unknown; "
            "store them with the image or give --voxel-size/--phases"
        )
    return ref.check_labels()


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import numpy as np

    from fem_anode.errors import UsageError
    from fem_anode.imaging.metrics import compute_metrics
    from fem_anode.imaging.plots import plot_comparison, plot_tortuosity_sections
    from fem_anode.io.output import atomic_path, output_directory, write_json

    from fem_anode.resources import check_memory, estimate_metrics_memory

    check_int(args.bins, "--bins", 1, 100_000)
    image = load_image(args, kind="labels")
    check_memory(estimate_metrics_memory(image.shape), hint="crop or bin the image first")
    phases = image.require_phases()
    for option, name, default in (("--pore-phase", args.pore_phase, "pore"), ("--si-phase", args.si_phase, "si")):
        if name != default and name not in phases:
            raise UsageError(f"{option} {name!r} is not a phase of {args.image} ({', '.join(phases)})")
    reference_metrics = None
    reference_fields: dict = {}
    if args.reference:
        reference = _load_reference(args)
        if reference.ndim != image.ndim:
            raise UsageError(f"--reference {args.reference} is {reference.ndim}D but {args.image} is {image.ndim}D")
        logger.info("metrics of the reference %s", args.reference)
        reference_metrics = compute_metrics(
            reference, pore_phase=args.pore_phase, si_phase=args.si_phase, bins=args.bins, fields=reference_fields
        )
    fields: dict = {}
    metrics = compute_metrics(
        image,
        reference=reference_metrics,
        pore_phase=args.pore_phase,
        si_phase=args.si_phase,
        bins=args.bins,
        fields=fields,
    )
    comm = world_comm()
    if args.tortuosity_factor is not None:
        _tortuosity_factor(args, image, metrics, comm)
    with output_directory(args.out, comm) as staging:
        if is_root(comm):
            write_json(staging / "metrics.json", {"provenance": provenance("metrics", comm=comm, args=args), **metrics})
            samples = {args.image.stem: metrics}
            if reference_metrics is not None:
                reference_json = {"provenance": provenance("metrics", comm=comm, args=args), **reference_metrics}
                write_json(staging / "reference_metrics.json", reference_json)
                samples = {f"reference {Path(args.reference).stem}": reference_metrics, **samples}
            plot_comparison(samples, staging)
            maps = {}
            if "tortuosity" in reference_fields:
                maps[f"reference {Path(args.reference).stem}"] = (
                    reference_fields["tortuosity"],
                    reference.require_voxel_size(),
                )
            if "tortuosity" in fields:
                maps[args.image.stem] = (fields["tortuosity"], image.require_voxel_size())
            if maps:
                plot_tortuosity_sections(maps, staging / "tortuosity_map.png")
            for name, array in fields.items() if args.fields else ():
                with atomic_path(staging / f"{name}.npy") as tmp:
                    np.save(tmp, array.astype(np.float32))
            if args.render:
                from fem_anode.io.render3d import render_metrics_figures

                volumes = {args.image.stem: (image, fields, metrics)}
                if reference_metrics is not None:
                    volumes = {
                        f"reference {Path(args.reference).stem}": (reference, reference_fields, reference_metrics),
                        **volumes,
                    }
                render_metrics_figures(volumes, staging, pore_phase=args.pore_phase, si_phase=args.si_phase)
            from fem_anode.io.report_html import metrics_report

            metrics_report(
                staging,
                metrics,
                label=args.image.stem,
                reference=reference_metrics,
                reference_label=f"reference {Path(args.reference).stem}" if args.reference else "reference",
                pore_phase=args.pore_phase,
                provenance=provenance("metrics", comm=comm, args=args),
            )
    fractions = ", ".join(f"{k} {100 * v:.2f} %" for k, v in metrics["phase_fractions"].items())
    logger.info("phase fractions: %s", fractions)
    if metrics.get("tortuosity"):
        t = metrics["tortuosity"]
        unreachable = 100 * t["unreachable_fraction"]["overall"]
        logger.info("tortuosity mean %.4g, unreachable %.2f %% of pore voxels", t["mean"], unreachable)
    for name, tau in metrics.get("tortuosity_factor", {}).items():
        logger.info(
            "tortuosity factor of %s along z: %s", name, "inf (not percolating)" if tau is None else f"{tau:.4g}"
        )
    for key, reason in metrics["not_applicable"].items():
        logger.info("%s: not applicable (%s)", key, reason)
    logger.info("time per metric (s): %s", ", ".join(f"{k} {v:.2f}" for k, v in metrics["timings_s"].items()))
    logger.info("wrote %s and %s", args.out / "metrics.json", args.out / "report.html")
    return 0
