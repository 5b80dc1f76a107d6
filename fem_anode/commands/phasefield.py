"""``fem-anode phasefield``: finite-strain Li Cahn-Hilliard + J2 chemo-mechanics of a Si nanowire (paper 002)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from fem_anode.commands._common import add_config_arguments, load_config, provenance, world_comm

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction, name: str) -> None:
    parser = subparsers.add_parser(
        name,
        help="chemo-mechanical phase field of a Si nanowire cross-section (Li and vacancy Cahn-Hilliard, F = Fe Fc Fp, J2 plasticity, voids, SEI percolation)",
        description="Cycle a Si nanowire cross-section (built-in disk or any tagged 2D mesh): Li Cahn-Hilliard with "
        "the regular-solution double well, finite-strain elasto-plasticity with chemical swelling, generalised plane "
        "strain, Dirichlet c on the surface; with [vacancy] enabled (default) a vacancy Cahn-Hilliard field, random void "
        "nucleation at the delithiation front and electrolyte percolation into surface-connected voids after every "
        "delithiation (SEI growth into the wire). Writes DIR/results.json (one record per half-cycle, with void "
        "fraction, SEI penetration depth, core connectivity), DIR/fields.bp and DIR/stress.bp (VTX on the deformed "
        "mesh), DIR/mesh.msh, PNG snapshots and a Fig. 5-style morphology montage. See --defaults for every setting.",
    )
    add_config_arguments(parser, default_out="phasefield_results")
    parser.add_argument(
        "--resume",
        type=Path,
        metavar="DIR",
        help="continue the interrupted, failed or killed run whose checkpoint is in DIR/checkpoint (results go to --out, "
        "default DIR; CONFIG is optional and must match the checkpoint's except [solver], [checkpoint] and [output]). "
        "Checkpoints are written as set in [checkpoint] and on SIGINT/SIGTERM/SIGUSR1, which stop the run after the "
        "current step with partial results (exit 130; under mpirun send SIGUSR1 to mpirun). See docs/checkpointing.md",
    )
    parser.set_defaults(func=run, out=None)


def run(args: argparse.Namespace) -> int:
    from fem_anode.fem.phasefield.settings import PhaseFieldSettings

    args.out = args.out or args.resume or Path("phasefield_results")
    checkpoint = None
    if args.resume and not args.defaults:
        from fem_anode.io.checkpoint import CheckpointStore

        checkpoint = CheckpointStore(args.resume, world_comm()).load()
    if checkpoint is not None and args.config is None:
        settings = _checkpoint_settings(checkpoint)
    else:
        settings = load_config(args, PhaseFieldSettings, "phasefield")
    if settings is None:
        return 0
    from fem_anode.errors import Interrupted, SolverError, UsageError
    from fem_anode.fem.phasefield.run import run_phasefield
    from fem_anode.io.checkpoint import CheckpointStore
    from fem_anode.io.output import output_directory, write_json

    comm = world_comm()
    store = CheckpointStore(args.out, comm)
    if checkpoint is None and store.exists():
        raise UsageError(f"{args.out} holds the checkpoint of an unfinished run: add --resume {args.out} to continue it, or remove {store.path}")
    try:
        with output_directory(args.out, comm, keep_on=(Interrupted, SolverError)) as staging:
            if comm.rank == 0:  # first, so that interrupted and failed runs have them too
                settings.to_toml(staging / "config.toml")
                write_json(staging / "provenance.json", provenance("phasefield", settings, comm=comm, args=args))
            results = run_phasefield(settings, staging, comm, checkpoint_dir=args.out, resume=checkpoint)
    except Interrupted as err:
        raise Interrupted(f"{err}; checkpoint and partial results in {args.out}; continue with: fem-anode phasefield --resume {args.out}") from None
    store.remove()
    for record in results["half_cycles"]:
        voids = ""
        if "void_fraction" in record:
            voids = (f"  voids {100 * record['void_fraction']:.2f} %  electrolyte {100 * record['accessible_void_fraction']:.2f} %"
                     f"  SEI depth {record['sei_penetration_depth_m'] * 1e9:.2f} nm  core {record['core_connectivity']:.3f}")
        logger.info(
            "%2d %-12s t = %-8g mean c %.4f  radius %.3f nm  stretch %.4f  max vM %.3f  max eps_p %.4f%s",
            record["index"], record["kind"], record["t"], record["mean_c_li"], record["outer_radius_m"] * 1e9,
            record["axial_stretch"], record["max_von_mises"], record["max_eq_plastic_strain"], voids,
        )
    logger.info("results in %s", args.out)
    return 0


def _checkpoint_settings(checkpoint: Any) -> Any:
    """The settings a checkpoint was written with (mesh path absolute)."""
    import tomllib

    from fem_anode.errors import InputError
    from fem_anode.fem.phasefield.settings import PhaseFieldSettings

    meta = checkpoint.state.get("meta", {})
    if meta.get("model") != "phasefield" or "settings_toml" not in meta:
        raise InputError(f"{checkpoint.path} is not a checkpoint of a phase-field run")
    return PhaseFieldSettings.from_dict(tomllib.loads(meta["settings_toml"]))
