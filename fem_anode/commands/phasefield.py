"""``fem-anode phasefield``: finite-strain Li Cahn-Hilliard + J2 chemo-mechanics of a Si nanowire (paper 002)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from fem_anode.commands._common import add_out_argument, provenance, world_comm

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction, name: str) -> None:
    parser = subparsers.add_parser(
        name,
        help="chemo-mechanical phase field of a Si nanowire cross-section (Li Cahn-Hilliard, F = Fe Fc Fp, J2 plasticity)",
        description="Cycle a Si nanowire cross-section (built-in disk or any tagged 2D mesh): Li Cahn-Hilliard with "
        "the regular-solution double well, finite-strain elasto-plasticity with chemical swelling, generalised plane "
        "strain, Dirichlet c on the surface. Writes DIR/results.json (one record per half-cycle), DIR/fields.bp and "
        "DIR/stress.bp (VTX on the deformed mesh), DIR/mesh.msh and PNG snapshots. See --defaults for every setting.",
    )
    parser.add_argument("config", metavar="CONFIG.toml", type=Path, nargs="?", help="run configuration (TOML)")
    add_out_argument(parser, default="phasefield_results")
    parser.add_argument("--defaults", action="store_true", help="print every setting with its default, unit and meaning, then exit")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fem_anode.errors import UsageError
    from fem_anode.fem.phasefield.settings import PhaseFieldSettings

    if args.defaults:
        for key, default, unit, doc in PhaseFieldSettings.describe():
            print(f"{key:<28} {default!s:<26} {unit or '':<5} {doc}")
        return 0
    if args.config is None:
        raise UsageError("give a CONFIG.toml (see fem-anode phasefield --defaults)")
    settings = PhaseFieldSettings.from_toml(args.config).resolve_paths(args.config.parent)
    from fem_anode.fem.phasefield.run import run_phasefield
    from fem_anode.io.output import output_directory, write_json

    comm = world_comm()
    with output_directory(args.out, comm) as staging:
        results = run_phasefield(settings, staging, comm)
        if comm.rank == 0:
            settings.to_toml(staging / "config.toml")
            write_json(staging / "provenance.json", provenance("phasefield"))
    for record in results["half_cycles"]:
        logger.info(
            "%2d %-12s t = %-8g mean c %.4f  radius %.3f nm  stretch %.4f  max vM %.3f  max eps_p %.4f",
            record["index"], record["kind"], record["t"], record["mean_c_li"], record["outer_radius_m"] * 1e9,
            record["axial_stretch"], record["max_von_mises"], record["max_eq_plastic_strain"],
        )
    logger.info("results in %s", args.out)
    return 0
