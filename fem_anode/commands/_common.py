"""Argument helpers shared by the subcommands (image input, output directory, provenance)."""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
from pathlib import Path
from typing import Any

from fem_anode import __version__
from fem_anode.io.images import VoxelImage, read_image

__all__ = ["add_config_arguments", "add_image_arguments", "add_out_argument", "is_root", "load_config", "load_image", "provenance", "world_comm"]


def add_image_arguments(parser: argparse.ArgumentParser, *, labels: bool = True) -> None:
    """``IMAGE``, ``--voxel-size`` (alias ``--pixel-size``) and, for label images, ``--phases``."""
    parser.add_argument(
        "image",
        metavar="IMAGE",
        type=Path,
        help="image file (.npy, .npz, .tif/.tiff, .png) or folder of numbered slices; 3D axes (z, y, x), z = 0 at the electrode surface",
    )
    parser.add_argument(
        "--voxel-size",
        "--pixel-size",
        dest="voxel_size",
        metavar="SIZE",
        help="voxel edge(s), one value or z,y,x: e.g. 20nm, 40nm,20nm,20nm, 0.65um, 1e-6 (metres); overrides the file's",
    )
    if labels:
        parser.add_argument(
            "--phases",
            metavar="MAP",
            help="phase map name=label,... e.g. pore=0,si=1,graphite=2,sei=3; overrides the file's",
        )


def add_out_argument(parser: argparse.ArgumentParser, default: str | None = None, what: str = "results") -> None:
    """``--out DIR`` (required unless a default is given)."""
    parser.add_argument(
        "--out",
        type=Path,
        required=default is None,
        default=None if default is None else Path(default),
        metavar="DIR",
        help=f"directory for the {what} (created; written only on success)" + (f"; default {default}" if default else ""),
    )


def load_image(args: argparse.Namespace, kind: str = "labels") -> VoxelImage:
    """Read ``args.image`` with the CLI's voxel size and phase overrides."""
    return read_image(args.image, voxel_size=args.voxel_size, phases=getattr(args, "phases", None), kind=kind)  # type: ignore[arg-type]


def provenance(command: str) -> dict[str, str]:
    """Who made a result: version, command line, time, Python (for every JSON written)."""
    return {
        "fem_anode_version": __version__,
        "command": command,
        "argv": " ".join(sys.argv),
        "created_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
    }


def world_comm() -> Any:
    """``MPI.COMM_WORLD`` if mpi4py is installed, else ``None`` (serial, e.g. imaging-only installs)."""
    try:
        from mpi4py import MPI
    except ImportError:
        return None
    return MPI.COMM_WORLD


def is_root(comm: Any) -> bool:
    """True on rank 0 (or without MPI): the rank that writes files and logs."""
    return comm is None or comm.rank == 0


def add_config_arguments(parser: argparse.ArgumentParser, default_out: str) -> None:
    """``CONFIG.toml`` (optional with ``--defaults``), ``--out DIR`` and ``--defaults``."""
    parser.add_argument("config", metavar="CONFIG.toml", type=Path, nargs="?", help="run configuration (TOML)")
    add_out_argument(parser, default=default_out)
    parser.add_argument("--defaults", action="store_true", help="print every setting with its default, unit and meaning, then exit")


def load_config(args: argparse.Namespace, settings_class: Any, command: str) -> Any:
    """The validated settings of ``args.config`` (paths relative to its folder).

    With ``--defaults`` prints the settings table and returns ``None``.
    """
    from fem_anode.errors import UsageError

    if getattr(args, "defaults", False):
        for key, default, unit, doc in settings_class.describe():
            print(f"{key:<32} {default!s:<26} {unit or '':<9} {doc}")
        return None
    if args.config is None:
        raise UsageError(f"give a CONFIG.toml (see fem-anode {command} --defaults)")
    return settings_class.from_toml(args.config).resolve_paths(args.config.parent)
