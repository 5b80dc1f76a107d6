"""The nanowire demo script runs (quick mode) and checks what it produced."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("dolfinx")


def test_demo_quick(shared_tmp_path, comm, load_demo):
    module = load_demo("phasefield_nanowire")
    out = shared_tmp_path / "demo"
    results = module.main(out, quick=True, comm=comm)
    records = results["table1"]["half_cycles"]
    assert [r["kind"] for r in records] == ["lithiation", "delithiation"]
    on_disk = json.loads((out / "table1" / "results.json").read_text())
    assert on_disk["half_cycles"][0]["axial_stretch"] == pytest.approx(records[0]["axial_stretch"])
    assert (out / "table1" / "config.toml").exists()
