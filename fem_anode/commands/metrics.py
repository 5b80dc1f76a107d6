"""``fem-anode metrics``: image metrics of a segmented 2D/3D image -> metrics.json + figures."""

from __future__ import annotations

import argparse
import logging

from fem_anode.commands._common import add_image_arguments, add_out_argument, is_root, load_image, provenance, world_comm

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction, name: str) -> None:
    parser = subparsers.add_parser(
        name,
        help="image metrics of a segmented image (phase fractions, per-slice profiles)",
        description="Compute image metrics of a segmented label image. Writes DIR/metrics.json (SI units) and PNG figures.",
    )
    add_image_arguments(parser)
    add_out_argument(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fem_anode.imaging.metrics import compute_metrics
    from fem_anode.imaging.plots import plot_per_slice
    from fem_anode.io.output import output_directory, write_json

    image = load_image(args, kind="labels")
    metrics = compute_metrics(image)
    comm = world_comm()
    with output_directory(args.out, comm) as staging:
        if is_root(comm):
            write_json(staging / "metrics.json", {"provenance": provenance("metrics"), **metrics})
            plot_per_slice(metrics["per_slice"], staging / "per_slice.png", title=f"{args.image.name}")
    fractions = ", ".join(f"{k} {100 * v:.2f} %" for k, v in metrics["phase_fractions"].items())
    logger.info("phase fractions: %s", fractions)
    logger.info("wrote %s", args.out / "metrics.json")
    return 0
