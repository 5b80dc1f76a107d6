"""Argument helpers shared by the subcommands (image input, output directory, provenance)."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fem_anode import __version__
from fem_anode.io.images import ImageKind, VoxelImage, read_image

if TYPE_CHECKING:
    from mpi4py import MPI

__all__ = [
    "add_config_arguments",
    "add_image_arguments",
    "add_out_argument",
    "add_render_argument",
    "add_resume_argument",
    "check_int",
    "check_number",
    "is_root",
    "load_config",
    "load_image",
    "load_resumable_config",
    "provenance",
    "run_checkpointed",
    "world_comm",
]

#: The largest seed or count a command accepts: what a TOML file (int64) can hold again.
INT64_MAX = 2**63 - 1


def check_int(value: int, option: str, low: int, high: int = INT64_MAX, hint: str = "") -> int:
    """An integer option within ``[low, high]`` (UsageError naming the option otherwise)."""
    from fem_anode.errors import UsageError

    if value < low:
        wanted = "positive" if low == 1 else "a non-negative integer" if low == 0 else f">= {low}"
        raise UsageError(f"{option} must be {wanted}, got {value}")
    if value > high:
        raise UsageError(f"{option} must be at most {high}{hint}, got {value if value < 10**20 else f'{value:.3g}'}")
    return value


def check_number(
    value: float,
    option: str,
    low: float | None = None,
    high: float | None = None,
    *,
    unit: str | None = None,
    low_open: bool = False,
) -> float:
    """A finite number option within ``[low, high]`` (or ``(low, high]`` with ``low_open``) and the
    numerical limits of :mod:`fem_anode.units` (UsageError naming the option otherwise)."""
    import math

    from fem_anode.errors import UsageError
    from fem_anode.units import check_value

    if not math.isfinite(value):
        raise UsageError(f"{option} must be a finite number, got {value}")
    if low is not None and (value < low or (low_open and value == low)):
        raise UsageError(f"{option} must be {'>' if low_open else '>='} {low:g}, got {value:g}")
    if high is not None and value > high:
        raise UsageError(f"{option} must be at most {high:g}, got {value:g}")
    return float(check_value(value, unit, option))


def add_image_arguments(parser: argparse.ArgumentParser, *, labels: bool = True) -> None:
    """``IMAGE``, ``--voxel-size`` (alias ``--pixel-size``) and, for label images, ``--phases``."""
    parser.add_argument(
        "image",
        metavar="IMAGE",
        type=Path,
        help="image file (.npy, .npz, .tif/.tiff, .png) or folder of numbered slices; 3D axes (z, y, x), z = 0 at "
        "the electrode surface",
    )
    parser.add_argument(
        "--voxel-size",
        "--pixel-size",
        dest="voxel_size",
        metavar="SIZE",
        help="voxel edge(s), one value or z,y,x: e.g. 20nm, 40nm,20nm,20nm, 0.65um, 1e-6 (metres); overrides the "
        "file's",
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
        help=f"directory for the {what} (created; written only on success)"
        + (f"; default {default}" if default else ""),
    )


def add_render_argument(parser: argparse.ArgumentParser) -> None:
    """``--no-render`` (``args.render``, default True): skip the pyvista 3D figures
    (:mod:`fem_anode.io.render3d`)."""
    parser.add_argument(
        "--no-render",
        dest="render",
        action="store_false",
        help="do not render the 3D figures (pyvista; also FEM_ANODE_NO_RENDER=1). Where no display or rendering "
        "backend can be made they are skipped with a warning",
    )


def load_image(args: argparse.Namespace, kind: ImageKind = "labels") -> VoxelImage:
    """Read ``args.image`` with the CLI's voxel size and phase overrides."""
    return read_image(args.image, voxel_size=args.voxel_size, phases=getattr(args, "phases", None), kind=kind)


def _versions() -> dict[str, str]:
    """Versions of the libraries this process has loaded (nothing is imported to ask)."""
    versions = {"python": platform.python_version()}
    for name, module in (
        ("numpy", "numpy"),
        ("scipy", "scipy"),
        ("scikit-image", "skimage"),
        ("gmsh", "gmsh"),
        ("dolfinx", "dolfinx"),
        ("basix", "basix"),
        ("ufl", "ufl"),
        ("petsc4py", "petsc4py"),
        ("mpi4py", "mpi4py"),
    ):
        mod = sys.modules.get(module)
        if mod is not None:
            version = getattr(mod, "__version__", None) or getattr(mod, "__version", None)
            if version is not None:
                versions[name] = str(version)
    petsc = sys.modules.get("petsc4py.PETSc")
    if petsc is not None:
        with contextlib.suppress(Exception):  # a version query must never break a run
            versions["petsc"] = ".".join(str(v) for v in petsc.Sys.getVersion())
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None:
        try:
            versions["mpi_library"] = mpi.Get_library_version().replace("\x00", "").strip().splitlines()[0]
            versions["mpi_standard"] = "{}.{}".format(*mpi.Get_version())
        except Exception:  # pragma: no cover
            pass
    return versions


def _ranks(comm: MPI.Comm | None) -> int:
    if comm is not None:
        return int(comm.size)
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        return int(mpi.COMM_WORLD.Get_size())
    for var in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"):
        if var in os.environ:
            return int(os.environ[var])
    return 1


def _find_seeds(config: Any, prefix: str = "") -> dict[str, Any]:
    """Every ``*seed*`` value of a nested settings dict, by dotted key."""
    seeds: dict[str, Any] = {}
    if isinstance(config, dict):
        for key, value in config.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            if "seed" in str(key).lower() and not isinstance(value, (dict, list)):
                if value is not None:
                    seeds[path] = value
            else:
                seeds.update(_find_seeds(value, path))
    elif isinstance(config, list):
        for i, item in enumerate(config):
            seeds.update(_find_seeds(item, f"{prefix}[{i}]"))
    return seeds


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed command-line options with their defaults (no callables), JSON-ready."""
    return {
        key: str(value) if isinstance(value, Path) else value
        for key, value in vars(args).items()
        if not callable(value)
    }


def provenance(
    command: str,
    settings: Any = None,
    *,
    comm: MPI.Comm | None = None,
    args: argparse.Namespace | None = None,
    seed: int | None = None,
) -> dict[str, Any]:
    """Everything needed to reproduce a result, for every JSON a command writes.

    Records the package and library versions (only of libraries already loaded, so dolfinx,
    PETSc and MPI appear for the commands that use them), the command line, the time, the
    number of MPI ranks, the full resolved configuration (settings and/or the parsed options
    with their defaults) and the seed(s).

    Args:
        command: subcommand name, e.g. ``"diffusion"`` or ``"detachment fit"``.
        settings: the resolved settings object (anything with ``to_dict()``) or a dict.
        comm: the run's MPI communicator (default: COMM_WORLD if MPI is initialised).
        args: the parsed command-line arguments.
        seed: a seed given outside the settings (e.g. ``demo --seed``).
    """
    record: dict[str, Any] = {
        "fem_anode_version": __version__,
        "command": command,
        "argv": " ".join(sys.argv),
        "created_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": _versions(),
        "ranks": _ranks(comm),
    }
    config: dict[str, Any] = {}
    if settings is not None:
        config["settings"] = settings.to_dict() if hasattr(settings, "to_dict") else dict(settings)
    if args is not None:
        config["options"] = _options(args)
    if config:
        record["configuration"] = config
    seeds = _find_seeds(config)
    if seed is not None:
        seeds["seed"] = seed
    record["seeds"] = seeds
    return record


def world_comm() -> MPI.Comm | None:
    """``MPI.COMM_WORLD`` if mpi4py is installed, else ``None`` (serial, e.g. imaging-only installs).

    Also the fault-injection point ``comm`` of :mod:`fem_anode.faults` (tests only).
    """
    from fem_anode.faults import fault_point

    try:
        from mpi4py import MPI
    except ImportError:
        fault_point("comm")
        return None
    fault_point("comm", MPI.COMM_WORLD.rank)
    return MPI.COMM_WORLD


def require_comm(comm: MPI.Comm | None, what: str) -> MPI.Comm:
    """``comm``; a UsageError naming ``what`` if there is none (mpi4py is not installed)."""
    if comm is None:
        from fem_anode.errors import UsageError

        raise UsageError(f"{what} needs mpi4py (installed with the FEniCSx stack; see the README)")
    return comm


def is_root(comm: MPI.Comm | None) -> bool:
    """True on rank 0 (or without MPI): the rank that writes files and logs."""
    return comm is None or comm.rank == 0


def add_config_arguments(parser: argparse.ArgumentParser, default_out: str) -> None:
    """``CONFIG.toml`` (optional with ``--defaults``), ``--out DIR`` and ``--defaults``."""
    parser.add_argument("config", metavar="CONFIG.toml", type=Path, nargs="?", help="run configuration (TOML)")
    add_out_argument(parser, default=default_out)
    parser.add_argument(
        "--defaults", action="store_true", help="print every setting with its default, unit and meaning, then exit"
    )


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


def add_resume_argument(parser: argparse.ArgumentParser, command: str, keep: str = "[solver] and [checkpoint]") -> None:
    """``--resume DIR`` of the commands that write checkpoints (see docs/checkpointing.md)."""
    parser.add_argument(
        "--resume",
        type=Path,
        metavar="DIR",
        help="continue the interrupted, failed or killed run whose checkpoint is in DIR/checkpoint (results go to "
        f"--out, default DIR; CONFIG is optional and must match the checkpoint's except {keep}). Checkpoints "
        "are written as set in [checkpoint] and on SIGINT/SIGTERM/SIGUSR1, which stop the run after the current step "
        "with partial results (exit 130; under mpirun send SIGUSR1 to mpirun). See docs/checkpointing.md",
    )
    parser.set_defaults(out=None)


def load_resumable_config(
    args: argparse.Namespace, settings_class: Any, command: str, default_out: str
) -> tuple[Any, Any]:
    """``(settings, checkpoint)`` of a run that may resume: the checkpoint of ``--resume DIR``
    (or ``None``) and the settings of ``CONFIG`` or, without one, those stored in the checkpoint.
    Sets ``args.out`` (default: the resumed directory). ``settings`` is ``None`` for ``--defaults``."""
    import tomllib

    from fem_anode.errors import InputError

    args.out = args.out or args.resume or Path(default_out)
    checkpoint = None
    if args.resume and not args.defaults:
        from fem_anode.io.checkpoint import CheckpointStore

        checkpoint = CheckpointStore(args.resume, world_comm()).load()
    if checkpoint is None or args.config is not None:
        return load_config(args, settings_class, command), checkpoint
    meta = checkpoint.state.get("meta", {})
    if meta.get("model") != command or "settings_toml" not in meta:
        raise InputError(f"{checkpoint.path} is not a checkpoint of a {command} run")
    return settings_class.from_dict(tomllib.loads(meta["settings_toml"])), checkpoint


def run_checkpointed(args: argparse.Namespace, settings: Any, command: str, checkpoint: Any, solve: Any) -> Any:
    """Run ``solve(staging, comm)`` into ``args.out`` with checkpoints in ``args.out``.

    Refuses a directory holding another run's checkpoint (unless resuming), writes
    ``config.toml`` and ``provenance.json`` first (interrupted and failed runs keep them with their
    partial results), publishes the partial results of a stop or failure, tells how to resume
    after a stop, and removes the checkpoint after success.
    """
    from fem_anode.errors import Interrupted, SolverError, UsageError
    from fem_anode.io.checkpoint import CheckpointStore
    from fem_anode.io.output import output_directory, write_json

    comm = world_comm()
    store = CheckpointStore(args.out, comm)
    if checkpoint is None and store.exists():
        raise UsageError(
            f"{args.out} holds the checkpoint of an unfinished run: add --resume {args.out} to continue it, or remove "
            f"{store.path}"
        )
    try:
        with output_directory(args.out, comm, keep_on=(Interrupted, SolverError)) as staging:
            if is_root(comm):
                settings.to_toml(staging / "config.toml")
                write_json(staging / "provenance.json", provenance(command, settings, comm=comm, args=args))
            results = solve(staging, comm)
    except Interrupted as err:
        raise Interrupted(
            f"{err}; checkpoint and partial results in {args.out}; continue with: fem-anode {command} --resume "
            f"{args.out}"
        ) from None
    store.remove()
    return results
