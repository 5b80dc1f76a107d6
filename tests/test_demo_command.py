"""`fem-anode demo` (the README's main job) produces its results on 1 and 2 ranks."""

from __future__ import annotations

import json

import pytest

from fem_anode.cli import main


def test_demo_runs_and_reports(shared_tmp_path, comm):
    out = shared_tmp_path / "demo"
    assert main(["demo", "--out", str(out), "-q"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    roi = summary["examples"]["roi_2d"]
    assert roi["shape"] == [400, 250]
    assert sum(roi["phase_fractions"].values()) == pytest.approx(1.0)
    assert summary["ageing_relative_change"]["pore"] < -0.1
    check = summary["mesh_check"]
    if "skipped" not in check:
        assert check["ranks"] == comm.size
        # dolfinx area of the SEI/C/B mesh = its pixel count * pixel area
        assert check["area_m2"] == pytest.approx(roi["phase_fractions"]["sei"] * 400 * 250 * (20e-9) ** 2, rel=1e-10)
        assert check["boundary_length_m"]["pore|sei"] > 0 and check["boundary_length_m"]["sei|si"] > 0
    for name in ("anode_pristine", "anode_aged", "roi_2d", "real_electrode"):
        assert (out / "metrics" / f"{name}.json").exists()
        assert (out / "figures" / f"{name}_per_slice.png").exists()
    assert (out / "meshes" / "roi_sei.msh").exists()
