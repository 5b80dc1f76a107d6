"""``fem-anode detachment {measure,simulate,fit}`` end to end, settings files and error exits.

Under MPI the ranks share one ``--out`` (``shared_tmp_path``)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fem_anode.cli import main
from fem_anode.commands.detachment import parse_inverse_length, parse_nonnegative_length
from fem_anode.detachment import DetachmentSettings, gapped_electrode, read_gap_csv
from fem_anode.errors import UsageError
from fem_anode.io.images import write_image


def test_simulate_writes_results_in_the_documented_shape(shared_tmp_path):
    out = shared_tmp_path / "sim"
    code = main(
        [
            "detachment",
            "simulate",
            "--alpha0",
            "0.83",
            "--kappa0",
            "0.02um",
            "--delta0",
            "120nm",
            "--zeta0",
            "0.163/um",
            "--cycles",
            "6",
            "--out",
            str(out),
            "-q",
        ]
    )
    assert code == 0
    res = json.loads((out / "results.json").read_text())
    cap = res["capacity_retention"]
    assert len(cap) == 7 and cap[0] == pytest.approx(1.0) and all(a > b for a, b in zip(cap, cap[1:]))
    gap = res["gap"]
    n_r = len(gap["radius_m"])
    assert gap["cycles"] == list(range(7))
    assert np.asarray(gap["mean_m"]).shape == (7, n_r) and np.asarray(gap["std_m"]).shape == (7, n_r)
    assert res["parameters"]["kappa0"] == pytest.approx(2e-8) and res["parameters"]["zeta0"] == pytest.approx(1.63e5)
    assert set(res["scenarios"]) == {"fitted", "alpha0 -50%", "kappa0 +100%", "delta0 -50%", "all three improved"}
    assert (out / "gap_model.png").stat().st_size > 1000 and (out / "capacity.png").stat().st_size > 1000
    again = DetachmentSettings.from_toml(out / "settings.toml")
    assert again.model.cycles == 6 and again.model.delta0 == pytest.approx(1.2e-7)


def test_measure_fit_simulate_chain(shared_tmp_path):
    rng = np.random.default_rng(0)
    radii = rng.uniform(0.4e-6, 1.0e-6, 12)
    images = {}
    for cycle, scale in ((0, 0.0), (1, 0.3), (3, 0.6)):
        image, _ = gapped_electrode(
            radii, scale * radii + 0.12e-6 * cycle, shape=(300, 300), voxel_size=40e-9, seed=cycle
        )
        images[cycle] = write_image(shared_tmp_path / f"sem{cycle}.npy", image)
    csvs = []
    for cycle, path in images.items():
        out = shared_tmp_path / f"m{cycle}"
        assert main(["detachment", "measure", str(path), "--cycle", str(cycle), "--out", str(out), "-q"]) == 0
        data = read_gap_csv(out / "gaps.csv")
        assert np.all(data.cycle == cycle) and data.size >= 5
        particles = json.loads((out / "particles.json").read_text())
        assert particles["stereology"] is True and particles["n_particles_with_gap"] == data.size
        assert (out / "gaps.png").stat().st_size > 1000
        csvs.append((out / "gaps.csv").read_text().splitlines())
    merged = shared_tmp_path / "all.csv"
    merged.write_text("\n".join([csvs[0][0]] + [line for c in csvs for line in c[1:]]) + "\n")
    fit_out = shared_tmp_path / "fit"
    assert main(["detachment", "fit", str(merged), "--bootstrap", "30", "--out", str(fit_out), "-q"]) == 0
    result = json.loads((fit_out / "fit.json").read_text())
    for name in ("alpha0", "kappa0", "delta0", "zeta0"):
        entry = result["parameters"][name]
        assert entry["ci"][0] <= entry["value"] <= entry["ci"][1]
    assert result["confidence"] == pytest.approx(0.68)
    assert np.loadtxt(fit_out / "bootstrap.csv", delimiter=",", skiprows=1).shape == (30, 4)
    sim_out = shared_tmp_path / "sim_fit"
    assert (
        main(
            [
                "detachment",
                "simulate",
                "--config",
                str(fit_out / "settings.toml"),
                "--radii",
                str(merged),
                "--out",
                str(sim_out),
                "-q",
            ]
        )
        == 0
    )
    res = json.loads((sim_out / "results.json").read_text())
    assert res["parameters"]["alpha0"] == pytest.approx(result["parameters"]["alpha0"]["value"])
    assert len(res["gap"]["radius_m"]) == len(csvs[0]) + len(csvs[1]) + len(csvs[2]) - 3


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty file"),
        ("cycle,radius_m\n1,1e-6\n", "missing column"),
        ("cycle,radius_m,gap_m\n1,-1e-6,1e-7\n", "radius_m must be positive"),
        ("cycle,radius_m,gap_m\n1,1e-6,nan\n", "column gap_m"),
    ],
)
def test_fit_bad_csv_exits_3_without_output(shared_tmp_path, capsys, text, message):
    path = shared_tmp_path / "bad.csv"
    path.write_text(text)
    out = shared_tmp_path / "never"
    assert main(["detachment", "fit", str(path), "--out", str(out)]) == 3
    err = capsys.readouterr().err
    assert "fem-anode detachment: error" in err and message in err and "Traceback" not in err
    assert not out.exists()


def test_usage_errors(shared_tmp_path, capsys):
    assert main(["detachment", "simulate", "--zeta0", "abc", "--out", str(shared_tmp_path / "x")]) == 2
    assert main(["detachment", "simulate", "--alpha0", "-1", "--out", str(shared_tmp_path / "x")]) == 2
    assert "alpha0 must be positive" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["detachment"])  # an action is required


def test_unit_parsers():
    assert parse_inverse_length("0.163/um") == pytest.approx(1.63e5)
    assert parse_inverse_length("0.163 1/um") == pytest.approx(1.63e5)
    assert parse_inverse_length("0.163um^-1") == pytest.approx(1.63e5)
    assert parse_inverse_length("1.63e5") == pytest.approx(1.63e5)
    assert parse_nonnegative_length("0") == 0.0 and parse_nonnegative_length("0um") == 0.0
    assert parse_nonnegative_length("20nm") == pytest.approx(2e-8)
    with pytest.raises(UsageError):
        parse_inverse_length("0.1/parsec")
