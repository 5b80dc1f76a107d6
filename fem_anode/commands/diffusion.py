"""``fem-anode diffusion``: transient Li diffusion with mass-transfer boundaries (Vorauer et al. 2020).

The run is :func:`~fem_anode.fem.diffusion.run.run_diffusion`: the solve of
:func:`fem_anode.solve_diffusion` (:func:`~fem_anode.fem.diffusion.run.simulate_diffusion`) and
:meth:`~fem_anode.fem.diffusion.run.DiffusionRun.save` into the output directory.
"""

from __future__ import annotations

import argparse
import logging

from fem_anode.commands._common import (
    add_config_arguments,
    add_render_argument,
    add_resume_argument,
    load_resumable_config,
    run_checkpointed,
)

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction, name: str) -> None:
    parser = subparsers.add_parser(
        name,
        help="transient Li diffusion in the SEI/C/B domain with pore mass-transfer boundaries",
        description="Solve eps dc/dt = div(eps^b D grad c) on the transporting phase of a segmented image "
        "(or a tagged mesh) with inflow k_f (c_bulk - c) at pore interfaces. Writes DIR/results.json, "
        "DIR/c.bp (VTX for ParaView), the mesh (DIR/mesh.xdmf for voxel meshes, DIR/mesh.msh for smooth ones) and "
        "PNG figures. See --defaults for every setting.",
    )
    add_config_arguments(parser, default_out="diffusion_results")
    add_resume_argument(parser, "diffusion")
    add_render_argument(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fem_anode.fem.diffusion.settings import DiffusionSettings

    settings, checkpoint = load_resumable_config(args, DiffusionSettings, "diffusion", "diffusion_results")
    if settings is None:
        print("[[regions]]: name, box = [x0, y0, x1, y1] (m), repeated per region")
        return 0
    from fem_anode.fem.diffusion.run import run_diffusion

    results = run_checkpointed(
        args,
        settings,
        "diffusion",
        checkpoint,
        lambda staging, comm: run_diffusion(
            settings,
            staging,
            comm,
            checkpoint_dir=args.out,
            resume=checkpoint,
            render=args.render,
            memory_check=not getattr(args, "no_memory_check", False),
        ),
    )
    for name, t90 in results["t90_s"].items():
        logger.info("t90 %-8s %s", name, "not reached" if t90 is None else f"{t90:.4g} s")
    logger.info("results in %s", args.out)
    return 0
