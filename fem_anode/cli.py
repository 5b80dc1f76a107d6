"""The ``fem-anode`` command line: subcommands, logging and error handling.

Conventions shared by every subcommand:

* inputs and outputs are files; results go to ``--out DIR`` (created if needed), staged in a
  temporary sibling and moved into place only on success, so nothing is ever half-written;
* numbers are written to ``DIR/*.json`` in SI units, figures as PNG;
* lengths accept unit suffixes (``20nm``, ``0.65um``; a bare number is metres);
* errors print one line ``fem-anode <cmd>: error: ...`` and exit with 2 (usage), 3 (input),
  4 (solver) or 1 (other); ``--debug`` shows the traceback instead;
* meshes and solves whose estimated memory exceeds the available memory are refused before
  they start (exit 3, see :mod:`fem_anode.resources`); ``--no-memory-check`` skips that.

Any subcommand runs under MPI as ``mpirun -n 4 fem-anode <cmd> ...``; only rank 0 logs. When a
command fails on any rank of a multi-rank run, that rank prints its one-line message and calls
``MPI_Abort`` so every rank stops, instead of the others waiting forever in the next collective
operation (only when MPI is already initialised, and only when running as the program, not
when :func:`main` is called with an explicit ``argv`` from Python).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
import time
import traceback
from collections.abc import Sequence

from fem_anode import __version__
from fem_anode.errors import EXIT_CODES, FemAnodeError, Interrupted

__all__ = ["main", "build_parser", "SUBCOMMANDS"]

logger = logging.getLogger("fem_anode")

#: Subcommand name -> module in fem_anode.commands that defines ``register(subparsers)``.
SUBCOMMANDS: dict[str, str] = {
    "demo": "demo",
    "segment": "segment",
    "metrics": "metrics",
    "mesh": "mesh",
    "diffusion": "diffusion",
    "phasefield": "phasefield",
    "detachment": "detachment",
    "convergence": "convergence",
}


def mpi_rank() -> int:
    """This process's MPI rank from the launcher's environment (0 when not under MPI)."""
    for var in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (subcommand modules are imported, their heavy deps are not)."""
    parser = argparse.ArgumentParser(
        prog="fem-anode",
        description="Image-based modelling of aged Si-based Li-ion anodes: image metrics, meshes, "
        "Li diffusion, chemo-mechanical phase field and particle detachment.",
        epilog="Run any subcommand under MPI with: mpirun -n 4 fem-anode <subcommand> ...",
    )
    parser.add_argument("--version", action="version", version=f"fem-anode {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks on errors")
    parser.add_argument(
        "--no-memory-check",
        action="store_true",
        help="do not refuse meshes/solves whose estimated memory exceeds the available memory",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="<subcommand>", required=True)
    for name, module in SUBCOMMANDS.items():
        importlib.import_module(f"fem_anode.commands.{module}").register(subparsers, name)
    for sub in subparsers.choices.values():  # logging options also after the subcommand
        group = sub.add_argument_group("output options")
        group.add_argument(
            "-v", "--verbose", action="count", default=argparse.SUPPRESS, help="more log output (-vv for debug)"
        )
        group.add_argument(
            "-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="only warnings and errors"
        )
        group.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help="show Python tracebacks on errors"
        )
        group.add_argument(
            "--no-memory-check",
            action="store_true",
            default=argparse.SUPPRESS,
            help="do not refuse meshes/solves whose estimated memory exceeds the available memory",
        )
    return parser


def _configure_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose >= 2 else logging.INFO
    if mpi_rank() != 0:
        level = max(level, logging.WARNING)
    handler = logging.StreamHandler(sys.stderr)
    prefix = f"[rank {mpi_rank()}] " if mpi_rank() else ""
    handler.setFormatter(
        logging.Formatter(f"{prefix}%(message)s" if verbose < 2 else f"{prefix}%(levelname)s %(name)s: %(message)s")
    )
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False


#: how long a rank other than 0 waits before it reports an error and aborts all ranks (s): an error
#: that every rank meets (bad input) is then reported once, by rank 0, whose abort ends the others
ABORT_GRACE_S = 0.5


def _abort_all_ranks(code: int) -> None:
    """``MPI_Abort`` on COMM_WORLD if MPI is initialised with more than one rank; else return.

    mpi4py is not imported here: imaging-only commands run without it, and a process that
    never initialised MPI simply exits (the launcher then stops the other ranks).
    """
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is None:
        return
    try:
        if not mpi.Is_initialized() or mpi.Is_finalized() or mpi.COMM_WORLD.Get_size() <= 1:
            return
    except Exception:  # pragma: no cover - a broken MPI state: nothing better to do
        return
    sys.stdout.flush()
    sys.stderr.flush()
    mpi.COMM_WORLD.Abort(code)


def _lock_output(args: argparse.Namespace) -> contextlib.AbstractContextManager[object]:
    """The exclusive lock of ``--out`` for the whole command (:mod:`fem_anode.io.lock`), or a
    no-op when the command has no ``--out`` yet (``--resume`` picks it later; the output directory
    locks it then) or writes nothing (``--defaults``). Under MPI the lock is rank 0's."""
    from pathlib import Path

    out = getattr(args, "out", None)
    if not isinstance(out, Path) or getattr(args, "defaults", False):
        return contextlib.nullcontext()
    from fem_anode.io.lock import output_lock

    comm = None
    mpi = sys.modules.get("mpi4py.MPI")  # only if already initialised: not imported here
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized() and mpi.COMM_WORLD.Get_size() > 1:
        comm = mpi.COMM_WORLD
    return output_lock(out, comm)


def main(argv: Sequence[str] | None = None, *, abort_on_error: bool | None = None) -> int:
    """Entry point of ``fem-anode``; returns the exit code.

    Args:
        argv: arguments (default ``sys.argv[1:]``).
        abort_on_error: on an error in a multi-rank MPI run, call ``MPI_Abort`` after the
            message so that no other rank hangs. Default: only when ``argv`` is ``None``
            (running as the program; a Python caller such as a test suite keeps control).
    """
    abort = argv is None if abort_on_error is None else abort_on_error
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose, args.quiet)
    where = f"fem-anode {args.command}"
    rank_note = f" (rank {mpi_rank()})" if mpi_rank() else ""
    from fem_anode.resources import memory_checks

    def fail(message: str, code: int) -> int:
        if abort and mpi_rank():
            time.sleep(ABORT_GRACE_S)  # rank 0 reports an error they share (see ABORT_GRACE_S)
        if args.debug:
            traceback.print_exc()
        else:
            print(message, file=sys.stderr)
        if abort:
            _abort_all_ranks(code)
        return code

    try:
        with memory_checks(not args.no_memory_check), _lock_output(args):
            return int(args.func(args) or 0)
    except Interrupted as err:  # a safe stop on SIGINT/SIGTERM, on every rank: no abort
        print(f"{where}: interrupted{rank_note}: {err}", file=sys.stderr)
        return err.exit_code
    except FemAnodeError as err:
        if args.debug and not abort:
            raise
        return fail(f"{where}: error{rank_note}: {err}", err.exit_code)
    except BrokenPipeError:  # output piped into e.g. `head`: stop quietly, like other CLI tools
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(f"{where}: interrupted{rank_note}", file=sys.stderr)
        return EXIT_CODES["interrupted"]
    except MemoryError:
        if args.debug and not abort:
            raise
        return fail(f"{where}: error{rank_note}: out of memory; use a smaller image or more ranks", EXIT_CODES["error"])
    except Exception as err:  # last resort: one line, not a traceback from deep inside a library
        if args.debug and not abort:
            raise
        return fail(
            f"{where}: internal error{rank_note}: {type(err).__name__}: {err}\n"
            f"  (this is a bug in fem_anode; rerun with --debug for the traceback and report it)",
            EXIT_CODES["error"],
        )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
