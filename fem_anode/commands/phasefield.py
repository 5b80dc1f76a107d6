"""``fem-anode phasefield``: finite-strain Li Cahn-Hilliard + J2 chemo-mechanics of a Si nanowire
(He et al. 2021; the run is :func:`fem_anode.solve_phasefield`)."""

from __future__ import annotations

import argparse
import logging

from fem_anode.commands._common import (
    add_config_arguments,
    add_resume_argument,
    load_resumable_config,
    run_checkpointed,
)

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction, name: str) -> None:
    parser = subparsers.add_parser(
        name,
        help=(
            "chemo-mechanical phase field of a Si nanowire cross-section (Li and vacancy Cahn-Hilliard, F = Fe Fc "
            "Fp, J2 plasticity, voids, SEI percolation)"
        ),
        description="Cycle a Si nanowire cross-section (built-in disk or any tagged 2D mesh): Li Cahn-Hilliard with "
        "the regular-solution double well, finite-strain elasto-plasticity with chemical swelling, generalised plane "
        "strain, Dirichlet c on the surface; with [vacancy] enabled (default) a vacancy Cahn-Hilliard field, random "
        "void nucleation at the delithiation front and electrolyte percolation into surface-connected voids after "
        "every delithiation (SEI growth into the wire). Writes DIR/results.json (one record per half-cycle, with "
        "void fraction, SEI penetration depth, core connectivity), DIR/fields.bp and DIR/stress.bp (VTX on the "
        "deformed mesh), DIR/mesh.msh, PNG snapshots and a Fig. 5-style morphology montage. See --defaults for every "
        "setting.",
    )
    add_config_arguments(parser, default_out="phasefield_results")
    add_resume_argument(parser, "phasefield", keep="[solver], [checkpoint] and [output]")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fem_anode.fem.phasefield.settings import PhaseFieldSettings

    settings, checkpoint = load_resumable_config(args, PhaseFieldSettings, "phasefield", "phasefield_results")
    if settings is None:
        return 0
    from fem_anode.api import solve_phasefield

    results = run_checkpointed(
        args,
        settings,
        "phasefield",
        checkpoint,
        lambda staging, comm: solve_phasefield(
            settings, comm=comm, out=staging, checkpoint_dir=args.out, resume=checkpoint
        ).to_dict(),
    )
    for record in results["half_cycles"]:
        voids = ""
        if "void_fraction" in record:
            voids = (
                f"  voids {100 * record['void_fraction']:.2f} %  electrolyte "
                f"{100 * record['accessible_void_fraction']:.2f} %"
                f"  SEI depth {record['sei_penetration_depth_m'] * 1e9:.2f} nm  core {record['core_connectivity']:.3f}"
            )
        logger.info(
            "%2d %-12s t = %-8g mean c %.4f  radius %.3f nm  stretch %.4f  max vM %.3f  max eps_p %.4f%s",
            record["index"],
            record["kind"],
            record["t"],
            record["mean_c_li"],
            record["outer_radius_m"] * 1e9,
            record["axial_stretch"],
            record["max_von_mises"],
            record["max_eq_plastic_strain"],
            voids,
        )
    logger.info("results in %s", args.out)
    return 0
