"""``fem-anode convergence``: mesh-convergence study of a model's configuration."""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fem_anode.commands._common import (
    add_out_argument,
    check_int,
    check_number,
    is_root,
    load_config,
    provenance,
    world_comm,
)

if TYPE_CHECKING:
    from fem_anode.settings import Settings

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction, name: str) -> None:
    parser = subparsers.add_parser(
        name,
        help="mesh-convergence study: observed order, Richardson extrapolation, GCI",
        description="Run a model's CONFIG.toml on successively refined meshes (h divided by --refine-factor per level) "
        "and report, per quantity of interest, the observed order, the Richardson-extrapolated value and Roache's GCI. "
        "Diffusion: voxel meshes subdivide every pixel; smooth meshes (mesh.method = 'smooth') divide the global size "
        "H (mesh.size, m; default 4 pixels), every size field with it, on the same boundary curves. Settings the study "
        "does not use ([output], [checkpoint]) are refused. Writes DIR/convergence.json and DIR/convergence.png.",
    )
    parser.add_argument(
        "config", metavar="CONFIG.toml", type=Path, help="the model's configuration (as for fem-anode diffusion)"
    )
    parser.add_argument(
        "--levels", type=int, default=3, help="number of meshes (>= 3 for an observed order; default 3)"
    )
    parser.add_argument(
        "--refine-factor",
        type=float,
        default=2.0,
        help="h ratio between successive levels (default 2; an integer for voxel meshes, any number > 1 for smooth "
        "meshes)",
    )
    parser.add_argument("--orders", default=None, help="element orders to study, e.g. 1,2 (default: the config's)")
    parser.add_argument(
        "--model",
        choices=["auto", "diffusion", "phasefield"],
        default="auto",
        help="model the config belongs to (auto: phasefield if it has phase-field sections or keys such as "
        "geometry.radius, else diffusion)",
    )
    add_out_argument(parser, default="convergence_results")
    parser.add_argument(
        "--resume",
        type=Path,
        metavar="DIR",
        help="continue the interrupted or killed study whose checkpoint is in DIR/checkpoint (written after every "
        "finished level); results go to --out (default DIR); CONFIG and options must be those of the study",
    )
    parser.set_defaults(func=run, out=None)


def _diffusion_study(
    settings: Any, args: argparse.Namespace, orders: Any, comm: Any, staging: Path, checkpointing: dict[str, Any]
) -> dict[str, Any]:
    from fem_anode.fem.convergence import run_diffusion_study

    return run_diffusion_study(
        settings, levels=args.levels, refine_factor=args.refine_factor, orders=orders, comm=comm, **checkpointing
    )


def _phasefield_study(
    settings: Any, args: argparse.Namespace, orders: Any, comm: Any, staging: Path, checkpointing: dict[str, Any]
) -> dict[str, Any]:
    from fem_anode.errors import UsageError
    from fem_anode.fem.convergence import run_phasefield_study

    if orders:
        raise UsageError(
            "--orders applies to the diffusion model; set mesh.displacement_degree in the phase-field config"
        )
    return run_phasefield_study(
        settings, levels=args.levels, refine_factor=args.refine_factor, workdir=staging, comm=comm, **checkpointing
    )


def _diffusion_settings() -> type[Settings]:
    from fem_anode.fem.diffusion.settings import DiffusionSettings

    return DiffusionSettings


def _phasefield_settings() -> type[Settings]:
    from fem_anode.fem.phasefield.settings import PhaseFieldSettings

    return PhaseFieldSettings


#: model -> (settings class loader, study runner). A study refuses the settings it does not use
#: (fem_anode.fem.convergence.STUDY_UNUSED_SETTINGS, keyed by the same model name).
STUDIES = {
    "diffusion": (_diffusion_settings, _diffusion_study),
    "phasefield": (_phasefield_settings, _phasefield_study),
}


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
    from fem_anode.fem.convergence import check_study_settings, format_table, plot_study
    from fem_anode.io.output import output_directory, write_json

    if not (math.isfinite(args.refine_factor) and args.refine_factor > 1):
        raise UsageError(f"--refine-factor must be a finite number > 1, got {args.refine_factor:g}")
    check_number(args.refine_factor, "--refine-factor", 1.0, 16.0, low_open=True)
    check_int(args.levels, "--levels", 2, 10, " (each level multiplies the mesh size)")
    model = _detect_model(args.config) if args.model == "auto" else args.model
    settings_class, study = STUDIES[model]
    settings = load_config(args, settings_class(), "convergence")
    check_study_settings(settings, model)
    if model == "diffusion" and settings.mesh.method == "voxel":
        if args.refine_factor != int(args.refine_factor):
            raise UsageError(
                f"--refine-factor {args.refine_factor:g}: voxel meshes are refined by subdividing pixels, use an "
                "integer (or mesh.method = 'smooth')"
            )
        args.refine_factor = int(args.refine_factor)
    comm = world_comm()
    from fem_anode.errors import Interrupted
    from fem_anode.io.checkpoint import CheckpointStore

    args.out = args.out or args.resume or Path("convergence_results")
    store = CheckpointStore(args.out, comm)
    resume = CheckpointStore(args.resume, comm).load() if args.resume else None
    if resume is None and store.exists():
        raise UsageError(
            f"{args.out} holds the checkpoint of an unfinished study: add --resume {args.out} to continue it, or "
            f"remove {store.path}"
        )
    checkpointing = {"checkpoint_dir": args.out, "resume": resume}
    try:
        with output_directory(args.out, comm) as staging:
            report = study(settings, args, orders, comm, staging, checkpointing)
            if is_root(comm):
                write_json(
                    staging / "convergence.json",
                    {
                        "provenance": provenance("convergence", settings, comm=comm, args=args),
                        **report,
                        "settings": settings.to_dict(),
                    },
                )
                plot_study(report, staging / "convergence.png")
    except Interrupted as err:
        raise Interrupted(
            f"{err}; continue with: fem-anode convergence {args.config} --resume {args.out} (same options)"
        ) from None
    store.remove()
    logger.info("%s", format_table(report))
    logger.info("results in %s", args.out)
    return 0


def _detect_model(config: Path) -> str:
    """'phasefield' if the TOML has a phase-field-only section, else 'diffusion'."""
    from fem_anode.settings import read_toml

    data = read_toml(config)
    phasefield_only = {"cycling", "material", "model", "initial"} & set(data)
    geometry = data.get("geometry", {}) if isinstance(data.get("geometry"), dict) else {}
    mesh = data.get("mesh", {}) if isinstance(data.get("mesh"), dict) else {}
    if phasefield_only or {"radius", "surface", "phase"} & set(geometry) or "displacement_degree" in mesh:
        return "phasefield"
    return "diffusion"
