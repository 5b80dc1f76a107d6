"""Synthetic microstructures: seeded, physically sensible, pristine and aged share geometry."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from fem_anode.data import REAL_ELECTRODE_PHASES, real_electrode
from fem_anode.imaging import ANODE_PHASES, ROI_PHASES, anode_volume, fib_sem_roi, phase_fractions, render_gray


def test_volume_is_seeded_and_ageing_acts_on_the_same_structure():
    a = anode_volume(shape=(16, 32, 32), seed=4)
    b = anode_volume(shape=(16, 32, 32), seed=4)
    aged = anode_volume(shape=(16, 32, 32), seed=4, aged=True)
    np.testing.assert_array_equal(a.array, b.array)
    assert not np.array_equal(a.array, anode_volume(shape=(16, 32, 32), seed=5).array)
    graphite = ANODE_PHASES["graphite"]
    np.testing.assert_array_equal(a.array == graphite, aged.array == graphite)  # graphite untouched
    pristine_f, aged_f = phase_fractions(a), phase_fractions(aged)
    assert aged_f["pore"] < 0.9 * pristine_f["pore"]  # SEI fills pores
    assert aged_f["sei"] > 1.2 * pristine_f["sei"]
    # Si fractures into more, smaller pieces.
    n_pristine = ndimage.label(a.array == ANODE_PHASES["si"])[1]
    n_aged = ndimage.label(aged.array == ANODE_PHASES["si"])[1]
    assert n_aged > n_pristine


def test_ageing_is_stronger_near_the_electrode_surface():
    pristine = anode_volume(shape=(30, 48, 48), seed=2)
    aged = anode_volume(shape=(30, 48, 48), seed=2, aged=True)
    pore = ANODE_PHASES["pore"]
    loss = (pristine.array == pore).mean(axis=(1, 2)) - (aged.array == pore).mean(axis=(1, 2))
    assert loss[:5].mean() > 2 * loss[-5:].mean()


def test_roi_matches_the_paper_geometry():
    roi = fib_sem_roi(seed=0)
    assert roi.shape == (400, 250) and roi.voxel_size == pytest.approx((20e-9, 20e-9))
    assert roi.extent == pytest.approx((8e-6, 5e-6))
    fractions = phase_fractions(roi)
    assert set(fractions) == set(ROI_PHASES)
    assert fractions["sei"] == pytest.approx(0.64, abs=0.03)  # paper: eps = 0.63985
    assert fractions["pore"] == pytest.approx(0.25, abs=0.03)


def test_gray_rendering_orders_phases_and_shine_through_brightens_pores():
    roi = fib_sem_roi(size=(2e-6, 2e-6), seed=1)
    clean = render_gray(roi, noise_sigma=0.0, blur_sigma=0.0)
    means = {name: clean.array[roi.array == v].mean() for name, v in ROI_PHASES.items()}
    assert means["pore"] < means["sei"] < means["si"]
    artefact = render_gray(roi, noise_sigma=0.0, blur_sigma=0.0, shine_through=1.0)
    pore = roi.array == ROI_PHASES["pore"]
    assert artefact.array[pore].mean() > means["pore"] + 0.05
    noisy = render_gray(roi, noise_sigma=0.05, blur_sigma=0.0, seed=3)
    assert np.std(noisy.array - clean.array) == pytest.approx(0.05, rel=0.05)


def test_real_electrode_is_bundled():
    image = real_electrode()
    assert image.shape == (128, 128, 128) and image.phases == REAL_ELECTRODE_PHASES
    assert phase_fractions(image)["solid"] == pytest.approx(0.40, abs=0.02)
