"""``fem-anode mesh``: a tagged mesh of a segmented image (+ quality report), as gmsh ``.msh`` or,
through meshio, ``.vtu``, ``.xdmf``, ``.inp`` (Abaqus) or ``.med`` (by the suffix of ``--out``)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from fem_anode.commands._common import (
    add_image_arguments,
    check_int,
    check_number,
    is_root,
    load_image,
    provenance,
    require_comm,
    world_comm,
)
from fem_anode.errors import UsageError
from fem_anode.faults import share_error

logger = logging.getLogger(__name__)

EXAMPLES = """examples:
  fem-anode mesh roi.npy --pixel-size 20nm --phases pore=0,si=1,sei=3 --keep sei --size 40nm --out roi_sei.msh
  fem-anode mesh roi.npy --pixel-size 20nm --phases pore=0,si=1,sei=3 --order 2 --xdmf --out roi.msh
  fem-anode mesh volume.tif --voxel-size 0.65um --phases pore=0,si=1,graphite=2,sei=3 --method tet --out vol.msh
  fem-anode mesh roi.npy --pixel-size 20nm --phases pore=0,si=1,sei=3 --order 2 --out roi.inp   # Abaqus
  fem-anode mesh roi.npy --pixel-size 20nm --phases pore=0,si=1,sei=3 --out roi.vtu             # ParaView

formats (by the suffix of --out): .msh gmsh 4.1 (physical groups); .vtu, .xdmf (+ .h5): cell data 'tag' on
cells and facets; .inp Abaqus: element set per phase, node set per interface/box side ('pore|sei' -> pore_sei);
.med: one element family per group. Tag numbers: phase 100 + label, interface 10000 + 256 min + max, box sides 1-6.
"""


#: Most triangles a ``--size`` may ask for (the mesh is written by one process with gmsh).
_MAX_ELEMENTS = 5e7


def _ratio(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1], got {text}")
    return value


def _nonneg(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _length_or_zero(text: str | None) -> float | None:
    """Length in metres (units allowed); ``"0"`` gives 0 (feature off); ``None`` stays ``None``."""
    from fem_anode.units import parse_length

    if text is None:
        return None
    try:
        if float(text) == 0:
            return 0.0
    except ValueError:
        pass
    return parse_length(text)


def register(subparsers: argparse._SubParsersAction, name: str) -> None:
    parser = subparsers.add_parser(
        name,
        help="tagged gmsh mesh of a segmented image",
        description="Mesh the kept phases of a segmented image. Cell groups are named after the phases, "
        "facet groups 'a|b' for interfaces and left/right/top/bottom(/front/back) for the box sides. "
        "Coordinates are in metres. A quality report (element counts, angles, phase areas/volumes vs the "
        "image) is written next to the mesh as MESH.quality.json.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_image_arguments(parser)
    parser.add_argument(
        "--keep",
        metavar="PHASES",
        help="comma-separated phases to mesh (default: all); dropped phases become tagged boundaries",
    )
    parser.add_argument(
        "--method",
        choices=["smooth", "voxel", "tet"],
        default=None,
        help="smooth: sub-pixel smooth interfaces, triangles (2D default); voxel: one quad/hex per pixel/voxel "
        "(3D default); tet: six tetrahedra per voxel (3D)",
    )
    parser.add_argument("--size", metavar="H", help="global element size (smooth), e.g. 40nm (default: 4 pixels)")
    parser.add_argument(
        "--order", type=int, choices=[1, 2], default=1, help="element order; 2 gives curved quadratic elements"
    )
    smooth = parser.add_argument_group("smooth method")
    smooth.add_argument(
        "--interface-ratio",
        type=_ratio,
        default=0.5,
        metavar="R",
        help="size at interfaces / H (default 0.5; 1 = no refinement)",
    )
    smooth.add_argument(
        "--refine-distance", metavar="LENGTH", help="distance over which the size grows back to H (default 10 pixels)"
    )
    smooth.add_argument(
        "--gap-width",
        metavar="LENGTH",
        help="refine parts of a phase narrower than this in proportion to their width (default 10 pixels; 0 = off)",
    )
    smooth.add_argument(
        "--min-island",
        type=int,
        default=0,
        metavar="PIXELS",
        help="merge regions with fewer pixels into their surroundings (default 0: keep all)",
    )
    smooth.add_argument(
        "--tolerance",
        type=_nonneg,
        default=0.1,
        metavar="PIXELS",
        help="curve simplification tolerance in pixels (default 0.1)",
    )
    smooth.add_argument(
        "--sigma",
        type=_nonneg,
        default=1.0,
        metavar="PIXELS",
        help="smoothing of the phase indicators for sub-pixel boundaries (default 1; 0 = marching squares)",
    )
    parser.add_argument(
        "--xdmf",
        action="store_true",
        help=(
            "with a .msh --out: also write MESH.xdmf (+ .h5) with cell and facet tags as dolfinx reads them (needs "
            "dolfinx)"
        ),
    )
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="MESH",
        help="output mesh file; the suffix picks the format: .msh (gmsh 4.1), .vtu, .xdmf, .inp (Abaqus), .med",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fem_anode.meshing.build import mesh_image
    from fem_anode.meshing.export import check_format
    from fem_anode.meshing.smooth2d import SmoothMeshOptions
    from fem_anode.units import parse_length

    suffix = check_format(args.out)
    if args.xdmf and suffix != ".msh":
        raise UsageError(
            f"--xdmf writes the dolfinx XDMF of a .msh mesh; --out {args.out} already picks the format (drop --xdmf)"
        )
    keep = [k.strip() for k in args.keep.split(",") if k.strip()] if args.keep else None
    if args.keep is not None and not keep:
        raise UsageError("--keep is empty; name at least one phase")
    if args.min_island < 0:
        raise UsageError(f"--min-island must be >= 0, got {args.min_island}")
    check_int(args.min_island, "--min-island", 0)
    check_number(args.tolerance, "--tolerance", 0.0, unit=None)
    check_number(args.sigma, "--sigma", 0.0, unit=None)
    image = load_image(args, kind="labels")
    method = args.method or ("smooth" if image.ndim == 2 else "voxel")
    if method == "smooth":
        largest = max(image.shape)
        check_number(
            args.sigma, "--sigma", 0.0, float(largest)
        )  # pixels: wider smoothing than the image only costs time
        check_number(args.tolerance, "--tolerance", 0.0, float(largest))
        if args.size:
            pixel = min(image.require_voxel_size())
            size = parse_length(args.size)
            extent = image.extent
            elements = 2.0 * extent[0] * extent[-1] / size**2
            if elements > _MAX_ELEMENTS:
                raise UsageError(
                    f"--size {args.size} would give about {elements:.3g} triangles on this {extent[-1]:.3g} m x "
                    f"{extent[0]:.3g} m image (more than {_MAX_ELEMENTS:.0e}); use an element size of at least "
                    f"{size * (elements / _MAX_ELEMENTS) ** 0.5:.3g} m (the pixel is {pixel:.3g} m)"
                )
        options = SmoothMeshOptions(
            size=parse_length(args.size) if args.size else None,
            order=args.order,
            interface_ratio=args.interface_ratio,
            refine_distance=_length_or_zero(args.refine_distance),
            gap_width=_length_or_zero(args.gap_width),
            min_island_pixels=args.min_island,
            tolerance=args.tolerance,
            sigma=args.sigma,
        )
    else:
        if args.size:
            raise UsageError(
                f"--size applies to --method smooth only; {method} meshes have one cell (or six tetrahedra) per voxel"
            )
        options = None
    comm = world_comm()
    quality_path = args.out.with_name(args.out.stem + ".quality.json")
    error: BaseException | None = None
    if is_root(comm):
        try:
            result = mesh_image(image, args.out, method=method, keep=keep, options=options, order=args.order)
            q = result.quality
            from fem_anode.io.output import write_json

            write_json(quality_path, {"provenance": provenance("mesh", comm=comm, args=args), **q})
            logger.info(
                "wrote %s (%d cells, %d nodes) and %s; groups: %s",
                args.out,
                q["cells"],
                q["nodes"],
                quality_path.name,
                ", ".join(result.groups),
            )
        except Exception as err:  # raised on every rank below: no rank is left waiting
            error = err
    share_error(comm, error)
    if args.xdmf:
        from fem_anode.fem.mesh_io import read_mesh, write_xdmf

        tagged = read_mesh(args.out, require_comm(comm, "--xdmf"))
        xdmf = write_xdmf(tagged, args.out.with_suffix(".xdmf"))
        if is_root(comm):
            logger.info("wrote %s", xdmf)
    return 0
