"""Atomic, MPI-aware checkpoints of long runs, and the policy that decides when to write them.

A checkpoint is the directory ``DIR/checkpoint/`` holding

* ``state.json``: the model's scalars, counters, time, step size, RNG state, settings and
  bookkeeping (format version, number of ranks, how each field is stored, the SHA-256 of
  the arrays file). Floats are written with ``repr`` precision, so they read back bit for bit.
* ``arrays.npz``: plain arrays (records so far) and the values of distributed dolfinx
  Functions, gathered on rank 0.

**Functions are stored rank-count independently when possible.** The owned dof values are
gathered on rank 0 together with their dof coordinates and sorted lexicographically by the
coordinates ("coordinates" mode). On restore, every rank finds its own dofs (owned and ghost)
in the stored coordinates with a k-d tree, so a checkpoint written on 2 ranks resumes on 1
rank or 4. This needs a space whose dof coordinates are unique: scalar or blocked (vector)
Lagrange spaces of any degree (P1, P2). A mixed space of such elements (the phase field's
``w``) is stored per collapsed sub-space the same way ("subspaces" mode). Spaces without unique
dof coordinates (DG, quadrature spaces) are stored in dolfinx's global dof order ("global"
mode): they resume only on the same number of ranks with the same partition, and anything
else fails with a :class:`~fem_anode.errors.UsageError` saying so.

**Writes are atomic.** Rank 0 writes into ``DIR/checkpoint.tmp-<random>/`` (files fsynced),
then renames the current ``checkpoint/`` to ``checkpoint.old-<random>``, renames the new one
to ``checkpoint/`` and removes the old one; every rank waits at a barrier. A crash at any
moment leaves either the previous or the new checkpoint complete: leftover ``checkpoint.tmp-*``
are ignored (and removed by the next save), and if the crash fell between the two renames,
:meth:`CheckpointStore.load` takes the newest complete ``checkpoint.old-*``. A corrupt or
truncated checkpoint (bad JSON, arrays whose checksum does not match) gives an
:class:`~fem_anode.errors.InputError` naming the file.

The module imports neither dolfinx nor mpi4py at import time.
"""

from __future__ import annotations

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
from typing import Any

import numpy as np

from fem_anode.errors import FemAnodeError, InputError, UsageError
from fem_anode.settings import Section, setting

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
FORMAT_VERSION = 2
_STATE, _ARRAYS = "state.json", "arrays.npz"


@dataclasses.dataclass
class CheckpointSettings(Section):
    """Checkpoints of a CLI run in DIR/checkpoint/ (resume with --resume DIR); see docs/checkpointing.md."""

    interval_s: float = setting(600.0, "wall-clock time between checkpoints (0: off)", unit="s", nonnegative=True)
    every_steps: int = setting(0, "accepted time steps between checkpoints (0: off)", nonnegative=True)


def _is_function(value: Any) -> bool:
    return hasattr(value, "function_space") and hasattr(value, "x")


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


def _owned_coordinates(V: Any) -> np.ndarray | None:
    """Dof coordinates of the owned dofs, or None (mixed spaces, no point evaluation)."""
    try:
        return np.asarray(V.tabulate_dof_coordinates()[: V.dofmap.index_map.size_local], dtype=np.float64)
    except RuntimeError:
        return None


def _sorted_unique(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray] | None:
    """Rank 0: ``(values, coords)`` of all ranks sorted by coordinate, or None if coordinates repeat."""
    all_values = np.concatenate([p[0] for p in parts])
    all_coords = np.concatenate([p[1] for p in parts])
    order = np.lexsort(all_coords.T[::-1])  # x first, then y, then z
    coords = all_coords[order]
    if coords.shape[0] > 1 and np.any(np.all(coords[1:] == coords[:-1], axis=1)):
        return None
    return all_values[order], coords


def _gather(comm: Any, item: Any) -> list[Any]:
    return [item] if _size(comm) == 1 else comm.gather(item, root=0)


def _all(comm: Any, flag: bool) -> bool:
    if _size(comm) == 1:
        return flag
    from mpi4py import MPI

    return bool(comm.allreduce(int(flag), op=MPI.MIN))


def _gather_function(u: Any, comm: Any) -> tuple[dict[str, Any], list[np.ndarray] | None, list[np.ndarray] | None]:
    """Collective: ``(meta, values, coords)`` of a Function on rank 0 (``None`` elsewhere).

    ``values``/``coords`` are lists: one entry for a plain space, one per sub-space for a
    mixed space ("subspaces" mode), no coordinates in "global" mode.
    """
    V = u.function_space
    imap = V.dofmap.index_map
    bs = V.dofmap.index_map_bs
    n = imap.size_local
    meta: dict[str, Any] = {"block_size": int(bs), "size": int(imap.size_global), "element": str(V.ufl_element())}
    values = np.array(u.x.array[: n * bs], dtype=np.float64).reshape(n, bs)
    coords = _owned_coordinates(V)
    if _all(comm, coords is not None):
        parts = _gather(comm, (values, coords))
        result = _sorted_unique(parts) if _rank(comm) == 0 else None
        if _bcast(comm, result is not None if _rank(comm) == 0 else None):
            meta["mode"] = "coordinates"
            return (meta, [result[0]], [result[1]]) if result is not None else (meta, None, None)
    elif V.num_sub_spaces > 0:  # mixed: each collapsed sub-space by its own coordinates
        subs = []
        for i in range(V.num_sub_spaces):
            Vi, dofs = V.sub(i).collapse()
            bsi, ni = Vi.dofmap.index_map_bs, Vi.dofmap.index_map.size_local
            sub_coords = _owned_coordinates(Vi)
            subs.append((np.array(u.x.array[dofs], dtype=np.float64).reshape(-1, bsi)[:ni], sub_coords))
        if _all(comm, all(c is not None for _, c in subs)):
            gathered = [_gather(comm, sub) for sub in subs]
            results = [_sorted_unique(parts) for parts in gathered] if _rank(comm) == 0 else []
            if _bcast(comm, all(r is not None for r in results) if _rank(comm) == 0 else None):
                meta["mode"] = "subspaces"
                meta["subspaces"] = V.num_sub_spaces
                if _rank(comm) != 0:
                    return meta, None, None
                return meta, [r[0] for r in results], [r[1] for r in results]  # type: ignore[index]
    ranges = _gather(comm, tuple(int(r) for r in imap.local_range))
    all_values = _gather(comm, values)
    if _rank(comm) != 0:
        return meta, None, None
    meta["mode"] = "global"
    meta["ranges"] = [list(r) for r in ranges]
    return meta, [np.concatenate(all_values)], None


@dataclasses.dataclass
class Checkpoint:
    """A loaded checkpoint (the same on every rank).

    Attributes:
        state: the ``state`` dict given to :meth:`CheckpointStore.save` (plus ``"_checkpoint"``
            bookkeeping: format, ranks, creation time, fields).
        arrays: plain arrays by name.
        path: the checkpoint directory read.
    """

    state: dict[str, Any]
    arrays: dict[str, np.ndarray]
    path: Path
    _fields: dict[str, np.ndarray] = dataclasses.field(default_factory=dict, repr=False)
    _coords: dict[str, np.ndarray] = dataclasses.field(default_factory=dict, repr=False)
    _trees: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)

    @property
    def fields(self) -> dict[str, dict[str, Any]]:
        """Stored Functions: name -> ``{"mode", "element", "size", "block_size", ...}``."""
        return self.state["_checkpoint"]["fields"]

    @property
    def ranks(self) -> int:
        """Number of MPI ranks that wrote the checkpoint."""
        return int(self.state["_checkpoint"]["ranks"])

    def restore(self, name: str, u: Any) -> None:
        """Collective: set Function ``u`` (owned and ghost dofs) from the stored field ``name``.

        Raises:
            InputError: no such field, or it does not fit ``u``'s space or mesh.
            UsageError: a "global"-mode field on another number of ranks or partition.
        """
        if name not in self.fields:
            raise InputError(f"checkpoint {self.path} has no field {name!r} (it has {', '.join(sorted(self.fields)) or 'none'})")
        meta = self.fields[name]
        V = u.function_space
        imap = V.dofmap.index_map
        bs = V.dofmap.index_map_bs
        comm = V.mesh.comm
        if meta["size"] != imap.size_global or meta["block_size"] != bs:
            raise InputError(
                f"checkpoint field {name!r} has {meta['size']} x {meta['block_size']} dofs, the current space "
                f"{imap.size_global} x {bs}: the mesh or element differs from the checkpointed run"
            )
        if meta["mode"] == "coordinates":
            u.x.array[:] = self._lookup(name, f"{meta['space']}.0", self._fields[f"{name}.0"], V, comm)
        elif meta["mode"] == "subspaces":
            if V.num_sub_spaces != meta["subspaces"]:
                raise InputError(f"checkpoint field {name!r} has {meta['subspaces']} sub-spaces, the current space {V.num_sub_spaces}")
            for i in range(V.num_sub_spaces):
                Vi, dofs = V.sub(i).collapse()
                u.x.array[dofs] = self._lookup(name, f"{meta['space']}.{i}", self._fields[f"{name}.{i}"], Vi, comm)
        else:
            values = self._fields[f"{name}.0"]
            ranges = meta["ranges"]
            if len(ranges) != comm.size:
                raise UsageError(
                    f"checkpoint field {name!r} ({meta['element']}) was written on {len(ranges)} rank(s) and can only be "
                    f"resumed on {len(ranges)} (its space has no unique dof coordinates); run with mpirun -n {len(ranges)}"
                )
            start, stop = (int(r) for r in imap.local_range)
            if [start, stop] != list(ranges[comm.rank]):
                raise UsageError(f"checkpoint field {name!r}: the mesh partition differs from the checkpointed run; resume with the same mesh and ranks")
            first = sum(r[1] - r[0] for r in ranges[: comm.rank])
            u.x.array[: (stop - start) * bs] = values[first : first + stop - start].reshape(-1)
            u.x.scatter_forward()

    def _lookup(self, name: str, key: str, values: np.ndarray, V: Any, comm: Any) -> np.ndarray:
        """Values of the stored (sorted-by-coordinate) field at every local dof of ``V`` (collective)."""
        local = np.asarray(V.tabulate_dof_coordinates(), dtype=np.float64)
        stored = self._coords[key]
        if key not in self._trees:
            from scipy.spatial import cKDTree

            self._trees[key] = cKDTree(stored)
        distance, index = self._trees[key].query(local) if local.size else (np.zeros(0), np.zeros(0, dtype=int))
        extent = float(np.ptp(stored, axis=0).max()) if stored.size else 0.0
        tolerance = 1e-9 * max(extent, np.finfo(float).tiny)
        bad = int(np.count_nonzero(distance > tolerance))
        if _size(comm) > 1:
            from mpi4py import MPI

            bad = comm.allreduce(bad, op=MPI.SUM)
        if bad:
            raise InputError(f"checkpoint field {name!r}: {bad} dof(s) of this mesh are not in the checkpoint; the mesh differs from the checkpointed run")
        return values[index].reshape(-1)


class CheckpointStore:
    """The checkpoint of one run, kept in ``directory / "checkpoint"``.

    Args:
        directory: the run's output directory (created by the first save).
        comm: MPI communicator (``None``: serial). Every method is collective.
    """

    def __init__(self, directory: str | Path, comm: Any = None) -> None:
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
            arrays: name -> dolfinx Function (gathered over the ranks) or NumPy array (taken
                from rank 0; the caller keeps it identical on every rank).
        """
        comm = self.comm
        fields: dict[str, dict[str, Any]] = {}
        data: dict[str, np.ndarray] = {}
        spaces: dict[int, str] = {}
        for name, value in (arrays or {}).items():
            if _is_function(value):
                meta, values, coords = _gather_function(value, comm)
                key = spaces.setdefault(id(value.function_space), f"space{len(spaces)}")
                if _rank(comm) == 0:
                    meta["space"] = key
                    for i, part in enumerate(values or []):
                        data[f"f.{name}.{i}"] = part
                    for i, part in enumerate(coords or []):
                        data.setdefault(f"s.{key}.{i}", part)
                fields[name] = meta
            elif _rank(comm) == 0:
                data[f"a.{name}"] = np.asarray(value)
        error: str | None = None
        if _rank(comm) == 0:
            try:
                self._write(dict(state), fields, data)
            except (OSError, TypeError, ValueError) as err:
                error = f"cannot write the checkpoint in {self.directory}: {err}"
        error = _bcast(comm, error)
        if error is not None:
            raise InputError(error)
        _barrier(comm)
        return self.path

    def _write(self, state: dict[str, Any], fields: dict[str, dict[str, Any]], data: dict[str, np.ndarray]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{CHECKPOINT_NAME}.tmp-", dir=self.directory))
        try:
            arrays_path = tmp / _ARRAYS
            with open(arrays_path, "wb") as handle:
                np.savez(handle, **data)
                handle.flush()
                os.fsync(handle.fileno())
            state["_checkpoint"] = {
                "format": FORMAT_VERSION,
                "ranks": _size(self.comm),
                "created_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "fields": fields,
                "arrays_sha256": _sha256(arrays_path),
            }
            text = json.dumps(state, indent=1, allow_nan=True)
            with open(tmp / _STATE, "w", encoding="utf-8") as handle:
                handle.write(text + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            old = None
            if self.path.exists():
                old = self.directory / f"{CHECKPOINT_NAME}.old-{tmp.name.rsplit('-', 1)[-1]}"
                os.replace(self.path, old)
            os.replace(tmp, self.path)
            _fsync(self.directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for stale in [*self.directory.glob(f"{CHECKPOINT_NAME}.tmp-*"), *self.directory.glob(f"{CHECKPOINT_NAME}.old-*")]:
            shutil.rmtree(stale, ignore_errors=True)  # this run's previous one, or left by a crash

    def load(self) -> Checkpoint:
        """Read the checkpoint on rank 0 and broadcast it (collective).

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
        state, plain, fields, coords, path = payload
        return Checkpoint(state=state, arrays=plain, path=path, _fields=fields, _coords=coords)

    def _read(self) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray], Path]:
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
            raise InputError(f"checkpoint {path} has format {bookkeeping.get('format')!r}; this version reads format {FORMAT_VERSION}")
        try:
            if _sha256(path / _ARRAYS) != expected:
                raise InputError(f"corrupt checkpoint {path / _ARRAYS}: its checksum does not match state.json")
            with np.load(path / _ARRAYS, allow_pickle=False) as archive:
                data = {key: archive[key] for key in archive.files}
        except OSError as err:
            raise InputError(f"cannot read checkpoint {path / _ARRAYS}: {err}") from None
        plain = {k[2:]: v for k, v in data.items() if k.startswith("a.")}
        fields = {k[2:]: v for k, v in data.items() if k.startswith("f.")}
        coords = {k[2:]: v for k, v in data.items() if k.startswith("s.")}
        return state, plain, fields, coords, path

    def remove(self) -> None:
        """Delete the checkpoint and any leftovers (collective; after a run finished)."""
        if _rank(self.comm) == 0 and self.directory.is_dir():
            for entry in [self.path, *self.directory.glob(f"{CHECKPOINT_NAME}.tmp-*"), *self.directory.glob(f"{CHECKPOINT_NAME}.old-*")]:
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
            raise UsageError(f"checkpoint interval_s and every_steps must be >= 0, got {self.interval_s}, {self.every_steps}")


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
        comm: Any = None,
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
        names = [name] if _size(self.comm) == 1 else self.comm.allgather(name)
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
