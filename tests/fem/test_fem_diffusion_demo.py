"""The diffusion demo script (Fig. 8 workflow) runs on 1 and 2 ranks and asserts its findings."""

from __future__ import annotations


import pytest

pytest.importorskip("dolfinx")


def test_diffusion_fig8_demo_quick(shared_tmp_path, comm, load_demo):
    module = load_demo("diffusion_fig8")
    results = module.main(shared_tmp_path / "fig8", quick=True, comm=comm)
    assert set(results["regions"]) == {"I", "II", "III", "IV"}
    t90 = results["t90_s"]
    assert t90["I"] < t90["II"] < t90["IV"]
    assert results["timescales"]["biot_number"] > 1
    assert (shared_tmp_path / "fig8" / "c_fields.png").exists()
