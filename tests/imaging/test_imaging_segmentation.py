"""Segmentation: iterative thresholds, multistage SCT method, region method vs pixel threshold."""

from __future__ import annotations

import numpy as np
import pytest

from fem_anode.errors import InputError, UsageError
from fem_anode.imaging.segmentation import (
    iou_per_phase,
    isodata_threshold,
    multiclass_isodata,
    multistage_threshold,
    region_features,
    region_segmentation,
    threshold_segmentation,
)
from fem_anode.imaging.synthetic import ANODE_PHASES, ROI_PHASES, anode_volume, fib_sem_roi, render_gray
from fem_anode.io.images import VoxelImage


def test_isodata_threshold_of_a_symmetric_bimodal_histogram_is_the_midpoint():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0.2, 0.03, 60_000), rng.normal(0.7, 0.03, 60_000)])
    assert isodata_threshold(values) == pytest.approx(0.45, abs=0.005)


def test_multiclass_isodata_finds_the_class_means():
    rng = np.random.default_rng(1)
    means = [0.1, 0.4, 0.6, 0.9]
    sizes = [50_000, 20_000, 40_000, 8_000]
    values = np.concatenate([rng.normal(m, 0.02, n) for m, n in zip(means, sizes)])
    thresholds, found = multiclass_isodata(values, 4)
    np.testing.assert_allclose(found, means, atol=0.01)
    np.testing.assert_allclose(thresholds, [0.25, 0.5, 0.75], atol=0.01)
    with pytest.raises(UsageError):
        multiclass_isodata(values, 1)
    with pytest.raises(InputError):
        multiclass_isodata(np.ones(10), 2)


def test_region_features_counts_below_and_above():
    gray = np.array([[0.1, 0.1, 0.9, 0.9], [0.1, 0.5, 0.9, 0.5]])
    regions = np.array([[0, 0, 1, 1], [0, 0, 1, 1]])
    f = region_features(gray, regions, [0.3, 0.7])
    np.testing.assert_allclose(f["count"], [4, 4])
    np.testing.assert_allclose(f["mean"], [0.2, 0.8])
    np.testing.assert_allclose(f["fraction_class"][0], [0.75, 0.0])
    np.testing.assert_allclose(f["fraction_class"][2], [0.0, 0.75])
    np.testing.assert_allclose(f["std"], [np.std([0.1, 0.1, 0.1, 0.5]), np.std([0.9, 0.9, 0.9, 0.5])])


def test_multistage_on_clean_rendering_recovers_the_phases():
    truth = anode_volume((24, 48, 48), seed=2)
    gray = render_gray(truth, blur_sigma=0.0, noise_sigma=0.02, seed=1)
    result = multistage_threshold(gray)
    iou = iou_per_phase(result.labels, truth)
    assert iou["pore"] > 0.99 and iou["si"] > 0.95 and iou["graphite"] > 0.9 and iou["sei"] > 0.8
    t = result.info["thresholds"]
    assert 0.12 < t["pore"] < 0.42 < t["intermediate_graphite"] < 0.58 < t["si"] < 0.88
    assert result.labels.phases == ANODE_PHASES
    assert result.labels.voxel_size == truth.voxel_size


@pytest.mark.parametrize("aged", [False, True])
def test_multistage_on_blurred_rendering_beats_pixel_threshold(aged):
    """Partial volume (blur 1 voxel, Si radius 1.2-2.8 voxels) limits Si; pores stay robust.

    Measured (24x48x48, seed 2): pristine IoU pore 0.92, si 0.43, graphite 0.60, sei 0.44;
    aged pore 0.89, si 0.28, graphite 0.51, sei 0.55.
    """
    truth = anode_volume((24, 48, 48), seed=2, aged=aged)
    gray = render_gray(truth, seed=1)
    iou = iou_per_phase(multistage_threshold(gray).labels, truth)
    assert iou["pore"] > 0.85
    assert iou["si"] > 0.25 and iou["graphite"] > 0.45 and iou["sei"] > 0.4
    # better than a plain 4-class pixel threshold on every phase
    order = ["pore", "sei", "graphite", "si"]
    pixel = iou_per_phase(threshold_segmentation(gray, ANODE_PHASES, order=order).labels, truth)
    assert all(iou[name] > pixel[name] for name in order)


def test_multistage_needs_four_roles():
    with pytest.raises(UsageError, match="graphite"):
        multistage_threshold(np.random.default_rng(0).random((10, 10)), {"pore": 0, "si": 1, "sei": 3})


@pytest.mark.parametrize("seed", [1, 2])
def test_region_method_beats_pixel_threshold_under_shine_through(seed):
    truth = fib_sem_roi(seed=seed)
    gray = render_gray(truth, shine_through=1.0, seed=seed + 10)
    order = ["pore", "sei", "si"]
    pixel = iou_per_phase(threshold_segmentation(gray, ROI_PHASES, order=order).labels, truth)
    region = region_segmentation(gray, ROI_PHASES, order=order)
    iou = iou_per_phase(region.labels, truth)
    assert iou["pore"] > pixel["pore"] + 0.08
    assert iou["pore"] > 0.8
    assert np.mean(list(iou.values())) > np.mean(list(pixel.values())) + 0.02
    assert iou["si"] > 0.9
    assert 100 <= region.info["regions_per_slice"]["mean"] <= 2000  # hundreds of regions per slice


def test_region_method_without_artefact_stays_accurate():
    truth = fib_sem_roi(seed=3)
    gray = render_gray(truth, seed=4)
    iou = iou_per_phase(region_segmentation(gray, ROI_PHASES, order=["pore", "sei", "si"]).labels, truth)
    assert min(iou.values()) > 0.9


def test_region_method_on_a_stack_segments_each_slice():
    truth = fib_sem_roi(size=(3e-6, 2e-6), seed=5)
    gray2d = render_gray(truth, shine_through=1.0, seed=6)
    stack = np.stack([gray2d.array, gray2d.array[::-1]])
    result = region_segmentation(stack, ROI_PHASES, order=["pore", "sei", "si"], denoise="none")
    single = region_segmentation(gray2d, ROI_PHASES, order=["pore", "sei", "si"], denoise="none").labels.array
    # thresholds come from the whole stack, identical histogram -> identical slices
    np.testing.assert_array_equal(result.labels.array[0], single)
    np.testing.assert_array_equal(result.labels.array[1], single[::-1])


def test_threshold_segmentation_with_given_thresholds():
    gray = np.array([[0.0, 0.35, 0.7, 0.95]])
    labels = threshold_segmentation(
        gray, {"pore": 0, "sei": 3, "si": 1}, order=["pore", "sei", "si"], thresholds=[0.3, 0.8]
    ).labels
    np.testing.assert_array_equal(labels.array, [[0, 3, 3, 1]])
    with pytest.raises(UsageError):
        threshold_segmentation(gray, {"pore": 0, "si": 1}, thresholds=[0.1, 0.2])
    with pytest.raises(UsageError):
        threshold_segmentation(gray, {"pore": 0, "si": 1}, order=["pore", "graphite"])


def test_multistage_median_prefilter_helps_graphite():
    truth = anode_volume((24, 48, 48), seed=2, aged=True)
    gray = render_gray(truth, seed=1)
    plain = iou_per_phase(multistage_threshold(gray, denoise="none", cleanup=False, refine=False).labels, truth)
    result = multistage_threshold(gray, median_size=3, denoise="none", cleanup=False, refine=False)
    filtered = iou_per_phase(result.labels, truth)
    assert result.info["median_size"] == 3
    assert filtered["graphite"] > plain["graphite"] + 0.1


def _graphite_majority_slice(n: int = 256, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """A 2D slice unlike the demo's: graphite the majority (~50 %), a thin intermediate coating
    (~7 %) whose gray level is close to graphite's, Si ~7 % in blobs far above both; blur 1
    pixel, noise 6 % of the pore-graphite contrast. Gray in 16-bit counts."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    pore_field = ndimage.gaussian_filter(rng.normal(size=(n, n)), 8)
    si_field = ndimage.gaussian_filter(rng.normal(size=(n, n)), 4)
    labels = np.full((n, n), ANODE_PHASES["graphite"], np.uint8)
    labels[pore_field < np.quantile(pore_field, 0.35)] = ANODE_PHASES["pore"]
    labels[(si_field > np.quantile(si_field, 0.88)) & (labels == ANODE_PHASES["graphite"])] = ANODE_PHASES["si"]
    pore = labels == ANODE_PHASES["pore"]
    labels[ndimage.binary_dilation(pore, iterations=2) & ~pore] = ANODE_PHASES["sei"]
    level = {"pore": 6000.0, "sei": 20000.0, "graphite": 28000.0, "si": 45000.0}
    gray = np.zeros((n, n))
    for name, value in level.items():
        gray[labels == ANODE_PHASES[name]] = value
    gray = ndimage.gaussian_filter(gray, 1.0) + rng.normal(0.0, 1300.0, gray.shape)
    return gray, labels


def test_multistage_finds_graphite_when_the_intermediate_domain_is_scarce():
    """When the solid's first split separates Si from everything else (scarce intermediate domain
    close to graphite: the split lies above the graphite peak), the intermediate/graphite
    threshold is taken below the peak. Before that rule graphite IoU was 0 here (every graphite
    pixel intermediate)."""
    gray, labels = _graphite_majority_slice()
    result = multistage_threshold(gray, refine=False)
    assert result.info["stage1"]["intermediate_graphite_rule"] == "below_solid_mode"
    t = result.info["thresholds"]
    assert 20000.0 < t["intermediate_graphite"] < 28000.0 < t["si"] < 45000.0
    iou = iou_per_phase(result.labels, VoxelImage(labels, None, ANODE_PHASES))
    assert iou["graphite"] > 0.85 and iou["pore"] > 0.9 and iou["si"] > 0.8 and iou["sei"] > 0.5
    # the demo-like volumes keep the first rule
    demo = multistage_threshold(render_gray(anode_volume((24, 48, 48), seed=2), seed=1), refine=False)
    assert demo.info["stage1"]["intermediate_graphite_rule"] == "solid"


def test_si_candidates_are_dropped_where_they_make_the_fit_worse():
    """Stage 5's Si candidates (bright local maxima) are meant for blurred sub-resolution Si. In
    a coarse, noisy graphite phase they seed false Si that the local search cannot remove
    (measured on this slice: Si IoU 0.30, graphite 0.49, and the refinement's final energy twice
    that of a run without them); the run without them is kept there. On the demo-like volume
    the energies are within 0.5 % and the candidates stay (they raise Si IoU there)."""
    gray, labels = _graphite_majority_slice()
    result = multistage_threshold(gray)
    choice = result.info["refine"]["si_candidates"]
    assert not choice["kept"] and choice["energy_with"] > 1.5 * choice["energy_without"]
    iou = iou_per_phase(result.labels, VoxelImage(labels, None, ANODE_PHASES))
    assert iou["graphite"] > 0.9 and iou["si"] > 0.85 and iou["pore"] > 0.95 and iou["sei"] > 0.7
    np.testing.assert_array_equal(result.labels.array, multistage_threshold(gray, si_seeds=False).labels.array)
    truth = anode_volume((24, 48, 48), seed=2, aged=True)
    demo = multistage_threshold(render_gray(truth, seed=1))
    choice = demo.info["refine"]["si_candidates"]
    assert choice["kept"] and abs(choice["energy_with"] / choice["energy_without"] - 1.0) < 0.01
    no_candidates = multistage_threshold(render_gray(truth, seed=1), si_seeds=False)
    assert iou_per_phase(demo.labels, truth)["si"] > iou_per_phase(no_candidates.labels, truth)["si"] + 0.05


def test_multistage_on_a_clipped_8_bit_export():
    """The same slice exported to 8 bits with its range cut off (pores below 0, Si above 255: 31 %
    and 3.5 % of the pixels at the ends). The clipped Si spike at 255 is not taken for the
    graphite peak, and stage 5 (whose blurred-label model cannot explain cut-off values) is
    skipped. Measured before: the peak at 254.8, graphite IoU 0.005, mean IoU 0.40."""
    gray, labels = _graphite_majority_slice()
    exported = np.clip((gray - 9000.0) / (42000.0 - 9000.0) * 255.0, 0, 255).astype(np.uint8)
    result = multistage_threshold(exported)
    clipped = result.info["stage1"]["clipped_voxels"]
    assert clipped["top"] == np.count_nonzero(exported == 255) and clipped["bottom"] == np.count_nonzero(exported == 0)
    assert result.info["stage1"]["solid_mode"] < 200.0
    assert "clipped" in result.info["refine"]["skipped"] and result.info["si_candidates_added"] is None
    iou = iou_per_phase(result.labels, VoxelImage(labels, None, ANODE_PHASES))
    assert iou["graphite"] > 0.9 and iou["pore"] > 0.95 and iou["si"] > 0.85 and iou["sei"] > 0.6
    # unclipped images are not affected: the float slice has no ends with more than a few pixels
    assert multistage_threshold(gray, refine=False).info["stage1"]["clipped_voxels"] == {"top": 0, "bottom": 0}


@pytest.mark.parametrize("seed", [1, 5, 12])
def test_multistage_over_random_slices(seed):
    """Slices whose structure and imaging are drawn at random (``random_anode_slice``). These three
    seeds were the worst before the stage-1 and stage-5 changes of 2026-12-05: mean IoU 0.39 /
    0.35 / 0.40; now 0.80 / 0.89 / 0.92, and 0.76 / 0.90 / 0.83 for 8-bit exports with 6 % of the
    pixels clipped (``benchmarks/bench_segmentation_robustness.py`` runs 24 seeds)."""
    from fem_anode.imaging.synthetic import random_anode_slice

    gray, labels, params = random_anode_slice(seed)
    assert np.mean(labels.array == ANODE_PHASES["pore"]) == pytest.approx(params["pore_fraction"], abs=0.01)
    again = random_anode_slice(seed)[0]
    np.testing.assert_array_equal(again.array, gray.array)
    assert np.mean(list(iou_per_phase(multistage_threshold(gray).labels, labels).values())) > 0.75
    lo, hi = np.percentile(gray.array, [3, 97])
    exported = np.clip((gray.array - lo) / (hi - lo) * 255.0, 0, 255).astype(np.uint8)
    assert np.mean(list(iou_per_phase(multistage_threshold(exported).labels, labels).values())) > 0.72
