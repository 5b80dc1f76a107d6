"""Convergence studies on smooth meshes (``mesh.method = "smooth"``): h = H halves, every size
field with it, on fixed boundary curves. Verified against Crank's plane sheet (straight
interface) and his cylinder with surface evaporation (curved interface); unused settings refused."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

pytest.importorskip("dolfinx")
pytest.importorskip("gmsh")

from scipy.optimize import brentq  # noqa: E402
from scipy.special import j0, j1, jn_zeros  # noqa: E402

from fem_anode.errors import UsageError  # noqa: E402
from fem_anode.fem.analytic import robin_sheet_mean  # noqa: E402
from fem_anode.fem.convergence import check_study_settings, level_changes, run_diffusion_study  # noqa: E402
from fem_anode.fem.diffusion import DiffusionSettings, GeometrySettings, MeshSettings, PhysicsSettings, TimeSettings  # noqa: E402
from fem_anode.io import VoxelImage, write_image  # noqa: E402

PHYSICS = PhysicsSettings()


def robin_cylinder_mean(t: float, radius: float, D_eff: float, eps: float, k_f: float, n_terms: int = 100) -> float:
    """Mean c / c_bulk of a cylinder (m) with surface evaporation (Crank 1975, eq. 5.49):
    1 - sum 4 L^2 exp(-b^2 T) / (b^2 (b^2 + L^2)), b J1(b) = L J0(b), L = a k_f / D_eff,
    T = D_eff t / (eps a^2) (the model's eps dc/dt = D_eff lap c, inflow k_f (c_bulk - c))."""
    biot = radius * k_f / D_eff
    upper = jn_zeros(0, n_terms)
    lower = np.concatenate([[0.0], jn_zeros(1, n_terms - 1)])  # b_n lies between j_(1,n-1) and j_(0,n)
    beta = np.array(
        [brentq(lambda b: b * j1(b) - biot * j0(b), lo + 1e-12, hi - 1e-12) for lo, hi in zip(lower, upper)]
    )
    T = t * D_eff / (eps * radius**2)
    return float(1.0 - np.sum(4 * biot**2 * np.exp(-(beta**2) * T) / (beta**2 * (beta**2 + biot**2))))


def test_cylinder_series_limits():
    """The series starts at 0, ends at 1 and matches the short-time limit eps dM/dt = k_f P (c_bulk - 0)."""
    a, t = 350e-9, 1e-9
    assert robin_cylinder_mean(1.0, a, PHYSICS.D_eff, PHYSICS.eps, PHYSICS.k_f) == pytest.approx(1.0, abs=1e-12)
    short = robin_cylinder_mean(t, a, PHYSICS.D_eff, PHYSICS.eps, PHYSICS.k_f, n_terms=3000)
    # next term: the surface concentration 2 (k_f/eps) sqrt(t / (pi D')) lowers the inflow by 0.24 %
    assert short == pytest.approx(2 * PHYSICS.k_f * t / (PHYSICS.eps * a), rel=0.005)


def _strip(directory, comm):  # type: ignore[no-untyped-def]
    """A 1 um x 0.2 um SEI strip fed by a pore column at x = 0 (50 nm pixels)."""
    labels = np.full((4, 21), 3, dtype=np.uint8)
    labels[:, 0] = 0
    path = directory / "strip.npy"
    if comm.rank == 0:
        write_image(path, VoxelImage(labels, (50e-9, 50e-9), {"pore": 0, "sei": 3}))
    comm.barrier()
    return path


@pytest.mark.parametrize(("order", "levels"), [(1, 4), (2, 3)])
def test_smooth_plane_sheet_orders(shared_tmp_path, comm, order, levels):
    """Straight interface: the domain mean at 1 ms converges at order 2 (P1) to Crank's plane
    sheet; P2 is exact to the time error on every level; fields converge at order >= p + 1."""
    settings = DiffusionSettings(
        geometry=GeometrySettings(image=_strip(shared_tmp_path, comm)),
        mesh=MeshSettings(method="smooth", order=order, size=200e-9),
        time=TimeSettings(t_end=1e-3, output_times=[1e-3], dt_initial=1e-8, steps_per_level=400, dt_max=4e-6),
    )
    study = run_diffusion_study(settings, levels=levels, refine_factor=2, comm=comm)
    assert study["mesh_method"] == "smooth"
    data = study["orders"][f"P{order}"]
    np.testing.assert_allclose(data["h"], 200e-9 / 2.0 ** np.arange(levels), rtol=1e-12)
    growth = np.diff(np.log(data["cells"])) / np.log(2)
    assert np.all((growth > 1.5) & (growth < 2.3))  # about 4x the cells per level: every size scales with H
    record = data["quantities"]["domain_mean@0.001s"]
    exact = PHYSICS.c_bulk * robin_sheet_mean(1e-3, 1e-6, PHYSICS.D_eff, PHYSICS.eps, PHYSICS.k_f)[0]
    field = data["field_l2_difference"]["values"]
    field_order = math.log(field[-2] / field[-1]) / math.log(2)
    if order == 1:
        assert record["observed_order"] == pytest.approx(2.0, abs=0.2)
        assert abs(record["extrapolated"] - exact) < 0.2 * abs(record["values"][-1] - exact)
        assert abs(record["values"][0] - exact) > 1e-3 * exact  # the coarse level has an error to converge from
        assert field_order > 1.8
    else:
        assert max(abs(v - exact) for v in record["values"]) < 1e-6 * exact
        assert field_order > 2.4


def test_smooth_disc_curved_interface(shared_tmp_path, comm):
    """Curved interface: an SEI disc (radius 14 pixels of 25 nm) in a pore: fields converge at
    order 2 (P1), and the domain mean agrees with Crank's cylinder series within the difference
    between the image's smoothed contour and a circle."""
    yy, xx = np.mgrid[:40, :40] + 0.5
    labels = np.zeros((40, 40), dtype=np.uint8)
    labels[(yy - 20) ** 2 + (xx - 20) ** 2 < 14**2] = 3
    path = shared_tmp_path / "disc.npy"
    if comm.rank == 0:
        write_image(path, VoxelImage(labels, (25e-9, 25e-9), {"pore": 0, "sei": 3}))
    comm.barrier()
    settings = DiffusionSettings(
        geometry=GeometrySettings(image=path),
        mesh=MeshSettings(method="smooth", order=1, size=100e-9),
        time=TimeSettings(t_end=2e-4, output_times=[2e-4], dt_initial=1e-9, steps_per_level=400, dt_max=1e-6),
    )
    study = run_diffusion_study(settings, levels=3, refine_factor=2, comm=comm)
    data = study["orders"]["P1"]
    field = data["field_l2_difference"]["values"]
    assert field[0] is None and math.log(field[1] / field[2]) / math.log(2) > 1.8
    values = data["quantities"]["domain_mean@0.0002s"]["values"]
    assert abs(values[2] - values[1]) < 0.3 * abs(values[1] - values[0])
    series = PHYSICS.c_bulk * robin_cylinder_mean(2e-4, 14 * 25e-9, PHYSICS.D_eff, PHYSICS.eps, PHYSICS.k_f)
    # The contour through the smoothed pixel disc has a 0.4 % longer perimeter than the circle of
    # its area (measured): the mean lies 0.1-0.3 % above the circle's series.
    assert 0.0 < (values[-1] - series) / series < 0.004


def test_level_changes_picks_the_coarsest_level_that_stays_within_tolerance():
    records = {"a": {"values": [1.05, 1.005, 1.001, 1.0]}, "b": {"values": [2.0, 2.0, 2.03, 2.031]}}
    result = level_changes(records, [10, 40, 160, 640], [4.0, 2.0, 1.0, 0.5])
    assert [c["largest_change"] for c in result["changes"]] == pytest.approx(
        [0.045 / 1.05, 0.03 / 2.03, 0.001 / 1.001], rel=1e-12
    )
    assert [c["quantity"] for c in result["changes"]] == ["a", "b", "a"]
    assert result["level"] == 2 and result["cells"] == 160


def test_unused_settings_are_refused(shared_tmp_path, comm, capsys):
    from fem_anode.cli import main

    path = _strip(shared_tmp_path, comm)
    base = DiffusionSettings(geometry=GeometrySettings(image=path), mesh=MeshSettings(method="smooth", size=200e-9))
    with pytest.raises(UsageError, match=r"output\.figures, checkpoint\.interval_s"):
        run_diffusion_study(
            base.replace(output=base.output.replace(figures=False), checkpoint=base.checkpoint.replace(interval_s=5.0)),
            levels=2,
            comm=comm,
        )
    check_study_settings(base, "diffusion")  # defaults pass (configs written by to_toml list them all)
    with pytest.raises(UsageError, match="mesh.discretisation = 'fv'"):
        check_study_settings(base.replace(mesh=MeshSettings(discretisation="fv")), "diffusion")
    config = shared_tmp_path / "unused.toml"
    if comm.rank == 0:
        config.write_text(
            '[geometry]\nimage = "strip.npy"\n\n[mesh]\nmethod = "smooth"\n\n[output]\nfields = false\nmesh = true\n'
        )
    comm.barrier()
    out = shared_tmp_path / "unused_out"
    assert main(["convergence", str(config), "--levels", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert (
        "output.fields:" in err
        and "output.mesh" not in err
        and "not used by a convergence study" in err
        and "Traceback" not in err
    )
    assert not out.exists()
    voxel = shared_tmp_path / "voxel.toml"
    if comm.rank == 0:
        voxel.write_text('[geometry]\nimage = "strip.npy"\n\n[mesh]\nsize = 40e-9\n')
    comm.barrier()
    assert main(["convergence", str(voxel), "--levels", "2", "--out", str(out)]) == 2
    assert "mesh.size applies to method = 'smooth'" in capsys.readouterr().err
    with pytest.raises(UsageError, match="use an integer"):
        run_diffusion_study(base.replace(mesh=MeshSettings()), levels=2, refine_factor=1.5, comm=comm)


def test_smooth_study_cli(shared_tmp_path, comm):
    """The CLI runs a smooth study with a non-integer ratio and writes h, cells, orders, GCI."""
    from fem_anode.cli import main

    _strip(shared_tmp_path, comm)
    config = shared_tmp_path / "smooth.toml"
    if comm.rank == 0:
        config.write_text(
            '[geometry]\nimage = "strip.npy"\n\n[mesh]\nmethod = "smooth"\nsize = 200e-9\n\n'
            "[time]\nt_end = 0.0005\noutput_times = [0.0005]\n"
        )
    comm.barrier()
    out = shared_tmp_path / "smooth_study"
    assert main(["convergence", str(config), "--levels", "3", "--refine-factor", "1.5", "--out", str(out), "-q"]) == 0
    report = json.loads((out / "convergence.json").read_text())
    assert report["mesh_method"] == "smooth" and "H" in report["h_definition"]
    data = report["orders"]["P1"]
    np.testing.assert_allclose(data["h"], [200e-9, 200e-9 / 1.5, 200e-9 / 2.25], rtol=1e-12)
    assert data["cells"][0] < data["cells"][1] < data["cells"][2]
    record = data["quantities"]["domain_mean@0.0005s"]
    assert record["converging"] == "monotone" and 1.5 < record["observed_order"] < 2.6 and record["gci"] < 0.01
    assert (
        data["level_changes_1pct"]["changes"][0]["largest_change"]
        > data["level_changes_1pct"]["changes"][1]["largest_change"]
    )
    assert (out / "convergence.png").exists()
