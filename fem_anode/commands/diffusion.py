"""``fem-anode diffusion``: transient Li diffusion with mass-transfer boundaries (paper 001)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from fem_anode.commands._common import add_out_argument, provenance, world_comm

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction, name: str) -> None:
    parser = subparsers.add_parser(
        name,
        help="transient Li diffusion in the SEI/C/B domain with pore mass-transfer boundaries",
        description="Solve eps dc/dt = div(eps^b D grad c) on the transporting phase of a segmented image "
        "(or a tagged mesh) with inflow k_f (c_bulk - c) at pore interfaces. Writes DIR/results.json, "
        "DIR/c.bp (VTX for ParaView), DIR/mesh.msh and PNG figures. See --defaults for every setting.",
    )
    parser.add_argument("config", metavar="CONFIG.toml", type=Path, nargs="?", help="run configuration (TOML)")
    add_out_argument(parser, default="diffusion_results")
    parser.add_argument("--defaults", action="store_true", help="print every setting with its default, unit and meaning, then exit")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fem_anode.errors import UsageError
    from fem_anode.fem.diffusion import DiffusionSettings

    if args.defaults:
        for key, default, unit, doc in DiffusionSettings.describe():
            print(f"{key:<28} {default!s:<22} {unit or '':<9} {doc}")
        print("[[regions]]: name, box = [x0, y0, x1, y1] (m), repeated per region")
        return 0
    if args.config is None:
        raise UsageError("give a CONFIG.toml (see fem-anode diffusion --defaults)")
    settings = DiffusionSettings.from_toml(args.config).resolve_paths(args.config.parent)
    from fem_anode.fem.diffusion_run import run_diffusion
    from fem_anode.io.output import output_directory, write_json

    comm = world_comm()
    with output_directory(args.out, comm) as staging:
        results = run_diffusion(settings, staging, comm)
        if comm.rank == 0:
            settings.to_toml(staging / "config.toml")
            write_json(staging / "provenance.json", provenance("diffusion"))
    for name, t90 in results["t90_s"].items():
        logger.info("t90 %-8s %s", name, "not reached" if t90 is None else f"{t90:.4g} s")
    logger.info("results in %s", args.out)
    return 0
