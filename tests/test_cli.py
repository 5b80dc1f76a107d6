"""The fem-anode CLI: help everywhere, version, exit codes, clean errors, nothing half-written."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import UNDER_MPI

from fem_anode import __version__
from fem_anode.cli import SUBCOMMANDS, build_parser, main
from fem_anode.imaging.synthetic import fib_sem_roi
from fem_anode.io import VoxelImage, write_image

RESERVED = {"demo", "segment", "metrics", "mesh", "diffusion", "phasefield", "detachment", "convergence"}


def test_all_reserved_subcommands_exist():
    assert RESERVED <= set(SUBCOMMANDS)


@pytest.mark.parametrize("command", sorted(RESERVED))
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: fem-anode " + command in capsys.readouterr().out


def test_version_and_top_level_help(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert __version__ in capsys.readouterr().out
    help_text = build_parser().format_help()
    for command in RESERVED:
        assert command in help_text


def test_metrics_writes_json_and_figure(shared_tmp_path):
    tmp_path = shared_tmp_path  # under MPI the CLI's ranks share one --out
    roi = fib_sem_roi(size=(1e-6, 0.8e-6), pixel_size=20e-9, seed=3)
    image_path = write_image(tmp_path / "roi.tif", roi)
    assert main(["metrics", str(image_path), "--out", str(tmp_path / "out"), "-q"]) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert sum(metrics["phase_fractions"].values()) == pytest.approx(1.0, abs=1e-12)
    assert metrics["image"]["voxel_size_m"] == pytest.approx([20e-9, 20e-9])
    assert (tmp_path / "out" / "per_slice.png").stat().st_size > 1000
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["metrics", "{missing}", "--out", "{out}"], 3, "image not found"),
        (
            ["metrics", "{float}", "--out", "{out}", "--voxel-size", "1nm", "--phases", "a=0"],
            3,
            "expected integer labels",
        ),
        (["metrics", "{nan}", "--out", "{out}"], 3, "NaN"),
        (["metrics", "{labels}", "--out", "{out}", "--voxel-size=-3nm", "--phases", "a=0,b=1"], 2, "must be positive"),
        (
            ["metrics", "{labels}", "--out", "{out}", "--voxel-size", "1nm", "--phases", "a=0"],
            3,
            "not in the phase map",
        ),
        (["metrics", "{labels}", "--out", "{out}", "--phases", "a=0,b=1"], 2, "voxel size unknown"),
        (
            ["mesh", "{labels}", "--voxel-size", "1nm", "--phases", "a=0,b=1", "--keep", "c", "--out", "{out}.msh"],
            2,
            "cannot keep phase",
        ),
        (["convergence", "{missing}", "--out", "{out}"], 3, "settings file not found"),
    ],
)
def test_bad_input_gives_one_line_and_exit_code(tmp_path, capsys, args, code, message):
    files = {
        "missing": tmp_path / "missing.npy",
        "float": tmp_path / "float.npy",
        "nan": tmp_path / "nan.npy",
        "labels": tmp_path / "labels.npy",
        "out": tmp_path / "out",
    }
    np.save(files["float"], np.random.default_rng(0).random((4, 4)))
    np.save(files["nan"], np.array([[1.0, np.nan], [0.0, 1.0]]))
    np.save(files["labels"], np.array([[0, 1], [1, 0]], dtype=np.uint8))
    argv = [a.format(**{k: str(v) for k, v in files.items()}) for a in args]
    assert main(argv) == code
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.msh").exists()
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


def test_failure_inside_output_directory_leaves_nothing(tmp_path):
    from fem_anode.io.output import output_directory, write_json

    out = tmp_path / "res"
    with pytest.raises(RuntimeError):
        with output_directory(out) as staging:
            write_json(staging / "a.json", {"x": 1})
            raise RuntimeError("solver blew up")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_output_directory_keeps_other_files(tmp_path):
    from fem_anode.io.output import output_directory, write_json

    out = tmp_path / "res"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with output_directory(out) as staging:
        write_json(staging / "a.json", {"x": np.float64(1.5), "bad": np.inf})
    assert (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / "a.json").read_text()) == {"x": 1.5, "bad": None}


@pytest.mark.skipif(UNDER_MPI, reason="spawns its own Python; run serially only")
def test_console_script_and_module_entry_points(tmp_path):
    image = write_image(
        tmp_path / "l.npy", VoxelImage(np.array([[0, 1], [1, 1]], dtype=np.uint8), (1e-6, 1e-6), {"pore": 0, "si": 1})
    )
    module = subprocess.run([sys.executable, "-m", "fem_anode", "--version"], capture_output=True, text=True)
    assert module.returncode == 0 and __version__ in module.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "fem_anode", "metrics", str(image), "--phases", "pore=0", "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 3 and "not in the phase map" in bad.stderr and "Traceback" not in bad.stderr
