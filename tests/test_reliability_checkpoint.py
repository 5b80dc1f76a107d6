"""Reliability of long runs: atomic checkpoints, resume after SIGKILL, safe stop on SIGINT/SIGTERM,
bounded step-halving retries after solver failures, level checkpoints of convergence studies.

Library-level tests run serially and under ``mpirun -n 2``; the tests that start ``fem-anode`` in
a subprocess (and send it real signals) run serially only, one of them launching ``mpirun -n 2``.
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

pytest.importorskip("dolfinx")

from dolfinx import fem, mesh as dmesh  # noqa: E402
from mpi4py import MPI  # noqa: E402

from fem_anode.errors import InputError, Interrupted, SolverError, UsageError  # noqa: E402
from fem_anode.fem.analytic import robin_sheet_mean  # noqa: E402
from fem_anode.fem.diffusion import DiffusionProblem  # noqa: E402
from fem_anode.fem.diffusion.settings import DiffusionSettings, GeometrySettings, SolverSettings, TimeSettings  # noqa: E402
from fem_anode.fem.diffusion.time_stepping import StepPlan, plan_steps  # noqa: E402
from fem_anode.io import VoxelImage, write_image  # noqa: E402
from fem_anode.io.checkpoint import CheckpointPolicy, Checkpointer, CheckpointStore  # noqa: E402
from fem_anode.io.interrupt import SafeStop  # noqa: E402

from builders import STRIP_LENGTH as LENGTH  # noqa: E402
from builders import strip_mesh  # noqa: E402
from conftest import UNDER_MPI, mpirun_environment  # noqa: E402

serial_only = pytest.mark.skipif(UNDER_MPI, reason="spawns its own processes; run serially only")

TIMES = [2e-4, 1e-3, 4e-3]


def strip(comm, directory: Path, n: int = 16):
    """The plane sheet of Crank's series (see builders.strip_mesh)."""
    return strip_mesh(n, directory, comm)


def strip_settings(**solver) -> DiffusionSettings:
    settings = DiffusionSettings(
        geometry=GeometrySettings(mesh=Path("strip.msh")),
        time=TimeSettings(t_end=4e-3, output_times=TIMES, dt_initial=1e-8, steps_per_level=4, dt_max=1e-4),
        solver=SolverSettings(**solver),
    )
    settings.check()
    return settings


def crank_errors(result, settings) -> np.ndarray:
    physics = settings.physics
    out = result.at_output_times()
    exact = physics.c_bulk * robin_sheet_mean(np.array(out["times"]), LENGTH, physics.D_eff, physics.eps, physics.k_f)
    return np.abs(np.array(out["domain_mean"]) - exact) / exact


def assert_same_records(a, b, rtol: float = 1e-10) -> None:
    np.testing.assert_allclose(a.times, b.times, rtol=1e-14, atol=0)
    np.testing.assert_allclose(a.domain_mean, b.domain_mean, rtol=rtol, atol=0)
    for name in b.region_means:
        np.testing.assert_allclose(a.region_means[name], b.region_means[name], rtol=rtol, atol=0)
    # The mass-balance error is round-off: bounded, never compared by value.
    assert a.mass_balance_rel_error < 1e-10 and b.mass_balance_rel_error < 1e-10


# -- the checkpoint store -------------------------------------------------------------------
def _unit_square(comm):
    return dmesh.create_unit_square(comm, 6, 5)


def _quadrature_space(domain):
    import basix.ufl

    return fem.functionspace(
        domain, basix.ufl.quadrature_element(domain.basix_cell(), value_shape=(3,), scheme="default", degree=2)
    )


def _quadrature_values(Q):
    """A smooth vector field at the quadrature points of ``Q`` (as the plastic state is stored)."""
    import ufl

    x = ufl.SpatialCoordinate(Q.mesh)
    q = fem.Function(Q)
    q.interpolate(
        fem.Expression(ufl.as_vector([x[0] * x[1], 1.0 + x[0], ufl.sin(3.0 * x[1])]), Q.element.interpolation_points())
    )
    return q


def test_functions_round_trip_on_any_rank_count(shared_tmp_path, comm):
    """P2, vector P1, mixed (vector P2 x P1), DG and quadrature fields come back exactly on the
    same ranks and on one rank (written in parallel in the mesh's input order); another mesh is refused."""
    import basix.ufl

    domain = _unit_square(comm)
    V2 = fem.functionspace(domain, ("Lagrange", 2))
    Vv = fem.functionspace(domain, ("Lagrange", 1, (2,)))
    dg = fem.functionspace(domain, ("DG", 1))
    elements = [basix.ufl.element("Lagrange", "triangle", 2, shape=(2,)), basix.ufl.element("Lagrange", "triangle", 1)]
    mixed = fem.functionspace(domain, basix.ufl.mixed_element(elements))
    u, w, m, d = fem.Function(V2), fem.Function(Vv), fem.Function(mixed), fem.Function(dg)
    u.interpolate(lambda x: 1.0 + x[0] + 3.0 * x[1] ** 2)
    w.interpolate(lambda x: np.vstack([x[0] * x[1], -x[1]]))
    m.sub(0).interpolate(lambda x: np.vstack([x[0] ** 2, x[1] - x[0]]))
    m.sub(1).interpolate(lambda x: 2.0 + x[1])
    d.interpolate(lambda x: np.sin(5.0 * x[0]) + x[1])  # discontinuous space: no unique dof coordinates
    q = _quadrature_values(_quadrature_space(domain))
    p3 = fem.Function(fem.functionspace(domain, ("Lagrange", 3)))  # oriented edge dofs: through adios4dolfinx
    p3.interpolate(lambda x: x[0] ** 3 - 2.0 * x[0] * x[1] ** 2)
    rng = np.random.default_rng(7)
    store = CheckpointStore(shared_tmp_path / "run", comm)
    assert not store.exists()
    store.save(
        {"t": 0.1 + 0.2, "rng": rng.bit_generator.state, "step": 3},
        {"u": u, "w": w, "m": m, "d": d, "q": q, "p3": p3, "times": np.array([0.0, 1e-9, 0.3])},
    )
    assert store.exists() and (store.path / "state.json").is_file()
    loaded = store.load()
    assert loaded.state["t"] == 0.1 + 0.2  # floats round-trip bit for bit
    assert loaded.ranks == comm.size and {loaded.fields[name]["mode"] for name in "uwmdq"} == {"input-order"}
    assert loaded.fields["p3"]["mode"] == "adios4dolfinx"
    np.testing.assert_array_equal(loaded.arrays["times"], [0.0, 1e-9, 0.3])
    resumed = np.random.default_rng(0)
    resumed.bit_generator.state = loaded.state["rng"]
    assert resumed.random() == rng.random()
    for comm_restore in (comm, MPI.COMM_SELF):  # the same ranks, and a single rank
        domain2 = _unit_square(comm_restore)
        u2 = fem.Function(fem.functionspace(domain2, ("Lagrange", 2)))
        w2 = fem.Function(fem.functionspace(domain2, ("Lagrange", 1, (2,))))
        loaded.restore("u", u2)
        loaded.restore("w", w2)
        exact = fem.Function(u2.function_space)
        exact.interpolate(lambda x: 1.0 + x[0] + 3.0 * x[1] ** 2)
        assert np.abs(u2.x.array - exact.x.array).max() < 1e-14
        exact_w = fem.Function(w2.function_space)
        exact_w.interpolate(lambda x: np.vstack([x[0] * x[1], -x[1]]))
        assert np.abs(w2.x.array - exact_w.x.array).max() < 1e-14
        m2 = fem.Function(fem.functionspace(domain2, basix.ufl.mixed_element(elements)))
        loaded.restore("m", m2)
        exact_m = fem.Function(m2.function_space)
        exact_m.sub(0).interpolate(lambda x: np.vstack([x[0] ** 2, x[1] - x[0]]))
        exact_m.sub(1).interpolate(lambda x: 2.0 + x[1])
        assert np.abs(m2.x.array - exact_m.x.array).max() < 1e-14
        d2 = fem.Function(fem.functionspace(domain2, ("DG", 1)))
        loaded.restore("d", d2)
        exact_d = fem.Function(d2.function_space)
        exact_d.interpolate(lambda x: np.sin(5.0 * x[0]) + x[1])
        assert np.abs(d2.x.array - exact_d.x.array).max() < 1e-14
        q2 = fem.Function(_quadrature_space(domain2))
        loaded.restore("q", q2)
        assert np.abs(q2.x.array - _quadrature_values(q2.function_space).x.array).max() < 1e-14
        p3_2 = fem.Function(fem.functionspace(domain2, ("Lagrange", 3)))
        loaded.restore("p3", p3_2)
        exact_p3 = fem.Function(p3_2.function_space)
        exact_p3.interpolate(lambda x: x[0] ** 3 - 2.0 * x[0] * x[1] ** 2)
        assert np.abs(p3_2.x.array - exact_p3.x.array).max() < 1e-13
    with pytest.raises(InputError, match="differs"):  # another mesh
        loaded.restore("u", fem.Function(fem.functionspace(dmesh.create_unit_square(comm, 6, 6), ("Lagrange", 2))))
    moved = _unit_square(comm)
    moved.geometry.x[:, 0] *= 2.0  # the same cells and dofs elsewhere
    with pytest.raises(InputError, match="mesh differs"):
        loaded.restore("u", fem.Function(fem.functionspace(moved, ("Lagrange", 2))))
    with pytest.raises(InputError, match="differs"):  # another element with as many dofs
        loaded.restore("d", fem.Function(fem.functionspace(domain, ("Lagrange", 1, (3,)))))
    with pytest.raises(InputError, match="no field 'x'"):
        loaded.restore("x", u)


class _SpyComm:
    """A communicator that records the pickled size of every object it sends or returns."""

    def __init__(self, comm):
        self._comm = comm
        self.sizes: list[int] = []

    def __getattr__(self, name):
        attribute = getattr(self._comm, name)
        if name not in (
            "bcast",
            "gather",
            "allgather",
            "scatter",
            "alltoall",
            "allreduce",
            "reduce",
            "send",
            "recv",
            "sendrecv",
        ):
            return attribute

        def spied(*args, **kwargs):
            import pickle

            self.sizes += [len(pickle.dumps(a)) for a in args[:1]]
            result = attribute(*args, **kwargs)
            self.sizes.append(len(pickle.dumps(result)))
            return result

        return spied


def test_no_rank_holds_a_whole_field(shared_tmp_path, comm):
    """Saving and loading Functions sends only small objects (checksums, state) through the store's
    communicator; the field values go from the owning ranks to the files and back, never via one rank."""
    domain = dmesh.create_unit_square(comm, 48, 48)
    u = fem.Function(fem.functionspace(domain, ("Lagrange", 2, (2,))))
    u.interpolate(lambda x: np.vstack([np.sin(x[0]), x[1] ** 2]))
    field_bytes = 8 * u.function_space.dofmap.index_map.size_global * 2
    spy = _SpyComm(comm)
    store = CheckpointStore(shared_tmp_path / "spied", spy)
    store.save({"t": 1.0}, {"u": u, "v": u, "times": np.arange(3.0)})
    loaded = store.load()
    u2 = fem.Function(u.function_space)
    loaded.restore("u", u2)
    owned = u.function_space.dofmap.index_map.size_local * 2
    assert np.array_equal(u2.x.array[:owned], u.x.array[:owned])
    assert len(spy.sizes) > 0 or comm.size == 1
    assert max(spy.sizes, default=0) < field_bytes / 20, (max(spy.sizes), field_bytes)
    assert len(list((store.path / "fields").glob("*.bin"))) == 2  # the values are there, not in rank 0's files
    assert sum(p.stat().st_size for p in (store.path / "fields").glob("*.bin")) == 2 * field_bytes  # values only
    for small in ("arrays.npz", "state.json"):
        assert (store.path / small).stat().st_size < field_bytes / 20, small


def test_stale_temporaries_are_ignored_and_corruption_is_reported(shared_tmp_path, comm):
    directory = shared_tmp_path / "atomic"
    store = CheckpointStore(directory, comm)
    with pytest.raises(InputError, match="no checkpoint in"):
        store.load()
    store.save({"step": 1}, {"x": np.arange(4.0)})
    store.save({"step": 2}, {"x": np.arange(5.0)})
    if comm.rank == 0:  # what a kill during a save leaves: a half-written temporary
        stale = directory / "checkpoint.tmp-killed"
        stale.mkdir()
        (stale / "state.json").write_text('{"step": 99, "_checkp')
    comm.barrier()
    assert store.load().state["step"] == 2
    if comm.rank == 0:  # a kill between the two renames of a save: only checkpoint.old-* is left
        os.replace(directory / "checkpoint", directory / "checkpoint.old-abc")
    comm.barrier()
    assert store.exists() and store.load().state["step"] == 2
    u = fem.Function(fem.functionspace(_unit_square(comm), ("Lagrange", 1)))
    u.interpolate(lambda x: x[0] + x[1])
    store.save({"step": 3}, {"x": np.arange(6.0), "u": u})  # cleans up every leftover
    comm.barrier()
    assert sorted(p.name for p in directory.iterdir()) == ["checkpoint"]
    assert store.load().arrays["x"].size == 6
    state_path = store.path / "state.json"
    text = state_path.read_text()
    comm.barrier()
    if comm.rank == 0:
        state_path.write_text(text[: len(text) // 2])
    comm.barrier()
    with pytest.raises(InputError, match=r"corrupt checkpoint .*state\.json"):
        store.load()
    if comm.rank == 0:
        state_path.write_text(text)
        arrays = (store.path / "arrays.npz").read_bytes()
        data = bytearray(arrays)
        data[-30] ^= 0xFF
        (store.path / "arrays.npz").write_bytes(bytes(data))
    comm.barrier()
    with pytest.raises(InputError, match=r"arrays\.npz: its checksum does not match"):
        store.load()
    field_file = next((store.path / "fields").glob("*.bin"))
    if comm.rank == 0:  # a field file damaged on disk: found by the rank that hashes that chunk
        (store.path / "arrays.npz").write_bytes(arrays)
        data = bytearray(field_file.read_bytes())
        data[len(data) // 2] ^= 0xFF
        field_file.write_bytes(bytes(data))
    comm.barrier()
    with pytest.raises(InputError, match=r"corrupt checkpoint .*\.bin: its checksum does not match"):
        store.load()
    if comm.rank == 0:
        field_file.write_bytes(field_file.read_bytes()[:-10])
    comm.barrier()
    with pytest.raises(InputError, match="size does not match"):
        store.load()


def test_a_failed_save_keeps_the_previous_checkpoint(shared_tmp_path, comm, monkeypatch):
    directory = shared_tmp_path / "full_disk"
    store = CheckpointStore(directory, comm)
    store.save({"step": 1}, {"x": np.ones(3)})

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", disk_full)
    with pytest.raises(InputError, match="cannot write the checkpoint.*No space left"):
        store.save({"step": 2}, {"x": np.zeros(3)})
    monkeypatch.undo()
    assert store.load().state["step"] == 1
    assert sorted(p.name for p in directory.iterdir()) == ["checkpoint"]


# -- safe stop and the time loop -----------------------------------------------------------
def test_signal_only_sets_a_flag_that_all_ranks_agree_on(comm):
    before = signal.getsignal(signal.SIGTERM)
    with SafeStop() as stop:
        assert not stop.agreed(comm)
        if comm.rank == 0:  # only one rank receives the signal
            os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested == (comm.rank == 0)
        assert stop.agreed(comm)
        if comm.rank == 0:
            assert stop.signal_name == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C does not wait for the safe point
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is before


def test_step_plan_resumes_and_replans_after_a_cut():
    args = (4e-3, TIMES, 1e-8)
    kwargs = {"steps_per_level": 4, "dt_max": 1e-4}
    full = list(plan_steps(*args, **kwargs))
    plan = StepPlan(*args, **kwargs)
    for _ in range(25):
        plan.accept(*plan.propose())
    again = StepPlan(*args, **kwargs)
    again.load_state(json.loads(json.dumps(plan.state_dict())))
    rest = []
    while not again.done:
        rest.append(again.propose())
        again.accept(*rest[-1])
    assert rest == full[25:]
    t_new, dt = plan.propose()
    plan.cut(dt)
    t_cut, dt_cut = plan.propose()
    assert dt_cut == pytest.approx(dt / 2) and t_cut == pytest.approx(t_new - dt / 2)
    steps = [(t_cut, dt_cut)]
    plan.accept(t_cut, dt_cut)
    while not plan.done:
        steps.append(plan.propose())
        plan.accept(*steps[-1])
    times = [t for t, _ in full[:25]] + [t for t, _ in steps]
    assert set(TIMES) <= set(times) and sum(d for _, d in full[:25]) + sum(d for _, d in steps) == pytest.approx(
        4e-3, rel=1e-12
    )
    dts = np.array([d for _, d in full[:25]] + [d for _, d in steps])
    assert np.all(dts[1:] / dts[:-1] <= 2.0 + 1e-12)


def test_interrupted_run_resumes_to_the_same_records(shared_tmp_path, comm):
    """Stop at a safe point (signal on one rank), checkpoint, resume on the same and on one rank."""
    tagged = strip(comm, shared_tmp_path)
    settings = strip_settings()
    reference = DiffusionProblem(tagged, settings).run()
    store = CheckpointStore(shared_tmp_path / "interrupted", comm)
    seen: list[float] = []

    def signal_at_first_output(t: float, problem: DiffusionProblem) -> None:
        seen.append(t)
        if t == TIMES[0] and comm.rank == 0:
            os.kill(os.getpid(), signal.SIGTERM)

    with SafeStop() as stop:
        checkpointer = Checkpointer(store, CheckpointPolicy(interval_s=0.0, every_steps=0), stop=stop, comm=comm)
        with pytest.raises(Interrupted, match=r"stopped by SIGTERM at t = 0\.0002 s") as info:
            DiffusionProblem(tagged, settings).run(signal_at_first_output, checkpointer=checkpointer)
    partial = info.value.result
    assert partial.status == "interrupted" and partial.times[-1] == TIMES[0] and checkpointer.saves == 1
    checkpoint = store.load()
    assert checkpoint.state["problem"]["t"] == TIMES[0]
    after: list[float] = []
    resumed = DiffusionProblem(tagged, settings).run(lambda t, p: after.append(t), resume=checkpoint)
    assert after == TIMES[1:]  # outputs before the checkpoint are not repeated
    assert resumed.resumed_from_step == partial.steps and resumed.steps == reference.steps
    assert_same_records(resumed, reference)
    longer = settings.replace(time=settings.time.replace(t_end=8e-3))
    with pytest.raises(UsageError, match=r"other time settings .*time\.t_end: 0\.004 -> 0\.008"):
        DiffusionProblem(tagged, longer).run(resume=checkpoint)
    single = DiffusionProblem(
        strip(MPI.COMM_SELF, shared_tmp_path / f"self{comm.rank}" if comm.size > 1 else shared_tmp_path), settings
    )
    assert_same_records(single.run(resume=checkpoint), reference, rtol=1e-8)  # another rank count


def test_periodic_checkpoints_by_steps_and_wall_clock(shared_tmp_path, comm):
    tagged = strip(comm, shared_tmp_path, n=8)
    settings = strip_settings()
    store = CheckpointStore(shared_tmp_path / "periodic", comm)
    every = Checkpointer(store, CheckpointPolicy(interval_s=0.0, every_steps=10), comm=comm)
    result = DiffusionProblem(tagged, settings).run(checkpointer=every)
    assert every.saves == (result.steps - 1) // 10  # none after the last step: the run is complete
    assert store.load().state["problem"]["steps"] == 10 * every.saves
    ticks = iter(range(10**6))
    by_clock = Checkpointer(store, CheckpointPolicy(interval_s=25.0), comm=comm, clock=lambda: float(next(ticks)))
    DiffusionProblem(tagged, settings).run(checkpointer=by_clock)
    assert 0 < by_clock.saves < result.steps // 10  # a poll is one tick: about every 25 steps
    never = Checkpointer(store, CheckpointPolicy(interval_s=1e9), comm=comm)
    DiffusionProblem(tagged, settings).run(checkpointer=never)
    assert never.saves == 0


# -- solver failures ---------------------------------------------------------------------------
def test_a_failed_solve_is_retried_with_half_the_step(shared_tmp_path, comm, monkeypatch):
    """The 6th solve returns NaN on rank 0 only: every rank sees the failure, the step is halved,
    the run completes and still matches Crank's series."""
    tagged = strip(comm, shared_tmp_path)
    settings = strip_settings()
    reference = DiffusionProblem(tagged, settings).run()
    calls = {"n": 0}
    original = DiffusionProblem._solve

    def flaky(self, ksp, rhs):
        original(self, ksp, rhs)
        calls["n"] += 1
        if calls["n"] == 6 and comm.rank == 0:
            self.c.x.petsc_vec.array[:] = np.nan

    monkeypatch.setattr(DiffusionProblem, "_solve", flaky)
    result = DiffusionProblem(tagged, settings).run()
    assert result.retries == 1 and result.steps > reference.steps
    np.testing.assert_array_equal(result.times[:6], reference.times[:6])  # the good steps before the failure
    assert np.diff(result.times)[5] == pytest.approx(np.diff(reference.times)[5] / 2, rel=1e-12)
    assert np.all(crank_errors(result, settings) < 5e-3)
    assert result.mass_balance_rel_error < 1e-6


def test_persistent_failure_saves_the_last_good_state_and_reports(shared_tmp_path, comm, monkeypatch):
    """CG + Jacobi limited to one iteration cannot converge: after max_retries halvings the run
    stops with the PETSc reason, the step sizes tried and the residual history."""
    tagged = strip(comm, shared_tmp_path)
    settings = strip_settings(type="iterative", max_retries=2, petsc_options={"pc_type": "jacobi", "ksp_max_it": "1"})
    store = CheckpointStore(shared_tmp_path / "failing", comm)
    with pytest.raises(SolverError, match=r"after 3 attempts .*DIVERGED_MAX_IT \(-3\)") as info:
        DiffusionProblem(tagged, settings).run(checkpointer=Checkpointer(store, CheckpointPolicy(), comm=comm))
    report = info.value.report
    assert [a["dt"] for a in report["attempts"]] == pytest.approx([1e-8, 5e-9, 2.5e-9])
    assert all(
        a["reason"] == -3 and len(a["residual_history"]) == 2 and a["relative_residual"] > 1e-12
        for a in report["attempts"]
    )
    assert report["t_last_good"] == 0.0
    saved = store.load().state["problem"]
    assert saved["failure"]["t_failed"] == pytest.approx(1e-8) and saved["steps"] == 0
    # a failure after some good steps: the checkpoint holds the state of the last good step
    original = DiffusionProblem._solve
    calls = {"n": 0}

    def dies_after_ten(self, ksp, rhs):
        original(self, ksp, rhs)
        calls["n"] += 1
        if calls["n"] > 10:
            self.c.x.petsc_vec.array[:] = np.inf

    monkeypatch.setattr(DiffusionProblem, "_solve", dies_after_ten)
    good = strip_settings(max_retries=1)
    with pytest.raises(SolverError, match="non-finite c"):
        DiffusionProblem(tagged, good).run(checkpointer=Checkpointer(store, CheckpointPolicy(), comm=comm))
    checkpoint = store.load()
    assert checkpoint.state["problem"]["steps"] == 10
    monkeypatch.undo()
    resumed = DiffusionProblem(tagged, good).run(resume=checkpoint)
    assert_same_records(resumed, DiffusionProblem(tagged, good).run())


# -- the command line (in-process: serial and under MPI) ----------------------------------------
def roi_config(
    directory: Path, comm, name: str = "run.toml", extra: str = "", dt_max: float = 2e-5, every_steps: int | None = 5
) -> Path:
    """A small 2D ROI run; ``every_steps = None`` leaves [checkpoint] out (convergence studies
    checkpoint per finished level and refuse the setting)."""
    labels = np.full((12, 15), 3, dtype=np.uint8)
    labels[:, :2] = 0
    yy, xx = np.mgrid[:12, :15]
    labels[(yy - 6) ** 2 + (xx - 10) ** 2 <= 5] = 1
    config = directory / name
    if comm is None or comm.rank == 0:
        write_image(directory / "roi.npy", VoxelImage(labels, (40e-9, 40e-9), {"pore": 0, "si": 1, "sei": 3}))
        config.write_text(
            '[geometry]\nimage = "roi.npy"\n\n[time]\nt_end = 0.01\noutput_times = [0.0005, 0.002, 0.01]\n'
            f"dt_initial = 1e-7\ndt_max = {dt_max!r}\nsteps_per_level = 4\n\n"
            + (f"[checkpoint]\nevery_steps = {every_steps}\n\n" if every_steps is not None else "")
            + '[[regions]]\nname = "far"\nbox = [400e-9, 0.0, 600e-9, 480e-9]\n'
            + extra
        )
    if comm is not None:
        comm.barrier()
    return config


def compare_results(resumed: dict, reference: dict, rtol: float = 1e-10) -> None:
    """Records within ``rtol``; the mass-balance error is round-off (its value depends on the
    factorisation's pivoting and on how many factorisations a run made), so only its bound is
    compared, never its value."""
    for key in ("times", "domain_mean"):
        np.testing.assert_allclose(resumed["history"][key], reference["history"][key], rtol=rtol, atol=0)
    for name, values in reference["history"]["regions"].items():
        np.testing.assert_allclose(resumed["history"]["regions"][name], values, rtol=rtol, atol=0)
    for name, t90 in reference["t90_s"].items():
        assert resumed["t90_s"][name] == pytest.approx(t90, rel=rtol)
    assert resumed["mass_balance_rel_error"] < 1e-10 and reference["mass_balance_rel_error"] < 1e-10
    assert (
        set(resumed["si_particles"]) == set(reference["si_particles"]) == {"0.0005", "0.002", "0.01"}
    )  # restored + new
    for t, particles in reference["si_particles"].items():
        for new, old in zip(resumed["si_particles"][t], particles, strict=True):
            assert new["id"] == old["id"] and new["mean"] == pytest.approx(old["mean"], rel=rtol)
    assert resumed["steps"] == reference["steps"] and resumed["status"] == "completed"


def test_cli_sigterm_stops_safely_and_resume_matches(shared_tmp_path, comm, monkeypatch, capsys):
    """SIGTERM (to rank 0 only) at step 60: exit 130 with a one-line message; the checkpoint and
    results.json ("interrupted") are in --out; a rerun without --resume is refused; --resume with
    other settings is refused; --resume gives the uninterrupted run's records."""
    from fem_anode.cli import main

    config = roi_config(shared_tmp_path, comm)
    assert main(["diffusion", str(config), "--out", str(shared_tmp_path / "ref"), "-q"]) == 0
    reference = json.loads((shared_tmp_path / "ref" / "results.json").read_text())
    assert not (shared_tmp_path / "ref" / "checkpoint").exists()  # removed after success
    poll = Checkpointer.poll

    def signal_at_step_60(self, step):
        if step == 60 and comm.rank == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        return poll(self, step)

    monkeypatch.setattr(Checkpointer, "poll", signal_at_step_60)
    out = shared_tmp_path / "stopped"
    capsys.readouterr()
    assert main(["diffusion", str(config), "--out", str(out), "-q"]) == 130
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "stopped by SIGTERM" in err and f"--resume {out}" in err
    partial = json.loads((out / "results.json").read_text())
    assert (
        partial["status"] == "interrupted"
        and partial["steps"] == 60
        and partial["t_reached_s"] == reference["history"]["times"][60]
    )
    for name in ("checkpoint/state.json", "c_regions.png", "config.toml", "provenance.json"):
        assert (out / name).is_file()
    monkeypatch.undo()
    assert main(["diffusion", str(config), "--out", str(out), "-q"]) == 2  # would overwrite the checkpoint
    assert "add --resume" in capsys.readouterr().err
    other = roi_config(shared_tmp_path, comm, "other.toml", extra="\n[physics]\nD = 2e-10\n")
    assert main(["diffusion", str(other), "--resume", str(out), "-q"]) == 2
    assert "physics.D" in capsys.readouterr().err
    assert main(["diffusion", "--resume", str(shared_tmp_path / "ref"), "-q"]) == 3  # no checkpoint there
    assert main(["diffusion", "--resume", str(out), "-q"]) == 0  # settings from the checkpoint
    resumed = json.loads((out / "results.json").read_text())
    assert resumed["resumed_from_step"] == 60
    compare_results(resumed, reference)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (shared_tmp_path / "ref").iterdir())


def test_cli_solver_failure_exit_4_with_report(shared_tmp_path, comm, capsys):
    from fem_anode.cli import main

    config = roi_config(
        shared_tmp_path,
        comm,
        "failing.toml",
        extra='\n[solver]\ntype = "iterative"\nmax_retries = 1\npetsc_options = {pc_type = "jacobi", ksp_max_it = "1"}\n',
    )
    out = shared_tmp_path / "failed"
    capsys.readouterr()
    assert main(["diffusion", str(config), "--out", str(out), "-q"]) == 4
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and "retrying with dt/2" in lines[0]  # one warning per retry, then the error
    assert (
        lines[1].startswith("fem-anode diffusion: error")
        and "DIVERGED_MAX_IT" in lines[1]
        and "last good state saved" in lines[1]
    )
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "failed" and len(results["failure"]["attempts"]) == 2
    assert CheckpointStore(out, comm).load().state["problem"]["failure"]["attempts"][1]["dt"] == pytest.approx(5e-8)


# -- convergence studies ------------------------------------------------------------------------
def test_study_resumes_after_the_last_finished_level(shared_tmp_path, comm, monkeypatch):
    from fem_anode.fem.convergence import run_diffusion_study

    config = roi_config(shared_tmp_path, comm, "study.toml", every_steps=None)
    settings = DiffusionSettings.from_toml(config).resolve_paths(config.parent)
    settings = settings.replace(time=settings.time.replace(t_end=0.002, output_times=[0.0005, 0.002], dt_max=1e-4))
    if comm.rank == 0:
        for name in ("w0", "w1", "w2"):
            (shared_tmp_path / name).mkdir()
    comm.barrier()
    reference = run_diffusion_study(settings, levels=3, orders=[1, 2], comm=comm)
    runs = {"n": 0}
    original = DiffusionProblem.run

    def killed_in_p2_level_1(self, *args, **kwargs):
        runs["n"] += 1
        if runs["n"] == 5:  # P1 levels 0-2, P2 level 0 done; the "process dies" here
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DiffusionProblem, "run", killed_in_p2_level_1)
    with pytest.raises(KeyboardInterrupt):
        run_diffusion_study(settings, levels=3, orders=[1, 2], comm=comm, checkpoint_dir=shared_tmp_path / "study")
    monkeypatch.undo()
    checkpoint = CheckpointStore(shared_tmp_path / "study", comm).load()
    assert checkpoint.state["problem"]["order"] == 2 and checkpoint.state["problem"]["level"] == 0
    resumed = run_diffusion_study(
        settings, levels=3, orders=[1, 2], comm=comm, resume=checkpoint, checkpoint_dir=shared_tmp_path / "study"
    )
    for order in ("P1", "P2"):
        ref, new = reference["orders"][order], resumed["orders"][order]
        assert new["cells"] == ref["cells"] and new["h"] == ref["h"]
        np.testing.assert_allclose(
            new["field_l2_difference"]["values"][1:], ref["field_l2_difference"]["values"][1:], rtol=1e-10
        )
        for name, record in ref["quantities"].items():
            np.testing.assert_allclose(new["quantities"][name]["values"], record["values"], rtol=1e-10)
            if np.isfinite(record["observed_order"]):
                assert new["quantities"][name]["observed_order"] == pytest.approx(record["observed_order"], rel=1e-8)
    with pytest.raises(UsageError, match="other settings"):
        run_diffusion_study(
            settings, levels=4, orders=[1, 2], comm=comm, resume=checkpoint, checkpoint_dir=shared_tmp_path / "study"
        )


# -- real processes and real signals (serial suite only) -----------------------------------------
def fem_anode(*args: str, mpi: int = 0, **kwargs) -> subprocess.Popen:
    command = [sys.executable, "-m", "fem_anode", *args]
    env = dict(os.environ)
    if mpi:
        command = ["mpirun", "-n", str(mpi), sys.executable, "-m", "mpi4py", "-m", "fem_anode", *args]
        env = mpirun_environment()
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True, **kwargs
    )


def kill_job(process: subprocess.Popen, out: Path) -> None:
    """SIGKILL the whole job, as a scheduler or a node failure would: ``mpirun``'s process group
    and its ranks (Open MPI's ranks are not in that group and would go on running: they then keep
    writing checkpoints into ``out`` while the resumed run reads them)."""
    os.killpg(process.pid, signal.SIGKILL)
    marker = f"--out\0{out}\0".encode()
    ranks = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and marker in _cmdline(p)]
    for pid in ranks:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 30
    while (
        any(Path(f"/proc/{pid}").exists() and b"fem_anode" in _cmdline(Path(f"/proc/{pid}")) for pid in ranks)
        and time.monotonic() < deadline
    ):
        time.sleep(0.05)


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""


def wait_for_checkpoint(out: Path, process: subprocess.Popen, t_min: float, timeout: float = 60.0) -> dict:
    """Poll until the run's checkpoint has passed ``t_min`` (s of model time)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, (
            f"the run ended before a checkpoint past t = {t_min}: {process.communicate()[1][-2000:]}"
        )
        try:
            state = json.loads((out / "checkpoint" / "state.json").read_text())
            if state["problem"]["t"] > t_min:
                return state
        except (OSError, ValueError, KeyError):  # not there yet, or renamed while reading
            pass
        time.sleep(0.005)
    raise AssertionError("no checkpoint within the timeout")


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    directory = tmp_path_factory.mktemp("reference")
    config = roi_config(directory, None)
    process = fem_anode("diffusion", str(config), "--out", str(directory / "ref"), "-q")
    _, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    return config, json.loads((directory / "ref" / "results.json").read_text())


@serial_only
@pytest.mark.parametrize("ranks", [0, 2], ids=["serial", "mpirun-2"])
def test_sigkill_mid_run_then_resume_gives_the_same_records(tmp_path, reference_run, ranks):
    if ranks and shutil.which("mpirun") is None:
        pytest.skip("mpirun not available")
    config, reference = reference_run
    out = tmp_path / "killed"
    process = fem_anode("diffusion", str(config), "--out", str(out), "-q", mpi=ranks)
    state = wait_for_checkpoint(out, process, t_min=0.0005)  # past the first output time
    kill_job(process, out)
    process.communicate(timeout=30)
    assert not (out / "results.json").exists()
    resumed_process = fem_anode("diffusion", "--resume", str(out), "-q", mpi=ranks)
    _, err = resumed_process.communicate(timeout=120)
    assert resumed_process.returncode == 0, err
    resumed = json.loads((out / "results.json").read_text())
    assert state["problem"]["steps"] <= resumed["resumed_from_step"] < reference["steps"]
    assert resumed["ranks"] == max(ranks, 1)
    compare_results(resumed, reference)
    assert not (out / "checkpoint").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["killed"]  # the killed run's staging is cleaned up


@serial_only
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_to_the_process_stops_it_with_exit_130(tmp_path, reference_run, signum):
    config, reference = reference_run
    out = tmp_path / "signalled"
    process = fem_anode("diffusion", str(config), "--out", str(out), "-q")
    wait_for_checkpoint(out, process, t_min=0.0)
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    lines = err.strip().splitlines()
    assert (
        len(lines) == 1
        and f"stopped by {signal.Signals(signum).name}" in lines[0]
        and f"fem-anode diffusion --resume {out}" in lines[0]
    )
    partial = json.loads((out / "results.json").read_text())
    assert partial["status"] == "interrupted" and 0 < partial["steps"] < reference["steps"]
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["problem"]["steps"] == partial["steps"]  # the checkpoint is the stop's own
    np.testing.assert_allclose(
        partial["history"]["domain_mean"], reference["history"]["domain_mean"][: partial["steps"] + 1], rtol=1e-12
    )


@serial_only
def test_sigusr1_to_mpirun_stops_every_rank_at_the_same_step(tmp_path, reference_run):
    """Open MPI's mpirun forwards SIGUSR1 to the ranks (SIGTERM to mpirun kills the job instead);
    the 2-rank checkpoint then resumes on one rank."""
    if shutil.which("mpirun") is None:
        pytest.skip("mpirun not available")
    config, reference = reference_run
    out = tmp_path / "usr1"
    process = fem_anode("diffusion", str(config), "--out", str(out), "-q", mpi=2)
    wait_for_checkpoint(out, process, t_min=0.0)
    process.send_signal(signal.SIGUSR1)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "stopped by SIGUSR1" in err and "Traceback" not in err
    partial = json.loads((out / "results.json").read_text())
    assert partial["status"] == "interrupted" and partial["ranks"] == 2 and 0 < partial["steps"] < reference["steps"]
    assert json.loads((out / "checkpoint" / "state.json").read_text())["problem"]["steps"] == partial["steps"]
    resumed_process = fem_anode("diffusion", "--resume", str(out), "-q")
    _, err = resumed_process.communicate(timeout=120)
    assert resumed_process.returncode == 0, err
    resumed = json.loads((out / "results.json").read_text())
    assert resumed["ranks"] == 1 and resumed["resumed_from_step"] == partial["steps"]
    compare_results(resumed, reference)


def test_cli_study_stopped_mid_level_resumes_to_the_same_report(shared_tmp_path, comm, monkeypatch, capsys):
    from fem_anode.cli import main

    config = roi_config(shared_tmp_path, comm, "study.toml", dt_max=1e-4, every_steps=None)
    args = ["convergence", str(config), "--levels", "3", "-q"]
    assert main([*args, "--out", str(shared_tmp_path / "study_ref")]) == 0
    reference = json.loads((shared_tmp_path / "study_ref" / "convergence.json").read_text())
    poll = Checkpointer.poll
    polls = {"n": 0}

    def signal_in_level_1(self, step):
        polls["n"] += 1
        if polls["n"] == 200 and comm.rank == 0:  # step 200 of 3 x 141: in the second level
            os.kill(os.getpid(), signal.SIGTERM)
        return poll(self, step)

    monkeypatch.setattr(Checkpointer, "poll", signal_in_level_1)
    out = shared_tmp_path / "study_stopped"
    capsys.readouterr()
    assert main([*args, "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert "stopped by SIGTERM" in err and "finished levels are saved" in err and "--resume" in err
    assert not (out / "convergence.json").exists()
    saved = CheckpointStore(out, comm).load().state["problem"]
    assert saved["order"] == 1 and saved["level"] == 0
    monkeypatch.undo()
    assert main([*args, "--out", str(out), "--resume", str(out)]) == 0
    resumed = json.loads((out / "convergence.json").read_text())
    assert not (out / "checkpoint").exists()
    for name, record in reference["orders"]["P1"]["quantities"].items():
        np.testing.assert_allclose(resumed["orders"]["P1"]["quantities"][name]["values"], record["values"], rtol=1e-10)
    assert (
        resumed["orders"]["P1"]["seconds"][: saved["level"] + 1] == saved["seconds"]
    )  # finished levels were not rerun
