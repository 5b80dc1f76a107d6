"""C libraries of the package compiled on first use and cached (``voxel_sweeps.c``, ``cell_assembly.c``,
``phasefield/mumps_single.c``).

Each is compiled with the system's compiler into ``$FEM_ANODE_CACHE_DIR`` (default
``$XDG_CACHE_HOME/fem_anode`` or ``~/.cache/fem_anode``) under a name keyed by the source, the
compiler, the flags and the machine, so an edited source or another compiler gives a new file.

Kernels that ask for it (``native=True``) are compiled for the processor they run on
(``-march=native``: the vector instructions it has, e.g. AVX-512); their cache name is also keyed
by the processor's model and instruction-set flags (:func:`cpu_identity`), so the nodes of a
cluster with different processors that share one cache each compile their own file instead of
loading one that may hold instructions they lack. ``FEM_ANODE_NATIVE=0`` turns this off (the
portable build). Where the native build cannot be made (a compiler that does not know
``-march=native``, or no compiler on this node), the portable build is used: compiled here, or
found in the cache (e.g. made on a login node with ``FEM_ANODE_NATIVE=0`` for compute nodes
without a compiler).
Without ``-ffast-math`` (never used) and with ``-std=c99`` (no contraction into fused
multiply-adds) the two builds compute the same numbers.
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

__all__ = [
    "LOAD_ERRORS",
    "NATIVE_FLAGS",
    "CompileError",
    "cache_dir",
    "compiled_library",
    "cpu_identity",
    "load_collectively",
]

#: what ``native=True`` adds to the flags
NATIVE_FLAGS = ("-march=native",)


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


def cpu_identity() -> str:
    """The processor's model and instruction-set flags (the first processor of ``/proc/cpuinfo``;
    elsewhere :func:`platform.processor`), as a cache key of code compiled for it."""
    lines: list[str] = []
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    if lines:
                        break  # the end of the first processor's block
                    continue
                if line.split(":")[0].strip() in ("model name", "flags", "Features", "CPU implementer", "CPU part"):
                    lines.append(" ".join(line.split()))
    except OSError:
        pass
    return "\n".join(lines) or platform.processor() or platform.machine()


def native_enabled() -> bool:
    """Whether kernels asking for it are compiled for this processor (``FEM_ANODE_NATIVE`` not 0)."""
    return os.environ.get("FEM_ANODE_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def compiled_library(
    source: Path, compiler: str, flags: Sequence[str], libraries: Sequence[str] = (), *, native: bool = False
) -> ctypes.CDLL:
    """Load ``source`` compiled as a shared library, compiling it into the cache first if needed
    (atomically: a temporary file, then a rename, so concurrent first uses are safe).

    Args:
        source: the C file.
        compiler: the compiler command.
        flags: its flags.
        libraries: libraries to link (after the source).
        native: compile for this processor (:data:`NATIVE_FLAGS`, cache keyed by
            :func:`cpu_identity`) unless ``FEM_ANODE_NATIVE=0``; the portable build (compiled, or
            from the cache) where the native one cannot be made.

    Raises:
        CompileError: no compiler, a failed compilation, an unwritable cache or an unloadable file.
    """
    if native and native_enabled():
        try:
            return _compiled(source, compiler, (*flags, *NATIVE_FLAGS), libraries, cpu_identity())
        except CompileError:  # a compiler without -march=native, or none here: the portable build (maybe cached)
            pass
    return _compiled(source, compiler, tuple(flags), libraries, "")


def _compiled(source: Path, compiler: str, flags: Sequence[str], libraries: Sequence[str], cpu: str) -> ctypes.CDLL:
    text = source.read_bytes()
    identity = (compiler, tuple(flags), tuple(libraries), platform.machine(), *((cpu,) if cpu else ()))
    key = hashlib.sha256(text + repr(identity).encode())
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
