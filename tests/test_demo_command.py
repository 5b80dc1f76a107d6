"""`fem-anode demo` (the README's main job) produces its results on 1 and 2 ranks.

The demo's dolfinx parts (mesh check, mesh-independence study, diffusion) are the job's point, so
this test needs dolfinx: without it the module is skipped with that reason, never passed with
those parts left out."""

from __future__ import annotations

import json

import pytest

from fem_anode.cli import main

pytest.importorskip("dolfinx", reason="the demo's mesh check and diffusion need the FEniCSx stack")
pytestmark = pytest.mark.dolfinx


def test_demo_runs_and_reports(shared_tmp_path, comm):
    out = shared_tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick", "-q"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    roi = summary["examples"]["roi_2d"]
    assert roi["shape"] == [200, 125]
    assert sum(roi["phase_fractions"].values()) == pytest.approx(1.0)
    assert summary["ageing_relative_change"]["pore"] < -0.1
    check = summary["mesh_check"]
    assert "skipped" not in check
    assert check["ranks"] == comm.size
    # dolfinx area of the smooth SEI/C/B mesh ~ its pixel count * pixel area (40 nm pixels in
    # quick mode); the sub-pixel contour moves the boundary by a fraction of a pixel
    assert check["area_m2"] == pytest.approx(roi["phase_fractions"]["sei"] * 200 * 125 * (40e-9) ** 2, rel=0.02)
    assert check["boundary_length_m"]["pore|sei"] > 0 and check["boundary_length_m"]["sei|si"] > 0
    study = summary["mesh_independence"]
    levels = study["levels"]
    assert len(levels) == 3 and levels[0]["cells"] < levels[1]["cells"] < levels[2]["cells"]
    assert [lv["H_m"] for lv in levels] == pytest.approx([160e-9 * 2**0.5, 160e-9, 160e-9 / 2**0.5], rel=1e-12)
    chosen = study["chosen_level"]
    changes = [lv["largest_change_to_next"] for lv in levels[:-1]]
    if study["mesh_independent"]:  # every later change below 1 %, the one before (if any) not
        assert all(c < 0.01 for c in changes[chosen:]) and (chosen == 0 or changes[chosen - 1] >= 0.01)
    else:
        assert chosen == 2 and changes[-1] >= 0.01
    mesh = summary["mesh"]
    assert (
        mesh["method"] == "smooth" and mesh["order"] == 2 and mesh["cells"] == levels[chosen]["cells"] == check["cells"]
    )
    assert "430" in study["why_fewer_than_paper"] and study["paper_cells"] == 430_000
    assert levels[chosen]["results"] == "diffusion/results.json"
    for level in levels:
        assert (out / level["results"]).is_file()
    assert summary["diffusion"]["element_degree"] == 2 and summary["diffusion"]["ncells"] == mesh["cells"]
    for name in ("anode_pristine", "anode_aged", "roi_2d", "real_electrode"):
        assert (out / "metrics" / f"{name}.json").exists()
        assert (out / "figures" / f"{name}_per_slice.png").exists()
    assert (out / "meshes" / "roi_sei.msh").exists()
    diffusion = summary["diffusion"]
    t90 = diffusion["t90_s"]
    assert t90["I"] < t90["IV"] and diffusion["mass_balance_rel_error"] < 1e-6
    report = (out / "report.md").read_text()
    assert "## Li diffusion" in report and "diffusion/c_fields.png" in report
    assert (out / "diffusion" / "c_fields.png").exists() and (out / "diffusion" / "results.json").exists()
