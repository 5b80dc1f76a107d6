"""Atomic output: results appear complete or not at all.

Every command writes into a staging directory next to ``--out`` and moves the files into place
only when it succeeded, so an error or an interrupt never leaves a half-written result.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from mpi4py import MPI

__all__ = ["atomic_path", "output_directory", "remove_stale_staging", "to_jsonable", "write_json", "write_text_atomic"]


def to_jsonable(value: Any) -> Any:
    """Convert NumPy scalars/arrays, paths and tuples to JSON types; non-finite floats become ``null``."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    return value


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the target's directory; rename it to ``path`` on success.

    The temporary name keeps the suffix, so writers that dispatch on it (gmsh, NumPy) work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write text to ``path`` via a temporary file and rename."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented JSON (NumPy types converted, NaN/inf as ``null``), atomically."""
    text = json.dumps(to_jsonable(data), indent=2, allow_nan=False)
    return write_text_atomic(path, text + "\n")


@contextlib.contextmanager
def output_directory(
    out: str | Path, comm: MPI.Comm | None = None, keep_on: tuple[type[BaseException], ...] = ()
) -> Iterator[Path]:
    """Stage a command's results and publish them in ``out`` only if the block succeeds.

    Yields a staging directory (a sibling of ``out``); on success its files are moved into
    ``out`` (created if needed; other files already in ``out`` are kept, same names replaced),
    on failure it is removed and ``out`` is untouched. With an MPI communicator, rank 0 owns
    the directory operations and every rank gets the same staging path.

    Args:
        out: the final directory.
        comm: MPI communicator (``None``: serial).
        keep_on: exception types after which the staged files are published all the same
            (the exception still propagates), e.g. :class:`~fem_anode.errors.Interrupted`
            for a run that wrote complete partial results before stopping. Every rank must
            raise one of them for the files to be published.

    Under MPI the ranks agree on success with :func:`fem_anode.faults.all_ranks_ok` on a
    duplicated communicator: a rank that failed alone (the others wait in another collective
    operation) gives up after a timeout and lets its exception reach the CLI, which aborts
    the job, instead of deadlocking here.

    The block holds the exclusive lock of ``out`` (:func:`fem_anode.io.lock.output_lock`; rank
    0's under MPI): a second run into the same ``out`` fails at once with a UsageError.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        from fem_anode.errors import UsageError

        raise UsageError(f"--out {out} exists and is not a directory")
    from fem_anode.io.lock import output_lock

    with output_lock(out, comm):  # nested (no-op) when the CLI holds it already
        yield from _staged(out, comm, keep_on)


def _staged(out: Path, comm: MPI.Comm | None, keep_on: tuple[type[BaseException], ...]) -> Iterator[Path]:
    rank = comm.rank if comm is not None else 0
    staging = None
    error = None
    if rank == 0:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            staging = tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent)
        except OSError as err:
            error = f"--out {out}: cannot create a folder in {out.parent}: {err.strerror or err}"
    sync = None
    if comm is not None and comm.size > 1:
        staging, error = comm.bcast((staging, error), root=0)
    if error is not None or staging is None:
        from fem_anode.errors import InputError

        raise InputError(error or f"--out {out}: no staging folder was made")
    if comm is not None and comm.size > 1:
        sync = comm.Dup()  # only for the final agreement, so it cannot match another collective
    staging_path = Path(staging)
    ok = False
    try:
        yield staging_path
        ok = True
    except keep_on:
        ok = True
        raise
    finally:
        agreed: bool | None = ok
        if sync is not None:
            from fem_anode.faults import all_ranks_ok

            agreed = all_ranks_ok(sync, ok)
        if agreed is not None:  # None: this rank failed alone; no collectives, the CLI aborts the job
            if rank == 0:
                if agreed:
                    _publish(staging_path, out)
                shutil.rmtree(staging_path, ignore_errors=True)
            if sync is not None and comm is not None:
                sync.Free()
                # Only after a success do the ranks wait for the published files. After a failure no
                # rank makes another collective call here, so a rank that gave up waiting (None) and
                # the others stay in step: the next collective call of the program matches on all.
                if agreed:
                    comm.barrier()
        if ok and agreed is False:  # this rank's block succeeded, another's did not
            from fem_anode.errors import FemAnodeError

            raise FemAnodeError(f"--out {out}: another MPI rank failed, so nothing was written")


def remove_stale_staging(staging: Path) -> None:
    """Delete a staging directory of :func:`output_directory` that a killed run left behind
    (a hidden ``.NAME.partial-*`` folder; anything else is left alone)."""
    if staging.name.startswith(".") and ".partial-" in staging.name and staging.is_dir():
        shutil.rmtree(staging, ignore_errors=True)


def _publish(staging: Path, out: Path) -> None:
    if not out.exists():
        os.replace(staging, out)
        return
    for entry in staging.iterdir():
        target = out / entry.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(entry, target)
