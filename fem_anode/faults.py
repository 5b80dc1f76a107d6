"""Test-only fault injection: make one MPI rank fail at a named point of a run.

Setting ``FEM_ANODE_INJECT_FAULT=RANK:POINT`` (e.g. ``1:comm``) makes the process of that MPI
rank raise :class:`InjectedFault` when it reaches :func:`fault_point` with that name. It exists
to test that a failure on one rank aborts every rank instead of leaving the others waiting in
the next collective operation. Never set it outside tests.

Points:

* ``comm``: a subcommand obtains its MPI communicator
  (:func:`fem_anode.commands._common.world_comm`), before any collective operation;
* ``solve``: start of :func:`fem_anode.fem.diffusion_run.run_diffusion`.
"""

from __future__ import annotations

import os

__all__ = ["ENV", "POINTS", "InjectedFault", "fault_point"]

ENV = "FEM_ANODE_INJECT_FAULT"
POINTS = ("comm", "solve")


class InjectedFault(RuntimeError):
    """The failure requested by ``FEM_ANODE_INJECT_FAULT`` (stands for an unexpected bug)."""


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
