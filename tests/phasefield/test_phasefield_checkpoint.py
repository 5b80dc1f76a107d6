"""Phase-field checkpoints: a stopped or killed run resumes to the uninterrupted run's records;
a failing half-cycle saves the last good state and reports every attempt."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

dolfinx = pytest.importorskip("dolfinx")

from mpi4py import MPI  # noqa: E402

from fem_anode.errors import Interrupted, SolverError  # noqa: E402
from fem_anode.fem.phasefield import run as run_module  # noqa: E402
from fem_anode.fem.phasefield.run import run_phasefield  # noqa: E402
from fem_anode.fem.phasefield.settings import (
    CyclingSettings,
    MeshSettings,
    OutputSettings,
    PhaseFieldSettings,
    SolverSettings,
)  # noqa: E402
from fem_anode.io.checkpoint import CheckpointSettings, CheckpointStore  # noqa: E402

VARYING = {"wall_time_s"}


def _settings(**cycling) -> PhaseFieldSettings:
    return PhaseFieldSettings(
        mesh=MeshSettings(size=4e-9),
        cycling=CyclingSettings(half_cycles=2, half_cycle_time=1.0, **cycling),
        output=OutputSettings(fields=False, figures=False, times=[]),
        checkpoint=CheckpointSettings(interval_s=0.0, every_steps=1),
    )


def _assert_same_records(a: list[dict], b: list[dict], rtol: float = 1e-10) -> None:
    """Equal to ``rtol``, relative for SI quantities (``*_m``, ``*_m2``) and absolute on top for
    the normalised ones (O(1) scale): under MPI the parallel factorisation is reproducible only
    to round-off, so e.g. the von Mises stress of a stress-free state (~1e-13) differs in its
    digits."""
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert set(ra) == set(rb)
        for key, value in ra.items():
            if key in VARYING:
                continue
            if isinstance(value, float):
                floor = 0.0 if key.endswith(("_m", "_m2")) else rtol
                assert abs(value - rb[key]) <= rtol * max(abs(value), abs(rb[key])) + floor, (
                    ra["index"],
                    key,
                    value,
                    rb[key],
                )
            else:
                assert value == rb[key], (ra["index"], key, value, rb[key])


class _StopAfter:
    """Stands in for SafeStop: requests a stop at the n-th poll (same on every rank)."""

    def __init__(self, polls: int) -> None:
        self.polls, self.signal_name = polls, "SIGTERM"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    @property
    def requested(self) -> bool:
        self.polls -= 1
        return self.polls < 0


def test_stopped_run_resumes_to_the_same_records(shared_tmp_path, comm, monkeypatch):
    reference = run_phasefield(_settings(), None, comm, checkpoint_dir=shared_tmp_path / "reference")["half_cycles"]
    directory = shared_tmp_path / "stopped"
    polls = reference[0]["steps"] + reference[1]["steps"] // 2  # one poll per step: mid-delithiation
    monkeypatch.setattr(run_module, "SafeStop", lambda: _StopAfter(polls))
    with pytest.raises(Interrupted, match="stopped by SIGTERM"):
        run_phasefield(_settings(), None, comm, checkpoint_dir=directory)
    monkeypatch.undo()
    checkpoint = CheckpointStore(directory, comm).load()
    assert (
        len(checkpoint.state["driver"]["records"]) == 1
        and checkpoint.state["driver"]["progress"]["kind"] == "delithiation"
    )
    resumed = run_phasefield(_settings(), None, comm, checkpoint_dir=directory, resume=checkpoint)
    assert resumed["resumed"] and resumed["status"] == "completed"
    _assert_same_records(reference, resumed["half_cycles"])
    assert reference[1]["void_fraction"] > 0  # the comparison includes voids and electrolyte


def test_failing_half_cycle_saves_the_last_good_state_and_reports_the_attempts(shared_tmp_path, comm):
    directory = shared_tmp_path / "failing"
    bad = _settings(max_retries=4).replace(solver=SolverSettings(max_it=1))
    with pytest.raises(SolverError, match="5 attempts in a row") as info:
        run_phasefield(bad, None, comm, checkpoint_dir=directory)
    report = info.value.report
    assert report["half_cycle"] == 1 and len(report["attempts"]) == 5
    assert [a["dt"] for a in report["attempts"]] == pytest.approx([0.01 * 0.25**k for k in range(5)])
    assert all(len(a["residual_history"]) == 2 and a["reason"].startswith("diverged") for a in report["attempts"])
    checkpoint = CheckpointStore(directory, comm).load()
    assert checkpoint.state["problem"]["failure"]["t_last_good"] == report["t_last_good"] == 0.0
    # resumed with working solver settings ([solver] may change), it finishes as a fresh run does
    good = _settings(max_retries=4)
    resumed = run_phasefield(good, None, comm, checkpoint_dir=directory, resume=checkpoint)
    assert resumed["status"] == "completed" and len(resumed["half_cycles"]) == 2
    fresh = run_phasefield(good, None, comm)["half_cycles"]
    assert resumed["half_cycles"][1]["mean_c_li"] == pytest.approx(fresh[1]["mean_c_li"], rel=1e-6)


@pytest.mark.skipif(MPI.COMM_WORLD.size > 1, reason="starts its own processes; run serially")
def test_sigkill_mid_run_then_resume_gives_the_same_records(tmp_path):
    config = tmp_path / "pf.toml"
    config.write_text(
        "[mesh]\nsize = 4e-9\n[cycling]\nhalf_cycles = 2\nhalf_cycle_time = 1.0\n"
        "[output]\nfields = false\nfigures = false\ntimes = []\n[checkpoint]\ninterval_s = 0.0\nevery_steps = 1\n"
    )
    command = [sys.executable, "-m", "fem_anode.cli", "-q", "phasefield", str(config)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([*command, "--out", str(tmp_path / "reference")], check=True, env=env, timeout=300)
    killed = tmp_path / "killed"
    process = subprocess.Popen([*command, "--out", str(killed)], env=env)
    state = killed / "checkpoint" / "state.json"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if state.exists() and len(json.loads(state.read_text())["driver"]["records"]) == 1:
            break  # into the delithiation
        time.sleep(0.2)
    assert process.poll() is None, "the run ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert not (killed / "results.json").exists()
    subprocess.run(
        [sys.executable, "-m", "fem_anode.cli", "-q", "phasefield", "--resume", str(killed)],
        check=True,
        env=env,
        timeout=300,
    )
    reference = json.loads((tmp_path / "reference" / "results.json").read_text())["half_cycles"]
    resumed = json.loads((killed / "results.json").read_text())
    assert resumed["resumed"] and not (killed / "checkpoint").exists()
    _assert_same_records(reference, resumed["half_cycles"])
