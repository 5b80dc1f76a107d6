"""``fem-anode mesh``: files written, exit codes and one-line errors for bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("gmsh")

from fem_anode.cli import main  # noqa: E402
from fem_anode.io.images import write_image  # noqa: E402


@pytest.fixture
def roi(shared_tmp_path, comm):
    path = shared_tmp_path / "roi.npy"
    if comm.rank == 0:
        yy, xx = np.mgrid[:40, :50] + 0.5
        labels = np.full((40, 50), 3, dtype=np.uint8)
        labels[(xx - 18) ** 2 + (yy - 20) ** 2 < 10**2] = 1
        labels[(xx - 38) ** 2 + (yy - 12) ** 2 < 7**2] = 0
        write_image(path, labels, voxel_size="20nm", phases="pore=0,si=1,sei=3")
    comm.barrier()
    return path


def test_cli_smooth_mesh_with_quality_and_xdmf(roi, shared_tmp_path, comm):
    out = shared_tmp_path / "m" / "roi_sei.msh"
    code = main(
        ["mesh", str(roi), "--keep", "sei", "--size", "60nm", "--order", "2", "--xdmf", "--out", str(out), "-q"]
    )
    assert code == 0
    assert out.is_file() and out.with_suffix(".xdmf").is_file() and out.with_suffix(".h5").is_file()
    quality = json.loads(out.with_name("roi_sei.quality.json").read_text())
    assert quality["method"] == "smooth" and quality["elements"]["Triangle 6"] == quality["cells"]
    assert set(quality["groups"]) == {"sei", "pore|sei", "sei|si", "left", "right", "top", "bottom"}
    assert abs(quality["phase_measure"]["sei"]["relative_difference"]) < 0.02


@pytest.mark.parametrize(
    ("extra", "code", "message"),
    [
        (["--keep", "graphite"], 2, "not in the phase map"),
        (["--size", "5um"], 2, "larger than the domain"),
        (["--method", "tet"], 3, "need a 3D image"),
        (["--method", "voxel", "--size", "40nm"], 2, "--size applies to --method smooth"),
    ],
)
def test_cli_bad_input_is_one_clear_line(roi, tmp_path, capsys, extra, code, message):
    out = tmp_path / "bad.msh"
    assert main(["mesh", str(roi), *extra, "--out", str(out)]) == code
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()


def test_cli_empty_and_missing_phase(tmp_path, capsys, comm):
    empty = tmp_path / "empty.npy"
    write_image(empty, np.zeros((0, 4), np.uint8), voxel_size="20nm", phases="pore=0")
    assert main(["mesh", str(empty), "--out", str(tmp_path / "e.msh")]) == 3
    assert "empty" in capsys.readouterr().err
    only_pore = tmp_path / "pore.npy"
    write_image(only_pore, np.zeros((10, 10), np.uint8), voxel_size="20nm", phases="pore=0")
    assert (
        main(["mesh", str(only_pore), "--phases", "pore=0,si=1", "--keep", "si", "--out", str(tmp_path / "p.msh")]) == 3
    )
    assert "si" in capsys.readouterr().err
