"""An exclusive lock on a run's output (``--out``), so that two runs cannot write into it at once.

The lock is a small JSON file next to the output, ``.NAME.lock`` (a sibling, because the output
directory itself is created only when the run succeeds), holding the owner's process id, host
name, process start time and command line. It is created atomically (a hard link of a complete
temporary file, or ``O_EXCL``), so exactly one of several concurrent runs gets it; the others
fail at once with a :class:`~fem_anode.errors.UsageError` naming the owner.

A lock left behind by a killed run (SIGKILL, a node failure, ``MPI_Abort``) is *stale*: its
process no longer exists on this host (or a different process now has its id, told apart by the
start time in ``/proc``). A stale lock is replaced with a warning. A lock from another host
cannot be checked and is respected; the message says which file to delete if that run is gone.

Under MPI the lock is rank 0's: rank 0 takes it and tells the other ranks whether it got it
(with a communicator), or the other ranks skip it (launched by ``mpirun`` before MPI is
initialised: their rank is read from the environment). The lock is released on every exit path
of the ``with`` block. Taking the same lock again in the same process nests (the CLI locks
``--out`` before the command runs; :func:`~fem_anode.io.output.output_directory` locks it again).

Before the lock is taken the output path is checked: a part of it that exists and is a file
gives a :class:`~fem_anode.errors.UsageError` (exit 2), a directory that cannot be created an
:class:`~fem_anode.errors.InputError` (exit 3), both naming the path.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import logging
import os
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fem_anode.errors import FemAnodeError, InputError, UsageError
from fem_anode.faults import share_error

if TYPE_CHECKING:
    from mpi4py import MPI

__all__ = ["output_lock", "lock_path", "check_output_path", "read_lock", "lock_is_stale"]

logger = logging.getLogger(__name__)

#: Locks this process holds: resolved lock path -> nesting depth. Process-wide by nature (a lock
#: belongs to a process), so a nested ``output_lock`` of the same path does not lock itself out.
_HELD: dict[str, int] = {}


def _named(out: str | Path) -> Path:
    """``out`` itself, or resolved when it has no name of its own (``.``, ``..``, ``dir/..``)."""
    out = Path(out)
    return out.resolve() if out.name in ("", ".", "..") or ".." in out.parts else out


def lock_path(out: str | Path) -> Path:
    """The lock file of output ``out``: ``.NAME.lock`` in the same folder."""
    out = _named(out)
    return out.parent / f".{out.name}.lock"


def check_output_path(out: str | Path, *, create_parent: bool = True) -> list[Path]:
    """Check that ``out`` can be written; create its missing parent folders.

    Returns the folders it created (outermost first), so that a caller can remove them again.

    Raises:
        UsageError: ``out`` is empty, or one of its parents exists and is not a directory.
        InputError: a parent folder cannot be created (permissions, read-only file system, ...).
    """
    if str(out) == "":
        raise UsageError("--out is empty; give a file or directory name")
    out = _named(out)
    if not out.name:
        raise UsageError(f"--out {out}: not a usable output name (the root folder)")
    missing: list[Path] = []
    parent = out.parent
    try:
        while not parent.exists():
            if parent.is_symlink():
                raise UsageError(f"--out {out}: {parent} is a broken symbolic link")
            missing.append(parent)
            if parent.parent == parent:
                break
            parent = parent.parent
        if parent.exists() and not parent.is_dir():
            raise UsageError(f"--out {out}: {parent} is a file, not a directory")
    except OSError as err:  # e.g. a name too long for the file system
        raise InputError(f"--out {out}: cannot use this path: {err.strerror or err}") from None
    created: list[Path] = []
    if create_parent:
        for folder in reversed(missing):
            try:
                folder.mkdir()
            except FileExistsError:
                if not folder.is_dir():
                    _remove_created(created)
                    raise UsageError(f"--out {out}: {folder} is a file, not a directory") from None
                continue
            except OSError as err:
                _remove_created(created)
                raise InputError(f"--out {out}: cannot create directory {folder}: {err.strerror or err}") from None
            created.append(folder)
    return created


def _remove_created(created: list[Path]) -> None:
    for folder in reversed(created):
        try:
            folder.rmdir()  # only if still empty
        except OSError:
            break


def _stat_fields(pid: int) -> list[str]:
    """The fields of ``/proc/<pid>/stat`` after the command name (empty if the process is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return []
    return stat[stat.rfind(")") + 2 :].split()


def _start_time(pid: int) -> str | None:
    """The start time of process ``pid`` (clock ticks since boot, from /proc), or ``None``."""
    fields = _stat_fields(pid)
    return fields[19] if len(fields) > 19 else None


def _process_state(pid: int) -> str | None:
    fields = _stat_fields(pid)
    return fields[0] if fields else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    except (OverflowError, ValueError):
        return False
    return _process_state(pid) not in ("Z", "X")  # a killed child not yet reaped is gone too


def read_lock(path: str | Path) -> dict[str, Any] | None:
    """The owner record of a lock file (``None`` if it does not exist or cannot be read)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def lock_is_stale(owner: dict[str, Any] | None) -> bool:
    """True if the run that wrote ``owner`` is certainly gone (same host, process not there or
    another process with its id); a lock from another host is never stale."""
    if owner is None:
        return False
    if owner.get("host") != socket.gethostname():
        return False
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return True
    if pid == os.getpid():
        return False
    if not _alive(pid):
        return True
    started = owner.get("start_time")
    return started is not None and _start_time(pid) not in (None, started)


def _owner_record() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "start_time": _start_time(os.getpid()),
        "created_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "argv": " ".join(sys.argv),
    }


def _describe(owner: dict[str, Any] | None) -> str:
    if owner is None:
        return "another run (its lock file is being written or unreadable)"
    started = f", started {owner['created_utc']}" if owner.get("created_utc") else ""
    return f"another fem-anode run (pid {owner.get('pid')} on {owner.get('host')}{started})"


def _try_create(path: Path, record: dict[str, Any]) -> bool:
    """Create ``path`` holding ``record`` atomically; False if it exists."""
    text = json.dumps(record, indent=1) + "\n"
    fd, tmp_name = tempfile.mkstemp(prefix=f"{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        try:
            os.link(tmp_name, path)  # atomic, and the lock is complete when it appears
            return True
        except FileExistsError:
            return False
        except OSError as err:
            if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV, errno.EMLINK, errno.EOPNOTSUPP):
                raise
        try:  # file systems without hard links
            fd2 = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd2, "w", encoding="utf-8") as f:
            f.write(text)
        return True
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)


def _acquire(out: Path) -> tuple[Path, list[Path]]:
    """Take the lock of ``out`` in this process; returns the lock file and the folders created."""
    created = check_output_path(out)
    path = lock_path(out)
    record = _owner_record()
    try:
        for _ in range(3):
            if _try_create(path, record):
                return path, created
            owner = read_lock(path)
            if owner is not None and lock_is_stale(owner):
                logger.warning(
                    "removing the stale lock %s of a run that no longer exists (pid %s on %s)",
                    path,
                    owner.get("pid"),
                    owner.get("host"),
                )
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                continue
            if owner is None and path.exists():
                # being written by a filesystem without hard links, or garbage: give it a moment
                import time

                time.sleep(0.2)
                owner = read_lock(path)
                if owner is None and path.exists():
                    _remove_created(created)
                    raise UsageError(
                        f"--out {out} is locked by {path}, which is not a valid lock file; delete it if no other run "
                        f"writes into {out}"
                    )
                continue
            if owner is None:
                continue  # released in the meantime: try again
            _remove_created(created)
            raise UsageError(
                f"--out {out} is in use by {_describe(owner)}; wait for it to finish or choose another --out "
                f"(if that run is gone, delete {path})"
            )
    except OSError as err:
        _remove_created(created)
        raise InputError(f"--out {out}: cannot create the lock file {path}: {err.strerror or err}") from None
    _remove_created(created)
    raise UsageError(f"--out {out}: could not take the lock {path} (it keeps changing owner)")


def _release(path: Path, created: list[Path]) -> None:
    owner = read_lock(path)
    if owner is not None and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    _remove_created(created)


def _launcher_rank() -> int:
    for var in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK"):
        if var in os.environ:
            try:
                return int(os.environ[var])
            except ValueError:
                return 0
    return 0


@contextlib.contextmanager
def output_lock(out: str | Path, comm: MPI.Comm | None = None) -> Iterator[Path]:
    """Hold the exclusive lock of output ``out`` (a file or directory) for the ``with`` block.

    Args:
        out: the run's output path.
        comm: MPI communicator; rank 0 takes the lock and broadcasts the outcome, so every rank
            raises the same error. Without one, a process launched as a rank other than 0
            (``OMPI_COMM_WORLD_RANK`` etc.) does not take it: the lock is rank 0's.

    Yields:
        The lock file's path (on every rank).

    Raises:
        UsageError: another live run holds the lock, or ``out`` lies below a file.
        InputError: the output's folder or the lock file cannot be created.
    """
    out = Path(out)
    path = lock_path(out)
    key = str(path.absolute())
    parallel = comm is not None and comm.size > 1
    rank = comm.rank if comm is not None else _launcher_rank()
    owner_rank = rank == 0
    nested = key in _HELD
    acquired: tuple[Path, list[Path]] | None = None
    error: FemAnodeError | None = None
    if owner_rank and not nested:
        try:
            acquired = _acquire(out)
        except FemAnodeError as err:
            error = err
    share_error(comm if parallel else None, error)
    if owner_rank:
        _HELD[key] = _HELD.get(key, 0) + 1
    try:
        yield path
    finally:
        if owner_rank:
            _HELD[key] -= 1
            if _HELD[key] == 0:
                del _HELD[key]
                if acquired is not None:
                    _release(*acquired)
