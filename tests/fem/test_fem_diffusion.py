"""Li diffusion with mass-transfer boundaries: analytic 1D limit, convergence rates in h and dt,
mass balance, steady state, and agreement between 1 and N ranks."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("dolfinx")

from mpi4py import MPI  # noqa: E402

from fem_anode.errors import InputError, UsageError  # noqa: E402
from fem_anode.fem import read_mesh  # noqa: E402
from fem_anode.fem.analytic import robin_sheet_mean, robin_sheet_profile  # noqa: E402
from fem_anode.fem.diffusion import (  # noqa: E402
    DiffusionProblem,
    DiffusionSettings,
    GeometrySettings,
    MeshSettings,
    PhysicsSettings,
    Region,
    TimeSettings,
)
from fem_anode.fem.diffusion.time_stepping import bdf_coefficients, plan_steps  # noqa: E402
from fem_anode.io import VoxelImage, write_image  # noqa: E402
from fem_anode.meshing import write_voxel_mesh  # noqa: E402

from builders import STRIP_LENGTH as LENGTH  # noqa: E402
from builders import strip_mesh  # noqa: E402

TIMES = [2e-4, 1e-3, 4e-3]  # s; the diffusion time eps L^2 / D_eff is 4.2e-3 s


def strip_settings(order: int, steps_per_level: int = 8, t_end: float = 4e-3, regions=()) -> DiffusionSettings:
    settings = DiffusionSettings(
        geometry=GeometrySettings(mesh="strip.msh"),
        mesh=MeshSettings(order=order),
        time=TimeSettings(
            t_end=t_end, output_times=TIMES, dt_initial=1e-8, steps_per_level=steps_per_level, dt_max=1e-4
        ),
        regions=list(regions),
    )
    settings.check()
    return settings


def relative_errors(result, physics) -> np.ndarray:
    out = result.at_output_times()
    exact = physics.c_bulk * robin_sheet_mean(np.array(out["times"]), LENGTH, physics.D_eff, physics.eps, physics.k_f)
    return np.abs(np.array(out["domain_mean"]) - exact) / exact


def test_bdf_coefficients_are_exact_for_quadratics():
    for dt, dt_prev in ((0.1, 0.1), (0.2, 0.1), (0.05, 0.1)):
        c = bdf_coefficients(dt, dt_prev, 2)
        t1, t0, tm = 1.0, 1.0 - dt, 1.0 - dt - dt_prev
        for f, df in ((lambda t: t, 1.0), (lambda t: t * t, 2.0)):
            assert c.a0 * f(t1) + c.a1 * f(t0) + c.a2 * f(tm) == pytest.approx(df, rel=1e-12)
    assert bdf_coefficients(0.1, None, 2).a0 == pytest.approx(10.0)


def test_step_plan_hits_output_times_and_limits_growth():
    steps = list(plan_steps(100.0, [2.0, 10.0, 100.0], 1e-6, growth=2.0, steps_per_level=4))
    times = [t for t, _ in steps]
    for t_out in (2.0, 10.0, 100.0):
        assert t_out in times
    dts = np.array([dt for _, dt in steps])
    assert np.all(dts[1:] / dts[:-1] <= 2.0 + 1e-12)
    assert np.isclose(np.sum(dts), 100.0, rtol=1e-12)
    assert len(steps) < 200
    with pytest.raises(UsageError):
        list(plan_steps(1.0, [2.0], 1e-3))


def test_default_output_times_are_the_papers_within_t_end(tmp_path):
    """Without ``output_times`` a run writes at the paper's 2, 10 and 100 s that lie within
    ``t_end``, and at ``t_end``: ``t_end`` alone is a complete time setting; output times given
    beyond ``t_end`` are still refused, and the default survives a TOML round trip."""
    assert TimeSettings().outputs() == [2.0, 10.0, 100.0]
    assert TimeSettings(t_end=1.0).outputs() == [1.0]
    assert TimeSettings(t_end=50.0).outputs() == [2.0, 10.0, 50.0]
    assert TimeSettings(t_end=5.0, output_times=[3.0, 1.0]).outputs() == [1.0, 3.0]
    settings = DiffusionSettings(time={"t_end": 1.0})
    assert settings.time.output_times is None
    settings.to_toml(tmp_path / "run.toml")
    assert DiffusionSettings.from_toml(tmp_path / "run.toml").time.outputs() == [1.0]
    with pytest.raises(UsageError, match=r"output_times \[2.0\] lie beyond t_end = 1.0 s"):
        TimeSettings(t_end=1.0, output_times=[2.0, 0.5])


@pytest.mark.parametrize("order", [1, 2])
def test_1d_limit_matches_crank_series(shared_tmp_path, comm, order):
    """Domain mean and far-end concentration vs the plane sheet with surface evaporation."""
    n = 32
    h = LENGTH / n
    far = Region(name="far", box=[LENGTH + h / 2, 0.0, LENGTH + h, h])  # last half pixel
    settings = strip_settings(order, regions=[far])
    result = DiffusionProblem(strip_mesh(n, shared_tmp_path, comm), settings).run()
    physics = settings.physics
    assert np.all(relative_errors(result, physics) < 5e-3)
    out = result.at_output_times()
    x = np.linspace(0.0, h / 2, 51)  # distance from the no-flux end
    exact_far = [
        physics.c_bulk * robin_sheet_profile(x, t, LENGTH, physics.D_eff, physics.eps, physics.k_f).mean()
        for t in out["times"]
    ]
    for numeric, exact in zip(out["regions"]["far"], exact_far):
        if exact > 0.05 * physics.c_bulk:
            assert numeric == pytest.approx(exact, rel=5e-3)
    assert result.mass_balance_rel_error < 1e-6


def test_time_convergence_is_second_order(shared_tmp_path, comm):
    mesh = strip_mesh(32, shared_tmp_path, comm)
    errors = []
    for steps_per_level in (4, 8, 16):  # each doubling halves every step
        settings = strip_settings(2, steps_per_level)
        errors.append(relative_errors(DiffusionProblem(mesh, settings).run(), settings.physics)[0])
    order = np.polyfit(np.log([1, 0.5, 0.25]), np.log(errors), 1)[0]
    assert order == pytest.approx(2.0, abs=0.3)


@pytest.mark.parametrize(("order", "sizes", "bounds"), [(1, (4, 8, 16), (1.8, 2.25)), (2, (2, 4), (3.5, 5.0))])
def test_space_convergence_rates(shared_tmp_path, comm, order, sizes, bounds):
    """Error of the domain mean (a linear functional): O(h^2) for P1, O(h^4) for P2 (2p)."""
    errors = []
    for n in sizes:
        settings = strip_settings(order, steps_per_level=48)
        errors.append(
            relative_errors(DiffusionProblem(strip_mesh(n, shared_tmp_path, comm), settings).run(), settings.physics)[1]
        )
    observed = np.polyfit(np.log(LENGTH / np.array(sizes)), np.log(errors), 1)[0]
    assert bounds[0] < observed < bounds[1]


def two_d_image() -> VoxelImage:
    """A small 2D ROI: pore channel on the left, Si discs in the SEI/C/B matrix."""
    labels = np.full((24, 30), 3, dtype=np.uint8)
    labels[:, :3] = 0
    labels[5:20, 12:14] = 0
    yy, xx = np.mgrid[:24, :30]
    labels[(yy - 6) ** 2 + (xx - 22) ** 2 <= 9] = 1
    labels[(yy - 17) ** 2 + (xx - 21) ** 2 <= 6] = 1
    return VoxelImage(labels, (20e-9, 20e-9), {"pore": 0, "si": 1, "sei": 3})


def run_roi(tagged, k_si=0.0, t_end=0.5, order=1):
    settings = DiffusionSettings(
        geometry=GeometrySettings(mesh="roi.msh"),
        mesh=MeshSettings(order=order),
        physics=PhysicsSettings(k_si=k_si),
        time=TimeSettings(t_end=t_end, output_times=[1e-4, 1e-3, t_end], dt_initial=1e-7),
        regions=[
            Region(name="I", box=[60e-9, 0.0, 200e-9, 200e-9]),
            Region(name="IV", box=[460e-9, 100e-9, 600e-9, 460e-9]),
        ],
    )
    settings.check()
    problem = DiffusionProblem(tagged, settings)
    return problem, problem.run()


def test_mass_balance_and_steady_state(shared_tmp_path, comm):
    path = shared_tmp_path / "roi.msh"
    if comm.rank == 0:
        write_voxel_mesh(two_d_image(), path, keep=["sei"])
    comm.barrier()
    tagged = read_mesh(path, comm)
    problem, result = run_roi(tagged, order=2)
    assert result.mass_balance_rel_error < 1e-6
    c = problem.concentration().x.array
    assert comm.allreduce(np.abs(c - 1000.0).max(initial=0.0), op=MPI.MAX) < 1e-6 * 1000.0
    t90 = result.t90()
    assert t90 == result.t90(1000.0)  # the run's own c_bulk
    assert t90["I"] < t90["IV"]  # near the pore channel fills first
    # Si uptake: Li leaves through the Si interfaces, the steady state stays below c_bulk
    problem_si, result_si = run_roi(tagged, k_si=1e-3)
    assert result_si.mass_balance_rel_error < 1e-6
    assert result_si.region_means["IV"][-1] < 0.99 * 1000.0


def test_same_numbers_on_one_and_all_ranks(shared_tmp_path, comm):
    path = shared_tmp_path / "roi_ranks.msh"
    if comm.rank == 0:
        write_voxel_mesh(two_d_image(), path, keep=["sei"])
    comm.barrier()
    _, distributed = run_roi(read_mesh(path, comm), t_end=0.01)
    _, serial = run_roi(read_mesh(path, MPI.COMM_SELF), t_end=0.01)
    for name in ("I", "IV"):
        # Round-off of the solves scales with the field (c_bulk = 1000), not with each value:
        # region IV is ~1e-8 (even slightly negative) at its first outputs, and 1 vs 2 ranks
        # differ by up to 1.1e-11 (measured). The floor is relative to the series' scale.
        scale = np.abs(serial.region_means[name]).max()
        np.testing.assert_allclose(
            distributed.region_means[name], serial.region_means[name], rtol=1e-8, atol=1e-11 * scale
        )


def test_bad_settings_and_meshes(shared_tmp_path, comm, tmp_path):
    with pytest.raises(UsageError, match="exactly one of"):
        DiffusionSettings().check_source()
    config = tmp_path / "bad.toml"
    config.write_text('[geometry]\nimage = "x.npy"\n[physics]\nkf = 1e-3\n')
    with pytest.raises(UsageError, match="did you mean 'k_f'"):
        DiffusionSettings.from_toml(config)
    config.write_text('[geometry]\nimage = "x.npy"\n[time]\nt_end = 1.0\noutput_times = [2.0]\n')
    with pytest.raises(UsageError, match="beyond t_end"):
        DiffusionSettings.from_toml(config)
    path = shared_tmp_path / "no_pore.msh"
    image = VoxelImage(np.array([[1, 3, 3], [3, 3, 3]], dtype=np.uint8), (1e-8, 1e-8), {"si": 1, "sei": 3})
    if comm.rank == 0:
        write_voxel_mesh(image, path, keep=["sei"])
    comm.barrier()
    with pytest.raises(InputError, match="no facet group 'pore\\|sei'"):
        DiffusionProblem(read_mesh(path, comm), DiffusionSettings(geometry=GeometrySettings(mesh=path)))
    tagged = strip_mesh(4, shared_tmp_path, comm)
    outside = DiffusionSettings(
        geometry=GeometrySettings(mesh=path), regions=[Region(name="x", box=[5e-6, 5e-6, 6e-6, 6e-6])]
    )
    with pytest.raises(UsageError, match="contains none of the transporting phase"):
        DiffusionProblem(tagged, outside)


def test_cli_run_writes_results_fields_and_figures(shared_tmp_path, comm):
    from fem_anode.cli import main

    write_image(shared_tmp_path / "roi.npy", two_d_image())
    config = shared_tmp_path / "run.toml"
    if comm.rank == 0:
        config.write_text(
            '[geometry]\nimage = "roi.npy"\n\n[time]\nt_end = 0.01\noutput_times = [0.001, 0.01]\n\n'
            '[[regions]]\nname = "I"\nbox = [60e-9, 0.0, 200e-9, 200e-9]\n'
        )
    comm.barrier()
    out = shared_tmp_path / "out"
    assert main(["diffusion", str(config), "--out", str(out), "-q"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["times"] == pytest.approx([0.001, 0.01])
    assert set(results["regions"]) == {"I"} and len(results["regions"]["I"]) == 2
    assert results["mass_balance_rel_error"] < 1e-6
    assert results["ncells"] == int(np.count_nonzero(two_d_image().array == 3))
    assert results["t90_s"]["I"] is not None and results["t90_s"]["I"] < 0.01
    particles = results["si_particles"]["0.01"]
    assert len(particles) == 2 and all(0 <= p["fraction_above_half_bulk"] <= 1 for p in particles)
    for name in ("c_fields.png", "c_regions.png", "mesh.xdmf", "mesh.h5", "config.toml"):
        assert (out / name).exists()
    assert (out / "c.bp").is_dir()
    assert main(["diffusion", str(shared_tmp_path / "missing.toml"), "--out", str(shared_tmp_path / "o2"), "-q"]) == 3


def test_3d_volume_through_the_cli(shared_tmp_path, comm):
    """3D voxel volume: pores at the electrode surface (z = 0), a Si particle inside."""
    from fem_anode.cli import main

    labels = np.full((10, 8, 8), 3, dtype=np.uint8)
    labels[:2] = 0  # pore layer at the surface
    zz, yy, xx = np.mgrid[:10, :8, :8]
    labels[(zz - 6) ** 2 + (yy - 4) ** 2 + (xx - 4) ** 2 <= 4] = 1
    write_image(shared_tmp_path / "vol.npy", VoxelImage(labels, (20e-9, 20e-9, 20e-9), {"pore": 0, "si": 1, "sei": 3}))
    config = shared_tmp_path / "vol.toml"
    if comm.rank == 0:
        config.write_text(
            '[geometry]\nimage = "vol.npy"\n\n[mesh]\norder = 2\n\n[time]\nt_end = 0.005\noutput_times = [1e-4, 0.005]\n\n'
            '[[regions]]\nname = "deep"\nbox = [0.0, 0.0, 150e-9, 160e-9, 160e-9, 200e-9]\n'
        )
    comm.barrier()
    out = shared_tmp_path / "vol_out"
    assert main(["diffusion", str(config), "--out", str(out), "-q"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["mass_balance_rel_error"] < 1e-6
    assert results["ncells"] == int(np.count_nonzero(labels == 3))
    deep = results["regions"]["deep"]
    assert deep[0] < deep[1] and deep[1] == pytest.approx(1000.0, rel=1e-3)
    assert len(results["si_particles"]["0.005"]) == 1
    assert (out / "c_fields.png").exists()


def test_smooth_curved_p2_mesh_conserves_mass_and_reaches_c_bulk(shared_tmp_path, comm):
    """Smooth order-2 (curved) mesh: quadrature on curved cells must not break the discrete
    balance or the exact steady state (source and diagnostics share the scheme's matrices)."""
    from fem_anode.cli import main

    yy, xx = np.mgrid[:40, :40]
    labels = np.full((40, 40), 3, dtype=np.uint8)
    labels[(yy - 12) ** 2 + (xx - 12) ** 2 <= 36] = 0  # round pore
    labels[(yy - 28) ** 2 + (xx - 27) ** 2 <= 25] = 1  # round Si particle
    write_image(shared_tmp_path / "round.npy", VoxelImage(labels, (20e-9, 20e-9), {"pore": 0, "si": 1, "sei": 3}))
    config = shared_tmp_path / "round.toml"
    if comm.rank == 0:
        config.write_text(
            '[geometry]\nimage = "round.npy"\n\n[mesh]\nmethod = "smooth"\nsize = 8e-8\norder = 2\n\n'
            "[time]\nt_end = 0.05\noutput_times = [1e-4, 0.05]\n"
        )
    comm.barrier()
    out = shared_tmp_path / "round_out"
    assert main(["diffusion", str(config), "--out", str(out), "-q"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["mass_balance_rel_error"] < 1e-6
    assert results["final_min_c"] == pytest.approx(1000.0, rel=1e-6) and results["final_max_c"] == pytest.approx(
        1000.0, rel=1e-6
    )
    assert len(results["si_particles"]["0.05"]) == 1
    assert (out / "mesh.quality.json").exists()
    bad = shared_tmp_path / "bad.toml"
    if comm.rank == 0:
        bad.write_text('[geometry]\nimage = "round.npy"\n\n[mesh]\nsize = 8e-8\n')
    comm.barrier()
    assert main(["diffusion", str(bad), "--out", str(shared_tmp_path / "bad_out"), "-q"]) == 2  # size needs smooth


@pytest.mark.parametrize("order", [1, 2])
def test_voxel_meshes_take_the_exact_quadrature_and_the_same_matrices(shared_tmp_path, comm, order):
    """On a voxel mesh (parallelogram cells) the forms use degree 2p, which integrates them exactly:
    the same M, K + R and region weights as UFL's estimate (degree 5 for P1) to round-off; a mesh
    with non-affine cells keeps the estimate."""
    import ufl
    from dolfinx import fem
    from dolfinx.fem import petsc as fem_petsc
    from petsc4py import PETSc

    path = shared_tmp_path / "quadrature.msh"
    if comm.rank == 0:
        write_voxel_mesh(two_d_image(), path, keep=["si", "sei"])
    comm.barrier()
    tagged = read_mesh(path, comm)
    settings = DiffusionSettings(
        geometry=GeometrySettings(mesh=path),
        mesh=MeshSettings(order=order),
        time=TimeSettings(t_end=1e-4, output_times=[1e-4], dt_initial=1e-6),
        regions=[Region(name="I", box=[60e-9, 0.0, 200e-9, 200e-9])],
    )
    settings.check()
    problem = DiffusionProblem(tagged, settings)
    assert problem._quadrature() == {"quadrature_degree": 2 * order}
    # the reference: the same forms with UFL's estimated degree
    physics, (s_dx, s_grad, s_ds) = settings.physics, problem._scaled_measures()
    u, v = ufl.TrialFunction(problem.V), ufl.TestFunction(problem.V)
    ds = ufl.Measure("ds", domain=tagged.mesh, subdomain_data=tagged.facet_tags)
    pore, si = tagged.facet_groups[problem.pore_interface], tagged.facet_groups[problem.si_interface]
    robin = problem.rate_f * s_ds * u * v * ds(pore) + problem.rate_si * s_ds * u * v * ds(si)
    stiffness = physics.D_eff / 1e-12 * s_grad * ufl.inner(ufl.grad(u), ufl.grad(v)) * ufl.dx
    for matrix, form in ((problem._M, s_dx * u * v * ufl.dx), (problem._KR, stiffness + robin)):
        reference = fem_petsc.assemble_matrix(fem.form(form))
        reference.assemble()
        reference.axpy(-1.0, matrix)
        assert reference.norm() <= 1e-12 * matrix.norm()
    chi = fem.Function(fem.functionspace(tagged.mesh, ("DG", 0)))
    chi.x.array[:] = 1.0
    weights = fem_petsc.assemble_vector(fem.form(s_dx * chi * v * ufl.dx))
    weights.ghostUpdate(addv=PETSc.InsertMode.ADD, mode=PETSc.ScatterMode.REVERSE)
    weights.axpy(-1.0, problem._w_dx)
    assert weights.norm() <= 1e-12 * problem._w_dx.norm()
    # a bilinear (non-affine) distortion of the cells: UFL's estimate again
    x = tagged.mesh.geometry.x
    x[:, 0] += 0.1 * x[:, 1] * x[:, 0] / float(comm.allreduce(np.abs(x[:, :2]).max(initial=0.0), op=MPI.MAX))
    assert problem._quadrature() == {}
    problem.destroy()
