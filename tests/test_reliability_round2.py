"""Reliability, round two: one test (or parameter) per class of failure.

* readers check what they assemble (TIFF pages and series, folders of slices, .npz members,
  sidecar JSON) and name the odd page, slice or member;
* every length, time and material value is checked against the numerical limits (error) and
  its plausible range (warning) before any work, from the command line, TOML and Python;
* impossible ``--out`` paths give exit 2 or 3 naming the path;
* detachment fits refuse data that cannot identify the parameters and flag parameters at a
  bound or not identifiable in fit.json and the log;
* an exclusive lock on ``--out`` (stale locks of killed runs detected by PID, host and start
  time; rank 0's under MPI).

Runs serially and under ``mpirun -n 2`` (commands get the same arguments on every rank; lock
tests use ``shared_tmp_path``); tests that start their own processes run serially only.
docs/reliability.md maps each class to its test.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fem_anode.cli import main
from fem_anode.errors import InputError, UsageError
from fem_anode.io import VoxelImage, read_image, write_image
from fem_anode.io.images import open_image_layers
from fem_anode.io.lock import lock_is_stale, lock_path, output_lock, read_lock
from conftest import UNDER_MPI
from test_reliability_input import run_cli

serial_only = pytest.mark.skipif(UNDER_MPI, reason="starts its own processes: run serially")

PHASES = {"pore": 0, "si": 1, "sei": 3}


def labels(shape=(6, 8), seed=0) -> np.ndarray:
    array = np.random.default_rng(seed).choice(np.array([0, 1, 3], dtype=np.uint8), size=shape)
    array.flat[:3] = (0, 1, 3)  # every phase present
    return array


@pytest.fixture
def no_figure_rendering(monkeypatch):
    """Figures are built but not rendered (an empty PNG), to keep the runs here short."""
    from matplotlib.figure import Figure

    monkeypatch.setattr(Figure, "savefig", lambda self, fname, *args, **kwargs: Path(fname).write_bytes(b""))


# ----------------------------------------------------------------------------- (a) readers: consistency


def _tiff_pages(path: Path, pages: list[np.ndarray], resolutions: list[tuple[float, float]] | None = None) -> Path:
    import tifffile

    with tifffile.TiffWriter(path) as tif:
        for i, page in enumerate(pages):
            tif.write(page, resolution=None if resolutions is None else resolutions[i], metadata=None)
    return path


@pytest.mark.parametrize(
    ("pages", "message"),
    [
        (
            [labels(), labels(seed=1), labels((5, 8), seed=2)],
            "page 2 has shape 5x8 (uint8) but page 0 has shape 6x8 (uint8)",
        ),
        ([labels(), labels((6, 7), seed=1), labels(seed=2)], "page 1 has shape 6x7 (uint8)"),
        ([labels(), labels(seed=1).astype(np.uint16), labels(seed=2)], "page 1 has shape 6x8 (uint16)"),
    ],
    ids=["shape-last-page", "shape-middle-page", "dtype"],
)
def test_multipage_tiff_whose_pages_disagree_is_refused_naming_the_page(tmp_path, capsys, pages, message):
    path = _tiff_pages(tmp_path / "stack.tif", pages)
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_image(path)
    with pytest.raises(InputError, match="page"):
        open_image_layers(path)
    out = tmp_path / "out"
    run_cli(
        ["metrics", str(path), "--voxel-size", "20nm", "--phases", "pore=0,si=1,sei=3", "--out", str(out)],
        capsys,
        3,
        message,
        out=out,
        nothing_in=tmp_path,
    )


def test_tiff_pages_with_different_calibration_are_refused(tmp_path):
    path = _tiff_pages(tmp_path / "calib.tif", [labels(), labels(seed=1)], resolutions=[(50.0, 50.0), (25.0, 50.0)])
    with pytest.raises(InputError, match="page 1 has another calibration"):
        read_image(path)


def test_tiff_pages_written_one_by_one_are_read_as_a_stack(tmp_path):
    """The same pages, consistent, written as separate images: every page is read (it used to be the first only)."""
    pages = [labels(seed=s) for s in range(3)]
    image = read_image(_tiff_pages(tmp_path / "stack.tif", pages), voxel_size="20nm", phases=PHASES)
    assert image.shape == (3, 6, 8)
    np.testing.assert_array_equal(image.array, np.stack(pages))


def test_folder_slices_that_disagree_are_refused_naming_the_slice(tmp_path):
    folder = tmp_path / "slices"
    folder.mkdir()
    for i in range(3):
        np.save(folder / f"slice_{i:03d}.npy", labels(seed=i))
    np.save(folder / "slice_003.npy", labels((6, 9), seed=3))
    for reader in (read_image, open_image_layers):
        with pytest.raises(
            InputError, match=r"slice slice_003.npy has shape 6x9 \(uint8\) but slice slice_000.npy has shape 6x8"
        ):
            reader(folder)
    np.save(folder / "slice_003.npy", labels(seed=3).astype(np.int32))
    with pytest.raises(InputError, match=r"slice slice_003.npy has shape 6x8 \(int32\)"):
        read_image(folder)
    np.save(folder / "slice_003.npy", labels((2, 6, 8), seed=3))
    with pytest.raises(InputError, match="slice slice_003.npy is 3D"):
        read_image(folder)


def test_folder_written_by_write_image_has_one_dtype(tmp_path):
    """A label volume with a label above 255 in one slice only: every PNG slice is uint16."""
    array = np.zeros((3, 4, 5), dtype=np.int64)
    array[1, 0, 0] = 300
    write_image(tmp_path / "vol", VoxelImage(array, (1e-8,) * 3))
    np.testing.assert_array_equal(read_image(tmp_path / "vol").array, array)


def test_npz_members_must_agree_and_metadata_is_checked(tmp_path):
    path = tmp_path / "roi.npz"
    np.savez(path, labels=labels(), image=np.zeros((5, 8)))
    with pytest.raises(InputError, match=r"member 'image' has shape 5x8 but 'labels' has 6x8"):
        read_image(path)
    np.savez(path, labels=labels(), metadata=np.array("{not json"))
    with pytest.raises(InputError, match="member 'metadata': not valid JSON"):
        read_image(path)
    np.savez(
        path,
        labels=labels(),
        metadata=np.array(json.dumps({"fem_anode": {"voxel_size_m": [1e-8, 1e-8, 1e-8], "phases": PHASES}})),
    )
    with pytest.raises(InputError, match="stored voxel size has 3 entries .* but the image is 2D"):
        read_image(path)
    assert read_image(path, voxel_size="20nm").voxel_size == (2e-8, 2e-8)  # given on the command line: used instead


@pytest.mark.parametrize(
    ("meta", "message"),
    [
        ({"voxel_size_m": [1e-8, 1e-8, 1e-8]}, "stored voxel size has 3 entries"),
        ({"voxel_size_m": ["20nm", 1e-8]}, "voxel_size_m must be a list of numbers"),
        ({"voxel_size_m": [1e300, 1e-8]}, "outside what fem_anode can compute with"),
        ({"voxel_size_m": [-1e-8, 1e-8]}, "must be positive"),
        ({"phases": {"pore": 0.5}}, "roi.npy.json: phases: phase 'pore' must map to an integer"),
        ({"phases": [0, 1]}, "phases must be a JSON object"),
    ],
)
def test_sidecar_calibration_is_checked_against_the_image(tmp_path, capsys, meta, message):
    path = tmp_path / "roi.npy"
    np.save(path, labels())
    path.with_name("roi.npy.json").write_text(json.dumps({"fem_anode": meta}))
    with pytest.raises(InputError, match=message):
        read_image(path)
    out = tmp_path / "out"
    run_cli(
        ["metrics", str(path), "--phases", "pore=0,si=1,sei=3", "--out", str(out)],
        capsys,
        3,
        message.split(": ")[-1],
        out=out,
    )


def test_squeezed_single_slice_keeps_its_in_plane_voxel_size(tmp_path):
    write_image(tmp_path / "one.npy", VoxelImage(labels((1, 6, 8)), (4e-8, 2e-8, 1e-8), PHASES))
    assert read_image(tmp_path / "one.npy").voxel_size == (2e-8, 1e-8)


# ----------------------------------------------------------------------------- (b) ranges: numerical limits and plausibility

LIMITS = [
    (["metrics", "{labels}", "--voxel-size", "1e300", "--out", "{out}"], "outside what fem_anode can compute with"),
    (["metrics", "{labels}", "--voxel-size", "1e200um", "--out", "{out}"], "outside what fem_anode can compute with"),
    (["metrics", "{labels}", "--voxel-size", "1e-300", "--out", "{out}"], "outside what fem_anode can compute with"),
    (["metrics", "{labels}", "--bins", str(10**30), "--out", "{out}"], "--bins must be at most"),
    (["segment", "{labels}", "--median", "100", "--out", "{out}.npy"], "--median must be at most 8"),
    (
        ["segment", "{labels}", "--method", "region", "--sigma", "100", "--out", "{out}.npy"],
        "--sigma must be at most 8",
    ),
    (
        ["segment", "{labels}", "--method", "region", "--sigma", "1e300", "--out", "{out}.npy"],
        "--sigma = 1e+300 is outside what fem_anode can compute with",
    ),
    (["mesh", "{labels}", "--size", "1e-35", "--out", "{out}.msh"], "outside what fem_anode can compute with"),
    (["mesh", "{labels}", "--size", "1e-13", "--out", "{out}.msh"], "triangles"),
    (
        ["mesh", "{labels}", "--sigma", "1e300", "--out", "{out}.msh"],
        "--sigma = 1e+300 is outside what fem_anode can compute with",
    ),
    (["mesh", "{labels}", "--sigma", "1e20", "--out", "{out}.msh"], "--sigma must be at most 8"),
    (["detachment", "measure", "{labels}", "--cycle", str(10**30), "--out", "{out}"], "--cycle must be at most 10000"),
    (
        ["detachment", "measure", "{labels}", "--cycle", "1", "--max-distance", "1e308", "--out", "{out}"],
        "outside what fem_anode",
    ),
    (["detachment", "simulate", "--kappa0", "1e40", "--out", "{out}"], "outside what fem_anode can compute with"),
    (["detachment", "simulate", "--alpha0", "1e-300", "--out", "{out}"], "alpha0 = 1e-300 is outside"),
    (["detachment", "fit", "{gaps}", "--seed", str(2**64), "--out", "{out}"], "--seed must be at most"),
    (["demo", "--seed", str(2**64), "--out", "{out}"], "--seed must be at most"),
    (["convergence", "{config}", "--levels", str(10**30), "--out", "{out}"], "--levels must be at most 10"),
    (["convergence", "{config}", "--refine-factor", "1e300", "--out", "{out}"], "--refine-factor must be at most"),
]


@pytest.fixture
def inputs(tmp_path: Path) -> dict[str, Path]:
    paths = {
        "labels": write_image(tmp_path / "labels.npy", VoxelImage(labels(), (2e-8, 2e-8), PHASES)),
        "out": tmp_path / "out",
        "gaps": tmp_path / "gaps.csv",
        "config": tmp_path / "run.toml",
    }
    paths["gaps"].write_text("cycle,radius_m,gap_m\n1,3e-7,5e-8\n2,5e-7,1e-7\n3,7e-7,2e-7\n3,4e-7,1.5e-7\n")
    paths["config"].write_text('[geometry]\nimage = "labels.npy"\n')
    return paths


@pytest.mark.parametrize(("argv", "message"), LIMITS, ids=lambda v: " ".join(v[:4]) if isinstance(v, list) else None)
def test_extreme_finite_values_are_refused_before_any_work(inputs, capsys, tmp_path, argv, message):
    argv = [a.format(**{k: str(v) for k, v in inputs.items()}) for a in argv]
    run_cli(argv, capsys, 2, message, out=inputs["out"], nothing_in=tmp_path)
    assert not list(tmp_path.glob("out*")) and not list(tmp_path.glob(".*.lock"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[geometry]\nimage = "x.npy"\npixel_size = 1e300\n',
            "geometry.pixel_size = 1e+300 is outside what fem_anode can compute with",
        ),
        ('[geometry]\nimage = "x.npy"\n[physics]\nD = 1e-40\n', "physics.D = 1e-40 is outside"),
        ('[geometry]\nimage = "x.npy"\n[time]\nt_end = 1e35\n', "time.t_end = 1e+35 is outside"),
        ('[geometry]\nimage = "x.npy"\n[physics]\nk_f = 1e-31\n', "physics.k_f = 1e-31 is outside"),
    ],
)
def test_toml_values_beyond_the_numerical_limits_are_refused(tmp_path, capsys, text, message):
    config = tmp_path / "run.toml"
    config.write_text(text)
    out = tmp_path / "out"
    run_cli(["diffusion", str(config), "--out", str(out)], capsys, 2, message, out=out, nothing_in=tmp_path)


def test_implausible_values_warn_and_the_run_goes_on(capsys, no_figure_rendering, shared_tmp_path, comm):
    """A bare number is metres: --voxel-size 20 (20 m) runs, with a warning naming the unit."""
    path = shared_tmp_path / "labels.npy"
    if comm.rank == 0:
        write_image(path, VoxelImage(labels(), None, PHASES))
    comm.barrier()
    capsys.readouterr()
    assert main(["metrics", str(path), "--voxel-size", "20", "--out", str(shared_tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "length '20' = 20 m is outside the plausible range of a length" in err and "20nm" in err
    assert json.loads((shared_tmp_path / "out" / "metrics.json").read_text())["phase_fractions"]


def test_implausible_settings_warn_once(caplog):
    from fem_anode.detachment.settings import DetachmentSettings
    from fem_anode.fem.diffusion.settings import DiffusionSettings

    with caplog.at_level(logging.WARNING, logger="fem_anode"):
        DiffusionSettings.from_dict({"geometry": {"image": "x.npy"}, "physics": {"D": 1.0}})
        DetachmentSettings.from_dict({"model": {"kappa0": 0.5}})
    assert "physics.D = 1 m^2/s is outside the plausible range of a diffusivity" in caplog.text
    assert "model.kappa0 = 0.5 m is outside the plausible range of a length" in caplog.text
    assert caplog.text.count("physics.D = 1 m^2/s") == 1  # once, although the sections are checked again
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fem_anode"):
        DiffusionSettings.from_dict({"geometry": {"image": "x.npy"}})  # the defaults are plausible
    assert not caplog.text


def test_python_api_checks_the_same_limits():
    from fem_anode.detachment.model import simulate
    from fem_anode.detachment.settings import ModelParameters

    with pytest.raises(UsageError, match="voxel size .* outside what fem_anode can compute with"):
        VoxelImage(labels(), (1e300, 1e-8))
    with pytest.raises(UsageError, match="model.kappa0 = 1e\\+40 is outside"):
        simulate(ModelParameters(kappa0=1e40))
    with pytest.raises(UsageError, match="delta0 = 1e\\+40 is outside"):
        ModelParameters().replace(delta0=1e40)
    with pytest.raises(InputError, match="radii must lie between"):
        simulate(ModelParameters(), np.array([1e-6, 1e35]))


def test_limits_and_plausible_ranges_are_consistent():
    """Every plausible range lies inside the numerical limits, and the defaults of every model are plausible."""
    from fem_anode.detachment.settings import DetachmentSettings
    from fem_anode.fem.phasefield.settings import PhaseFieldSettings
    from fem_anode.units import NUMERIC_LIMITS, QUANTITIES

    for quantity in QUANTITIES.values():
        assert NUMERIC_LIMITS[0] < quantity.plausible[0] < quantity.plausible[1] < NUMERIC_LIMITS[1]
    assert PhaseFieldSettings().implausible() == [] and DetachmentSettings().implausible() == []


# ----------------------------------------------------------------------------- (c) impossible output paths


def test_out_below_a_file_or_not_creatable_names_the_path(inputs, shared_tmp_path, comm, capsys):
    blocker = shared_tmp_path / "a_file"  # one path for all ranks: under MPI rank 0 checks it for all
    if comm.rank == 0:
        blocker.write_text("x")
    comm.barrier()
    for command in (
        ["metrics", str(inputs["labels"])],
        ["segment", str(inputs["labels"])],
        ["mesh", str(inputs["labels"])],
        ["detachment", "simulate"],
        ["detachment", "fit", str(inputs["gaps"])],
        ["diffusion", str(inputs["config"])],
    ):
        name = "x.msh" if command[0] == "mesh" else "x.npy" if command[0] == "segment" else "x"
        run_cli([*command, "--out", str(blocker / "sub" / name)], capsys, 2, f"{blocker} is a file, not a directory")
    assert blocker.read_text() == "x"
    run_cli(
        ["metrics", str(inputs["labels"]), "--out", "/proc/fem_anode_test/out"],
        capsys,
        3,
        "cannot create directory /proc/fem_anode_test",
    )


def test_missing_parents_of_a_refused_run_are_removed(inputs, shared_tmp_path, capsys):
    out = shared_tmp_path / "new" / "deeper" / "out"
    run_cli(["metrics", str(inputs["labels"]), "--bins", "0", "--out", str(out)], capsys, 2, "--bins must be positive")
    assert not (shared_tmp_path / "new").exists()


# ----------------------------------------------------------------------------- (d) fits the data cannot support


def _gaps(path: Path, rows: list[tuple[int, float, float]]) -> Path:
    path.write_text("cycle,radius_m,gap_m\n" + "".join(f"{c},{r:.6e},{g:.6e}\n" for c, r, g in rows))
    return path


def test_fit_refuses_fewer_observations_than_parameters(tmp_path, capsys):
    out = tmp_path / "out"
    few = _gaps(tmp_path / "few.csv", [(0, 5e-7, 0.0), (1, 3e-7, 5e-8), (2, 5e-7, 1e-7), (3, 7e-7, 2e-7)])
    run_cli(["detachment", "fit", str(few), "--out", str(out)], capsys, 3, "3 distinct observation(s)", out=out)
    alike = _gaps(tmp_path / "alike.csv", [(2, 5e-7, g) for g in np.linspace(1e-7, 2e-7, 8)])  # one cycle, one radius
    run_cli(["detachment", "fit", str(alike), "--out", str(out)], capsys, 3, "1 distinct observation(s)", out=out)
    single = _gaps(tmp_path / "single.csv", [(c, r, 4e-8 * c) for c, r in zip(range(1, 6), np.linspace(3e-7, 9e-7, 5))])
    run_cli(
        ["detachment", "fit", str(single), "--out", str(out)],
        capsys,
        3,
        "bootstrap ranges would have zero width",
        out=out,
    )


@pytest.fixture(scope="module")
def small_gaps():
    from fem_anode.detachment import ModelParameters, SizeDistribution, sample_gap_data

    truth = ModelParameters(alpha0=0.83, kappa0=0.02e-6, delta0=0.12e-6, zeta0=0.163e6, cycles=10)
    dist = SizeDistribution(median_radius=0.8e-6, geometric_std=1.6, min_radius=0.1e-6, max_radius=4e-6)
    return sample_gap_data(truth, [1, 3, 10], [6, 6, 6], np.random.default_rng(3), distribution=dist, noise=0.05e-6)


def test_fit_flags_a_parameter_at_its_bound_in_fit_json_and_the_log(
    small_gaps, shared_tmp_path, comm, capsys, no_figure_rendering
):
    from fem_anode.detachment.data import write_gap_csv

    gaps, config = shared_tmp_path / "gaps.csv", shared_tmp_path / "fit.toml"
    if comm.rank == 0:
        write_gap_csv(gaps, small_gaps)
        config.write_text(
            "[fit]\nalpha0_bounds = [0.01, 0.3]\nn_bootstrap = 4\nradius_grid = 16\nmax_iterations = 20\n"
        )
    comm.barrier()
    out = shared_tmp_path / "out"
    capsys.readouterr()
    assert main(["detachment", "fit", str(gaps), "--config", str(config), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    fit_json = json.loads((out / "fit.json").read_text())
    alpha0 = fit_json["parameters"]["alpha0"]
    assert alpha0["at_bound"] == "upper" and alpha0["value"] == pytest.approx(0.3, rel=1e-6)
    assert alpha0["ci_zero_width"] is True
    assert (
        fit_json["parameters"]["delta0"]["at_bound"] is None
        and fit_json["parameters"]["delta0"]["identifiable"] is True
    )
    assert any("alpha0 is at the upper bound" in f for f in fit_json["identifiability"]["flags"])
    if comm.rank == 0:
        assert "alpha0 is at the upper bound of its search range (0.3, fit.alpha0_bounds)" in err


def test_jacobian_rank_flags_parameters_the_data_cannot_identify():
    """One particle per cycle (no bootstrap): the fit runs, and the rank-deficient Jacobian is reported."""
    from fem_anode.detachment import DetachmentSettings, GapData, fit

    gaps = GapData(np.arange(1, 6), np.linspace(3e-7, 9e-7, 5), np.linspace(5e-8, 3e-7, 5))
    settings = DetachmentSettings()
    settings.fit = settings.fit.replace(n_bootstrap=0, radius_grid=16, max_iterations=20)
    result = fit(gaps, None, settings)
    info = result.identifiability
    assert info["n_observations"] == 5 and info["jacobian_rank"] < 4
    flagged = [name for name, p in info["parameters"].items() if not p["identifiable"]]
    assert flagged and all(f"{name} is not identifiable" in " ".join(info["flags"]) for name in flagged)
    assert result.to_dict()["parameters"][flagged[0]]["identifiable"] is False
    assert result.to_dict()["identifiability"]["jacobian_rank"] == info["jacobian_rank"]


def test_well_posed_fit_has_no_flags(small_gaps):
    """The same data without the narrow bound: every parameter is identified, none is flagged."""
    from fem_anode.detachment import DetachmentSettings, fit

    settings = DetachmentSettings()
    settings.fit = settings.fit.replace(n_bootstrap=2, radius_grid=8, max_iterations=10)
    info = fit(small_gaps, None, settings).identifiability
    assert info["jacobian_rank"] == 4 and info["flags"] == []
    assert all(
        p == {"at_bound": None, "identifiable": True, "ci_zero_width": False} for p in info["parameters"].values()
    )


# ----------------------------------------------------------------------------- (e) exclusive lock on --out


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def _write_lock(out: Path, **owner) -> Path:
    path = lock_path(out)
    path.write_text(json.dumps({"host": socket.gethostname(), "created_utc": "2026-01-01T00:00:00+00:00", **owner}))
    return path


def _start_time(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rfind(")") + 2 :].split()[19]


def test_lock_nests_and_is_released_on_every_exit_path(tmp_path, monkeypatch):
    for var in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK"):
        monkeypatch.delenv(var, raising=False)  # this process on its own (under mpirun every rank is)
    out = tmp_path / "out"
    with output_lock(out) as path:
        assert read_lock(path)["pid"] == os.getpid()
        with output_lock(out):  # the CLI and then the output directory take it: nested, not locked out
            pass
        assert path.exists()
    assert not path.exists()
    with pytest.raises(KeyboardInterrupt), output_lock(out):
        raise KeyboardInterrupt
    assert not lock_path(out).exists()


def test_lock_is_rank_zeros_without_a_communicator(tmp_path, monkeypatch):
    """Launched by mpirun before MPI is initialised, ranks other than 0 do not take the lock."""
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "1")
    with output_lock(tmp_path / "out"):
        assert not lock_path(tmp_path / "out").exists()


def test_second_run_into_a_locked_out_fails_naming_the_owner(shared_tmp_path, comm, capsys, no_figure_rendering):
    """A live owner (another process) holds --out: every rank fails with the same message; a stale
    lock (the process is gone, or its PID now belongs to another process) is replaced. Checks are
    collected and compared at the end, so that a failure on one rank cannot hang the others."""
    image, out = shared_tmp_path / "labels.npy", shared_tmp_path / "out"
    problems: list[str] = []

    def run(expected: int, message: str) -> str:
        capsys.readouterr()
        code = main(["metrics", str(image), "--out", str(out)])
        err = capsys.readouterr().err
        if code != expected or message not in err or "Traceback" in err:
            problems.append(f"rank {comm.rank}: exit {code} (expected {expected}), {message!r} not in {err!r}")
        comm.barrier()  # rank 0 releases the lock when its command returns
        return err

    sleeper = _sleeper() if comm.rank == 0 else None
    try:
        if comm.rank == 0:
            write_image(image, VoxelImage(labels(), (2e-8, 2e-8), PHASES))
            _write_lock(out, pid=sleeper.pid, start_time=_start_time(sleeper.pid))
        comm.barrier()
        run(2, f"--out {out} is in use by another fem-anode run (pid {comm.bcast(sleeper.pid if sleeper else None)}")
        if not lock_path(out).exists():
            problems.append(f"rank {comm.rank}: the live owner's lock was removed")
        comm.barrier()
        if comm.rank == 0:  # the same PID with another start time: the PID was reused, the lock is stale
            _write_lock(out, pid=sleeper.pid, start_time="1")
        comm.barrier()
        err = run(0, "")
        if comm.rank == 0 and "removing the stale lock" not in err:
            problems.append(f"no warning about the stale lock in {err!r}")
        if lock_path(out).exists():
            problems.append(f"rank {comm.rank}: lock left behind: {read_lock(lock_path(out))}")
        comm.barrier()
    finally:
        if sleeper is not None:
            sleeper.kill()
            sleeper.wait()
    if comm.rank == 0:  # its process is gone: stale
        _write_lock(out, pid=sleeper.pid, start_time=None)
        if not lock_is_stale(read_lock(lock_path(out))):
            problems.append("the lock of a finished process is not stale")
        _write_lock(out, pid=sleeper.pid, host="another-host")  # cannot be checked: respected
        if lock_is_stale(read_lock(lock_path(out))):
            problems.append("a lock from another host is taken for stale")
    comm.barrier()
    run(2, "on another-host")
    assert not [p for rank in comm.allgather(problems) for p in rank]


def test_same_out_twice_in_a_row_is_fine(shared_tmp_path, comm, no_figure_rendering):
    image, out = shared_tmp_path / "labels.npy", shared_tmp_path / "out"
    if comm.rank == 0:
        write_image(image, VoxelImage(labels(), (2e-8, 2e-8), PHASES))
    comm.barrier()
    for _ in range(2):
        assert main(["-q", "metrics", str(image), "--out", str(out)]) == 0
    comm.barrier()  # rank 0 releases the lock when its command returns
    assert (out / "metrics.json").exists() and not lock_path(out).exists()


@serial_only
def test_two_concurrent_processes_and_a_killed_owner(tmp_path, capsys, no_figure_rendering):
    """Real processes: a run holding --out makes a second run fail at once with exit 2; after the
    holder is SIGKILLed its lock is stale and the next run replaces it."""
    image, out = tmp_path / "labels.npy", tmp_path / "out"
    write_image(image, VoxelImage(labels(), (2e-8, 2e-8), PHASES))
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys\nfrom fem_anode.io.lock import output_lock\n"
            f"with output_lock({str(out)!r}):\n    print('locked', flush=True)\n    sys.stdin.read()\n",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        second = subprocess.run(
            [sys.executable, "-m", "fem_anode", "metrics", str(image), "--out", str(out)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode == 2, second.stderr
        assert (
            f"is in use by another fem-anode run (pid {holder.pid}" in second.stderr
            and "Traceback" not in second.stderr
        )
        assert not out.exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert lock_path(out).exists()  # a killed run cannot clean up
    capsys.readouterr()
    assert main(["metrics", str(image), "--out", str(out)]) == 0  # this process: a third run
    assert (
        f"removing the stale lock {lock_path(out)} of a run that no longer exists (pid {holder.pid}"
        in capsys.readouterr().err
    )
    assert (out / "metrics.json").exists() and not lock_path(out).exists()
