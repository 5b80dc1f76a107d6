"""C libraries of the package compiled on first use and cached (``voxel_sweeps.c``, ``cell_assembly.c``,
``phasefield/mumps_single.c``).

Each is compiled with the system's compiler into ``$FEM_ANODE_CACHE_DIR`` (default
``$XDG_CACHE_HOME/fem_anode`` or ``~/.cache/fem_anode``) under a name keyed by the source, the
compiler, the flags and the machine, so an edited source or another compiler gives a new file.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from mpi4py import MPI

__all__ = ["LOAD_ERRORS", "CompileError", "cache_dir", "compiled_library", "load_collectively"]


class CompileError(RuntimeError):
    """A library could not be compiled or loaded (the message says why)."""


#: what a loader may raise on one rank (a missing symbol: AttributeError)
LOAD_ERRORS = (CompileError, OSError, AttributeError)


def cache_dir() -> Path:
    """Where the compiled libraries are kept."""
    explicit = os.environ.get("FEM_ANODE_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fem_anode"


def compiled_library(source: Path, compiler: str, flags: Sequence[str], libraries: Sequence[str] = ()) -> ctypes.CDLL:
    """Load ``source`` compiled as a shared library, compiling it into the cache first if needed
    (atomically: a temporary file, then a rename, so concurrent first uses are safe).

    Raises:
        CompileError: no compiler, a failed compilation, an unwritable cache or an unloadable file.
    """
    text = source.read_bytes()
    key = hashlib.sha256(text + repr((compiler, tuple(flags), tuple(libraries), platform.machine())).encode())
    target = cache_dir() / f"{source.stem}-{key.hexdigest()[:16]}.so"
    if not target.exists():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            handle, scratch = tempfile.mkstemp(suffix=".so", dir=target.parent)
            os.close(handle)
        except OSError as exc:
            raise CompileError(f"cannot compile {source.name}: {exc}") from exc
        try:
            done = subprocess.run(
                [compiler, *flags, str(source), "-o", scratch, *libraries], capture_output=True, text=True, timeout=120
            )
            if done.returncode != 0:
                raise CompileError(f"{compiler} failed on {source.name}: {done.stderr.strip()[:400]}")
            os.replace(scratch, target)
        except (OSError, subprocess.SubprocessError) as exc:  # no compiler, or it hung
            raise CompileError(f"cannot compile {source.name}: {exc}") from exc
        finally:
            if os.path.exists(scratch):
                os.unlink(scratch)
    try:
        return ctypes.CDLL(str(target))
    except OSError as exc:
        raise CompileError(f"cannot load {target}: {exc}") from exc


def load_collectively(comm: MPI.Comm, load: Callable[[], ctypes.CDLL]) -> ctypes.CDLL:
    """``load()`` on every rank of ``comm`` (collective): rank 0 first, so that it compiles into
    the cache, then the others (which compile their own where the cache is not shared).

    Raises:
        CompileError: on every rank, if any rank could not load the library.
    """
    library: ctypes.CDLL | None = None
    error = ""
    if comm.rank == 0:
        try:
            library = load()
        except LOAD_ERRORS as exc:  # every rank must reach the collectives below
            error = str(exc)
    error = comm.bcast(error, root=0)
    if comm.rank != 0 and not error:
        try:
            library = load()
        except LOAD_ERRORS as exc:
            error = str(exc)
    errors = [e for e in comm.allgather(error) if e]
    if errors:
        raise CompileError(errors[0])
    assert library is not None
    return library
