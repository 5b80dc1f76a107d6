"""``fem-anode diffusion``: transient Li diffusion with mass-transfer boundaries (paper 001)."""

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
        help="transient Li diffusion in the SEI/C/B domain with pore mass-transfer boundaries",
        description="Solve eps dc/dt = div(eps^b D grad c) on the transporting phase of a segmented image "
        "(or a tagged mesh) with inflow k_f (c_bulk - c) at pore interfaces. Writes DIR/results.json, "
        "DIR/c.bp (VTX for ParaView), DIR/mesh.msh and PNG figures. See --defaults for every setting.",
    )
    add_config_arguments(parser, default_out="diffusion_results")
    parser.add_argument(
        "--resume",
        type=Path,
        metavar="DIR",
        help="continue the interrupted or killed run whose checkpoint is in DIR/checkpoint (results go to --out, "
        "default DIR; CONFIG is optional and must match the checkpoint's except [solver] and [checkpoint]). Checkpoints "
        "are written as set in [checkpoint] and on SIGINT/SIGTERM/SIGUSR1, which stop the run after the current step "
        "with partial results (exit 130; under mpirun send SIGUSR1 to mpirun). See docs/checkpointing.md",
    )
    parser.set_defaults(func=run, out=None)


def run(args: argparse.Namespace) -> int:
    from fem_anode.fem.diffusion_settings import DiffusionSettings

    args.out = args.out or args.resume or Path("diffusion_results")
    checkpoint = _resume_checkpoint(args) if args.resume and not args.defaults else None
    if checkpoint is not None and args.config is None:
        settings = _checkpoint_settings(checkpoint)
    else:
        settings = load_config(args, DiffusionSettings, "diffusion")
    if settings is None:
        print("[[regions]]: name, box = [x0, y0, x1, y1] (m), repeated per region")
        return 0
    from fem_anode.errors import Interrupted, SolverError, UsageError
    from fem_anode.fem.diffusion_run import run_diffusion
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
                write_json(staging / "provenance.json", provenance("diffusion", settings, comm=comm, args=args))
            results = run_diffusion(settings, staging, comm, checkpoint_dir=args.out, resume=checkpoint)
    except Interrupted as err:
        raise Interrupted(f"{err}; checkpoint and partial results in {args.out}; continue with: fem-anode diffusion --resume {args.out}") from None
    store.remove()
    for name, t90 in results["t90_s"].items():
        logger.info("t90 %-8s %s", name, "not reached" if t90 is None else f"{t90:.4g} s")
    logger.info("results in %s", args.out)
    return 0


def _resume_checkpoint(args: argparse.Namespace) -> Any:
    from fem_anode.io.checkpoint import CheckpointStore

    return CheckpointStore(args.resume, world_comm()).load()


def _checkpoint_settings(checkpoint: Any) -> Any:
    """The settings a checkpoint was written with (stored with absolute paths)."""
    import tomllib

    from fem_anode.errors import InputError
    from fem_anode.fem.diffusion_settings import DiffusionSettings

    meta = checkpoint.state.get("meta", {})
    if meta.get("model") != "diffusion" or "settings_toml" not in meta:
        raise InputError(f"{checkpoint.path} is not a checkpoint of a diffusion run")
    return DiffusionSettings.from_dict(tomllib.loads(meta["settings_toml"]))
