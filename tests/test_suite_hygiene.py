"""The suite's own processes are found at its end, also when their parent is gone (conftest)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SESSION_MARK, suite_processes

pytestmark = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc")


def test_an_orphaned_grandchild_of_the_suite_is_found(tmp_path):
    mark = os.environ[SESSION_MARK]
    pid_file = tmp_path / "pid"
    # a child that starts a sleeper in its own session and exits at once: the sleeper is
    # re-parented to init, as the ranks of a SIGKILLed mpirun are
    launcher = (
        "import subprocess, sys; "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)'], start_new_session=True); "
        f"open({str(pid_file)!r}, 'w').write(str(p.pid))"
    )
    subprocess.run([sys.executable, "-c", launcher], check=True, timeout=30)
    orphan = int(pid_file.read_text())
    try:
        assert orphan in [pid for pid, _ in suite_processes(mark)]
        assert os.getpid() not in [pid for pid, _ in suite_processes(mark)]
    finally:
        os.kill(orphan, 9)
    deadline = time.monotonic() + 10
    while orphan in [pid for pid, _ in suite_processes(mark)] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert orphan not in [pid for pid, _ in suite_processes(mark)]
    assert suite_processes("another-session") == []
