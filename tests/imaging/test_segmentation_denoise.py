"""Denoising, noise estimate, illumination flattening and clean-up before/after the multistage method."""

from __future__ import annotations

import numpy as np
import pytest

from fem_anode.errors import UsageError
from fem_anode.imaging.denoise import denoise_gray, estimate_noise_sigma, flatten_illumination
from fem_anode.imaging.segmentation import clean_labels, iou_per_phase, multistage_threshold
from fem_anode.imaging.synthetic import ANODE_PHASES, anode_volume, render_gray


@pytest.mark.parametrize("shape", [(256, 256), (32, 64, 64)])
def test_noise_estimate_recovers_the_noise_of_a_piecewise_constant_image(shape):
    rng = np.random.default_rng(3)
    clean = np.zeros(shape)
    clean[..., : shape[-1] // 2] = 1.0  # one sharp edge: the Haar all-details sub-band ignores it
    for sigma in (0.01, 0.05):
        noisy = clean + rng.normal(0.0, sigma, shape)
        assert estimate_noise_sigma(noisy) == pytest.approx(sigma, rel=0.05)
    assert estimate_noise_sigma(clean) == 0.0


def test_denoising_removes_noise_and_keeps_the_edge():
    rng = np.random.default_rng(4)
    clean = np.zeros((24, 40, 40))
    clean[:, :, 20:] = 1.0
    noisy = clean + rng.normal(0.0, 0.1, clean.shape)
    for method in ("nl_means", "tv"):
        out, info = denoise_gray(noisy, method)
        assert info["noise_sigma"] == pytest.approx(0.1, rel=0.05) and info["noise_sigma_estimated"]
        flat = out[:, :, 2:17]
        assert flat.std() < 0.5 * 0.1  # noise at least halved away from the edge
        step = out[:, :, 20].mean() - out[:, :, 19].mean()
        assert step > 0.6  # the edge stays (a Gaussian of the same smoothing would spread it)
    same, info = denoise_gray(noisy, "none")
    assert same is not None and np.array_equal(same, noisy) and info == {"method": "none"}
    with pytest.raises(UsageError, match="denoising method"):
        denoise_gray(noisy, "median")  # type: ignore[arg-type]


def test_flatten_illumination_removes_ramp_and_cupping_and_keeps_the_depth_trend():
    z, y, x = np.mgrid[0:8, 0:64, 0:80].astype(float)
    structure = ((np.floor(x / 4) + np.floor(y / 4)) % 2) * 0.2  # fine checkerboard, no trend
    depth_trend = 0.05 * z  # a real composition gradient with depth
    u, v = x / 79.0 - 0.5, y / 63.0 - 0.5
    shading = 0.3 * u + 0.4 * (u**2 + v**2)  # ramp + cupping of the field of view
    image = structure + depth_trend + shading
    out = flatten_illumination(image, 2)
    expected = structure + depth_trend + shading.mean(axis=(1, 2), keepdims=True)
    # the quadratic shading is removed up to the checkerboard's own (tiny) projection on it
    assert np.abs(out - expected).max() < 0.01
    np.testing.assert_allclose(out.mean(axis=(1, 2)), image.mean(axis=(1, 2)), rtol=1e-12)  # slice means kept
    np.testing.assert_allclose(flatten_illumination(image[3], 2), out[3], rtol=0, atol=1e-12)  # per slice: slab-exact
    with pytest.raises(UsageError, match="degree"):
        flatten_illumination(image, 0)


def test_clean_labels_fills_isolated_voxels_and_small_objects():
    labels = np.zeros((9, 9), dtype=np.uint8)
    labels[:, 5:] = 2
    labels[6, 2] = 1  # isolated voxel in phase 0
    labels[6:8, 7] = 3  # two-voxel object inside phase 2
    labels[0:4, 0:2] = 1  # an 8-voxel object of phase 1: kept
    phases = {"pore": 0, "si": 1, "graphite": 2, "sei": 3}
    out, info = clean_labels(labels, phases, min_size=3)
    assert out[6, 2] == 0 and np.all(out[6:8, 7] == 2)
    assert np.all(out[0:4, 0:2] == 1)
    assert info["isolated_filled"] == 1 and info["small_objects_removed"]["sei"] == 1
    kept, _ = clean_labels(labels, phases, min_size=1, fill_isolated=False)
    np.testing.assert_array_equal(kept, labels)
    with pytest.raises(UsageError, match="not in the phase map"):
        clean_labels(labels, phases, min_size={"carbon": 4})


@pytest.mark.parametrize("aged", [False, True])
def test_denoised_multistage_beats_the_raw_one(aged):
    """Measured (24x48x48, seed 2): pristine raw mean IoU 0.60 -> denoised 0.66; aged 0.55 -> 0.65."""
    truth = anode_volume((24, 48, 48), seed=2, aged=aged)
    gray = render_gray(truth, seed=1)
    # the denoising stage's own effect: both without the blur-aware refinement (test_segmentation_restore.py)
    raw = iou_per_phase(multistage_threshold(gray, denoise="none", cleanup=False, refine=False).labels, truth)
    result = multistage_threshold(gray, refine=False)
    iou = iou_per_phase(result.labels, truth)
    assert result.info["denoise"]["method"] == "nl_means"
    assert result.info["denoise"]["noise_sigma"] == pytest.approx(0.04, rel=0.1)  # the renderer's noise
    assert np.mean(list(iou.values())) > np.mean(list(raw.values())) + 0.04
    assert iou["pore"] > 0.85 and iou["graphite"] > 0.75 and iou["si"] > 0.24
    assert iou["sei"] > (0.6 if aged else 0.5)
    assert result.info["fractions"]["pore"] == pytest.approx(np.mean(result.labels.array == ANODE_PHASES["pore"]))


def test_illumination_flattening_rescues_the_multistage_method_under_shading():
    """A ramp plus cupping over the field of view breaks global thresholds; the per-slice
    polynomial background (degree 2) restores them. Measured (8x160x160, stages 1-4): mean IoU
    0.696 unshaded, 0.562 shaded (0.433 before the below-the-graphite-peak rule for ``t_mid``,
    which the shading triggers), 0.667 shaded and flattened."""
    truth = anode_volume((8, 160, 160), seed=0)
    gray = render_gray(truth, seed=1).array
    v, u = np.mgrid[0:160, 0:160] / 159.0 - 0.5
    shaded = gray + 0.15 * u + 0.3 * (u**2 + v**2)

    def mean_iou(image, degree):
        result = multistage_threshold(image, illumination_degree=degree, refine=False)
        assert result.info["denoise"]["illumination_degree"] == degree
        return np.mean(list(iou_per_phase(result.labels, truth).values()))

    plain, broken, rescued = mean_iou(gray, None), mean_iou(shaded, None), mean_iou(shaded, 2)
    assert broken < plain - 0.1 and rescued > broken + 0.08
    assert rescued > plain - 0.04
