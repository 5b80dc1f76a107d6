"""Point-to-point exchanges of array rows between the ranks of a communicator (buffer-based
``Alltoallv``, no pickling), shared by the checkpoints and the phase field's substructured LU."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["answer_rows", "send_rows"]


def send_rows(comm: Any, dest: np.ndarray, data: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Collective: send row ``i`` of ``data`` to rank ``dest[i]``; returns the received rows
    (by source rank), the send order and the per-rank receive counts (to send answers back)."""
    from mpi4py.util.dtlib import from_numpy_dtype

    order = np.argsort(dest, kind="stable")
    send_counts = np.bincount(dest, minlength=comm.size).astype(np.int64)
    recv_counts = np.empty(comm.size, dtype=np.int64)
    comm.Alltoall(send_counts, recv_counts)
    width = int(np.prod(data.shape[1:]))
    sent = np.ascontiguousarray(data[order])
    received = np.empty((int(recv_counts.sum()), *data.shape[1:]), dtype=data.dtype)
    kind = from_numpy_dtype(data.dtype)
    comm.Alltoallv([sent, send_counts * width, kind], [received, recv_counts * width, kind])
    return received, order, recv_counts


def answer_rows(comm: Any, answers: np.ndarray, recv_counts: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Collective: send ``answers`` (rows in received order) back to where the rows of
    :func:`send_rows` came from; returns them in the caller's original row order."""
    from mpi4py.util.dtlib import from_numpy_dtype

    send_counts = np.bincount(np.repeat(np.arange(comm.size), recv_counts), minlength=comm.size).astype(np.int64)
    back_counts = np.empty(comm.size, dtype=np.int64)
    comm.Alltoall(send_counts, back_counts)
    width = int(np.prod(answers.shape[1:]))
    back = np.empty((int(back_counts.sum()), *answers.shape[1:]), dtype=answers.dtype)
    kind = from_numpy_dtype(answers.dtype)
    comm.Alltoallv([np.ascontiguousarray(answers), send_counts * width, kind], [back, back_counts * width, kind])
    out = np.empty_like(back)
    out[order] = back
    return out
