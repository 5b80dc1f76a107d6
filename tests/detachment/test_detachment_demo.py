"""The measure -> fit -> simulate demo runs in quick mode and produces what it claims."""

from __future__ import annotations

import json


def test_detachment_demo_quick(shared_tmp_path, load_demo):
    module = load_demo("detachment_measure_fit_simulate")
    summary = module.main(shared_tmp_path / "demo", quick=True)
    saved = json.loads((shared_tmp_path / "demo" / "summary.json").read_text())
    gaps = [saved["mean_gap_m_per_cycle"][str(c)] for c in (0, 1, 3, 10)]
    assert gaps[0] < 0.05e-6 < gaps[1] < gaps[2] < gaps[3]
    assert abs(summary["fitted"]["delta0"]["value"] - 0.12e-6) < 0.03e-6
    low, high = summary["fitted"]["zeta0"]["ci"]
    assert low <= summary["fitted"]["zeta0"]["value"] <= high
    cap = summary["capacity_after_10_cycles"]
    assert abs(cap["paper_values_default_distribution"] - 0.20) < 0.02
    assert abs(cap["paper_values_all_three_improved"] - 0.40) < 0.03
    for sub in (
        "fit/fit.json",
        "fit/bootstrap.png",
        "fit/fit_gaps.png",
        "simulate/results.json",
        "simulate/capacity.png",
        "measure/txtm_cycle10/gaps.csv",
    ):
        assert (shared_tmp_path / "demo" / sub).stat().st_size > 100, sub
    assert "all three improved" in module._report(summary)
