"""Faults on one MPI rank: errors raised on every rank, test-only injection, and an agreement
that cannot deadlock on them.

:func:`share_error` (one rank's error, e.g. rank 0's after reading or meshing) and
:func:`first_error` (any rank's error) raise the same fem_anode error on every rank, so that no
rank is left waiting in the next collective operation. Both send an error as one
:data:`ErrorPayload`: the error class's name and the message (:func:`error_payload`).

:func:`all_ranks_ok` tells every rank whether a block succeeded everywhere without risking a
deadlock when only one rank failed (the failing rank gives up after a timeout and lets its
exception reach the CLI, which aborts the job).

Fault injection (tests only):

Setting ``FEM_ANODE_INJECT_FAULT=RANK:POINT`` (e.g. ``1:comm``) makes the process of that MPI
rank raise :class:`InjectedFault` when it reaches :func:`fault_point` with that name. It exists
to test that a failure on one rank aborts every rank instead of leaving the others waiting in
the next collective operation. Never set it outside tests.

Points:

* ``comm``: a subcommand obtains its MPI communicator
  (:func:`fem_anode.commands._common.world_comm`), before any collective operation;
* ``solve``: start of :func:`fem_anode.fem.diffusion.run.simulate_diffusion` (the solve of
  ``fem-anode diffusion`` and of :func:`fem_anode.solve_diffusion`).
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np

from fem_anode.errors import FemAnodeError, InputError, SolverError, UsageError

if TYPE_CHECKING:
    from mpi4py import MPI

__all__ = [
    "ENV",
    "POINTS",
    "ErrorPayload",
    "InjectedFault",
    "all_ranks_ok",
    "error_payload",
    "fault_point",
    "first_error",
    "raise_payload",
    "share_error",
]

#: An error as sent to other ranks: (kind, message); kind is ``"UsageError"``, ``"InputError"``,
#: ``"SolverError"`` or ``"internal"`` (any other exception: a bug).
ErrorPayload = tuple[str, str]

_KINDS: dict[str, type[FemAnodeError]] = {cls.__name__: cls for cls in (UsageError, InputError, SolverError)}

ENV = "FEM_ANODE_INJECT_FAULT"
POINTS = ("comm", "solve")


class InjectedFault(RuntimeError):
    """The failure requested by ``FEM_ANODE_INJECT_FAULT`` (stands for an unexpected bug)."""


def error_payload(error: BaseException | None, rank: int = 0) -> ErrorPayload | None:
    """``error`` as other ranks can raise it again (``None`` for no error).

    Args:
        error: the exception caught on this rank.
        rank: this rank (named in the message of an unexpected exception).
    """
    if error is None:
        return None
    for kind, cls in _KINDS.items():
        if isinstance(error, cls):
            return kind, str(error)
    return "internal", f"{type(error).__name__} on rank {rank}: {error}"


def raise_payload(payload: ErrorPayload) -> NoReturn:
    """Raise the error a :func:`error_payload` describes (``RuntimeError`` for ``"internal"``)."""
    kind, message = payload
    raise _KINDS.get(kind, RuntimeError)(message)


def share_error(comm: MPI.Comm | None, error: BaseException | None, *, root: int = 0) -> None:
    """Raise the error of rank ``root`` on every rank; return if it had none (collective).

    The root rank raises ``error`` itself (its traceback intact), the others the same kind of
    error with the same message. ``error`` is ignored on the other ranks.

    Args:
        comm: communicator (``None`` or one rank: ``error`` is raised as it is).
        error: the exception ``root`` caught, or ``None``.
        root: the rank whose error counts.
    """
    if comm is None or comm.size == 1:
        if error is not None:
            raise error
        return
    payload = comm.bcast(error_payload(error, root) if comm.rank == root else None, root=root)
    if payload is None:
        return
    if comm.rank == root and error is not None:
        raise error
    raise_payload(payload)


def first_error(comm: MPI.Comm | None, error: BaseException | None) -> None:
    """Raise the error of the lowest rank that had one on every rank; return if none had (collective).

    That rank raises its own ``error`` (traceback intact), the others the same kind of error
    with the same message.
    """
    if comm is None or comm.size == 1:
        if error is not None:
            raise error
        return
    payloads = comm.allgather(error_payload(error, comm.rank))
    for rank, payload in enumerate(payloads):
        if payload is not None:
            if rank == comm.rank and error is not None:
                raise error
            raise_payload(payload)


def fault_point(point: str, rank: int | None = None) -> None:
    """Raise :class:`InjectedFault` if ``FEM_ANODE_INJECT_FAULT`` asks for ``point`` on this rank.

    Args:
        point: name of this point (one of :data:`POINTS`).
        rank: this process's MPI rank (default: from the launcher's environment).
    """
    spec = os.environ.get(ENV, "").strip()
    if not spec:
        return
    want_rank, _, want_point = spec.partition(":")
    if want_point.strip() != point:
        return
    if rank is None:
        from fem_anode.cli import mpi_rank

        rank = mpi_rank()
    try:
        selected = int(want_rank) == rank
    except ValueError:
        selected = False
    if selected:
        raise InjectedFault(f"injected fault at {point!r} on rank {rank} ({ENV}={spec}; test only)")


_abandoned: list[Any] = []  # requests (and their buffers) given up by all_ranks_ok, kept alive


def all_ranks_ok(comm: MPI.Comm, ok: bool, *, timeout: float = 5.0, poll: float = 0.005) -> bool | None:
    """Whether ``ok`` holds on every rank (a MIN reduction), safe against a lone failing rank.

    A rank whose block succeeded waits as long as it takes (the others may still compute). A
    rank whose block failed waits at most ``timeout`` seconds: when every rank failed together
    (the usual case: the same bad input everywhere) they all get ``False`` within
    milliseconds and can clean up; when the others do not arrive (they wait in some other
    collective operation for this rank, or still compute), it returns ``None`` and the caller
    should skip every further collective and let its exception propagate, so that the CLI
    aborts the job (:func:`fem_anode.cli.main`).

    Args:
        comm: a communicator used for nothing else meanwhile (e.g. ``comm.Dup()`` made when
            entering the block), so the pending reduction cannot be matched with another
            collective operation.
        ok: this rank's result.
        timeout: seconds a failing rank waits for the others.
        poll: polling interval of a failing rank, seconds.

    Returns:
        ``True`` (all ok), ``False`` (some rank failed) or ``None`` (this rank failed and the
        others did not answer in time).
    """
    from mpi4py import MPI

    send = np.array([1 if ok else 0], dtype=np.int32)
    recv = np.zeros(1, dtype=np.int32)
    request = comm.Iallreduce(send, recv, op=MPI.MIN)
    if ok:
        request.Wait()
        return bool(recv[0])
    deadline = time.monotonic() + timeout
    while not request.Test():
        if time.monotonic() > deadline:
            _abandoned.append((request, send, recv))
            return None
        time.sleep(poll)
    return bool(recv[0])
