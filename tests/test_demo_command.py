"""`fem-anode demo` (the README's main job) produces its results on 1 and 2 ranks."""

from __future__ import annotations

import json

import pytest

from fem_anode.cli import main


def test_demo_runs_and_reports(shared_tmp_path, comm):
    out = shared_tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick", "-q"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    roi = summary["examples"]["roi_2d"]
    assert roi["shape"] == [200, 125]
    assert sum(roi["phase_fractions"].values()) == pytest.approx(1.0)
    assert summary["ageing_relative_change"]["pore"] < -0.1
    check = summary["mesh_check"]
    if "skipped" not in check:
        assert check["ranks"] == comm.size
        # dolfinx area of the SEI/C/B mesh = its pixel count * pixel area (40 nm pixels in quick mode)
        assert check["area_m2"] == pytest.approx(roi["phase_fractions"]["sei"] * 200 * 125 * (40e-9) ** 2, rel=1e-10)
        assert check["boundary_length_m"]["pore|sei"] > 0 and check["boundary_length_m"]["sei|si"] > 0
    for name in ("anode_pristine", "anode_aged", "roi_2d", "real_electrode"):
        assert (out / "metrics" / f"{name}.json").exists()
        assert (out / "figures" / f"{name}_per_slice.png").exists()
    assert (out / "meshes" / "roi_sei.msh").exists()
    diffusion = summary.get("diffusion")
    if "skipped" not in check:
        t90 = diffusion["t90_s"]
        assert t90["I"] < t90["IV"] and diffusion["mass_balance_rel_error"] < 1e-6
        report = (out / "report.md").read_text()
        assert "## Li diffusion" in report and "diffusion/c_fields.png" in report
        assert (out / "diffusion" / "c_fields.png").exists() and (out / "diffusion" / "results.json").exists()
