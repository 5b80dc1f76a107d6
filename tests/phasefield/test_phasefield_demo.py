"""The nanowire demo (quick mode): the physics of its Table 1 run, read from the files it wrote.

With the paper's mobility the wire (de)lithiates uniformly within each half-cycle (its diffusion
time is far shorter), so at the end of the lithiation the free wire is stress-free and stretched
by the chemical stretch ``1 + beta`` in every direction (radius and length; area by
``(1 + beta)^2``), and after the delithiation it is back to its reference size. The transient
stress stays below the yield strength: no plastic strain.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("dolfinx")


def test_demo_quick_swells_by_one_plus_beta_and_returns(shared_tmp_path, comm, load_demo):
    module = load_demo("phasefield_nanowire")
    material = module.table1_settings(quick=True).material
    out = shared_tmp_path / "demo"
    module.main(out, quick=True, comm=comm)
    saved = json.loads((out / "table1" / "results.json").read_text())
    assert saved["status"] == "completed"
    lith, delith = saved["half_cycles"]
    assert (lith["kind"], delith["kind"]) == ("lithiation", "delithiation")
    stretch = 1 + material.beta

    # uniform: full lithiation to c_max, back to c_min
    assert lith["min_c_li"] == pytest.approx(material.c_max, abs=1e-6)
    assert lith["max_c_li"] == pytest.approx(material.c_max, abs=1e-6)
    assert delith["min_c_li"] == pytest.approx(material.c_min, abs=1e-6)
    assert delith["max_c_li"] == pytest.approx(material.c_min, abs=1e-6)
    # free chemical swelling by 1 + beta in radius, area and length, and back
    assert lith["outer_radius_m"] / delith["outer_radius_m"] == pytest.approx(stretch, rel=1e-6)
    assert lith["area_m2"] / lith["reference_area_m2"] == pytest.approx(stretch**2, rel=1e-6)
    assert lith["axial_stretch"] == pytest.approx(stretch, rel=1e-6)
    assert delith["area_m2"] / delith["reference_area_m2"] == pytest.approx(1.0, rel=1e-6)
    assert delith["axial_stretch"] == pytest.approx(1.0, abs=1e-6)
    # stress-free at the end of each half-cycle; elastic throughout (below yield, no plastic strain)
    for record in (lith, delith):
        assert record["max_von_mises"] < 1e-6 * material.yield_strength
        assert 0 < record["peak_von_mises"] < material.yield_strength
        assert record["peak_eq_plastic_strain"] == 0.0
    assert (out / "table1" / "config.toml").exists()
