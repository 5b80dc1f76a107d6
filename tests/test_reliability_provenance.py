"""Provenance: every output JSON records the package and library versions, the command line, the
number of ranks, the full resolved configuration and the seed(s), so each result can be redone.

Runs serially and under ``mpirun -n 2`` (the commands' ``--out`` lies in ``shared_tmp_path``).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from fem_anode import __version__
from fem_anode.cli import main
from builders import small_roi

from fem_anode.io import write_image


def check(record: dict, command: str, comm, *, fe: bool = False) -> None:
    assert record["fem_anode_version"] == __version__
    assert record["command"] == command
    assert record["ranks"] == comm.size
    assert record["python"] and record["created_utc"] and "argv" in record
    versions = record["versions"]
    assert "numpy" in versions and "python" in versions
    if fe:
        for name in ("dolfinx", "petsc", "petsc4py", "mpi4py", "mpi_library"):
            assert name in versions, name
        assert versions["petsc"].count(".") == 2


@pytest.fixture
def image_path(shared_tmp_path):
    return write_image(shared_tmp_path / "roi.npy", small_roi())


def test_metrics_segment_and_mesh_record_options(shared_tmp_path, image_path, comm):
    out = shared_tmp_path / "metrics"
    assert main(["metrics", str(image_path), "--bins", "7", "--out", str(out), "-q"]) == 0
    record = json.loads((out / "metrics.json").read_text())["provenance"]
    check(record, "metrics", comm)
    assert record["configuration"]["options"]["bins"] == 7
    assert record["configuration"]["options"]["image"] == str(image_path)
    assert record["configuration"]["options"]["pore_phase"] == "pore"  # defaults are resolved too

    gray = shared_tmp_path / "gray.npy"
    if comm.rank == 0:
        np.save(gray, np.where(small_roi().array == 0, 0.1, 0.8) + 0.01 * np.random.default_rng(0).random((24, 30)))
    comm.barrier()
    seg = shared_tmp_path / "seg.npy"
    assert (
        main(
            [
                "segment",
                str(gray),
                "--voxel-size",
                "20nm",
                "--method",
                "threshold",
                "--phases",
                "pore=0,si=1",
                "--out",
                str(seg),
                "-q",
            ]
        )
        == 0
    )
    record = json.loads((shared_tmp_path / "seg.npy.report.json").read_text())["provenance"]
    check(record, "segment", comm)
    assert record["configuration"]["options"]["method"] == "threshold"
    assert record["configuration"]["options"]["voxel_size"] == "20nm"

    mesh = shared_tmp_path / "roi.msh"
    assert main(["mesh", str(image_path), "--keep", "sei", "--method", "voxel", "--out", str(mesh), "-q"]) == 0
    quality = json.loads((shared_tmp_path / "roi.quality.json").read_text())
    check(quality["provenance"], "mesh", comm)
    assert quality["provenance"]["configuration"]["options"]["keep"] == "sei"
    assert quality["cells"] == int(np.count_nonzero(small_roi().array == 3))  # the report itself is still there


def test_detachment_records_settings_and_seed(shared_tmp_path, comm):
    out = shared_tmp_path / "sim"
    assert main(["detachment", "simulate", "--alpha0", "0.5", "--cycles", "3", "--out", str(out), "-q"]) == 0
    record = json.loads((out / "results.json").read_text())["provenance"]
    check(record, "detachment simulate", comm)
    settings = record["configuration"]["settings"]
    assert settings["model"]["alpha0"] == 0.5 and settings["model"]["cycles"] == 3
    assert record["seeds"] == {"settings.fit.seed": 0}

    gaps = shared_tmp_path / "gaps.csv"
    if comm.rank == 0:
        rows = ["cycle,radius_m,gap_m"] + [
            f"{c},{r:.3e},{g:.3e}"
            for c in (1, 2, 3)
            for r, g in ((5e-8, 2e-9 * c), (8e-8, 3e-9 * c), (1.2e-7, 5e-9 * c))
        ]
        gaps.write_text("\n".join(rows) + "\n")
    comm.barrier()
    fit = shared_tmp_path / "fit"
    assert main(["detachment", "fit", str(gaps), "--bootstrap", "5", "--seed", "7", "--out", str(fit), "-q"]) == 0
    record = json.loads((fit / "fit.json").read_text())["provenance"]
    check(record, "detachment fit", comm)
    assert record["seeds"] == {"settings.fit.seed": 7, "options.seed": 7}


def test_diffusion_records_fe_library_versions_and_configuration(shared_tmp_path, image_path, comm):
    pytest.importorskip("dolfinx")
    config = shared_tmp_path / "run.toml"
    if comm.rank == 0:
        config.write_text(
            '[geometry]\nimage = "roi.npy"\n\n[time]\nt_end = 0.001\noutput_times = [0.001]\n\n[output]\nfields = false\nfigures = false\n'
        )
    comm.barrier()
    out = shared_tmp_path / "diffusion"
    assert main(["diffusion", str(config), "--out", str(out), "-q"]) == 0
    record = json.loads((out / "provenance.json").read_text())
    check(record, "diffusion", comm, fe=True)
    # the full resolved configuration travels with the results (config.toml and results.json)
    from fem_anode.fem.diffusion.settings import DiffusionSettings

    written = DiffusionSettings.from_toml(out / "config.toml")
    assert written.geometry.image == shared_tmp_path / "roi.npy" and written.time.t_end == 0.001
    assert json.loads((out / "results.json").read_text())["settings"] == written.to_dict()


def test_provenance_helper_is_backwards_compatible_and_finds_seeds():
    from fem_anode.commands._common import provenance

    old_style = provenance("diffusion")
    assert old_style["command"] == "diffusion" and "configuration" not in old_style and old_style["seeds"] == {}
    record = provenance(
        "phasefield", {"initial": {"seed": 3}, "vacancy": {"seed": 4, "rate": 1.0}, "regions": [{"seed": 5}]}, seed=9
    )
    assert record["seeds"] == {
        "settings.initial.seed": 3,
        "settings.vacancy.seed": 4,
        "settings.regions[0].seed": 5,
        "seed": 9,
    }
    assert record["configuration"]["settings"]["vacancy"]["rate"] == 1.0
    json.dumps(record)  # JSON-ready
