"""Accuracy of a segmentation: confusion matrix, IoU, phase-fraction errors (hand-computed cases)."""

from __future__ import annotations

import numpy as np
import pytest

from fem_anode.errors import InputError
from fem_anode.imaging.accuracy import (
    accuracy_from_confusion,
    accuracy_report,
    confusion_matrix,
    plot_confusion,
    plot_segmentation_report,
)
from fem_anode.imaging.segmentation import iou_per_phase
from fem_anode.io.images import VoxelImage

PHASES = {"pore": 0, "si": 1, "sei": 3}


def test_confusion_iou_and_fraction_errors_by_hand():
    truth = np.array([[0, 0, 0, 1], [1, 3, 3, 3]])
    pred = np.array([[0, 0, 3, 1], [3, 3, 3, 3]])
    c = confusion_matrix(pred, truth, PHASES)
    np.testing.assert_array_equal(c, [[2, 0, 1], [0, 1, 1], [0, 0, 3]])  # rows truth pore, si, sei
    report = accuracy_report(pred, truth, PHASES)
    assert report["iou"] == pytest.approx({"pore": 2 / 3, "si": 1 / 2, "sei": 3 / 5})
    assert report["iou"] == pytest.approx(iou_per_phase(pred, VoxelImage(truth, phases=PHASES)))
    assert report["mean_iou"] == pytest.approx((2 / 3 + 1 / 2 + 3 / 5) / 3)
    assert report["overall_accuracy"] == pytest.approx(6 / 8)
    assert report["precision"]["sei"] == pytest.approx(3 / 5) and report["recall"]["si"] == pytest.approx(1 / 2)
    pf = report["phase_fraction"]
    assert pf["error_points"] == pytest.approx({"pore": -1 / 8, "si": -1 / 8, "sei": 2 / 8})
    assert pf["relative_error"]["sei"] == pytest.approx((5 - 3) / 3)
    # additive over slabs: the sum of the halves' matrices is the whole image's
    halves = confusion_matrix(pred[:1], truth[:1], PHASES) + confusion_matrix(pred[1:], truth[1:], PHASES)
    assert accuracy_from_confusion(halves, PHASES) == report


def test_absent_phase_has_no_iou_and_bad_inputs_are_clear():
    truth = np.zeros((3, 3), dtype=np.uint8)
    report = accuracy_report(truth, truth, PHASES)
    assert report["iou"] == {"pore": 1.0, "si": None, "sei": None} and report["mean_iou"] == 1.0
    with pytest.raises(InputError, match="shape"):
        confusion_matrix(truth, truth[:2], PHASES)
    odd = truth.copy()
    odd[1, 1] = 7
    with pytest.raises(InputError, match=r"segmentation: label values \[7\]"):
        confusion_matrix(odd, truth, PHASES)
    with pytest.raises(InputError, match=r"reference labels: label values \[7\]"):
        confusion_matrix(truth, odd, PHASES)


def test_report_figures(tmp_path):
    rng = np.random.default_rng(0)
    truth = rng.choice([0, 1, 3], size=(30, 40))
    pred = np.where(rng.random(truth.shape) < 0.1, 3, truth)
    report = accuracy_report(pred, truth, PHASES)
    assert plot_confusion(report, tmp_path / "c.png").stat().st_size > 5000
    assert (
        plot_segmentation_report(rng.random(truth.shape), pred, PHASES, tmp_path / "r.png", truth=truth).stat().st_size
        > 5000
    )
