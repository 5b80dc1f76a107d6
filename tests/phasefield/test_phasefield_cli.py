"""``fem-anode phasefield``: a short run through the CLI, its outputs and its input errors."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("dolfinx")

from fem_anode.cli import main  # noqa: E402

RECORD_KEYS = {
    "index",
    "kind",
    "t",
    "mean_c_li",
    "outer_radius_m",
    "area_m2",
    "axial_stretch",
    "max_von_mises",
    "max_eq_plastic_strain",
    "newton_iterations_total",
}

CONFIG = """
[geometry]
radius = 20e-9
[mesh]
size = 5e-9
[model]
kinematics = "generalized_plane_strain"
coupling = true
plasticity = true
[material]
omega = 2.6
kappa_li = 1e-4
mobility_li = 10.0
beta = 0.5874
c_min = 0.14
c_max = 0.86
e_max = 175.0
e_min = 43.75
poisson = 0.22
yield_strength = 1.64
[cycling]
half_cycles = 2
half_cycle_time = 0.05
dt_initial = 0.002
[vacancy]
enabled = true
seed = 3
[output]
times = [0.004]
"""


def test_cli_run_writes_records_fields_and_snapshots(shared_tmp_path, comm):
    config = shared_tmp_path / "pf.toml"
    if comm.rank == 0:
        config.write_text(CONFIG)
    comm.barrier()
    out = shared_tmp_path / "out"
    assert main(["-q", "phasefield", str(config), "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    records = results["half_cycles"]
    assert [r["kind"] for r in records] == ["lithiation", "delithiation"]
    for record in records:
        assert RECORD_KEYS <= set(record)
    lithiated, delithiated = records
    assert lithiated["t"] == pytest.approx(0.05) and delithiated["t"] == pytest.approx(0.1)
    assert lithiated["mean_c_li"] > 0.8 and delithiated["mean_c_li"] < 0.2
    # swelling: radius and stretch grow by ~(1 + beta) when lithiated, return when delithiated
    assert lithiated["outer_radius_m"] / delithiated["outer_radius_m"] == pytest.approx(1.5874, rel=0.02)
    assert lithiated["axial_stretch"] == pytest.approx(1.5874, rel=0.02)
    assert lithiated["area_m2"] > 2.4 * delithiated["area_m2"]
    assert lithiated["peak_von_mises"] > 0.05
    for name in ("fields.bp", "stress.bp", "mesh.msh", "config.toml", "provenance.json"):
        assert (out / name).exists(), name
    assert results["vacancy_model"] and lithiated["void_fraction"] == 0 and delithiated["mean_c_v"] > 0.14
    assert results["settings"]["vacancy"]["seed"] == 3
    assert (out / "morphology_montage.png").stat().st_size > 10_000
    assert sorted(p.name for p in out.glob("morphology_0*.png")) == [
        "morphology_01_lithiation.png",
        "morphology_02_delithiation.png",
    ]
    pngs = sorted(p.name for p in out.glob("snapshot_*.png"))
    assert len(pngs) == 4 and all(p.startswith(("snapshot_01_lithiation", "snapshot_02_delithiation")) for p in pngs)
    assert (out / pngs[0]).stat().st_size > 10_000


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[model]\nkinematics = 'plane_stress'\n", "must be one of"),
        ("[material]\nkapa_li = 1e-4\n", "did you mean 'kappa_li'"),
        ("[vacancy]\nnucleus_radius = -1e-9\n", "vacancy.nucleus_radius"),
        ("[vacancy]\nthreshhold = 0.4\n", "did you mean 'threshold'"),
        ("[material]\nc_min = 0.9\n", "must be below"),
        ("[geometry]\nmesh = 'missing.msh'\n", "mesh file not found"),
    ],
)
def test_cli_bad_config_is_one_line_error(shared_tmp_path, comm, capsys, text, message):
    config = shared_tmp_path / "bad.toml"
    if comm.rank == 0:
        config.write_text(text)
    comm.barrier()
    code = main(["phasefield", str(config), "--out", str(shared_tmp_path / "never")])
    assert code in (2, 3)
    assert message in capsys.readouterr().err
    assert not (shared_tmp_path / "never").exists()


def test_every_setting_has_a_row_with_its_default_in_the_docs():
    """docs/phasefield.md's configuration table lists every setting with its current default
    (a setting added without its row, or a default changed without the docs, fails here)."""
    import dataclasses
    from pathlib import Path

    from fem_anode.fem.phasefield.settings import PhaseFieldSettings

    text = (Path(__file__).parents[2] / "docs" / "phasefield.md").read_text()
    settings = PhaseFieldSettings()
    missing = []
    for section in dataclasses.fields(settings):
        values = getattr(settings, section.name)
        if not dataclasses.is_dataclass(values):
            continue
        for field in dataclasses.fields(values):
            if f"| `{section.name}.{field.name}` | {getattr(values, field.name)} |" not in text:
                missing.append(f"{section.name}.{field.name}")
    assert not missing
