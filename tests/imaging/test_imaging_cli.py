"""``fem-anode segment`` and ``fem-anode metrics`` end to end (serial and under MPI)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fem_anode.cli import main
from fem_anode.imaging.synthetic import anode_volume, fib_sem_roi, render_gray
from fem_anode.io.images import read_image, write_image

pytest.importorskip("mpi4py")


def _barrier(comm):
    comm.barrier()


def test_segment_then_metrics_with_reference(shared_tmp_path, comm):
    d = shared_tmp_path
    if comm.rank == 0:
        pristine = anode_volume((16, 32, 32), seed=4)
        aged = anode_volume((16, 32, 32), seed=4, aged=True)
        write_image(d / "pristine.npy", pristine)
        write_image(d / "aged_gray.tif", render_gray(aged, seed=2))
        write_image(d / "aged_truth.npy", aged)
    _barrier(comm)
    assert (
        main(
            [
                "segment",
                str(d / "aged_gray.tif"),
                "--method",
                "multistage",
                "--truth",
                str(d / "aged_truth.npy"),
                "--out",
                str(d / "aged.npy"),
            ]
        )
        == 0
    )
    _barrier(comm)
    labels = read_image(d / "aged.npy", kind="labels")
    assert labels.phases == {"pore": 0, "si": 1, "graphite": 2, "sei": 3}
    assert labels.voxel_size == pytest.approx((0.65e-6,) * 3)
    report = json.loads((d / "aged.npy.report.json").read_text())
    assert report["method"] == "multistage" and report["iou"]["pore"] > 0.8
    out = d / "metrics"
    assert (
        main(["metrics", str(d / "aged.npy"), "--reference", str(d / "pristine.npy"), "--fields", "--out", str(out)])
        == 0
    )
    _barrier(comm)
    m = json.loads((out / "metrics.json").read_text())
    for key in (
        "phase_fractions",
        "per_slice",
        "si_particles",
        "pore_surface_area_m2",
        "tortuosity",
        "connections_per_depth",
        "pore_si_distance",
        "relative_change",
        "timings_s",
    ):
        assert key in m, key
    assert m["relative_change"]["phase_volume"]["pore"] < 0  # ageing fills pores with SEI
    for png in (
        "per_slice",
        "tortuosity",
        "tortuosity_map",
        "connections",
        "pore_si_distance",
        "si_size_distribution",
        "si_per_slice",
    ):
        assert (out / f"{png}.png").stat().st_size > 1000
    tau = np.load(out / "tortuosity.npy")
    assert tau.shape == (16, 32, 32)
    pore = labels.array == 0
    assert np.all(np.isnan(tau[~pore])) and np.all(tau[pore] >= 1 - 1e-6)
    assert np.count_nonzero(np.isinf(tau[pore])) == m["tortuosity"]["unreachable_voxels"]


def test_region_segment_and_2d_metrics(shared_tmp_path, comm):
    d = shared_tmp_path
    if comm.rank == 0:
        roi = fib_sem_roi(size=(3e-6, 2e-6), seed=2)
        write_image(d / "roi_gray.npy", render_gray(roi, shine_through=1.0, seed=3))
        write_image(d / "roi.npy", roi)
    _barrier(comm)
    assert (
        main(
            [
                "segment",
                str(d / "roi_gray.npy"),
                "--method",
                "region",
                "--truth",
                str(d / "roi.npy"),
                "--out",
                str(d / "seg.npz"),
            ]
        )
        == 0
    )
    _barrier(comm)
    report = json.loads((d / "seg.npz.report.json").read_text())
    assert report["order"] == ["pore", "sei", "si"] and report["iou"]["si"] > 0.8
    assert main(["metrics", str(d / "seg.npz"), "--out", str(d / "m2d")]) == 0
    _barrier(comm)
    m = json.loads((d / "m2d" / "metrics.json").read_text())
    assert m["image"]["ndim"] == 2 and m["pore_surface_area_m2"] is None and m["pore_perimeter_m"] > 0
    assert "pore_surface_area_m2" in m["not_applicable"]


def test_threshold_method_honours_illumination(shared_tmp_path, comm):
    """``--illumination`` is applied by every method, the plain threshold one included: a
    ramp of 0.5 across a 250 x 400 pixel ROI breaks its global thresholds, the flattening
    restores them. Measured (seed 2): mean IoU 0.63 shaded, 0.98 flattened, 0.99 unshaded.
    (Before, the threshold method ignored the option.)"""
    d = shared_tmp_path
    if comm.rank == 0:
        roi = fib_sem_roi(seed=2)
        gray = render_gray(roi, seed=3)
        ramp = np.linspace(-0.25, 0.25, gray.array.shape[1])
        write_image(d / "shaded.npy", type(gray)(gray.array + ramp, gray.voxel_size))
        write_image(d / "roi_t.npy", roi)
    _barrier(comm)
    iou = {}
    for name, extra in (("plain", []), ("flattened", ["--illumination", "1"])):
        args = ["segment", str(d / "shaded.npy"), "--method", "threshold", "--truth", str(d / "roi_t.npy")]
        assert main([*args, *extra, "--out", str(d / f"{name}.npy"), "-q"]) == 0
        _barrier(comm)
        report = json.loads((d / f"{name}.npy.report.json").read_text())
        iou[name] = report["accuracy"]["mean_iou"]
        assert report["illumination_degree"] == (1 if extra else None)
    assert iou["flattened"] > 0.95 and iou["plain"] < 0.8
    # the labels may not overwrite the input
    assert main(["segment", str(d / "shaded.npy"), "--method", "threshold", "--out", str(d / "shaded.npy")]) == 2


def test_cli_errors_are_one_line(shared_tmp_path, comm, capsys):
    d = shared_tmp_path
    if comm.rank == 0:
        write_image(d / "lab.npy", anode_volume((8, 16, 16), seed=1))
        write_image(d / "gray2.npy", render_gray(fib_sem_roi(size=(1e-6, 1e-6)), seed=1))
    _barrier(comm)
    assert main(["metrics", str(d / "lab.npy"), "--si-phase", "silicon", "--out", str(d / "bad")]) == 2
    assert "--si-phase 'silicon' is not a phase" in capsys.readouterr().err
    assert not (d / "bad").exists()
    assert (
        main(
            [
                "segment",
                str(d / "gray2.npy"),
                "--method",
                "multistage",
                "--phases",
                "pore=0,si=1",
                "--out",
                str(d / "x.npy"),
            ]
        )
        == 2
    )
    assert main(["metrics", str(d / "missing.npy"), "--out", str(d / "bad")]) == 3
    _barrier(comm)
