"""``fem-anode segment``: gray image -> label image (multistage threshold, region-based, threshold).

* ``--method multistage`` (synchrotron CT): histogram-based global iterative threshold
  multistage segmentation into pore, intermediate (SEI/CBD), graphite and Si domains;
* ``--method region`` (FIB-SEM): Felzenszwalb regions per slice + per-region features, robust
  to shine-through artefacts;
* ``--method threshold``: plain multi-class isodata pixel threshold (baseline).

See :mod:`fem_anode.imaging.segmentation` and docs/imaging.md.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from fem_anode.commands._common import add_image_arguments, check_int, check_number, is_root, provenance, world_comm

logger = logging.getLogger(__name__)

METHODS = ("multistage", "region", "threshold")


def register(subparsers: argparse._SubParsersAction, name: str) -> None:
    parser = subparsers.add_parser(
        name,
        help="segment a gray image into phase labels (multistage threshold, Felzenszwalb regions)",
        description="Segment a 2D/3D gray image into a label image. Writes --out (.npy/.npz/.tif/folder) "
        "with voxel size and phase map, and OUT.report.json with the thresholds found.",
    )
    add_image_arguments(parser, labels=False)
    parser.add_argument(
        "--method", choices=METHODS, default="multistage", help="segmentation method (default multistage)"
    )
    parser.add_argument(
        "--phases",
        metavar="MAP",
        help="labels to write, name=label,...; multistage needs pore, sei, graphite, si "
        "(default pore=0,si=1,graphite=2,sei=3); region/threshold default pore=0,si=1,sei=3",
    )
    parser.add_argument(
        "--order",
        metavar="NAMES",
        help="region/threshold: phase names from darkest to brightest, e.g. pore,sei,si (default: by the usual gray "
        "levels pore < sei < graphite < si, else the --phases order)",
    )
    parser.add_argument(
        "--median",
        type=int,
        default=0,
        metavar="N",
        help="multistage: median filter of width N voxels first (default off)",
    )
    parser.add_argument("--scale", type=float, default=30.0, help="region: Felzenszwalb scale (default 30)")
    parser.add_argument(
        "--sigma", type=float, default=0.8, help="region: Felzenszwalb Gaussian pre-smoothing (default 0.8)"
    )
    parser.add_argument(
        "--min-size", type=int, default=20, help="region: Felzenszwalb minimum region size in pixels (default 20)"
    )
    parser.add_argument(
        "--dark-fraction",
        type=float,
        default=0.1,
        help="region: fraction of pore-dark pixels that makes a region a pore region (default 0.1)",
    )
    parser.add_argument(
        "--truth", metavar="LABELS", type=Path, help="known label image: report per-phase IoU against it"
    )
    parser.add_argument("--out", type=Path, required=True, metavar="FILE", help="label image to write, e.g. labels.npy")
    parser.set_defaults(func=run)


def _order(phases: dict[str, int], order: str | None) -> list[str]:
    from fem_anode.imaging.synthetic import DEFAULT_GRAY_LEVELS

    if order:
        return [n.strip() for n in order.split(",") if n.strip()]
    if all(name in DEFAULT_GRAY_LEVELS for name in phases):
        return sorted(phases, key=lambda n: DEFAULT_GRAY_LEVELS[n])
    return list(phases)


def run(args: argparse.Namespace) -> int:
    from fem_anode.errors import UsageError
    from fem_anode.imaging import segmentation as seg
    from fem_anode.imaging.synthetic import ANODE_PHASES, ROI_PHASES
    from fem_anode.io.images import parse_phase_map, read_image, write_image
    from fem_anode.io.output import write_json

    if args.out.suffix.lower() == ".png":
        raise UsageError("--out: write labels as .npy, .npz, .tif or a folder (PNG cannot hold 3D volumes)")
    # Upper limits of the options before any work (their signs and NaN are checked by the methods):
    # widths and smoothing beyond the image only cost memory and time.
    import math

    if args.median > 0:
        check_int(args.median, "--median", 0, 10_000)
    if args.method == "region":
        if math.isfinite(args.scale) and args.scale > 0:
            check_number(args.scale, "--scale", 0.0)
        if args.min_size >= 1:
            check_int(args.min_size, "--min-size", 1, 2**31 - 1)
    gray = read_image(args.image, voxel_size=args.voxel_size, kind="gray")
    largest = max(gray.shape)
    if args.median > 0:
        check_int(args.median, "--median", 0, largest, " (the image's largest dimension in voxels)")
    if args.method == "region" and math.isfinite(args.sigma) and args.sigma >= 0:
        check_number(args.sigma, "--sigma", 0.0, float(largest))
    if args.method == "multistage":
        phases = parse_phase_map(args.phases) if args.phases else dict(ANODE_PHASES)
        result = seg.multistage_threshold(gray, phases, median_size=args.median)
    else:
        phases = parse_phase_map(args.phases) if args.phases else dict(ROI_PHASES)
        order = _order(phases, args.order)
        if args.method == "region":
            result = seg.region_segmentation(
                gray,
                phases,
                order=order,
                scale=args.scale,
                sigma=args.sigma,
                min_size=args.min_size,
                dark_fraction=args.dark_fraction,
            )
        else:
            result = seg.threshold_segmentation(gray, phases, order=order)
    report = {"provenance": provenance("segment", args=args), "input": str(args.image), **result.info}
    if args.truth is not None:
        truth = read_image(args.truth, kind="labels")
        report["iou"] = seg.iou_per_phase(result.labels, truth, phases)
        logger.info("IoU vs %s: %s", args.truth, ", ".join(f"{k} {v:.3f}" for k, v in report["iou"].items()))
    comm = world_comm()
    if is_root(comm):
        write_image(args.out, result.labels)
        write_json(args.out.with_name(args.out.name + ".report.json"), report)
    if comm is not None and comm.size > 1:
        comm.barrier()
    logger.info("%s segmentation: thresholds %s", args.method, result.info["thresholds"])
    logger.info("wrote %s", args.out)
    return 0
