"""``fem-anode metrics``: image metrics of a segmented 2D/3D image -> metrics.json + figures.

Computes the quantities of the paper's Figs. 4-7 (see :mod:`fem_anode.imaging.metrics`):
phase fractions and per-slice profiles, Si particles, pore surface area, geodesic tortuosity
from the electrode surface (z index 0), surface-connected pore channels per depth and pore-Si
distances; with ``--reference`` also the relative change versus a reference sample.
"""

from __future__ import annotations

import argparse
import logging
from typing import TYPE_CHECKING

from fem_anode.commands._common import (
    add_image_arguments,
    add_out_argument,
    add_render_argument,
    check_int,
    is_root,
    load_image,
    provenance,
    world_comm,
)
from fem_anode.errors import UsageError

if TYPE_CHECKING:
    from fem_anode.io.images import ImageLayers, VoxelImage

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


def _load_reference(args: argparse.Namespace) -> VoxelImage | ImageLayers:
    from pathlib import Path

    from fem_anode.io.images import ImageLayers, open_image_layers

    ref = open_image_layers(Path(args.reference))
    if ref.voxel_size is None or ref.phases is None:
        ref = open_image_layers(
            Path(args.reference),
            voxel_size=args.voxel_size if ref.voxel_size is None else None,
            phases=args.phases if ref.phases is None else None,
        )
    if ref.voxel_size is None or ref.phases is None:
        raise UsageError(
            f"reference {args.reference}: voxel size or phase map unknown; "
            "store them with the image or give --voxel-size/--phases"
        )
    return ref if isinstance(ref, ImageLayers) else ref.check_labels()


def _open_image(args: argparse.Namespace) -> VoxelImage | ImageLayers:
    """The label image: a 3D ``.npy``, multi-page TIFF or folder of slices opened for reading by
    layers (each rank reads its slab), anything else read whole and checked."""
    from fem_anode.io.images import ImageLayers, open_image_layers

    opened = open_image_layers(args.image, voxel_size=args.voxel_size, phases=args.phases)
    if isinstance(opened, ImageLayers):
        return opened  # the labels are checked as the metrics count them
    return load_image(args, kind="labels")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fem_anode.api import compute_metrics
    from fem_anode.io.output import output_directory
    from fem_anode.resources import check_memory, estimate_metrics_memory

    check_int(args.bins, "--bins", 1, 100_000)
    image = _open_image(args)
    comm = world_comm()
    check_memory(  # before anything else about the image: an absurd one is refused for its size
        estimate_metrics_memory(image.shape, 1 if comm is None else comm.size),
        comm,
        hint="crop or bin the image first, or run on more ranks",
        enabled=not getattr(args, "no_memory_check", False),
    )
    phases = image.require_phases()
    for option, name, default in (("--pore-phase", args.pore_phase, "pore"), ("--si-phase", args.si_phase, "si")):
        if name != default and name not in phases:
            raise UsageError(f"{option} {name!r} is not a phase of {args.image} ({', '.join(phases)})")
    reference = None
    if args.reference:
        reference = _load_reference(args)
        if reference.ndim != image.ndim:
            raise UsageError(f"--reference {args.reference} is {reference.ndim}D but {args.image} is {image.ndim}D")
        logger.info("metrics of the reference %s", args.reference)
    factor = None
    if args.tortuosity_factor is not None:
        factor = [n.strip() for n in args.tortuosity_factor.split(",") if n.strip()] or [args.pore_phase]
    metrics = compute_metrics(
        image,
        reference=reference,
        pore_phase=args.pore_phase,
        si_phase=args.si_phase,
        bins=args.bins,
        tortuosity_factor=factor,
        tortuosity_method=args.tortuosity_method,
        comm=comm,
        memory_check=not getattr(args, "no_memory_check", False),
        require_all_phases=True,
    )
    with output_directory(args.out, comm) as staging:
        metrics.save(
            staging,
            label=args.image.stem,
            reference_label=f"reference {Path(args.reference).stem}" if args.reference else "reference",
            render=args.render,
            fields=args.fields,
            provenance=provenance("metrics", comm=comm, args=args) if is_root(comm) else None,
            comm=comm,
        )
    fractions = ", ".join(f"{k} {100 * v:.2f} %" for k, v in metrics.phase_fractions.items())
    logger.info("phase fractions: %s", fractions)
    tortuosity = metrics.geodesic_tortuosity
    if tortuosity:
        unreachable = 100 * tortuosity["unreachable_fraction"]["overall"]
        logger.info(
            "geodesic tortuosity mean %.4g, unreachable %.2f %% of pore voxels", tortuosity["mean"], unreachable
        )
    for name, tau in metrics.tortuosity_factor.items():
        logger.info(
            "tortuosity factor of %s along z: %s",
            name,
            "inf (not percolating)" if tau == float("inf") else f"{tau:.4g}",
        )
    for key, reason in metrics.not_applicable.items():
        logger.info("%s: not applicable (%s)", key, reason)
    logger.info("time per metric (s): %s", ", ".join(f"{k} {v:.2f}" for k, v in metrics.timings_s.items()))
    logger.info("wrote %s and %s", args.out / "metrics.json", args.out / "report.html")
    return 0
