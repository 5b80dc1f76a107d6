"""Atomic, MPI-aware checkpoints of long runs, and the policy that decides when to write them.

A checkpoint is the directory ``DIR/checkpoint/`` holding

* ``state.json``: the model's scalars, counters, time, step size, RNG state, settings and
  bookkeeping (format version, number of ranks, how each field is stored, the SHA-256 of
  every file). Floats are written with ``repr`` precision, so they read back bit for bit.
* ``arrays.npz``: plain NumPy arrays (records so far), written by rank 0.
* ``fields/<token>.<i>.bin``: the values of distributed dolfinx Functions, one raw float64 file
  each, written and read by all ranks with MPI-IO (``token`` is unique per save, so a checkpoint
  replaced between :meth:`CheckpointStore.load` and :meth:`Checkpoint.restore` is reported,
  never mixed with the state it was loaded with).

**Functions are stored in the mesh's input order, in parallel.** The key of a dof is
``original_cell * k + j`` minimised over the cells holding it (``k`` dofs per cell, ``j`` its
position in the cell; the minimum over the ranks by the index map's ghost exchange): it depends
on the input order of the cells and the element's reference layout only, not on the partition.
The file holds the values sorted by key; the rank owning a dof sends it (key and value) to the
rank in charge of its cell's range of input indices, which sorts its block and writes it with
``MPI_File_write_at_all``. A restore routes the keys the same way and sends the values back.
So a checkpoint resumes on any number of ranks and partition, as long as the mesh is re-created
from the same input (same image, same mesh file, so the same cells in the same input order),
for P1/P2, vector, mixed (the phase field's ``w``), DG and quadrature spaces. No rank ever
holds more than its share of a field, and the file holds the values only (8 bytes per dof).
Elements whose dofs need transformations (Lagrange of degree >= 3, Nedelec: their edge dofs
are oriented by partition-dependent vertex numbers) are written through
``adios4dolfinx.write_function_on_input_mesh`` instead (``fields/<token>.<i>.bp``, with the
cell dofmaps and permutations: about 30 times larger, slower). A mesh signature (a hash-weighted
sum of the cell midpoints by original cell index, reduced over the ranks) is stored with each
field; restoring onto a mesh with another geometry or cell order raises
:class:`~fem_anode.errors.InputError`.

**Writes are atomic.** Rank 0 creates ``DIR/checkpoint.tmp-<random>/``; all ranks write the
fields into it, then hash them (chunks of the files spread over the ranks, every file fsynced);
rank 0 writes ``arrays.npz`` and ``state.json`` (fsynced), renames the current ``checkpoint/``
to ``checkpoint.old-<random>``, renames the new one to ``checkpoint/`` and removes the old one.
A crash at any moment leaves either the previous or the new checkpoint complete: leftover
``checkpoint.tmp-*`` are ignored (and removed by the next save), and if the crash fell between
the two renames, :meth:`CheckpointStore.load` takes the newest complete ``checkpoint.old-*``.
A corrupt or truncated checkpoint (bad JSON, a file whose checksum does not match) gives an
:class:`~fem_anode.errors.InputError` naming the file. ``DIR`` must be on a file system that
every rank sees (as for any parallel output).

The module imports neither dolfinx, mpi4py nor adios4dolfinx at import time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, cast

import numpy as np

from fem_anode.errors import FemAnodeError, InputError, UsageError
from fem_anode.faults import first_error, share_error
from fem_anode.parallel import answer_rows, send_rows
from fem_anode.settings import Section, setting

if TYPE_CHECKING:
    from mpi4py import MPI

__all__ = [
    "CHECKPOINT_NAME",
    "Checkpoint",
    "CheckpointPolicy",
    "CheckpointSettings",
    "CheckpointStore",
    "Checkpointer",
    "settings_differences",
    "settings_fingerprint",
]

logger = logging.getLogger(__name__)

#: Name of the checkpoint directory inside a run's output directory.
CHECKPOINT_NAME = "checkpoint"
FORMAT_VERSION = 3
_STATE, _ARRAYS, _FIELDS = "state.json", "arrays.npz", "fields"
_VARIABLE = "field"  # the Function's name inside its BP file
_CHUNK = 1 << 24  # bytes per checksum chunk (16 MiB); chunks are hashed by the ranks in turn
_CELL_CHUNK = 1 << 16  # cells per block when computing dof keys and mesh signatures
_SIGNATURE_RTOL = 1e-10  # of the sum of |terms|: covers summation order on any partition


@dataclasses.dataclass
class CheckpointSettings(Section):
    """Checkpoints of a CLI run in DIR/checkpoint/ (resume with --resume DIR); see docs/checkpointing.md."""

    interval_s: float = setting(600.0, "wall-clock time between checkpoints (0: off)", unit="s", nonnegative=True)
    every_steps: int = setting(0, "accepted time steps between checkpoints (0: off)", nonnegative=True)


def _is_function(value: Any) -> bool:
    return hasattr(value, "function_space") and hasattr(value, "x")


def _is_global_array(value: Any) -> bool:
    """A distributed 1D array in a rank-independent global order (e.g. the finite-volume
    :class:`~fem_anode.fem.diffusion.finite_volume.VectorField`): ``global_offset``, ``global_size``,
    ``comm`` and the local block as ``x.array``."""
    return hasattr(value, "global_offset") and hasattr(value, "global_size") and hasattr(value, "x")


def _write_global_array(directory: Path, stem: str, u: Any, comm: Any) -> dict[str, Any]:
    """Collective: each rank writes its block of ``u`` at its global offset (MPI-IO, raw float64)."""
    from mpi4py import MPI

    relative = f"{_FIELDS}/{stem}.bin"
    block = np.ascontiguousarray(u.x.array, dtype=np.float64)
    if _size(comm) == 1:
        block.tofile(directory / relative)
    else:
        handle = MPI.File.Open(comm, str(directory / relative), MPI.MODE_WRONLY | MPI.MODE_CREATE)
        try:
            handle.Write_at_all(int(u.global_offset) * 8, [block, MPI.DOUBLE])
        finally:
            handle.Close()
    return {
        "mode": "global-array",
        "file": relative,
        "element": "global-array",
        "size": int(u.global_size),
        "block_size": 1,
        "cells": int(u.global_size),
        "mesh_signature": [0.0, 0.0],
    }


def _read_global_array(path: Path, u: Any, comm: Any) -> None:
    """Collective: fill ``u``'s local block from a file of :func:`_write_global_array`."""
    from mpi4py import MPI

    block = np.empty(len(u.x.array), dtype=np.float64)
    if _size(comm) == 1:
        block[:] = np.fromfile(path, dtype=np.float64, count=block.size)
    else:
        handle = MPI.File.Open(comm, str(path), MPI.MODE_RDONLY)
        try:
            handle.Read_at_all(int(u.global_offset) * 8, [block, MPI.DOUBLE])
        finally:
            handle.Close()
    u.x.array[:] = block


def _size(comm: Any) -> int:
    return 1 if comm is None else comm.size


def _rank(comm: Any) -> int:
    return 0 if comm is None else comm.rank


def _bcast(comm: Any, value: Any) -> Any:
    return value if comm is None or comm.size == 1 else comm.bcast(value, root=0)


def _barrier(comm: Any) -> None:
    if comm is not None and comm.size > 1:
        comm.barrier()


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _gather(comm: Any, item: Any) -> list[Any] | None:
    """Small items only (checksums, error messages): the list on rank 0, None elsewhere."""
    return [item] if _size(comm) == 1 else comm.gather(item, root=0)


def _adios4dolfinx() -> Any:
    """The adios4dolfinx module (imported on first use: it selects ADIOS2's MPI bindings)."""
    try:
        import adios4dolfinx
    except ImportError as err:
        raise UsageError(
            f"checkpoints of dolfinx Functions need adios4dolfinx ({err}); install the Debian package "
            "python3-adios4dolfinx (scripts/setup.sh does)"
        ) from None
    return adios4dolfinx


def _splitmix64(index: np.ndarray) -> np.ndarray:
    """A well-mixed 64-bit hash of each (non-negative) integer."""
    z = index.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def mesh_signature(mesh: Any) -> list[float]:
    """Collective: ``[signature, scale]`` of a mesh, independent of its partition.

    ``signature`` is the sum over the cells of their geometric midpoints weighted by pseudo-random
    weights in [1, 2) drawn from the original (input) cell index; ``scale`` is the sum of the
    absolute terms. Two meshes with the same cells in the same input order agree to round-off
    (``|a - b| <= 1e-10 scale``); another geometry or cell order changes the signature.
    """
    from mpi4py import MPI

    tdim = mesh.topology.dim
    n = mesh.topology.index_map(tdim).size_local
    local = np.zeros(2)
    for start in range(0, n, _CELL_CHUNK):  # bounded temporaries on large meshes
        stop = min(start + _CELL_CHUNK, n)
        original = np.asarray(mesh.topology.original_cell_index[start:stop], dtype=np.int64)
        midpoints = mesh.geometry.x[mesh.geometry.dofmap[start:stop]].mean(axis=1)
        keys = (3 * original[:, None] + np.arange(3)).reshape(-1)
        weights = 1.0 + (_splitmix64(keys) >> np.uint64(11)).astype(np.float64).reshape(-1, 3) / 2.0**53
        terms = (weights * midpoints).sum(axis=1)
        local += [terms.sum(), np.abs(terms).sum()]
    total = local if mesh.comm.size == 1 else mesh.comm.allreduce(local, op=MPI.SUM)
    return [float(total[0]), float(total[1])]


def _input_owner(cells: np.ndarray, n_cells: int, size: int) -> np.ndarray:
    """Rank that writes/reads the file block of each original cell index: contiguous, balanced ranges."""
    q, r = divmod(n_cells, size)
    cells = np.asarray(cells, dtype=np.int64)
    if q == 0:
        return cells
    split = r * (q + 1)
    return np.where(cells < split, cells // (q + 1), r + (cells - split) // q).astype(np.int64)


def _ghost_min(imap: Any, values: np.ndarray) -> np.ndarray:
    """Collective: for each local index (owned and ghost) the minimum over every rank's value of it.

    The ghost exchange of the index map (PETSc's ghosted vector): a reverse scatter with MAX of the
    negated values to the owners, then a forward scatter to the ghosts. Exact for |values| < 2^53.
    """
    from dolfinx import la
    from petsc4py import PETSc

    vec = la.create_petsc_vector(imap, 1)
    try:
        with vec.localForm() as local:
            local.array[:] = -values
        vec.ghostUpdate(addv=PETSc.InsertMode.MAX_VALUES, mode=PETSc.ScatterMode.REVERSE)
        vec.ghostUpdate(addv=PETSc.InsertMode.INSERT, mode=PETSc.ScatterMode.FORWARD)
        with vec.localForm() as local:
            return -local.array
    finally:
        vec.destroy()


def _canonical_keys(V: Any) -> np.ndarray:
    """Collective: a partition-independent key of every owned dof block of ``V``.

    The key of a dof is ``min(original_cell * k + j)`` over the cells holding it (``k`` dofs per
    cell, ``j`` its position in the cell): the input order of the mesh's cells and the
    reference layout of the element fix it, whatever the partition. The file stores the values
    sorted by key.
    """
    mesh = V.mesh
    dofmap = V.dofmap.list
    imap = V.dofmap.index_map
    per_cell = dofmap.shape[1]
    n_cells = mesh.topology.index_map(mesh.topology.dim).size_local
    original = mesh.topology.original_cell_index
    keys = np.full(imap.size_local + imap.num_ghosts, float(2**62))
    positions = np.arange(per_cell, dtype=np.float64)
    for start in range(0, n_cells, _CELL_CHUNK):  # bounded temporaries on large meshes
        stop = min(start + _CELL_CHUNK, n_cells)
        candidates = np.asarray(original[start:stop], dtype=np.float64)[:, None] * per_cell + positions
        np.minimum.at(keys, dofmap[start:stop].reshape(-1), candidates.reshape(-1))
    if mesh.comm.size > 1:
        keys = _ghost_min(imap, keys)
    return keys[: imap.size_local].astype(np.int64)


def _destinations(
    V: Any, cache: dict[int, tuple[np.ndarray, np.ndarray]] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Collective: the keys of the owned dof blocks and the rank holding each one's file block
    (kept in ``cache`` by space for the other fields of the same save)."""
    if cache is not None and id(V) in cache:
        return cache[id(V)]
    keys = _canonical_keys(V)
    per_cell = V.dofmap.list.shape[1]
    n_cells = V.mesh.topology.index_map(V.mesh.topology.dim).size_global
    result = keys, _input_owner(keys // per_cell, n_cells, V.mesh.comm.size)
    if cache is not None:
        cache[id(V)] = result
    return result


def _write_values(path: Path, u: Any, cache: dict[int, tuple[np.ndarray, np.ndarray]] | None = None) -> None:
    """Collective: write ``u``'s owned values to ``path`` (raw float64) in key order, by MPI-IO;
    each rank writes the contiguous block of the cells in its input range."""
    from mpi4py import MPI

    V = u.function_space
    comm = V.mesh.comm
    bs = V.dofmap.index_map_bs
    n = V.dofmap.index_map.size_local
    values = np.asarray(u.x.array[: n * bs], dtype=np.float64).reshape(n, bs)
    keys, dest = _destinations(V, cache)
    received_keys, _, _ = send_rows(comm, dest, keys)
    received, _, _ = send_rows(comm, dest, values)
    block = np.ascontiguousarray(received[np.argsort(received_keys, kind="stable")])
    offset = int(comm.exscan(len(block)) or 0) if comm.size > 1 else 0
    handle = MPI.File.Open(comm, str(path), MPI.MODE_WRONLY | MPI.MODE_CREATE)
    try:
        handle.Write_at_all(offset * bs * 8, [block, MPI.DOUBLE])
    finally:
        handle.Close()


def _read_values(path: Path, u: Any) -> None:
    """Collective: fill ``u`` (owned and ghost values) from a file of :func:`_write_values`."""
    from mpi4py import MPI

    V = u.function_space
    comm = V.mesh.comm
    bs = V.dofmap.index_map_bs
    n = V.dofmap.index_map.size_local
    keys, dest = _destinations(V)
    received, order, recv_counts = send_rows(comm, dest, keys)
    sort = np.argsort(received, kind="stable")
    offset = int(comm.exscan(len(received)) or 0) if comm.size > 1 else 0
    block = np.empty((len(received), bs), dtype=np.float64)
    handle = MPI.File.Open(comm, str(path), MPI.MODE_RDONLY)
    try:
        handle.Read_at_all(offset * bs * 8, [block, MPI.DOUBLE])
    finally:
        handle.Close()
    answers = np.empty_like(block)
    answers[sort] = block
    u.x.array[: n * bs] = answer_rows(comm, answers, recv_counts, order).reshape(-1)
    u.x.scatter_forward()


def _fixed_layout(element: Any) -> bool:
    """Whether the cell-local dof layout of a (basix.ufl) element is the same on every partition:
    no dof transformations or permutations (Lagrange <= 2, DG, quadrature, mixed/blocked of these)."""
    if element.is_mixed:
        return all(_fixed_layout(sub) for sub in element.sub_elements)
    if element.is_quadrature:
        return True
    return bool(element.basix_element.dof_transformations_are_identity)


def _write_field(directory: Path, stem: str, u: Any, comm: Any, cache: dict[int, Any] | None = None) -> dict[str, Any]:
    """Collective: write Function ``u`` into ``directory/fields/``; returns its metadata.

    Elements with a fixed dof layout (:func:`_fixed_layout`) go to ``<stem>.bin`` in key order
    (:func:`_write_values`); the others (e.g. Lagrange of degree 3, whose edge dofs are ordered by
    the partition-dependent global vertex numbers) through
    ``adios4dolfinx.write_function_on_input_mesh`` to ``<stem>.bp``.
    """
    V = u.function_space
    mesh = V.mesh
    if mesh.comm.size != _size(comm):
        raise UsageError(
            f"a checkpoint on {_size(comm)} rank(s) cannot store a Function on a mesh over {mesh.comm.size} rank(s): "
            "give the store the mesh's communicator"
        )
    imap = V.dofmap.index_map
    if not _fixed_layout(V.ufl_element()):
        adios4dolfinx = _adios4dolfinx()
        from adios4dolfinx.adios2_helpers import adios2

        mode, relative = "adios4dolfinx", f"{_FIELDS}/{stem}.bp"
        adios4dolfinx.write_function_on_input_mesh(
            directory / relative, u, engine="BP4", mode=adios2.Mode.Write, name=_VARIABLE
        )
    else:
        mode, relative = "input-order", f"{_FIELDS}/{stem}.bin"
        _write_values(directory / relative, u, cache)
    return {
        "mode": mode,
        "file": relative,
        "element": str(V.ufl_element()),
        "size": int(imap.size_global),
        "block_size": int(V.dofmap.index_map_bs),
        "cells": int(mesh.topology.index_map(mesh.topology.dim).size_global),
        "mesh_signature": mesh_signature(mesh),
    }


def _chunks(listing: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """``(file, chunk)`` pairs of a file listing, in a fixed order (0 bytes: one empty chunk)."""
    return [(name, k) for name, size in listing for k in range(max(1, -(-size // _CHUNK)))]


def _hash_chunks(root: Path, chunks: list[tuple[str, int]], sync: bool) -> dict[tuple[str, int], str]:
    """SHA-256 of each ``(file, chunk)`` under ``root``; with ``sync`` fsync every file read."""
    digests: dict[tuple[str, int], str] = {}
    handles: dict[str, BinaryIO] = {}
    with contextlib.ExitStack() as files:
        for name, k in chunks:
            if name not in handles:
                handles[name] = files.enter_context(open(root / name, "rb"))
            handle = handles[name]
            handle.seek(k * _CHUNK)
            digests[(name, k)] = hashlib.sha256(handle.read(_CHUNK)).hexdigest()
        if sync:
            for handle in handles.values():
                os.fsync(handle.fileno())
    return digests


def _digest_fields(directory: Path, comm: Any) -> dict[str, dict[str, Any]] | None:
    """Collective: ``{file: {"size", "sha256": [chunk digests]}}`` of ``directory/fields`` on rank 0.

    Chunk ``j`` of the sorted file listing is hashed (and its file fsynced) by rank ``j mod size``.
    """
    root = directory / _FIELDS
    listing: list[tuple[str, int]] = []
    if _rank(comm) == 0:
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
        listing = [(p.relative_to(directory).as_posix(), p.stat().st_size) for p in files]
    listing = _bcast(comm, listing)
    mine = _chunks(listing)[_rank(comm) :: _size(comm)]
    parts = _gather(comm, _hash_chunks(directory, mine, sync=True))
    if parts is None:
        return None
    merged = {key: value for part in parts for key, value in part.items()}
    table: dict[str, dict[str, Any]] = {name: {"size": size, "sha256": []} for name, size in listing}
    for name, k in _chunks(listing):
        table[name]["sha256"].append(merged[(name, k)])
    return table


def _verify_fields(path: Path, table: dict[str, dict[str, Any]], comm: Any) -> None:
    """Collective: raise InputError on every rank if a field file is missing, truncated or corrupt."""
    listing = sorted((name, int(entry["size"])) for name, entry in table.items())
    mine = _chunks(listing)[_rank(comm) :: _size(comm)]
    bad: str | None = None
    try:
        for name in {name for name, _ in mine}:
            if (path / name).stat().st_size != table[name]["size"]:
                bad = f"corrupt checkpoint {path / name}: its size does not match state.json"
                break
        else:
            digests = _hash_chunks(path, mine, sync=False)
            wrong = sorted(name for (name, k), digest in digests.items() if table[name]["sha256"][k] != digest)
            if wrong:
                bad = f"corrupt checkpoint {path / wrong[0]}: its checksum does not match state.json"
    except OSError as err:
        bad = f"cannot read checkpoint {path}: {err}"
    first_error(comm, InputError(bad) if bad is not None else None)


@dataclasses.dataclass
class Checkpoint:
    """A loaded checkpoint (the same on every rank).

    Attributes:
        state: the ``state`` dict given to :meth:`CheckpointStore.save` (plus ``"_checkpoint"``
            bookkeeping: format, ranks, creation time, fields, checksums).
        arrays: plain arrays by name.
        path: the checkpoint directory read.
    """

    state: dict[str, Any]
    arrays: dict[str, np.ndarray]
    path: Path

    @property
    def fields(self) -> dict[str, dict[str, Any]]:
        """Stored Functions: name -> ``{"mode", "file", "element", "size", "block_size", "cells", ...}``."""
        return self.state["_checkpoint"]["fields"]

    @property
    def ranks(self) -> int:
        """Number of MPI ranks that wrote the checkpoint."""
        return int(self.state["_checkpoint"]["ranks"])

    def restore(self, name: str, u: Any) -> None:
        """Collective over ``u``'s mesh: set Function ``u`` (owned and ghost dofs) from the stored field ``name``.

        Any number of ranks and any partition of the same input mesh will do.

        Raises:
            InputError: no such field, or it does not fit ``u``'s space or mesh.
        """
        if name not in self.fields:
            raise InputError(
                f"checkpoint {self.path} has no field {name!r} (it has {', '.join(sorted(self.fields)) or 'none'})"
            )
        meta = self.fields[name]
        if meta["mode"] == "global-array" or _is_global_array(u):
            if meta["mode"] != "global-array" or not _is_global_array(u) or meta["size"] != u.global_size:
                raise InputError(
                    f"checkpoint field {name!r} ({meta['size']} values, {meta['mode']}) does not fit the current run's "
                    f"unknowns: the image or the discretisation differs from the checkpointed run"
                )
            error: str | None = None
            try:
                _read_global_array(self.path / meta["file"], u, u.comm)
            except (OSError, ValueError) as err:
                error = f"cannot read checkpoint field {name!r} from {self.path / meta['file']}: {err}"
            first_error(u.comm, InputError(error) if error is not None else None)
            return
        V = u.function_space
        mesh = V.mesh
        imap = V.dofmap.index_map
        bs = V.dofmap.index_map_bs
        cells = mesh.topology.index_map(mesh.topology.dim).size_global
        if (meta["size"], meta["block_size"], meta["cells"]) != (imap.size_global, bs, cells) or meta["element"] != str(
            V.ufl_element()
        ):
            raise InputError(
                f"checkpoint field {name!r} has {meta['size']} x {meta['block_size']} dofs of {meta['element']} on "
                f"{meta['cells']} cells, the current space {imap.size_global} x {bs} of {V.ufl_element()} on {cells}: "
                "the mesh or element differs from the checkpointed run"
            )
        signature, scale = mesh_signature(mesh)
        saved, saved_scale = meta["mesh_signature"]
        if abs(signature - saved) > _SIGNATURE_RTOL * max(scale, saved_scale):
            raise InputError(
                f"checkpoint field {name!r}: the mesh differs from the checkpointed run (other cell positions or input "
                "cell order); resume with the mesh made from the same input"
            )
        error = None
        if not (self.path / meta["file"]).exists():
            error = (
                f"checkpoint field {name!r}: {self.path} was replaced after it was loaded (is another run writing "
                "into the same directory?); load it again"
            )
        else:
            try:
                if meta["mode"] == "input-order":
                    _read_values(self.path / meta["file"], u)
                else:
                    _adios4dolfinx().read_function(self.path / meta["file"], u, engine="BP4", name=_VARIABLE)
            except (KeyError, RuntimeError, ValueError, OSError) as err:
                source = self.path / meta["file"]
                error = f"cannot read checkpoint field {name!r} from {source}: {type(err).__name__}: {err}"
        first_error(mesh.comm, InputError(error) if error is not None else None)


class CheckpointStore:
    """The checkpoint of one run, kept in ``directory / "checkpoint"``.

    Args:
        directory: the run's output directory (created by the first save); on a file system
            every rank sees.
        comm: MPI communicator (``None``: serial); the communicator of the stored Functions'
            meshes. Every method is collective.
    """

    def __init__(self, directory: str | Path, comm: MPI.Comm | None = None) -> None:
        self.directory = Path(directory)
        self.comm = comm

    @property
    def path(self) -> Path:
        """The checkpoint directory ``directory / "checkpoint"``."""
        return self.directory / CHECKPOINT_NAME

    def _candidates(self) -> list[Path]:
        found = [self.path] if (self.path / _STATE).is_file() else []
        if self.directory.is_dir():  # a crash between the two renames of a save
            olds = [p for p in self.directory.glob(f"{CHECKPOINT_NAME}.old-*") if (p / _STATE).is_file()]
            found += sorted(olds, key=lambda p: (p / _STATE).stat().st_mtime, reverse=True)
        return found

    def exists(self) -> bool:
        """Whether a checkpoint can be loaded (stale ``checkpoint.tmp-*`` do not count)."""
        return bool(_bcast(self.comm, bool(self._candidates()) if _rank(self.comm) == 0 else None))

    def save(self, state: Mapping[str, Any], arrays: Mapping[str, Any] | None = None) -> Path:
        """Write a new checkpoint atomically (collective); returns its path.

        Args:
            state: JSON-serialisable dict (floats, ints, strings, lists, dicts; NaN allowed).
            arrays: name -> dolfinx Function (written in parallel by all ranks) or NumPy array
                (small; taken from rank 0, the caller keeps it identical on every rank).

        Raises:
            InputError: the checkpoint could not be written (the previous one stays).
        """
        comm = self.comm
        made: Path | str | None = None
        if _rank(comm) == 0:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                made = Path(tempfile.mkdtemp(prefix=f"{CHECKPOINT_NAME}.tmp-", dir=self.directory))
                (made / _FIELDS).mkdir()
            except OSError as err:
                made = f"cannot write the checkpoint in {self.directory}: {err}"
        made = _bcast(comm, made)
        if not isinstance(made, Path):
            raise InputError(str(made))
        tmp = made
        error: str | None = None
        try:
            fields: dict[str, dict[str, Any]] = {}
            table: dict[str, dict[str, Any]] | None = None
            try:
                token = tmp.name.rsplit("-", 1)[-1]  # unique per save: a replaced checkpoint is noticed by restore
                keys: dict[int, Any] = {}  # dof keys by space, shared by the fields of this save
                for name, value in (arrays or {}).items():
                    if _is_global_array(value):
                        fields[name] = _write_global_array(tmp, f"{token}.{len(fields)}", value, comm)
                    elif _is_function(value):
                        fields[name] = _write_field(tmp, f"{token}.{len(fields)}", value, comm, keys)
                table = _digest_fields(tmp, comm)
            except FemAnodeError:
                raise
            except (OSError, RuntimeError, ValueError) as err:
                error = f"cannot write the checkpoint in {self.directory}: {err}"
            first_error(comm, InputError(error) if error is not None else None)
            commit_error: InputError | None = None
            if _rank(comm) == 0:
                plain = {
                    f"a.{name}": np.asarray(value)
                    for name, value in (arrays or {}).items()
                    if not (_is_function(value) or _is_global_array(value))
                }
                try:
                    self._commit(tmp, dict(state), fields, table or {}, plain)
                except (OSError, TypeError, ValueError) as err:
                    commit_error = InputError(f"cannot write the checkpoint in {self.directory}: {err}")
            share_error(comm, commit_error)
        finally:
            if _rank(comm) == 0:  # gone after a successful save (renamed into place)
                shutil.rmtree(tmp, ignore_errors=True)
        _barrier(comm)
        return self.path

    def _commit(
        self,
        tmp: Path,
        state: dict[str, Any],
        fields: dict[str, dict[str, Any]],
        table: dict[str, dict[str, Any]],
        data: dict[str, np.ndarray],
    ) -> None:
        """Rank 0: write arrays.npz and state.json into ``tmp``, then swap it in for the checkpoint."""
        arrays_path = tmp / _ARRAYS
        with open(arrays_path, "wb") as handle:
            np.savez(handle, **cast("dict[str, Any]", data))  # numpy's stub lets **kwds fill allow_pickle
            handle.flush()
            os.fsync(handle.fileno())
        state["_checkpoint"] = {
            "format": FORMAT_VERSION,
            "ranks": _size(self.comm),
            "created_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "fields": fields,
            "arrays_sha256": _sha256(arrays_path),
            "fields_sha256": table,
        }
        text = json.dumps(state, indent=1, allow_nan=True)
        with open(tmp / _STATE, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        for directory in {tmp / Path(name).parent for name in table} | {tmp / _FIELDS, tmp}:
            _fsync(directory)
        old = None
        if self.path.exists():
            old = self.directory / f"{CHECKPOINT_NAME}.old-{tmp.name.rsplit('-', 1)[-1]}"
            os.replace(self.path, old)
        os.replace(tmp, self.path)
        _fsync(self.directory)
        for stale in [
            *self.directory.glob(f"{CHECKPOINT_NAME}.tmp-*"),
            *self.directory.glob(f"{CHECKPOINT_NAME}.old-*"),
        ]:
            shutil.rmtree(stale, ignore_errors=True)  # this run's previous one, or left by a crash

    def load(self) -> Checkpoint:
        """Read the checkpoint (collective): state and plain arrays on rank 0, broadcast; the
        field files are checked by all ranks, each hashing its share; fields are read by
        :meth:`Checkpoint.restore`.

        Raises:
            InputError: no checkpoint, or a corrupt one (unreadable JSON, checksum mismatch).
        """
        payload: Any = None
        if _rank(self.comm) == 0:
            try:
                payload = self._read()
            except FemAnodeError as err:
                payload = err
        payload = _bcast(self.comm, payload)
        if isinstance(payload, FemAnodeError):
            raise payload
        state, plain, path = payload
        _verify_fields(path, state["_checkpoint"].get("fields_sha256") or {}, self.comm)
        return Checkpoint(state=state, arrays=plain, path=path)

    def _read(self) -> tuple[dict[str, Any], dict[str, np.ndarray], Path]:
        candidates = self._candidates()
        if not candidates:
            raise InputError(f"no checkpoint in {self.directory} (expected {self.path / _STATE})")
        path = candidates[0]
        try:
            state = json.loads((path / _STATE).read_text(encoding="utf-8"))
            bookkeeping = state["_checkpoint"]
            expected = bookkeeping["arrays_sha256"]
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
            raise InputError(f"corrupt checkpoint {path / _STATE}: {type(err).__name__}: {err}") from None
        if bookkeeping.get("format") != FORMAT_VERSION:
            raise InputError(
                f"checkpoint {path} has format {bookkeeping.get('format')!r}; this version reads format "
                f"{FORMAT_VERSION}"
            )
        try:
            if _sha256(path / _ARRAYS) != expected:
                raise InputError(f"corrupt checkpoint {path / _ARRAYS}: its checksum does not match state.json")
            with np.load(path / _ARRAYS, allow_pickle=False) as archive:
                plain = {key[2:]: archive[key] for key in archive.files if key.startswith("a.")}
        except OSError as err:
            raise InputError(f"cannot read checkpoint {path / _ARRAYS}: {err}") from None
        return state, plain, path

    def remove(self) -> None:
        """Delete the checkpoint and any leftovers (collective; after a run finished)."""
        if _rank(self.comm) == 0 and self.directory.is_dir():
            for entry in [
                self.path,
                *self.directory.glob(f"{CHECKPOINT_NAME}.tmp-*"),
                *self.directory.glob(f"{CHECKPOINT_NAME}.old-*"),
            ]:
                shutil.rmtree(entry, ignore_errors=True)
        _barrier(self.comm)


@dataclasses.dataclass
class CheckpointPolicy:
    """When to write periodic checkpoints (a safe stop always writes one).

    Attributes:
        interval_s: wall-clock seconds between checkpoints (0: off).
        every_steps: accepted steps between checkpoints (0: off).
    """

    interval_s: float = 600.0
    every_steps: int = 0

    def __post_init__(self) -> None:
        if not (self.interval_s >= 0 and self.every_steps >= 0):
            raise UsageError(
                f"checkpoint interval_s and every_steps must be >= 0, got {self.interval_s}, {self.every_steps}"
            )


class Checkpointer:
    """Used by a time loop at its safe points: decides (collectively) whether to save or stop.

    Args:
        store: where checkpoints go (``None``: never save, only honour stop requests).
        policy: periodic checkpoint interval.
        stop: the :class:`~fem_anode.io.interrupt.SafeStop` whose flag is polled (optional).
        meta: stored under ``state["meta"]`` (settings, fingerprint, model name).
        extra: called at every save; returns ``(state, arrays)`` of the caller's own
            bookkeeping (e.g. output snapshots), stored under ``state["driver"]`` and arrays
            prefixed ``"driver."``.
        comm: communicator of the run.
        clock: monotonic clock (s), replaceable in tests.
    """

    def __init__(
        self,
        store: CheckpointStore | None,
        policy: CheckpointPolicy | None = None,
        *,
        stop: Any = None,
        meta: Mapping[str, Any] | None = None,
        extra: Callable[[], tuple[dict[str, Any], dict[str, Any]]] | None = None,
        comm: MPI.Comm | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.policy = policy or CheckpointPolicy()
        self.stop = stop
        self.meta = dict(meta or {})
        self.extra = extra
        self.comm = comm if comm is not None else (store.comm if store is not None else None)
        self.clock = clock
        self._last_time = clock()
        self._last_step: int | None = None
        self.saves = 0

    def poll(self, step: int) -> tuple[bool, bool]:
        """Collective, after accepted step ``step``: ``(save_now, stop_now)``, equal on all ranks."""
        from fem_anode.io.interrupt import agree_flags

        if self._last_step is None:
            self._last_step = step - 1
        policy = self.policy
        due_steps = policy.every_steps > 0 and step - self._last_step >= policy.every_steps
        due_time = policy.interval_s > 0 and self.clock() - self._last_time >= policy.interval_s
        requested = bool(self.stop is not None and self.stop.requested)
        due_time, stop_now = agree_flags(self.comm, due_time, requested)
        save_now = self.store is not None and (due_steps or due_time or stop_now)
        return save_now, stop_now

    def stop_reason(self) -> str:
        """Collective: the signal name that requested the stop on any rank (e.g. "SIGTERM")."""
        name = getattr(self.stop, "signal_name", None)
        names = [name] if self.comm is None or self.comm.size == 1 else self.comm.allgather(name)
        return next((n for n in names if n), "request")

    def save(self, step: int, state: Mapping[str, Any], arrays: Mapping[str, Any]) -> Path | None:
        """Save the model's ``state``/``arrays`` with the meta and driver extras (collective)."""
        if self.store is None:
            return None
        full: dict[str, Any] = {"meta": self.meta, "problem": dict(state)}
        all_arrays = {f"problem.{k}": v for k, v in arrays.items()}
        if self.extra is not None:
            driver_state, driver_arrays = self.extra()
            full["driver"] = driver_state
            all_arrays.update({f"driver.{k}": v for k, v in driver_arrays.items()})
        path = self.store.save(full, all_arrays)
        self._last_time = self.clock()
        self._last_step = step
        self.saves += 1
        logger.debug("checkpoint at step %d in %s", step, path)
        return path

    def check_meta(self, checkpoint: Checkpoint, keys: tuple[str, ...] = ("fingerprint",)) -> None:
        """Raise :class:`UsageError` if the checkpoint's meta differs from this run's."""
        saved = checkpoint.state.get("meta", {})
        for key in keys:
            if saved.get(key) != self.meta.get(key):
                what = settings_differences(saved.get(key), self.meta.get(key))
                raise UsageError(
                    f"the checkpoint in {checkpoint.path} belongs to a run with other settings ({what}); "
                    "resume with the same configuration or start afresh in a new --out directory"
                )


def settings_fingerprint(settings: Any, *, free: tuple[str, ...], paths: tuple[str, ...] = ()) -> dict[str, Any]:
    """The settings a resumed run must share with its checkpoint, as JSON types.

    Args:
        settings: a :class:`~fem_anode.settings.Settings` object.
        free: sections that may change on resume (e.g. ``"solver"``, ``"checkpoint"``).
        paths: keys of ``[geometry]`` holding file paths, compared as absolute real paths.
    """
    data = json.loads(json.dumps(settings.to_dict(), default=str))
    for key in free:
        data.pop(key, None)
    geometry = data.get("geometry", {})
    for key in paths:
        if geometry.get(key):
            geometry[key] = os.path.realpath(geometry[key])
    return data


def settings_differences(saved: Any, current: Any, where: str = "") -> str:
    """Human-readable list of the keys in which two nested settings dicts differ."""
    keys: list[str] = []

    def walk(a: Any, b: Any, path: str) -> None:
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            for k in sorted(set(a) | set(b), key=str):
                walk(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
        elif a != b:
            keys.append(f"{path or 'value'}: {a!r} -> {b!r}")

    walk(saved, current, where)
    return "; ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "") if keys else "no difference"
