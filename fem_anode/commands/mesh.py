"""``fem-anode mesh``: a tagged gmsh mesh of a segmented image."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from fem_anode.commands._common import add_image_arguments, is_root, load_image, world_comm
from fem_anode.errors import UsageError

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction, name: str) -> None:
    parser = subparsers.add_parser(
        name,
        help="tagged gmsh mesh of a segmented image",
        description="Mesh the kept phases of a segmented image. Cell groups are named after the phases, "
        "facet groups 'a|b' for interfaces and left/right/top/bottom(/front/back) for the box sides.",
    )
    add_image_arguments(parser)
    parser.add_argument("--keep", metavar="PHASES", help="comma-separated phases to mesh (default: all); dropped phases become tagged boundaries")
    parser.add_argument("--method", choices=["voxel"], default="voxel", help="voxel: one quad/hex per pixel/voxel (default)")
    parser.add_argument("--out", type=Path, required=True, metavar="MESH.msh", help="output gmsh mesh file (.msh)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fem_anode.meshing.voxel import write_voxel_mesh

    if args.out.suffix != ".msh":
        raise UsageError(f"--out {args.out} must be a .msh file")
    keep = [k.strip() for k in args.keep.split(",") if k.strip()] if args.keep else None
    image = load_image(args, kind="labels")
    phases = image.require_phases()
    unknown = [name for name in keep or [] if name not in phases]
    if unknown:  # checked on every rank, so all ranks fail together under MPI
        raise UsageError(f"cannot keep phase(s) {', '.join(unknown)}: not in the phase map ({', '.join(phases)})")
    if is_root(world_comm()):
        data = write_voxel_mesh(image, args.out, keep)
        logger.info("wrote %s: %d cells, %d facets, groups: %s", args.out, len(data.cells), len(data.facets), ", ".join(data.groups))
    return 0

