"""Safe stop on SIGINT/SIGTERM: the signal only sets a flag; the time loop stops at a safe point.

A long run wraps its time loop in :class:`SafeStop`. The handlers it installs record the
signal and return, so no PETSc call or file write is cut in half. The loop polls
:meth:`SafeStop.agreed` after each accepted step; under MPI the flag is reduced over the
communicator (MAX), so every rank sees the stop at the same step even if only one rank (or
only the launcher's target) received the signal. A second SIGINT while a stop is pending
raises :class:`KeyboardInterrupt` at once (the usual "press Ctrl-C twice" escape).
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mpi4py import MPI

__all__ = ["SafeStop", "agree_flags"]

logger = logging.getLogger(__name__)


def agree_flags(comm: MPI.Comm | None, *flags: bool) -> tuple[bool, ...]:
    """Logical OR of each flag over the ranks of ``comm`` (one small allreduce; no-op serially)."""
    if comm is None or comm.size == 1:
        return tuple(bool(f) for f in flags)
    import numpy as np
    from mpi4py import MPI

    values = np.array([1 if f else 0 for f in flags], dtype=np.int32)
    comm.Allreduce(MPI.IN_PLACE, values, op=MPI.MAX)
    return tuple(bool(v) for v in values)


class SafeStop:
    """Context manager: SIGINT/SIGTERM/SIGUSR1 set :attr:`requested` instead of killing the process.

    Args:
        signals: signals to catch (default SIGINT, SIGTERM and SIGUSR1; Open MPI's ``mpirun``
            forwards SIGUSR1 to every rank, and batch systems send it before a time limit).

    The previous handlers are restored on exit. Outside the main thread (where Python cannot
    install handlers) nothing is installed and only :meth:`request` sets the flag.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)) -> None:
        self.signals = tuple(signals)
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def request(self, reason: str = "request") -> None:
        """Ask the loop to stop at its next safe point (what the signal handler does)."""
        self.requested = True
        self.signal_name = self.signal_name or reason

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: give up waiting for the safe point
        self.request(name)

    def agreed(self, comm: MPI.Comm | None) -> bool:
        """Collective: True on every rank if any rank has a pending stop request."""
        return agree_flags(comm, self.requested)[0]

    def __enter__(self) -> SafeStop:
        if threading.current_thread() is not threading.main_thread():
            logger.debug("SafeStop: not in the main thread, signal handlers not installed")
            return self
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._handler)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
