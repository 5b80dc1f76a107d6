"""The pristine-vs-aged imaging demo runs (quick mode) and produces its figures and summary."""

from __future__ import annotations

import json


def test_imaging_demo_quick(tmp_path, load_demo):
    module = load_demo("imaging_pristine_vs_aged")
    summary = module.main(tmp_path, quick=True)
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["relative_change_aged_vs_pristine"]["phase_volume"]["pore"] < -0.2
    assert (
        summary["samples"]["aged"]["pore_si_distance_mean_m"]
        > summary["samples"]["pristine"]["pore_si_distance_mean_m"]
    )
    for name in (
        "per_slice",
        "tortuosity",
        "connections",
        "pore_si_distance",
        "si_size_distribution",
        "sct_slices",
        "fib_sem_shine_through",
        "tortuosity_map",
    ):
        assert (tmp_path / "figures" / f"{name}.png").stat().st_size > 1000, name
    assert "FIB-SEM shine-through pore IoU" in module._report(summary)
    for sample in summary["samples"].values():  # the blur-aware refinement ran, its PSF fitted to the data
        assert 0.5 < sample["refine"]["psf_sigma_voxels"] < 1.5 and sample["refine"]["sweeps"] >= 1
