"""Shared test fixtures. The suite runs serially and under ``mpirun -n 2``.

Every rank gets its own ``tmp_path`` (``--basetemp`` per rank); tests that need one directory
for all ranks use ``shared_tmp_path``. Tests must be rank-agnostic: reduce scalars over the
communicator before asserting.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import pytest


def mpi_size() -> int:
    for var in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"):
        if var in os.environ:
            return int(os.environ[var])
    return 1


#: Whether this test process is one of several MPI ranks (``mpirun -n 2 ... pytest``). Tests that
#: start their own processes or measure one process check it: ``from conftest import UNDER_MPI``.
UNDER_MPI = mpi_size() > 1


def mpi_rank_env() -> int:
    for var in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def pytest_configure(config: pytest.Config) -> None:
    if mpi_size() > 1:
        if not config.option.basetemp:
            config.option.basetemp = (
                Path(tempfile.gettempdir()) / f"fem_anode-pytest-{os.getppid()}-rank{mpi_rank_env()}"
            )
        if mpi_rank_env() != 0:
            config.option.verbose = -1


#: Environment variable that marks every process the suite starts (inherited through exec).
SESSION_MARK = "FEM_ANODE_TEST_SESSION"


def pytest_sessionstart(session: pytest.Session) -> None:
    os.environ[SESSION_MARK] = f"{os.getpid()}-{time.time_ns()}"


def suite_processes(mark: str) -> list[tuple[int, str]]:
    """Live processes (pid, command line) other than this one whose environment carries ``mark``.

    Finds them even after their parent died (a SIGKILLed ``mpirun`` leaves its ranks to init),
    which a walk over this process's children would not.
    """
    needle = f"{SESSION_MARK}={mark}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # gone meanwhile, or not ours
            continue
        if stat[stat.rfind(")") + 2] != "Z":  # zombies are dead, only not yet reaped
            found.append((int(entry.name), command))
    return found


#: Session directories of the ``mpirun`` jobs this process started (removed at the end).
_MPIRUN_TMPDIRS: list[str] = []


def mpirun_environment(**extra: str) -> dict[str, str]:
    """Environment for an ``mpirun`` the suite starts: as root, shared memory, and its own new TMPDIR.

    Open MPI 5 puts the job's session directory at ``$TMPDIR/prterun.<host>.<pid>.<uid>`` and refuses
    to start (``PMIX_ERR_EXISTS`` in ``session_dir.c``) when a directory of that name is left over from
    a SIGKILLed ``mpirun`` whose pid was later reused (pid_max is 32768 here). A fresh, short directory
    per launch (Unix sockets in it must stay under 108 characters) makes that impossible.
    """
    tmpdir = tempfile.mkdtemp(prefix="fa-mpi-", dir="/tmp" if Path("/tmp").is_dir() else None)
    _MPIRUN_TMPDIRS.append(tmpdir)
    env = {
        **os.environ,
        "OMPI_ALLOW_RUN_AS_ROOT": "1",
        "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
        "OMPI_MCA_btl": "self,sm",
        "OMPI_MCA_rmaps_base_oversubscribe": "1",
        "TMPDIR": tmpdir,
    }
    env.update(extra)
    return env


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """The suite must leave no process of its own behind (e.g. the ranks of a killed ``mpirun``):
    wait up to 10 s for them, then kill them and fail the session naming them. Then remove the
    ``mpirun`` session directories."""
    try:
        _fail_on_leftover_processes(session)
    finally:
        for tmpdir in _MPIRUN_TMPDIRS:
            shutil.rmtree(tmpdir, ignore_errors=True)
        _EXIT_STATUS[0] = int(session.exitstatus)


_EXIT_STATUS = [0]


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """Under MPI, end every rank here: flush, wait for all, ``MPI_Finalize``, exit with the session's
    status, without ``PetscFinalize``.

    ``PetscFinalize`` (petsc4py's exit handler) destroys the PETSc objects that Python's garbage
    collector handed to PETSc, collectively, matched between ranks by their creation numbers. After a
    suite whose tests create different numbers of PETSc objects on different ranks (rank-0-only
    checks, rank-dependent code paths) those numbers name different objects on each rank, and a rank
    can enter a collective call the others never make: the run hung after every test had passed
    (seen in two of four runs; ``gdb``: rank 1 in ``PetscGarbageCleanup`` -> ``MPI_Allreduce``, rank 0
    in ``MPI_Finalize``). A rank still here after 120 s prints its traceback and exits with an error.
    """
    if not UNDER_MPI:
        return
    import faulthandler

    from mpi4py import MPI

    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        if stream is not None:
            stream.flush()
    faulthandler.dump_traceback_later(120, exit=True, file=sys.__stderr__ or sys.stderr)
    MPI.COMM_WORLD.Barrier()
    MPI.Finalize()
    os._exit(_EXIT_STATUS[0])


def _fail_on_leftover_processes(session: pytest.Session) -> None:
    mark = os.environ.get(SESSION_MARK)
    if not mark or not Path("/proc/self/environ").exists():
        return
    deadline = time.monotonic() + 10.0
    while (left := suite_processes(mark)) and time.monotonic() < deadline:
        time.sleep(0.2)
    if not left:
        return
    for pid, _ in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    listing = "\n".join(f"  pid {pid}: {command[:200]}" for pid, command in left)
    sys.stderr.write(
        f"\nERROR: the test session left {len(left)} process(es) of its own running (now killed):\n{listing}\n"
    )
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def comm():
    """MPI.COMM_WORLD (tests using it need mpi4py)."""
    MPI = pytest.importorskip("mpi4py.MPI")
    return MPI.COMM_WORLD


@pytest.fixture
def shared_tmp_path(comm, tmp_path: Path) -> Path:
    """One temporary directory shared by all ranks (rank 0's ``tmp_path``)."""
    return Path(comm.bcast(str(tmp_path), root=0))


@pytest.fixture(autouse=True)
def _no_3d_rendering(monkeypatch: pytest.MonkeyPatch) -> None:
    """3D pictures cost seconds per command: off in the suite except in tests/io (whose tests delete the variable)."""
    monkeypatch.setenv("FEM_ANODE_NO_RENDER", "1")


@pytest.fixture(autouse=True)
def _restore_package_logging():
    """The CLI points the ``fem_anode`` logger at the stderr of the moment (pytest's capture);
    give later tests the logger as it was, not a handler on a closed stream."""
    import logging

    logger = logging.getLogger("fem_anode")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved[0], saved[1], saved[2]


@pytest.fixture(autouse=True)
def _ranks_stay_in_step(request: pytest.FixtureRequest):
    """Under MPI, say when a rank gave up an output agreement during a test.

    :func:`fem_anode.faults.all_ranks_ok` returns ``None`` on a rank that failed more than its
    timeout before the others (e.g. under load); such a rank makes no further collective call in
    :func:`fem_anode.io.output.output_directory`, nor do the others after a failure, so the ranks
    stay in step. The note names the test should a later collective call hang all the same
    (the suite's ``faulthandler_timeout`` then prints where each rank waits).
    """
    if not UNDER_MPI:
        yield
        return
    from fem_anode import faults

    before = len(faults._abandoned)
    yield
    if len(faults._abandoned) > before:  # (past pytest's capture: it is shown only for failed tests)
        (sys.__stderr__ or sys.stderr).write(
            f"\nNOTE: rank {mpi_rank_env()} gave up waiting for the other ranks' agreement in {request.node.nodeid}\n"
        )


@pytest.fixture(autouse=True)
def _matplotlib_agg(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MPLBACKEND", "Agg")


DEMOS = Path(__file__).resolve().parents[1] / "demos"


@pytest.fixture(scope="session")
def load_demo():
    """``load_demo("diffusion_fig8")`` imports ``demos/diffusion_fig8.py`` as a module."""
    import importlib.util

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"demo_{name}", DEMOS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
