"""Convergence studies: Richardson/GCI arithmetic, theoretical orders on the 1D limit, and the
same study on 1 and N ranks."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

pytest.importorskip("dolfinx")

from mpi4py import MPI  # noqa: E402

from fem_anode.errors import UsageError  # noqa: E402
from fem_anode.fem.analytic import robin_sheet_mean  # noqa: E402
from fem_anode.fem.convergence import mesh_independence, richardson, run_diffusion_study  # noqa: E402
from fem_anode.fem.diffusion import (
    DiffusionSettings,
    GeometrySettings,
    MeshSettings,
    PhysicsSettings,
    Region,
    TimeSettings,
)  # noqa: E402
from fem_anode.io import VoxelImage, write_image  # noqa: E402


def test_richardson_recovers_order_and_limit_of_a_power_law():
    h = np.array([0.4, 0.2, 0.1])
    values = 3.0 + 0.7 * h**1.7
    result = richardson(h, values)
    assert result["observed_order"] == pytest.approx(1.7, rel=1e-10)
    assert result["extrapolated"] == pytest.approx(3.0, rel=1e-12)
    assert result["asymptotic_ratio"] == pytest.approx(values[2] / values[1], rel=1e-10)  # = f1/f2 for a pure power law
    e21 = abs(values[1] - values[2]) / values[2]
    assert result["gci"] == pytest.approx(1.25 * e21 / (2**1.7 - 1), rel=1e-12)
    assert richardson(h, [1.0, 2.0, 1.5])["converging"] == "oscillatory"
    assert richardson(h, [2.0, 2.0, 2.0])["converging"] == "exact"
    assert richardson(h, [1.0, 1.1, 1.3])["converging"] == "diverging"
    assert richardson(h[:2], [1.0, 1.1])["converging"] == "insufficient"
    with pytest.raises(UsageError, match="constant refinement ratio"):
        richardson([0.4, 0.2, 0.05], [1.0, 1.1, 1.2])


def test_mesh_independence_picks_the_coarsest_level_within_tolerance():
    records = {
        "a": {"values": [1.05, 1.008, 1.001], "extrapolated": 1.0, "converging": "monotone"},
        "b": {"values": [2.0, 2.0, 2.0], "extrapolated": 2.0, "converging": "exact"},
        "noise": {"values": [1e-12, 5e-13, 3e-12], "extrapolated": float("nan"), "converging": "oscillatory"},
    }
    result = mesh_independence(records, [10, 40, 160], [0.4, 0.2, 0.1])
    assert result["cells"] == 40 and result["excluded"] == ["noise"]


@pytest.mark.parametrize(("order", "theory", "n"), [(1, 2.0, 4), (2, 4.0, 2)])
def test_1d_limit_orders_match_theory_and_extrapolation_helps(shared_tmp_path, comm, order, theory, n):
    """Strip of SEI with the pore at one end (Crank's plane sheet): the domain mean at 1 ms."""
    length = 1e-6
    labels = np.full((1, n + 1), 3, dtype=np.uint8)
    labels[:, 0] = 0
    path = shared_tmp_path / f"strip_P{order}.npy"
    write_image(path, VoxelImage(labels, (length / n, length / n), {"pore": 0, "sei": 3}))
    settings = DiffusionSettings(
        geometry=GeometrySettings(image=path),
        mesh=MeshSettings(order=order),
        time=TimeSettings(t_end=1e-3, output_times=[1e-3], dt_initial=1e-8, steps_per_level=400, dt_max=4e-6),
    )
    settings.check()
    study = run_diffusion_study(settings, levels=3, refine_factor=2, comm=comm)
    record = study["orders"][f"P{order}"]["quantities"]["domain_mean@0.001s"]
    physics = PhysicsSettings()
    exact = physics.c_bulk * robin_sheet_mean(1e-3, length, physics.D_eff, physics.eps, physics.k_f)[0]
    assert record["observed_order"] == pytest.approx(theory, abs=0.2)
    assert abs(record["extrapolated"] - exact) < abs(record["values"][-1] - exact)
    assert record["asymptotic_ratio"] == pytest.approx(1.0, abs=0.05)


def test_study_cli_and_same_numbers_on_one_and_all_ranks(shared_tmp_path, comm):
    from fem_anode.cli import main

    labels = np.full((12, 15), 3, dtype=np.uint8)
    labels[:, :2] = 0
    yy, xx = np.mgrid[:12, :15]
    labels[(yy - 6) ** 2 + (xx - 10) ** 2 <= 5] = 1
    write_image(shared_tmp_path / "roi.npy", VoxelImage(labels, (40e-9, 40e-9), {"pore": 0, "si": 1, "sei": 3}))
    config = shared_tmp_path / "study.toml"
    if comm.rank == 0:
        config.write_text(
            '[geometry]\nimage = "roi.npy"\n\n[time]\nt_end = 0.002\noutput_times = [0.0005, 0.002]\n\n'
            '[[regions]]\nname = "far"\nbox = [400e-9, 0.0, 600e-9, 480e-9]\n'
        )
    comm.barrier()
    out = shared_tmp_path / "study"
    assert main(["convergence", str(config), "--levels", "3", "--out", str(out), "-q"]) == 0
    report = json.loads((out / "convergence.json").read_text())
    data = report["orders"]["P1"]
    assert data["cells"][1] == 4 * data["cells"][0] and data["h"][0] == pytest.approx(2 * data["h"][1])
    record = data["quantities"]["region_far@0.0005s"]
    assert set(record) >= {"h", "values", "observed_order", "extrapolated", "gci"}
    assert math.isfinite(record["observed_order"]) and record["gci"] < 0.05
    assert data["field_l2_difference"]["values"][2] < data["field_l2_difference"]["values"][1]
    assert (out / "convergence.png").exists()
    settings = DiffusionSettings.from_toml(config).resolve_paths(config.parent)
    (shared_tmp_path / f"self{comm.rank}").mkdir(exist_ok=True)
    serial = run_diffusion_study(settings, levels=3, comm=MPI.COMM_SELF)
    for name, rec in serial["orders"]["P1"]["quantities"].items():
        np.testing.assert_allclose(data["quantities"][name]["values"], rec["values"], rtol=1e-8)
    with pytest.raises(UsageError, match="levels >= 2"):
        run_diffusion_study(settings, levels=1, comm=comm)


def test_phasefield_study_radius_converges_at_second_order(shared_tmp_path, comm):
    """Disk meshes with h halved: the outer radius of the swollen and the shrunk wire converges
    at order 2 (polygonal boundary) to (1 + beta) R and R."""
    from fem_anode.cli import main

    config = shared_tmp_path / "pf.toml"
    if comm.rank == 0:
        config.write_text(
            "[geometry]\nradius = 10e-9\n\n[mesh]\nsize = 4e-9\n\n[cycling]\nhalf_cycles = 2\nhalf_cycle_time = 0.5\n\n[output]\ntimes = []\n"
        )
    comm.barrier()
    out = shared_tmp_path / "pf_study"
    assert main(["convergence", str(config), "--levels", "3", "--out", str(out), "-q"]) == 0
    report = json.loads((out / "convergence.json").read_text())
    assert report["model"] == "phasefield"
    data = next(iter(report["orders"].values()))
    for index, expected in ((1, 1.5874 * 10e-9), (2, 10e-9)):
        record = data["quantities"][f"outer_radius_m[half-cycle {index}]"]
        assert record["observed_order"] == pytest.approx(2.0, abs=0.2)
        assert record["extrapolated"] == pytest.approx(expected, rel=1e-3)
    assert "peak_von_mises[half-cycle 1]" in data["quantities"] and "level" in data["mesh_independent_1pct"]
    assert "void_fraction[half-cycle 2]" in data["quantities"]  # the vacancy model (on by default) joins the study
    field = data["field_l2_difference"]
    assert field["values"][0] is None and all(0 <= v < 0.05 for v in field["values"][1:])
