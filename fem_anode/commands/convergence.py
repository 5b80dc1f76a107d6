"""``fem-anode convergence``: mesh-convergence study of a model's configuration."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from fem_anode.commands._common import add_out_argument, provenance, world_comm

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction, name: str) -> None:
    parser = subparsers.add_parser(
        name,
        help="mesh-convergence study: observed order, Richardson extrapolation, GCI",
        description="Run a model's CONFIG.toml on successively refined meshes (h divided by --refine-factor per level) "
        "and report, per quantity of interest, the observed order, the Richardson-extrapolated value and Roache's GCI. "
        "Writes DIR/convergence.json and DIR/convergence.png.",
    )
    parser.add_argument("config", metavar="CONFIG.toml", type=Path, help="the model's configuration (as for fem-anode diffusion)")
    parser.add_argument("--levels", type=int, default=3, help="number of meshes (>= 3 for an observed order; default 3)")
    parser.add_argument("--refine-factor", type=int, default=2, help="h ratio between successive levels (default 2)")
    parser.add_argument("--orders", default=None, help="element orders to study, e.g. 1,2 (default: the config's)")
    parser.add_argument("--model", choices=["diffusion"], default="diffusion", help="model the config belongs to (default diffusion)")
    add_out_argument(parser, default="convergence_results")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fem_anode.errors import UsageError

    orders = None
    if args.orders:
        try:
            orders = [int(v) for v in args.orders.split(",") if v.strip()]
        except ValueError:
            raise UsageError(f"--orders {args.orders!r}: expected a comma-separated list such as 1,2") from None
        if not orders or any(o not in (1, 2) for o in orders):
            raise UsageError(f"--orders {args.orders!r}: element orders must be 1 or 2")
    from fem_anode.fem.convergence import format_table, plot_study, run_diffusion_study
    from fem_anode.fem.diffusion import DiffusionSettings
    from fem_anode.io.output import output_directory, write_json

    settings = DiffusionSettings.from_toml(args.config).resolve_paths(args.config.parent)
    comm = world_comm()
    with output_directory(args.out, comm) as staging:
        report = run_diffusion_study(settings, levels=args.levels, refine_factor=args.refine_factor, orders=orders, workdir=staging, comm=comm)
        if comm.rank == 0:
            write_json(staging / "convergence.json", {"provenance": provenance("convergence"), **report, "settings": settings.to_dict()})
            plot_study(report, staging / "convergence.png")
    logger.info("%s", format_table(report))
    logger.info("results in %s", args.out)
    return 0
