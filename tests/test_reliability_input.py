"""Bad input: every subcommand fails fast with one line naming the problem, a distinct exit code,
no traceback unless --debug, and nothing written. One test (or parameter) per class of bad input;
docs/reliability.md maps each item to its test.

Runs serially and under ``mpirun -n 2`` (each rank runs every test; commands that use MPI get a
``--out`` in ``shared_tmp_path``; errors raised identically on every rank need no communication).
Subprocess tests (memory measurements) run serially only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fem_anode.cli import main
from builders import small_roi

from fem_anode.io import VoxelImage, write_image
from conftest import UNDER_MPI


LABELS = VoxelImage(
    np.array([[0, 1, 1], [1, 0, 3], [3, 3, 1]], dtype=np.uint8), (20e-9, 20e-9), {"pore": 0, "si": 1, "sei": 3}
)


def run_cli(
    argv: list[str],
    capsys: pytest.CaptureFixture,
    code: int,
    message: str,
    *,
    nothing_in: Path | None = None,
    out: Path | None = None,
) -> str:
    """Run ``fem-anode argv``; check the exit code, one error line with ``message``, no traceback,
    no ``out`` and no staging leftovers in ``nothing_in``."""
    capsys.readouterr()
    assert main(argv) == code
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err
    assert len([line for line in err.strip().splitlines() if "error" in line]) == 1, err
    # under MPI every rank checks before any rank starts its next command (whose staging folder
    # would otherwise show up in a shared directory)
    _barrier()
    try:
        if out is not None:
            assert not out.exists(), f"{out} was written"
        if nothing_in is not None:
            assert not [p.name for p in nothing_in.iterdir() if "partial" in p.name]
    finally:
        _barrier()
    return err


def _barrier() -> None:
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and mpi.COMM_WORLD.size > 1:
        mpi.COMM_WORLD.barrier()


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    """Bad and good inputs, per rank."""
    paths = {
        "labels": write_image(tmp_path / "labels.npy", LABELS),
        "gray": tmp_path / "gray.npy",
        "gray_nan": tmp_path / "gray_nan.npy",
        "one_d": tmp_path / "one_d.npy",
        "four_d": tmp_path / "four_d.npy",
        "float_labels": tmp_path / "float_labels.npy",
        "corrupt": tmp_path / "corrupt.npy",
        "corrupt_tif": tmp_path / "corrupt.tif",
        "bad_toml": tmp_path / "bad.toml",
        "missing": tmp_path / "missing.npy",
        "missing_toml": tmp_path / "missing.toml",
        "missing_csv": tmp_path / "missing.csv",
        "out": tmp_path / "out",
    }
    rng = np.random.default_rng(0)
    np.save(paths["gray"], rng.random((16, 16)))
    gray = rng.random((16, 16))
    gray[3, 4] = np.inf
    np.save(paths["gray_nan"], gray)
    np.save(paths["one_d"], np.arange(6, dtype=np.uint8))
    np.save(paths["four_d"], np.zeros((2, 2, 2, 2), dtype=np.uint8))
    np.save(paths["float_labels"], np.array([[0.0, 1.0], [1.0, 0.5]]))
    paths["corrupt"].write_bytes(b"\x93NUMPY\x01\x00garbage")
    paths["corrupt_tif"].write_bytes(b"II*\x00garbage")
    paths["bad_toml"].write_text("[physics\nD = 1\n")
    return paths


def fmt(argv: list[str], files: dict[str, Path]) -> list[str]:
    return [a.format(**{k: str(v) for k, v in files.items()}) for a in argv]


# ----------------------------------------------------------------------------- missing / unreadable files

MISSING_OR_UNREADABLE = [
    (["segment", "{missing}", "--out", "{out}.npy"], 3, "image not found"),
    (["segment", "{corrupt}", "--out", "{out}.npy"], 3, "cannot read image"),
    (["metrics", "{missing}", "--out", "{out}"], 3, "image not found"),
    (["metrics", "{corrupt_tif}", "--out", "{out}"], 3, "cannot read image"),
    (["mesh", "{missing}", "--out", "{out}.msh"], 3, "image not found"),
    (["detachment", "measure", "{missing}", "--cycle", "1", "--out", "{out}"], 3, "image not found"),
    (["detachment", "fit", "{missing_csv}", "--out", "{out}"], 3, "not found"),
    (["detachment", "simulate", "--config", "{missing_toml}", "--out", "{out}"], 3, "settings file not found"),
    (["detachment", "simulate", "--config", "{bad_toml}", "--out", "{out}"], 2, "is not valid TOML"),
    (["diffusion", "{missing_toml}", "--out", "{out}"], 3, "settings file not found"),
    (["diffusion", "{bad_toml}", "--out", "{out}"], 2, "is not valid TOML"),
    (["phasefield", "{missing_toml}", "--out", "{out}"], 3, "settings file not found"),
    (["convergence", "{bad_toml}", "--out", "{out}"], 2, "is not valid TOML"),
]


@pytest.mark.parametrize(
    ("argv", "code", "message"), MISSING_OR_UNREADABLE, ids=lambda v: " ".join(v[:2]) if isinstance(v, list) else None
)
def test_missing_or_unreadable_files(files, capsys, argv, code, message, tmp_path):
    run_cli(fmt(argv, files), capsys, code, message, out=files["out"], nothing_in=tmp_path)
    assert not list(tmp_path.glob("out*"))


def test_image_named_in_a_config_is_missing(shared_tmp_path, comm, capsys):
    pytest.importorskip("dolfinx")
    config = shared_tmp_path / "run.toml"
    if comm.rank == 0:
        config.write_text('[geometry]\nimage = "nowhere.npy"\n')
    comm.barrier()
    out = shared_tmp_path / "out"
    run_cli(
        ["diffusion", str(config), "--out", str(out)], capsys, 3, "image not found", out=out, nothing_in=shared_tmp_path
    )


# ----------------------------------------------------------------------------- dimensionality, NaN/inf, labels

IMAGE_CONTENT = [
    (["metrics", "{one_d}", "--out", "{out}"], 3, "expected a 2D or 3D image, got 1D"),
    (["segment", "{four_d}", "--out", "{out}.npy"], 3, "expected a 2D or 3D image, got 4D"),
    (["mesh", "{four_d}", "--out", "{out}.msh"], 3, "got 4D"),
    (["segment", "{gray_nan}", "--out", "{out}.npy"], 3, "NaN or infinite"),
    (
        ["metrics", "{float_labels}", "--voxel-size", "1nm", "--phases", "a=0,b=1", "--out", "{out}"],
        3,
        "expected integer labels",
    ),
    (
        ["mesh", "{float_labels}", "--voxel-size", "1nm", "--phases", "a=0,b=1", "--out", "{out}.msh"],
        3,
        "expected integer labels",
    ),
    (
        [
            "detachment",
            "measure",
            "{gray}",
            "--voxel-size",
            "1nm",
            "--phases",
            "si=0,cbd=1",
            "--cycle",
            "0",
            "--out",
            "{out}",
        ],
        3,
        "expected integer labels",
    ),
    (
        ["metrics", "{labels}", "--phases", "pore=0,si=1", "--out", "{out}"],
        3,
        "label values [3] are not in the phase map",
    ),
    (["mesh", "{labels}", "--phases", "pore=0,si=1", "--out", "{out}.msh"], 3, "not in the phase map"),
    (
        ["metrics", "{labels}", "--phases", "pore=0,si=1,sei=3,graphite=2", "--out", "{out}"],
        3,
        "graphite have no voxels",
    ),
    (
        ["mesh", "{labels}", "--phases", "pore=0,si=1,sei=3,graphite=2", "--keep", "graphite", "--out", "{out}.msh"],
        3,
        "have no voxels",
    ),
]


@pytest.mark.parametrize(("argv", "code", "message"), IMAGE_CONTENT)
def test_wrong_dimension_nonfinite_and_label_problems(files, capsys, argv, code, message, tmp_path):
    run_cli(fmt(argv, files), capsys, code, message, out=files["out"], nothing_in=tmp_path)
    assert not list(tmp_path.glob("out*"))


def test_phase_a_model_needs_has_no_pixels(shared_tmp_path, comm, capsys):
    """diffusion: the transporting phase is in the phase map but has no pixels -> exit 3."""
    pytest.importorskip("dolfinx")
    image = VoxelImage(np.array([[0, 1], [1, 0]], dtype=np.uint8), (20e-9, 20e-9), {"pore": 0, "si": 1})
    write_image(shared_tmp_path / "nosei.npy", image)
    config = shared_tmp_path / "nosei.toml"
    if comm.rank == 0:
        config.write_text('[geometry]\nimage = "nosei.npy"\nphases = {pore = 0, si = 1, sei = 3}\n')
    comm.barrier()
    out = shared_tmp_path / "out"
    run_cli(
        ["diffusion", str(config), "--out", str(out)],
        capsys,
        3,
        "phase(s) sei have no voxels",
        out=out,
        nothing_in=shared_tmp_path,
    )


# ----------------------------------------------------------------------------- NaN/inf and non-positive parameters

PARAMETERS = [
    (["metrics", "{labels}", "--voxel-size", "nan", "--out", "{out}"], 2, "cannot read length 'nan'"),
    (["metrics", "{labels}", "--voxel-size", "inf", "--out", "{out}"], 2, "cannot read length 'inf'"),
    (["metrics", "{labels}", "--voxel-size", "0", "--out", "{out}"], 2, "must be positive"),
    (["metrics", "{labels}", "--voxel-size=-20nm", "--out", "{out}"], 2, "must be positive"),
    (["metrics", "{labels}", "--voxel-size", "20nm,0nm", "--out", "{out}"], 2, "must be positive"),
    (["metrics", "{labels}", "--bins", "0", "--out", "{out}"], 2, "--bins must be positive"),
    (["metrics", "{labels}", "--pore-phase", "si", "--out", "{out}"], 2, "pore and Si phase are both 'si'"),
    (
        ["segment", "{gray}", "--method", "region", "--scale", "nan", "--out", "{out}.npy"],
        2,
        "--scale must be finite",
    ),
    (
        ["segment", "{gray}", "--method", "region", "--sigma", "-1", "--out", "{out}.npy"],
        2,
        "--sigma must be non-negative",
    ),
    (["segment", "{gray}", "--median", "-3", "--out", "{out}.npy"], 2, "--median must lie in [0, "),
    (
        ["segment", "{gray}", "--method", "region", "--psf-sigma", "1", "--out", "{out}.npy"],
        2,
        "--psf-sigma belong to --method multistage, not region",
    ),
    (
        ["segment", "{gray}", "--scale", "10", "--out", "{out}.npy"],
        2,
        "--scale belong to --method region, not multistage",
    ),
    (
        ["segment", "{gray}", "--method", "threshold", "--scale", "1", "--no-refine", "--out", "{out}.npy"],
        2,
        " --no-refine belong to --method multistage, not threshold\n",
    ),
    (
        ["segment", "{gray}", "--method", "threshold", "--settings", "{out}.toml", "--out", "{out}.npy"],
        2,
        "--settings holds the settings of --method multistage or region",
    ),
    (["mesh", "{labels}", "--size", "nan", "--out", "{out}.msh"], 2, "cannot read length 'nan'"),
    (["mesh", "{labels}", "--size", "0", "--out", "{out}.msh"], 2, "must be positive"),
    (["detachment", "simulate", "--alpha0", "nan", "--out", "{out}"], 2, "alpha0 must be finite"),
    (["detachment", "simulate", "--kappa0", "inf", "--out", "{out}"], 2, "cannot read length 'inf'"),
    (["detachment", "simulate", "--delta0", "abc", "--out", "{out}"], 2, "cannot read length 'abc'"),
    (["detachment", "simulate", "--cycles", "0", "--out", "{out}"], 2, "cycles must lie in"),
    (["demo", "--seed", "-1", "--out", "{out}"], 2, "--seed must be a non-negative integer"),
]


@pytest.mark.parametrize(("argv", "code", "message"), PARAMETERS)
def test_nonfinite_and_nonpositive_command_line_parameters(files, capsys, argv, code, message, tmp_path):
    run_cli(fmt(argv, files), capsys, code, message, out=files["out"], nothing_in=tmp_path)
    assert not list(tmp_path.glob("out*"))


TOML_CASES = [
    ("diffusion", '[geometry]\nimage = "x.npy"\n[physics]\nD = nan\n', "physics.D must be finite"),
    ("diffusion", '[geometry]\nimage = "x.npy"\n[physics]\nD = -3e-10\n', "physics.D must be positive"),
    ("diffusion", '[geometry]\nimage = "x.npy"\n[physics]\nk_f = -inf\n', "physics.k_f must be finite"),
    ("diffusion", '[geometry]\nimage = "x.npy"\npixel_size = 0.0\n', "geometry.pixel_size must be positive"),
    ("diffusion", '[geometry]\nimage = "x.npy"\n[time]\ndt_initial = 0\n', "time.dt_initial must be positive"),
    ("diffusion", '[geometry]\nimage = "x.npy"\n[time]\noutput_times = [1.0, inf]\n', "must be finite"),
    (
        "diffusion",
        '[geometry]\nimage = "x.npy"\n[physics]\nDD = 1e-10\n',
        "unknown setting 'physics.DD'; did you mean 'D'?",
    ),
    (
        "diffusion",
        '[geometry]\nimage = "x.npy"\n[phsyics]\nD = 1e-10\n',
        "unknown setting 'phsyics'; did you mean 'physics'?",
    ),
    ("diffusion", '[geometry]\nimage = "x.npy"\n[physics]\nD = "fast"\n', "physics.D must be a number, got 'fast'"),
    ("diffusion", '[geometry]\nimage = "x.npy"\n[mesh]\norder = 1.5\n', "mesh.order must be an integer"),
    ("diffusion", "[physics]\nD = 1e-10\n", "geometry needs exactly one of 'image' or 'mesh'"),
    ("phasefield", "[cycling]\ndt_initial = -0.01\n", "cycling.dt_initial must be positive"),
    ("phasefield", "[material]\nmobility_li = nan\n", "material.mobility_li must be finite"),
    ("phasefield", "[geometry]\nradius = 0.0\n", "geometry.radius must be positive"),
    ("phasefield", "[cyclng]\nhalf_cycles = 2\n", "did you mean 'cycling'?"),
    ("phasefield", '[initial]\nseed = "abc"\n', "initial.seed must be an integer"),
    ("convergence", '[geometry]\nimage = "x.npy"\n[time]\nt_end = inf\n', "time.t_end must be finite"),
]


@pytest.mark.parametrize(("command", "text", "message"), TOML_CASES)
def test_toml_nan_inf_nonpositive_unknown_wrong_type_missing(tmp_path, capsys, command, text, message):
    config = tmp_path / "c.toml"
    config.write_text(text)
    out = tmp_path / "out"
    run_cli([command, str(config), "--out", str(out)], capsys, 2, message, out=out, nothing_in=tmp_path)


def test_detachment_config_unknown_key_and_nan(tmp_path, capsys):
    config = tmp_path / "d.toml"
    config.write_text("[model]\nalpha = 0.8\n")
    run_cli(
        ["detachment", "simulate", "--config", str(config), "--out", str(tmp_path / "o")],
        capsys,
        2,
        "did you mean 'alpha0'?",
        out=tmp_path / "o",
    )
    config.write_text("[model]\ndelta0 = nan\n")
    run_cli(
        ["detachment", "simulate", "--config", str(config), "--out", str(tmp_path / "o")],
        capsys,
        2,
        "model.delta0 must be finite",
        out=tmp_path / "o",
    )


def test_every_positive_setting_rejects_zero_and_negative_values():
    """Exhaustive over the three models: each setting declared positive refuses 0 and -1."""
    import dataclasses
    import typing

    from fem_anode.detachment.settings import DetachmentSettings
    from fem_anode.errors import UsageError
    from fem_anode.fem.diffusion.settings import DiffusionSettings
    from fem_anode.fem.phasefield.settings import PhaseFieldSettings

    checked = []
    for cls, base in (
        (DiffusionSettings, {"geometry": {"image": "x.npy"}}),
        (PhaseFieldSettings, {}),
        (DetachmentSettings, {}),
    ):
        hints = typing.get_type_hints(cls)
        for section in dataclasses.fields(cls):
            tp = hints[section.name]
            if not (isinstance(tp, type) and dataclasses.is_dataclass(tp)):
                continue
            for field in dataclasses.fields(tp):
                if not field.metadata.get("positive"):
                    continue
                default = getattr(tp(), field.name)
                is_list = "list[" in str(typing.get_type_hints(tp)[field.name])  # also a list that defaults to None
                for bad in (0, -1):
                    value = (
                        [bad]
                        if is_list
                        else (
                            type(default)(bad)
                            if isinstance(default, (int, float)) and not isinstance(default, bool)
                            else bad
                        )
                    )
                    data = {**base, section.name: {**base.get(section.name, {}), field.name: value}}
                    with pytest.raises(UsageError, match=f"{section.name}.{field.name}.* must be positive"):
                        cls.from_dict(data)
                checked.append(f"{cls.__name__}.{section.name}.{field.name}")
    # the examples are among them: voxel sizes, diffusivities, time steps
    for name in (
        "DiffusionSettings.geometry.pixel_size",
        "DiffusionSettings.physics.D",
        "DiffusionSettings.time.dt_initial",
        "DiffusionSettings.time.output_times",
        "PhaseFieldSettings.cycling.dt_initial",
    ):
        assert name in checked


# ----------------------------------------------------------------------------- meshes without the expected tags


@pytest.fixture
def mesh_without_pore(shared_tmp_path, comm) -> Path:
    """A tagged voxel mesh of SEI around Si, with no pore boundary ('pore|sei') and no 'surface'."""
    from fem_anode.meshing.voxel import write_voxel_mesh

    path = shared_tmp_path / "no_pore.msh"
    image = VoxelImage(np.array([[1, 3, 3], [3, 3, 3]], dtype=np.uint8), (1e-8, 1e-8), {"si": 1, "sei": 3})
    if comm.rank == 0:
        write_voxel_mesh(image, path, keep=["sei"])
    comm.barrier()
    return path


@pytest.mark.parametrize(
    ("command", "text", "code", "message"),
    [
        ("diffusion", '[geometry]\nmesh = "no_pore.msh"\n', 3, "mesh has no facet group 'pore|sei'"),
        ("phasefield", '[geometry]\nmesh = "no_pore.msh"\nphase = "sei"\n', 3, "mesh has no facet group 'surface'"),
        ("phasefield", '[geometry]\nmesh = "no_pore.msh"\n', 3, "mesh has no cell group 'si'"),
        ("convergence", '[geometry]\nmesh = "no_pore.msh"\n', 2, "give geometry.image"),
    ],
)
def test_meshes_without_the_expected_tags(
    mesh_without_pore, shared_tmp_path, comm, capsys, command, text, code, message
):
    pytest.importorskip("dolfinx")
    config = shared_tmp_path / f"{command}.toml"
    if comm.rank == 0:
        config.write_text(text)
    comm.barrier()
    out = shared_tmp_path / "out"
    run_cli([command, str(config), "--out", str(out)], capsys, code, message, out=out, nothing_in=shared_tmp_path)


def test_mesh_file_that_is_not_a_mesh(shared_tmp_path, comm, capsys):
    pytest.importorskip("dolfinx")
    bad = shared_tmp_path / "bad.msh"
    config = shared_tmp_path / "bad_mesh.toml"
    if comm.rank == 0:
        bad.write_text("this is not gmsh\n")
        config.write_text('[geometry]\nmesh = "bad.msh"\n')
    comm.barrier()
    out = shared_tmp_path / "out"
    run_cli(["diffusion", str(config), "--out", str(out)], capsys, 3, "bad.msh", out=out, nothing_in=shared_tmp_path)


# ----------------------------------------------------------------------------- absurd sizes: memory estimate and refusal


def huge_npy(path: Path, shape: tuple[int, ...] = (10_000, 10_000, 10_000)) -> Path:
    """A header-only ``.npy`` claiming an absurd uint8 volume (no data on disk)."""
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": shape})
    return path


def test_absurd_image_is_refused_with_the_estimate(tmp_path, capsys):
    path = huge_npy(tmp_path / "huge.npy")
    err = run_cli(
        ["metrics", str(path), "--out", str(tmp_path / "out")],
        capsys,
        3,
        "image metrics of a 10000x10000x10000 image needs an estimated 50 TB of memory",
        out=tmp_path / "out",
        nothing_in=tmp_path,
    )
    assert "is available" in err and "--no-memory-check" in err
    run_cli(
        ["mesh", str(path), "--out", str(tmp_path / "m.msh")],
        capsys,
        3,
        "10000x10000x10000 uint8",
        out=tmp_path / "m.msh",
    )


def test_memory_limit_refuses_meshing_and_the_override_lets_it_run(shared_tmp_path, comm, capsys, monkeypatch):
    image = write_image(shared_tmp_path / "roi.npy", small_roi())
    out = shared_tmp_path / "roi.msh"
    monkeypatch.setenv("FEM_ANODE_MEMORY_LIMIT", "50MB")
    err = run_cli(
        ["mesh", str(image), "--keep", "sei", "--out", str(out)],
        capsys,
        3,
        "smooth mesh of a 24x30 image needs an estimated",
    )
    assert "50 MB is available" in err
    comm.barrier()
    assert not out.exists()
    assert main(["mesh", str(image), "--keep", "sei", "--out", str(out), "--no-memory-check", "-q"]) == 0
    assert out.stat().st_size > 0
    assert os.environ.get("FEM_ANODE_MEMORY_CHECK") is None  # the flag does not leak out of main()


def test_diffusion_refuses_before_meshing(shared_tmp_path, comm, capsys, monkeypatch):
    pytest.importorskip("dolfinx")
    write_image(shared_tmp_path / "roi.npy", small_roi())
    config = shared_tmp_path / "run.toml"
    if comm.rank == 0:
        config.write_text('[geometry]\nimage = "roi.npy"\n[mesh]\norder = 2\n')
    comm.barrier()
    monkeypatch.setenv("FEM_ANODE_MEMORY_LIMIT", "100MB")
    out = shared_tmp_path / "out"
    err = run_cli(
        ["diffusion", str(config), "--out", str(out)],
        capsys,
        3,
        "diffusion run on a 24x30 image",
        out=out,
        nothing_in=shared_tmp_path,
    )
    assert "dofs, P2" in err and "solver.type = 'iterative'" in err


def test_memory_estimates_scale_and_parse():
    from fem_anode.errors import UsageError
    from fem_anode.fem.diffusion.settings import DiffusionSettings
    from fem_anode.resources import (
        estimate_diffusion_memory,
        estimate_fe_memory,
        estimate_mesh_memory,
        format_bytes,
        parse_bytes,
    )

    assert parse_bytes("4GB") == 4e9 and parse_bytes("512 MiB") == 512 * 2**20 and parse_bytes("1e6") == 1e6
    for bad in ("-1GB", "0", "lots", "5 furlongs"):
        with pytest.raises(UsageError):
            parse_bytes(bad)
    assert format_bytes(1.5e12) == "1.5 TB" and format_bytes(2.5e6) == "2.5 MB"
    solid = VoxelImage(np.ones((10, 10, 10), dtype=np.uint8), (1e-8,) * 3, {"sei": 1})
    est = estimate_mesh_memory(solid, "voxel")
    assert est.details["cells"] == 1000 and est.details["facets"] == 600 and est.details["nodes"] <= 11**3
    assert estimate_mesh_memory(solid, "tet").details["cells"] == 6000
    # a direct 3D factorisation grows faster than linearly in the dofs; an iterative solve does not
    small, large = (
        estimate_fe_memory(cells=n, dofs=n, ndim=3, cell_type="hexahedron", degree=1, solver="direct")
        for n in (1e5, 1e6)
    )
    assert large.details["factor_bytes"] / small.details["factor_bytes"] == pytest.approx(10 ** (4 / 3), rel=1e-12)
    iterative = estimate_fe_memory(cells=1e6, dofs=1e6, ndim=3, cell_type="hexahedron", degree=1, solver="iterative")
    assert iterative.details["factor_bytes"] == 0 and iterative.bytes < large.bytes
    settings = DiffusionSettings.from_dict({"geometry": {"image": "x.npy"}, "mesh": {"order": 2}})
    p2 = estimate_diffusion_memory(small_roi(), settings)
    p1 = estimate_diffusion_memory(small_roi(), settings.replace(mesh=settings.mesh.replace(order=1)))
    assert p2.details["dofs"] == 4 * p1.details["dofs"] and p2.bytes > p1.bytes


def test_memory_estimates_count_the_fields_kept_for_the_result():
    """With ``output.fields`` the run keeps c at t = 0 and at every output time (8 B per unknown each)."""
    from fem_anode.fem.diffusion.finite_volume import estimate_fv_memory
    from fem_anode.fem.diffusion.settings import DiffusionSettings
    from fem_anode.resources import estimate_diffusion_memory, estimate_voxel_diffusion_memory

    times = {"t_end": 2.0, "output_times": [0.5, 1.0, 2.0]}  # t = 0 and three output times: 4 vectors
    kept = DiffusionSettings.from_dict({"time": times, "output": {"fields": True}})
    dropped = kept.replace(output=kept.output.replace(fields=False))
    unknowns = 1e6
    fv = [estimate_fv_memory(unknowns, s) for s in (kept, dropped)]
    assert fv[0].bytes - fv[1].bytes == pytest.approx(4 * 8 * unknowns, rel=1e-12)
    voxel = [estimate_voxel_diffusion_memory(unknowns, 1.2 * unknowns, (100, 100, 100), s) for s in (kept, dropped)]
    assert voxel[0].details["kept_fields_bytes"] == pytest.approx(4 * 8 * 1.2 * unknowns, rel=1e-12)
    assert voxel[0].bytes - voxel[1].bytes == pytest.approx(4 * 8 * 1.2 * unknowns, rel=1e-12)
    mesh = [estimate_diffusion_memory(None, s, cells=2e6, cell_type="triangle") for s in (kept, dropped)]
    assert mesh[0].bytes - mesh[1].bytes == pytest.approx(4 * 8 * 1e6, rel=1e-12)  # 0.5 vertices per triangle


MEASURE = r"""
import json, sys, numpy as np
from fem_anode.io.images import VoxelImage


def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def current_rss():
    return status("VmRSS")




case = sys.argv[1]
if case == "mesh":
    from fem_anode.meshing.build import mesh_image
    from fem_anode.resources import estimate_mesh_memory
    rng = np.random.default_rng(0)
    image = VoxelImage((rng.random((40, 40, 40)) < 0.7).astype(np.uint8), (1e-8,) * 3, {"pore": 0, "sei": 1})
    estimate = estimate_mesh_memory(image, "voxel", ["sei"])
    base = current_rss()
    mesh_image(image, sys.argv[2], method="voxel", keep=["sei"])
    estimate = estimate.bytes
else:
    from pathlib import Path
    from mpi4py import MPI
    import dolfinx  # noqa: F401
    from fem_anode.fem.diffusion.run import run_diffusion
    from fem_anode.fem.diffusion.settings import DiffusionSettings
    from fem_anode.io.images import write_image
    from fem_anode.resources import FE_BASE_PER_RANK, estimate_diffusion_memory
    labels = np.full((200, 200), 3, np.uint8)
    labels[:, :3] = 0
    image = write_image(Path(sys.argv[2]) / "img.npy", VoxelImage(labels, (2e-8, 2e-8), {"pore": 0, "sei": 3}))
    settings = DiffusionSettings.from_dict({"geometry": {"image": str(image)}, "time": {"t_end": 1e-5, "output_times": [1e-5]},
                                            "output": {"fields": False, "figures": False}})
    estimate = estimate_diffusion_memory(VoxelImage(labels, (2e-8, 2e-8), {"pore": 0, "sei": 3}), settings)
    estimate = estimate.bytes - FE_BASE_PER_RANK  # dolfinx/PETSc are loaded before the baseline
    base = current_rss()
    run_diffusion(settings, Path(sys.argv[2]), MPI.COMM_SELF)
# VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over fork and exec, so a child of a
# large pytest process starts with the parent's resident size (measured: 551 MB for a run whose
# own peak is 91 MB).
peak = status("VmHWM")
print(json.dumps({"estimate": estimate, "measured": (peak - base) * 1024.0}))
"""


@pytest.mark.skipif(UNDER_MPI, reason="measures one process's peak memory in a subprocess; serial only")
@pytest.mark.parametrize("case", ["mesh", "diffusion"])
def test_memory_estimate_matches_a_measured_run(tmp_path, case):
    """The estimate is within a factor 4 of the measured peak memory (VmHWM) of a real run."""
    if case == "diffusion":
        pytest.importorskip("dolfinx")
    proc = subprocess.run(
        [sys.executable, "-c", MEASURE, case, str(tmp_path / "m.msh" if case == "mesh" else tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    numbers = json.loads(proc.stdout.strip().splitlines()[-1])
    ratio = numbers["estimate"] / numbers["measured"]
    print(
        f"{case}: estimate {numbers['estimate'] / 1e6:.0f} MB, measured {numbers['measured'] / 1e6:.0f} MB, ratio {ratio:.2f}"
    )
    assert 0.25 < ratio < 4.0


def test_available_memory_and_limit(monkeypatch, comm):
    from fem_anode.errors import InputError
    from fem_anode.resources import MemoryEstimate, available_memory, check_memory

    total = available_memory(comm)
    assert total > 0 and comm.allreduce(total, op=_max()) == total  # same on every rank
    monkeypatch.setenv("FEM_ANODE_MEMORY_LIMIT", "1GB")
    assert available_memory(comm) == 1e9
    with pytest.raises(InputError, match="needs an estimated 2 GB of memory but only 1 GB is available"):
        check_memory(MemoryEstimate("a test", 2e9), comm)
    check_memory(MemoryEstimate("a test", 0.5e9), comm)
    monkeypatch.setenv("FEM_ANODE_MEMORY_CHECK", "off")
    check_memory(MemoryEstimate("a test", 2e9), comm)


def _max():
    from mpi4py import MPI

    return MPI.MAX


# ----------------------------------------------------------------------------- --debug and internal errors


def test_debug_shows_the_traceback(files):
    from fem_anode.errors import InputError

    with pytest.raises(InputError, match="image not found"):
        main(["metrics", str(files["missing"]), "--out", str(files["out"]), "--debug"])


def test_unexpected_exception_is_one_line_internal_error(files, capsys, monkeypatch, comm):
    """A bug (here the injected fault, raised on every rank) gives exit 1 and one line, or a traceback with --debug."""
    monkeypatch.setenv("FEM_ANODE_INJECT_FAULT", f"{comm.rank}:comm")
    capsys.readouterr()
    assert main(["metrics", str(files["labels"]), "--out", str(files["out"])]) == 1
    err = capsys.readouterr().err
    assert "internal error" in err and "InjectedFault" in err and "rerun with --debug" in err and "Traceback" not in err
    from fem_anode.faults import InjectedFault

    with pytest.raises(InjectedFault):
        main(["metrics", str(files["labels"]), "--out", str(files["out"]), "--debug"])
    assert not files["out"].exists()


def test_exit_codes_are_distinct():
    from fem_anode.errors import EXIT_CODES, InputError, Interrupted, SolverError, UsageError

    codes = [
        UsageError.exit_code,
        InputError.exit_code,
        SolverError.exit_code,
        Interrupted.exit_code,
        EXIT_CODES["error"],
    ]
    assert codes == [2, 3, 4, 130, 1] and len(set(codes)) == len(codes)


# ----------------------------------------------------------------------------- more dimensionality and output checks


def test_wrong_dimension_for_a_model(shared_tmp_path, comm, capsys):
    """3D volume with the 2D-only smooth mesher (diffusion); 3D mesh for the 2D phase-field model."""
    pytest.importorskip("dolfinx")
    from fem_anode.meshing.voxel import write_voxel_mesh

    volume = VoxelImage(
        np.array([[[0, 3], [3, 1]], [[3, 3], [1, 0]]], dtype=np.uint8), (2e-8,) * 3, {"pore": 0, "si": 1, "sei": 3}
    )
    write_image(shared_tmp_path / "vol.npy", volume)
    if comm.rank == 0:
        write_voxel_mesh(volume, shared_tmp_path / "vol.msh", keep=["si"])
        (shared_tmp_path / "smooth.toml").write_text('[geometry]\nimage = "vol.npy"\n[mesh]\nmethod = "smooth"\n')
        (shared_tmp_path / "pf3d.toml").write_text('[geometry]\nmesh = "vol.msh"\n')
    comm.barrier()
    out = shared_tmp_path / "out"
    run_cli(
        ["diffusion", str(shared_tmp_path / "smooth.toml"), "--out", str(out)],
        capsys,
        3,
        "'smooth' is for 2D images",
        out=out,
        nothing_in=shared_tmp_path,
    )
    run_cli(
        ["phasefield", str(shared_tmp_path / "pf3d.toml"), "--out", str(out)],
        capsys,
        3,
        "needs a 2D mesh",
        out=out,
        nothing_in=shared_tmp_path,
    )


def test_colour_image_and_out_that_is_a_file(files, tmp_path, capsys):
    import imageio.v3 as iio

    rgb = np.zeros((8, 8, 3), dtype=np.uint8)
    rgb[..., 0] = 255
    iio.imwrite(tmp_path / "colour.png", rgb)
    run_cli(
        ["metrics", str(tmp_path / "colour.png"), "--out", str(files["out"])],
        capsys,
        3,
        "colour image (RGB)",
        out=files["out"],
    )
    taken = tmp_path / "taken"
    taken.write_text("a file")
    run_cli(["metrics", str(files["labels"]), "--out", str(taken)], capsys, 2, "exists and is not a directory")
    assert taken.read_text() == "a file"


def test_tortuosity_factor_solve_is_refused_when_too_large(shared_tmp_path, comm, capsys, monkeypatch):
    pytest.importorskip("dolfinx")
    volume = np.zeros((6, 5, 5), dtype=np.uint8)
    volume[:, 1:3, 1:3] = 1
    path = write_image(shared_tmp_path / "vol.npy", VoxelImage(volume, (2e-8,) * 3, {"pore": 0, "si": 1}))
    monkeypatch.setenv("FEM_ANODE_MEMORY_LIMIT", "100MB")
    out = shared_tmp_path / "out"
    run_cli(
        ["metrics", str(path), "--tortuosity-factor", "--out", str(out)],
        capsys,
        3,
        "tortuosity factor of 'pore' needs an estimated",
        out=out,
        nothing_in=shared_tmp_path,
    )


@pytest.mark.parametrize("factor", ["nan", "inf", "1"])
def test_convergence_refine_factor_must_be_finite_and_above_one(tmp_path, capsys, factor):
    config = tmp_path / "pf.toml"
    config.write_text("[mesh]\nsize = 4e-9\n")
    run_cli(
        ["convergence", str(config), "--refine-factor", factor, "--out", str(tmp_path / "out")],
        capsys,
        2,
        "--refine-factor must be a finite number > 1",
    )


def test_memory_checks_are_switched_off_for_a_block_and_per_call_only(monkeypatch):
    """--no-memory-check reaches the checks as a scoped choice (memory_checks) or an argument,
    never as a process-wide environment variable."""
    from fem_anode.errors import InputError
    from fem_anode.resources import MemoryEstimate, check_memory, memory_checks

    monkeypatch.delenv("FEM_ANODE_MEMORY_CHECK", raising=False)
    huge = MemoryEstimate("a test operation", 1e30)
    with pytest.raises(InputError, match="a test operation needs an estimated"):
        check_memory(huge)
    with memory_checks(False):
        check_memory(huge)
        assert os.environ.get("FEM_ANODE_MEMORY_CHECK") is None
    with pytest.raises(InputError):
        check_memory(huge)  # on again after the block
    check_memory(huge, enabled=False)


def test_auto_solver_type_is_one_rule_for_the_solver_and_the_estimates():
    """``solver.type = "auto"``: direct in 2D and below 50k dofs in 3D, else iterative; the memory
    estimate resolves it by the same rule (a factorisation appears exactly when it is chosen)."""
    from fem_anode.fem.diffusion.settings import AUTO_DIRECT_MAX_DOFS_3D, resolve_solver_type
    from fem_anode.resources import estimate_fe_memory

    limit = AUTO_DIRECT_MAX_DOFS_3D
    assert limit == 50_000
    assert resolve_solver_type("auto", 2, 1e7) == "direct"
    assert resolve_solver_type("auto", 3, limit - 1) == "direct"
    assert resolve_solver_type("auto", 3, limit) == "iterative"
    assert resolve_solver_type("direct", 3, 1e7) == "direct" and resolve_solver_type("iterative", 2, 10) == "iterative"
    for dofs in (limit - 1, limit):
        auto = estimate_fe_memory(cells=dofs, dofs=dofs, ndim=3, cell_type="hexahedron", degree=1, solver="auto")
        assert (auto.details["factor_bytes"] > 0) == (dofs < limit)
