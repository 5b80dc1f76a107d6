"""MPI faults: an exception on one rank aborts every rank with its message instead of hanging.

The tests launch ``mpirun -n 2 python -m fem_anode ...`` in a subprocess with a timeout and a
fault injected on rank 1 only (``FEM_ANODE_INJECT_FAULT``, see :mod:`fem_anode.faults`): the
other rank would wait forever in the next collective operation. They run when the suite runs
serially and skip when it already runs under MPI (no mpirun inside mpirun). The in-process
checks at the end run on any number of ranks.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fem_anode.io import VoxelImage, write_image
from conftest import UNDER_MPI, mpirun_environment

MPIRUN = shutil.which("mpirun") or shutil.which("mpiexec")
needs_mpirun = pytest.mark.skipif(
    UNDER_MPI or MPIRUN is None, reason="launches mpirun itself: run serially, with Open MPI installed"
)
TIMEOUT = 60.0


def launch(
    args: list[str], *, fault: str | None = None, timeout: float = TIMEOUT, python: list[str] | None = None
) -> tuple[int | None, str, float]:
    """``mpirun -n 2 python -m fem_anode args``: (exit code or None on timeout, stderr, seconds).

    On a timeout the whole process group (mpirun and its ranks, started here) is terminated.
    """
    env = mpirun_environment()
    env.pop("FEM_ANODE_INJECT_FAULT", None)
    if fault is not None:
        env["FEM_ANODE_INJECT_FAULT"] = fault
    cmd = [MPIRUN, "-n", "2", sys.executable, *(python or ["-m", "fem_anode"]), *args]
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        _, err = proc.communicate(timeout=timeout)
        return proc.returncode, err, time.perf_counter() - start
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            _, err = proc.communicate()
        return None, err, time.perf_counter() - start


def roi(path: Path) -> Path:
    labels = np.full((24, 30), 3, dtype=np.uint8)
    labels[:, :3] = 0
    yy, xx = np.mgrid[:24, :30]
    labels[(yy - 6) ** 2 + (xx - 22) ** 2 <= 9] = 1
    return write_image(path, VoxelImage(labels, (20e-9, 20e-9), {"pore": 0, "si": 1, "sei": 3}))


@needs_mpirun
def test_fault_on_one_rank_aborts_all_ranks(tmp_path):
    """metrics: rank 1 fails when it gets its communicator; rank 0 goes on into the collectives
    of the output directory. Without MPI_Abort rank 0 would wait forever (see the next test)."""
    image = roi(tmp_path / "roi.npy")
    out = tmp_path / "out"
    code, err, seconds = launch(["metrics", str(image), "--out", str(out)], fault="1:comm")
    assert code is not None, f"hung for {seconds:.0f} s:\n{err}"
    assert code != 0
    assert "fem-anode metrics: internal error (rank 1): InjectedFault: injected fault at 'comm' on rank 1" in err
    assert "Traceback" not in err
    assert not out.exists()
    print(f"aborted in {seconds:.1f} s")


@needs_mpirun
def test_without_abort_the_same_fault_hangs(tmp_path):
    """The control experiment: main() with abort_on_error=False leaves rank 0 waiting (killed here after 8 s)."""
    image = roi(tmp_path / "roi.npy")
    script = "import sys; from fem_anode.cli import main; sys.exit(main(sys.argv[1:], abort_on_error=False))"
    code, err, seconds = launch(
        ["metrics", str(image), "--out", str(tmp_path / "out")], fault="1:comm", timeout=6.0, python=["-c", script]
    )
    assert code is None and seconds >= 6.0, f"expected a hang, got exit {code}:\n{err}"
    assert "injected fault" in err


@needs_mpirun
def test_fault_in_the_solver_of_one_rank_aborts_all_ranks(tmp_path):
    """diffusion: rank 1 fails at the start of the solve, inside the output directory, while rank 0 enters
    the memory-check collectives. output_directory's success agreement (faults.all_ranks_ok) gives up after
    its timeout instead of blocking in a mismatched allreduce, so the CLI can abort (hung before)."""
    pytest.importorskip("dolfinx")
    roi(tmp_path / "roi.npy")
    config = tmp_path / "run.toml"
    config.write_text(
        '[geometry]\nimage = "roi.npy"\n\n[time]\nt_end = 0.001\noutput_times = [0.001]\n\n[output]\nfields = false\nfigures = false\n'
    )
    out = tmp_path / "out"
    code, err, seconds = launch(["diffusion", str(config), "--out", str(out)], fault="1:solve")
    assert code is not None, f"hung for {seconds:.0f} s:\n{err}"
    print(f"aborted in {seconds:.1f} s")
    assert code != 0
    assert "injected fault at 'solve' on rank 1" in err and "Traceback" not in err
    assert not out.exists()


@needs_mpirun
def test_same_input_error_on_every_rank_keeps_its_exit_code(tmp_path):
    code, err, _ = launch(["metrics", str(tmp_path / "missing.npy"), "--out", str(tmp_path / "out")])
    assert code == 3
    assert "image not found" in err and "Traceback" not in err
    # every rank meets it: rank 0 reports it (the others wait first, and rank 0's abort usually ends
    # them before they report it too)
    assert "fem-anode metrics: error: image not found" in err, err


@needs_mpirun
def test_two_rank_run_records_its_ranks_and_mpi_library(tmp_path):
    image = roi(tmp_path / "roi.npy")
    out = tmp_path / "out"
    code, err, _ = launch(["metrics", str(image), "--out", str(out), "-q"])
    assert code == 0, err
    record = json.loads((out / "metrics.json").read_text())["provenance"]
    assert record["ranks"] == 2
    assert "mpi_library" in record["versions"] and "mpi4py" in record["versions"]


def test_fault_injection_is_off_unless_asked(monkeypatch):
    from fem_anode.faults import InjectedFault, fault_point

    monkeypatch.delenv("FEM_ANODE_INJECT_FAULT", raising=False)
    fault_point("comm", 1)
    monkeypatch.setenv("FEM_ANODE_INJECT_FAULT", "1:solve")
    fault_point("comm", 1)  # other point
    fault_point("solve", 0)  # other rank
    with pytest.raises(InjectedFault, match="injected fault at 'solve' on rank 1"):
        fault_point("solve", 1)


def test_error_in_process_under_mpi_does_not_abort(comm, tmp_path, capsys, monkeypatch):
    """main(argv) called from Python (this test suite, on every rank) returns the code instead of aborting."""
    from fem_anode.cli import main

    monkeypatch.setenv("FEM_ANODE_INJECT_FAULT", f"{comm.rank}:comm")
    assert main(["metrics", str(roi(tmp_path / "roi.npy")), "--out", str(tmp_path / "out")]) == 1
    assert "injected fault" in capsys.readouterr().err
    comm.barrier()  # every rank is still alive


def _in_step(comm, seconds: float = 20.0) -> bool:
    """Whether every rank reaches this barrier (polled: a rank left out of step fails the test
    instead of hanging it)."""
    request = comm.Ibarrier()
    deadline = time.monotonic() + seconds
    while not request.Test():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def test_output_agreement_keeps_the_ranks_in_step_after_a_failure(comm, shared_tmp_path, monkeypatch):
    """A failure inside ``output_directory``: the rank that gave up waiting (it failed first,
    the others later) and the others make the same collective calls afterwards; ranks whose own
    block succeeded raise too; nothing is published."""
    from fem_anode import faults
    from fem_anode.errors import FemAnodeError
    from fem_anode.io.output import output_directory

    real = faults.all_ranks_ok
    monkeypatch.setattr(faults, "all_ranks_ok", lambda sync, ok: real(sync, ok, timeout=0.3))
    last = comm.rank == comm.size - 1
    out = shared_tmp_path / "out"
    # 1) every rank fails, the last one first: it gives up after 0.3 s, the others fail 1 s later
    with pytest.raises(ValueError, match="fails"):
        with output_directory(out, comm) as staging:
            (staging / f"part{comm.rank}").write_text("x")
            if not last:
                time.sleep(1.0)
            raise ValueError("this rank fails")
    if comm.size > 1 and last:
        request, _, _ = faults._abandoned.pop()  # (the others' late answer completes it)
        request.Wait()
    assert _in_step(comm), "the ranks are out of step after a failed output agreement"
    # 2) only the last rank fails: the others' blocks succeed, and they raise all the same
    expected = (ValueError, "fails") if last or comm.size == 1 else (FemAnodeError, "another MPI rank failed")
    with pytest.raises(expected[0], match=expected[1]):
        with output_directory(out, comm) as staging:
            if last:
                raise ValueError("this rank fails")
    assert _in_step(comm)
    assert not out.exists()
    assert comm.allreduce(1) == comm.size


def test_all_ranks_ok_agrees_and_never_deadlocks(comm):
    """The agreement an output directory needs after its block (see docs/reliability.md)."""
    import time

    from fem_anode.faults import all_ranks_ok

    sync = comm.Dup()
    try:
        assert all_ranks_ok(sync, True) is True
        assert all_ranks_ok(sync, False) is False  # every rank failed: all agree at once
        assert all_ranks_ok(sync, comm.rank != comm.size - 1) is False  # one rank failed, the others arrive
        if comm.size > 1:
            # the last rank fails while the others are busy for 1.5 s: it gives up after 0.3 s ...
            last = comm.rank == comm.size - 1
            if last:
                start = time.perf_counter()
                assert all_ranks_ok(sync, False, timeout=0.3) is None
                assert 0.3 <= time.perf_counter() - start < 1.4
            else:
                time.sleep(1.5)
                assert all_ranks_ok(sync, True) is False  # ... and they still learn of the failure
            if last:
                from fem_anode.faults import _abandoned

                request, _, recv = _abandoned.pop()
                request.Wait()
                assert recv[0] == 0
        comm.barrier()
    finally:
        sync.Free()
