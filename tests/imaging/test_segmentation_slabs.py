"""The multistage segmentation on slabs of layers (one per MPI rank) equals one process's, bit for bit.

Run serially and under ``mpirun -n 2`` (or more): every assertion compares a distributed result
with the one-process result computed on every rank.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from fem_anode.errors import UsageError
from fem_anode.imaging.denoise import _nl_means_padded, denoise_gray, estimate_noise_sigma
from fem_anode.imaging.partition import Slabs
from fem_anode.imaging.segmentation import multistage_slabs, multistage_threshold
from fem_anode.imaging.synthetic import ANODE_PHASES, anode_volume, render_gray

MPI = pytest.importorskip("mpi4py.MPI")
COMM = MPI.COMM_WORLD


def _gather(comm: object, owned: np.ndarray) -> np.ndarray:
    return np.concatenate([p for p in COMM.allgather(owned) if p.size])


def _uneven(n0: int) -> Slabs:
    """Rank 0 owns 3 layers (thinner than every halo), the others share the rest."""
    if COMM.size == 1:
        return Slabs.whole(n0)
    rest = [3 + (n0 - 3) * r // (COMM.size - 1) for r in range(COMM.size)]
    return Slabs(COMM, (0, *rest), COMM.rank)


def test_nl_means_output_depends_only_on_the_halo():
    """A window with the halo gives the whole image's denoised voxels exactly (no running sums)."""
    rng = np.random.default_rng(4)
    clean = np.zeros((20, 14, 16), dtype=np.float32)
    clean[:, :, 8:] = 1.0
    clean[4:9, 3:7, 2:5] = 1.0
    image = clean + rng.normal(0, 0.2, clean.shape).astype(np.float32)
    halo = 1 + 2  # patch_size // 2 + patch_distance
    padded = np.pad(image, halo, mode="reflect")
    whole = _nl_means_padded(padded, h=0.16, sigma=0.2, patch_size=3, patch_distance=2)
    part = _nl_means_padded(padded[5 : 12 + 2 * halo], h=0.16, sigma=0.2, patch_size=3, patch_distance=2)
    np.testing.assert_array_equal(part, whole[5:12])
    assert np.std(whole - clean) < 0.6 * np.std(image - clean)  # and it denoises


def test_reductions_are_exact_on_any_partition():
    rng = np.random.default_rng(5)
    values = np.abs(rng.normal(size=(12, 7)))
    slabs = Slabs.even(COMM, values.shape[0])
    mine = values[slabs.z0 : slabs.z1]
    assert slabs.median(mine) == np.median(values)
    assert slabs.median(mine[:, :6]) == np.median(values[:, :6])
    for k in (0, 5, 83):
        assert slabs.kth_smallest(mine, k) == np.sort(values.ravel())[k]
    rows = values.sum(axis=1)
    assert slabs.sum_layers(mine.sum(axis=1)[:, None])[0] == math.fsum(rows)
    hist, _, edges = slabs.histogram(mine, 16)
    np.testing.assert_array_equal(hist, np.histogram(values, 16, range=(values.min(), values.max()))[0])
    assert edges[0] == values.min() and edges[-1] == values.max()


def test_noise_estimate_and_denoising_on_slabs():
    gray = render_gray(anode_volume((15, 24, 26), seed=3), seed=4).array
    for slabs in (Slabs.even(COMM, gray.shape[0]), _uneven(gray.shape[0])):
        mine = gray[slabs.z0 : slabs.z1]
        assert estimate_noise_sigma(mine, slabs) == estimate_noise_sigma(gray)
        out, info = denoise_gray(mine, slabs=slabs)
        whole, whole_info = denoise_gray(gray)
        np.testing.assert_array_equal(_gather(COMM, out), whole)
        assert info == whole_info


@pytest.mark.parametrize("aged", [False, True])
def test_multistage_on_slabs_gives_the_labels_of_one_process(aged):
    labels = anode_volume((22, 36, 40), seed=2, aged=aged)
    gray = render_gray(labels, seed=3).array
    serial = multistage_threshold(gray, ANODE_PHASES)
    assert serial.info["refine"]["sweeps"] >= 2  # the refinement ran (so the halo exchanges did)
    for slabs in (Slabs.even(COMM, gray.shape[0]), _uneven(gray.shape[0])):
        mine, info = multistage_slabs(gray[slabs.z0 : slabs.z1], slabs, ANODE_PHASES)
        assert mine.shape == (slabs.layers, *gray.shape[1:])
        np.testing.assert_array_equal(_gather(COMM, mine), serial.labels.array)
        assert info == serial.info  # thresholds, noise, PSF, levels, energies, counts: the same bits


def test_multistage_options_on_slabs():
    """Median pre-filter, per-phase object sizes, a given PSF, given (fixed) levels, another coating
    weight and no Si candidates take the same halo route."""
    labels = anode_volume((16, 30, 30), seed=5, aged=True)
    gray = render_gray(labels, seed=6).array
    options = {
        "median_size": 3,
        "min_object_size": {"si": 2, "graphite": 5},
        "psf_sigma": 1.2,
        "potts_beta": 0.5,
        "levels": {"pore": 0.12, "sei": 0.42, "graphite": 0.58, "si": 0.88},
        "coating_weight": 2.0,
        "si_seeds": False,
    }
    serial = multistage_threshold(gray, ANODE_PHASES, **options)
    slabs = _uneven(gray.shape[0])
    mine, info = multistage_slabs(gray[slabs.z0 : slabs.z1], slabs, ANODE_PHASES, **options)
    np.testing.assert_array_equal(_gather(COMM, mine), serial.labels.array)
    assert info["cleanup"] == serial.info["cleanup"] and info["refine"]["halo_layers"] == 2 * int(4 * 1.2 + 0.5)


def test_total_variation_is_refused_on_several_ranks():
    if COMM.size == 1:
        pytest.skip("needs several MPI ranks")
    slabs = Slabs.even(COMM, 8)
    with pytest.raises(UsageError, match="one process only"):
        denoise_gray(np.zeros((slabs.layers, 6, 6)), "tv", slabs=slabs)
