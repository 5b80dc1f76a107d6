"""Trainable segmentation: accuracy vs the multistage method, sparse labels, chunk seams, model files, errors."""

from __future__ import annotations

import numpy as np
import pytest

from fem_anode.errors import InputError, UsageError
from fem_anode.imaging.segmentation import iou_per_phase, multistage_threshold
from fem_anode.imaging.synthetic import ANODE_PHASES, anode_volume, render_gray
from fem_anode.imaging.trainable import (
    LOG_SIGMAS,
    UNLABELLED,
    FeatureSettings,
    _Blocks,
    _blocks,
    _extended_halo,
    compute_features,
    extended_features,
    feature_halo,
    gray_percentiles,
    gray_scale_warning,
    load_model,
    n_extended_features,
    predict_labels,
    save_model,
    train_classifier,
)

SHAPE = (24, 48, 48)


def _two_slices(truth: np.ndarray) -> np.ndarray:
    labels = np.full(truth.shape, UNLABELLED, dtype=np.uint8)
    labels[[6, 18]] = truth[[6, 18]]
    return labels


@pytest.fixture(scope="module")
def aged_case():
    truth = anode_volume(SHAPE, seed=2, aged=True)
    gray = render_gray(truth, seed=1).array
    model = train_classifier([(gray, _two_slices(truth.array))], ANODE_PHASES, seed=0, n_estimators=30)
    return truth, gray, model


@pytest.mark.parametrize("aged", [False, True])
def test_trainable_on_two_slices_against_the_denoised_multistage(aged):
    """Measured (24x48x48, seed 2, 30 trees, the default extended features; multistage with the
    Si candidates and coating prior of stage 5): pristine mean IoU 0.847 vs 0.764 (the issue's
    margin of 0.05 and every phase), aged 0.798 vs 0.768 (every phase above; 0.773 with graphite
    0.841 vs 0.850 on the 20 features of before): on the aged volume the improved multistage
    method comes close to the random forest, so the issue's trainable goal is missed there
    (docs/imaging.md section 1.7); asked: not below it in mean IoU, Si and pore."""
    truth = anode_volume(SHAPE, seed=2, aged=aged)
    gray = render_gray(truth, seed=1).array
    model = train_classifier([(gray, _two_slices(truth.array))], ANODE_PHASES, seed=0, n_estimators=30)
    trained = iou_per_phase(predict_labels(gray, SHAPE, model, progress=False), truth)
    multistage = iou_per_phase(multistage_threshold(gray).labels, truth)
    if aged:
        assert np.mean(list(trained.values())) >= np.mean(list(multistage.values()))
        assert trained["si"] >= multistage["si"] and trained["pore"] >= multistage["pore"]
    else:
        assert np.mean(list(trained.values())) >= np.mean(list(multistage.values())) + 0.05
        assert all(trained[p] >= multistage[p] for p in ANODE_PHASES)
    assert trained["pore"] > 0.9 and trained["graphite"] > 0.8 and trained["si"] > 0.5 and trained["sei"] > 0.7


def test_sparse_scribbles_are_enough():
    """About 0.3 % of the voxels labelled at random (no full slice): still far above chance."""
    truth = anode_volume(SHAPE, seed=5)
    gray = render_gray(truth, seed=6).array
    rng = np.random.default_rng(0)
    labels = np.full(SHAPE, UNLABELLED, dtype=np.uint8)
    picked = rng.random(SHAPE) < 0.003
    labels[picked] = truth.array[picked]
    model = train_classifier([(gray, labels)], ANODE_PHASES, seed=1, n_estimators=30)
    assert model.training["samples_used"] == int(picked.sum())
    iou = iou_per_phase(predict_labels(gray, SHAPE, model, progress=False), truth)
    assert iou["pore"] > 0.88 and iou["graphite"] > 0.75 and np.mean(list(iou.values())) > 0.65


def test_chunk_seams_and_slab_splits_give_identical_labels(aged_case):
    _, gray, model = aged_case
    whole = predict_labels(gray, SHAPE, model, progress=False)
    # a budget that forces blocks of 11 x 11 x 11 voxels (3 slabs, 5 x 5 in-plane tiles, the last
    # ones thinner): every block's features come from a window with the full halo
    plan = _blocks(SHAPE, model.settings, 86.4e6)
    assert plan == _Blocks(11, (11, 11), 21)
    tiled = predict_labels(lambda a, b: gray[a:b], SHAPE, model, chunk_memory=86.4e6, progress=False)
    np.testing.assert_array_equal(tiled, whole)
    split = np.concatenate(
        [
            predict_labels(gray, SHAPE, model, z0=0, z1=7, progress=False),
            predict_labels(gray, SHAPE, model, z0=7, z1=SHAPE[0], progress=False),
        ]
    )
    np.testing.assert_array_equal(split, whole)
    # the extended features (default) reach farthest: the Laplacian of Gaussian at 5 voxels, plus 1
    assert model.settings.extended and feature_halo(model.settings) == int(4 * 5.0 + 0.5) + 1
    assert feature_halo(FeatureSettings(extended=False)) == int(4 * 4.0 + 0.5) + 3


def test_model_round_trip_and_checks(aged_case, tmp_path, monkeypatch):
    _, gray, model = aged_case
    path = save_model(model, tmp_path / "model.joblib")
    again = load_model(path, ANODE_PHASES)
    assert again.settings == model.settings and again.phases == ANODE_PHASES and again.ndim == 3
    np.testing.assert_array_equal(
        predict_labels(gray, SHAPE, again, progress=False), predict_labels(gray, SHAPE, model, progress=False)
    )
    with pytest.raises(InputError, match="the model segments the phases"):
        load_model(path, {"pore": 0, "si": 1, "sei": 3})
    with pytest.raises(UsageError, match="trained on 3D images"):
        predict_labels(gray[0], SHAPE[1:], again, progress=False)
    (tmp_path / "junk.joblib").write_bytes(b"not a pickle")
    with pytest.raises(InputError, match="not a readable model file"):
        load_model(tmp_path / "junk.joblib")
    import joblib

    joblib.dump({"format": "something else"}, tmp_path / "other.joblib")
    with pytest.raises(InputError, match="not a fem_anode segmentation model"):
        load_model(tmp_path / "other.joblib")
    import fem_anode

    monkeypatch.setattr(fem_anode, "__version__", "999.0")
    with pytest.raises(InputError, match="trained with fem_anode"):
        load_model(path)


def test_gray_normalisation_makes_a_model_independent_of_the_gray_scale(aged_case):
    """A model trained on gray values in 0..1 and applied to the same volume as 16-bit-like counts
    (``1000 g + 200``): with percentile normalisation the labels are those of the original scale
    (up to voxels whose features sit within round-off of a split), without it they are wrong and
    :func:`gray_scale_warning` says so."""
    from fem_anode.imaging.accuracy import accuracy_report

    truth, gray, plain = aged_case
    counts = 1000.0 * gray + 200.0
    lo, hi = gray_percentiles(gray, SHAPE)
    assert gray_percentiles(counts, SHAPE) == pytest.approx((1000.0 * lo + 200.0, 1000.0 * hi + 200.0), rel=1e-12)
    normalised = train_classifier(
        [(gray, _two_slices(truth.array))],
        ANODE_PHASES,
        settings=FeatureSettings(gray_normalisation="percentiles"),
        seed=0,
        n_estimators=30,
    )
    same = predict_labels(gray, SHAPE, normalised, progress=False)
    scaled = predict_labels(counts, SHAPE, normalised, progress=False)
    assert np.mean(same == scaled) > 0.999
    iou = accuracy_report(scaled, truth.array, ANODE_PHASES)["mean_iou"]
    assert iou > 0.75 and iou == pytest.approx(accuracy_report(same, truth.array, ANODE_PHASES)["mean_iou"], abs=0.002)
    assert (
        accuracy_report(predict_labels(counts, SHAPE, plain, progress=False), truth.array, ANODE_PHASES)["mean_iou"]
        < 0.5
    )
    assert "differs from the model's training images" in gray_scale_warning(plain, gray_percentiles(counts, SHAPE))
    assert gray_scale_warning(plain, gray_percentiles(gray, SHAPE)) is None
    assert gray_scale_warning(normalised, gray_percentiles(counts, SHAPE)) is None
    with pytest.raises(InputError, match="percentile normalisation needs contrast"):
        predict_labels(np.full(SHAPE, 0.5), SHAPE, normalised, progress=False)
    with pytest.raises(UsageError, match="gray_normalisation must be one of 'none', 'percentiles'"):
        FeatureSettings(gray_normalisation="minmax")
    with pytest.raises(UsageError, match="unknown setting 'sigma_maxx'; did you mean 'sigma_max'"):
        FeatureSettings(sigma_maxx=2.0)
    with pytest.raises(UsageError, match="at least one of the intensity, edge and texture"):
        FeatureSettings(intensity=False, edges=False, texture=False)


def test_a_2d_model_segments_a_volume_slice_by_slice(aged_case):
    """Labels drawn on exported 2D slices, classifier applied to the stack (ilastik workflow):
    each z-slice is segmented as the 2D image it is on its own, for any range of slices (MPI
    slabs), with its own gray normalisation."""
    truth, gray, _ = aged_case
    settings = FeatureSettings(gray_normalisation="percentiles")
    model = train_classifier(
        [(gray[6], truth.array[6]), (gray[18], truth.array[18])], ANODE_PHASES, settings=settings, n_estimators=20
    )
    assert model.ndim == 2 and model.slice_by_slice(SHAPE) and not model.slice_by_slice(SHAPE[1:])
    whole = predict_labels(gray, SHAPE, model, progress=False)
    slices = np.stack([predict_labels(gray[z], SHAPE[1:], model, progress=False) for z in range(SHAPE[0])])
    np.testing.assert_array_equal(whole, slices)
    np.testing.assert_array_equal(predict_labels(gray, SHAPE, model, z0=5, z1=9, progress=False), whole[5:9])
    from fem_anode.imaging.accuracy import accuracy_report

    assert accuracy_report(whole, truth.array, ANODE_PHASES)["mean_iou"] > 0.7


def test_training_errors_are_clear():
    truth = anode_volume((8, 16, 16), seed=1)
    gray = render_gray(truth, seed=1).array
    labels = truth.array.copy()
    with pytest.raises(InputError, match="must match voxel for voxel"):
        train_classifier([(gray, labels[:, :8])], ANODE_PHASES)
    wrong = labels.copy()
    wrong[0, 0, 0] = 7
    with pytest.raises(InputError, match=r"label values \[7\]"):
        train_classifier([(gray, wrong)], ANODE_PHASES)
    no_si = np.where(labels == ANODE_PHASES["si"], UNLABELLED, labels).astype(np.uint8)
    with pytest.raises(InputError, match="si have no labelled voxels"):
        train_classifier([(gray, no_si)], ANODE_PHASES)
    with pytest.raises(InputError, match="no labelled voxels"):
        train_classifier([(gray, np.full(labels.shape, UNLABELLED, np.uint8))], ANODE_PHASES)
    with pytest.raises(InputError, match="integers"):
        train_classifier([(gray, labels.astype(float))], ANODE_PHASES)
    with pytest.raises(UsageError, match="unlabelled value 3"):
        train_classifier([(gray, labels)], ANODE_PHASES, unlabelled=3)
    with pytest.raises(UsageError, match="sigma_max"):
        FeatureSettings(sigma_min=2.0, sigma_max=1.0)


def test_2d_training_and_illumination_flattening():
    """2D slices under uneven illumination: a ramp along x in the training slice, the reversed
    ramp and a doubled ramp along y in the test slice.

    Measured (96x96, 30 trees): with the flattening (degree 1, part of the model) the labels
    under both test shadings are identical (mean IoU 0.79 each); without it 0.76 and 0.62."""
    from fem_anode.imaging.accuracy import accuracy_report

    truth = anode_volume((6, 96, 96), seed=3)
    gray = render_gray(truth, seed=4).array
    ramp = np.linspace(-0.15, 0.15, 96)
    train = (gray[1] + ramp, truth.array[1])
    shaded = [gray[4] - ramp, gray[4] + 2 * ramp[:, None]]
    flat = train_classifier(
        [train], ANODE_PHASES, settings=FeatureSettings(illumination_degree=1), seed=0, n_estimators=30
    )
    plain = train_classifier([train], ANODE_PHASES, seed=0, n_estimators=30)
    assert flat.ndim == 2
    flat_labels = [predict_labels(g, g.shape, flat, progress=False) for g in shaded]
    plain_labels = [predict_labels(g, g.shape, plain, progress=False) for g in shaded]
    np.testing.assert_array_equal(flat_labels[0], flat_labels[1])  # the shading is gone before the features
    flat_iou = [accuracy_report(p, truth.array[4], ANODE_PHASES)["mean_iou"] for p in flat_labels]
    plain_iou = [accuracy_report(p, truth.array[4], ANODE_PHASES)["mean_iou"] for p in plain_labels]
    assert flat_iou[0] > 0.75 and flat_iou[1] > plain_iou[1] + 0.1
    # chunked 2D prediction with flattening reads the whole image: same labels
    np.testing.assert_array_equal(
        predict_labels(lambda a, b: shaded[0][a:b], (96, 96), flat, chunk_memory=1.0, progress=False), flat_labels[0]
    )


@pytest.mark.parametrize("aged", [False, True])
def test_auto_context_against_the_plain_forest_and_the_multistage(aged):
    """The second (auto-context) forest on cross-fitted probabilities, two labelled slices, 30
    trees. Measured (24x48x48, seed 2): pristine mean IoU 0.837 against the plain forest's 0.830
    and the multistage 0.764 (every phase above both); aged 0.772 against 0.773 and 0.768 (graphite
    up 0.841 -> 0.854, Si and pore down; each fold forest sees only 2 304 voxels here; on the
    demo's 48x128x128 volumes +0.014 / +0.011, docs/imaging.md section 1.7). Measured with the
    features of ``multiscale_basic_features`` alone (``extended=False``): with the extended
    features the plain forest already reaches what auto-context adds here (see
    :func:`test_extended_features_raise_the_iou`)."""
    truth = anode_volume(SHAPE, seed=2, aged=aged)
    gray = render_gray(truth, seed=1).array
    labels = _two_slices(truth.array)
    plain = train_classifier(
        [(gray, labels)], ANODE_PHASES, seed=0, n_estimators=30, settings=FeatureSettings(extended=False)
    )
    context = train_classifier(
        [(gray, labels)],
        ANODE_PHASES,
        seed=0,
        n_estimators=30,
        settings=FeatureSettings(auto_context=True, extended=False),
    )
    assert context.training["auto_context"]["fold_voxels"] == [48 * 48, 48 * 48]
    iou_plain = iou_per_phase(predict_labels(gray, SHAPE, plain, progress=False), truth)
    iou_context = iou_per_phase(predict_labels(gray, SHAPE, context, progress=False), truth)
    multistage = iou_per_phase(multistage_threshold(gray).labels, truth)
    mean_plain, mean_context, mean_multistage = (
        float(np.mean(list(v.values()))) for v in (iou_plain, iou_context, multistage)
    )
    assert mean_context >= mean_multistage
    if aged:
        assert abs(mean_context - mean_plain) <= 0.01
    else:
        assert mean_context >= mean_plain + 0.005 and mean_context >= mean_multistage + 0.05
        assert all(iou_context[p] >= max(iou_plain[p], multistage[p]) for p in ANODE_PHASES)


def test_auto_context_blocks_ranks_and_model_file(tmp_path):
    """Auto-context labels are those of the whole image for any block size and layer split (the
    probabilities are smoothed across block seams), and survive a model file round trip."""
    truth = anode_volume(SHAPE, seed=2, aged=True)
    gray = render_gray(truth, seed=1).array
    settings = FeatureSettings(auto_context=True)
    model = train_classifier(
        [(gray, _two_slices(truth.array))], ANODE_PHASES, seed=0, n_estimators=8, settings=settings
    )
    assert feature_halo(settings) == int(4 * 5.0 + 0.5) + 1 + int(4 * 2.0 + 0.5)
    whole = predict_labels(gray, SHAPE, model, progress=False)
    assert _blocks(SHAPE, settings, 30e6).tile == (8, 8)  # in-plane tiles
    tiled = predict_labels(lambda a, b: gray[a:b], SHAPE, model, chunk_memory=30e6, progress=False)
    np.testing.assert_array_equal(tiled, whole)
    assert _blocks(SHAPE, settings, 87e6) == _Blocks(7, SHAPE[1:], 29)  # thin slabs
    slabs = predict_labels(lambda a, b: gray[a:b], SHAPE, model, chunk_memory=87e6, progress=False)
    np.testing.assert_array_equal(slabs, whole)
    split = np.concatenate(
        [predict_labels(gray, SHAPE, model, z0=z0, z1=z1, progress=False) for z0, z1 in ((0, 5), (5, 13), (13, 24))]
    )
    np.testing.assert_array_equal(split, whole)
    again = load_model(save_model(model, tmp_path / "context.joblib"), ANODE_PHASES)
    assert again.settings.auto_context and again.context_forest is not None
    np.testing.assert_array_equal(predict_labels(gray, SHAPE, again, progress=False), whole)
    import joblib

    payload = joblib.load(tmp_path / "context.joblib")
    payload["context_forest"] = None
    joblib.dump(payload, tmp_path / "broken.joblib")
    with pytest.raises(InputError, match="holds no context forest"):
        load_model(tmp_path / "broken.joblib")
    one_layer = np.full(SHAPE, UNLABELLED, dtype=np.uint8)
    one_layer[6] = truth.array[6]
    with pytest.raises(InputError, match="at least two layers"):
        train_classifier([(gray, one_layer)], ANODE_PHASES, settings=settings)


def test_extended_features_are_exact_in_blocks():
    """Each extended feature (structure tensor, Laplacian of Gaussian, local extrema) of a layer
    block computed from the block plus ``_extended_halo`` layers (fewer at the image ends) equals
    that of the whole image, bit for bit, in 3D and 2D; with two layers less it differs (the halo
    is not larger than needed by more than its one layer of margin)."""
    rng = np.random.default_rng(3)
    halo = _extended_halo()
    assert halo == int(4 * max(LOG_SIGMAS) + 0.5) + 1
    for shape in ((60, 20, 24), (70, 30)):
        image = rng.random(shape).astype(np.float32)
        whole = extended_features(image)
        assert whole.shape == (*shape, n_extended_features(len(shape)))
        assert whole.shape[-1] == 2 * len(shape) + 10 and np.all(np.isfinite(whole))
        assert FeatureSettings().n_features(len(shape)) == FeatureSettings(extended=False).n_features(len(shape)) + (
            2 * len(shape) + 10
        )
        for lo, hi in ((0, 9), (25, 35), (50, shape[0])):
            a, b = max(lo - halo, 0), min(hi + halo, shape[0])
            np.testing.assert_array_equal(extended_features(image[a:b])[lo - a : hi - a], whole[lo:hi])
        short = extended_features(image[25 - halo + 2 : 35 + halo - 2])[halo - 2 : halo - 2 + 10]
        assert not np.array_equal(short, whole[25:35])
    assert compute_features(image, FeatureSettings()).shape[-1] == FeatureSettings().n_features(2)


@pytest.mark.parametrize("aged", [False, True])
def test_extended_features_raise_the_iou(aged):
    """The extended features (default) against ``multiscale_basic_features`` alone, plain forest of
    30 trees on two slices. Measured (24x48x48, seed 2): pristine mean IoU 0.847 vs 0.830, aged
    0.798 vs 0.773 (every phase up on both; aged now above the multistage method's 0.768 in every
    phase). Asked: 0.01 above in mean IoU and no phase more than 0.01 below; a broken feature
    (noise, a wrong scale) gives the forest nothing and fails the margin."""
    truth = anode_volume(SHAPE, seed=2, aged=aged)
    gray = render_gray(truth, seed=1).array
    labels = _two_slices(truth.array)
    iou = {}
    for extended in (False, True):
        model = train_classifier(
            [(gray, labels)], ANODE_PHASES, seed=0, n_estimators=30, settings=FeatureSettings(extended=extended)
        )
        iou[extended] = iou_per_phase(predict_labels(gray, SHAPE, model, progress=False), truth)
    mean = {k: float(np.mean(list(v.values()))) for k, v in iou.items()}
    assert mean[True] >= mean[False] + 0.01
    assert all(iou[True][p] >= iou[False][p] - 0.01 for p in ANODE_PHASES)
    if aged:
        multistage = iou_per_phase(multistage_threshold(gray).labels, truth)
        assert all(iou[True][p] >= multistage[p] for p in ANODE_PHASES)


def test_model_without_the_extended_setting_loads_as_trained(aged_case, tmp_path):
    """A model file whose settings predate ``extended`` was trained without those features: it
    loads with ``extended=False`` and predicts with 20 features; a forest whose feature count does
    not match its settings is a clear error."""
    import joblib

    truth, gray, _ = aged_case
    model = train_classifier(
        [(gray, _two_slices(truth.array))],
        ANODE_PHASES,
        seed=0,
        n_estimators=4,
        settings=FeatureSettings(extended=False),
    )
    path = save_model(model, tmp_path / "old.joblib")
    payload = joblib.load(path)
    del payload["settings"]["extended"]
    joblib.dump(payload, path)
    again = load_model(path, ANODE_PHASES)
    assert not again.settings.extended and again.forest.n_features_in_ == 20
    np.testing.assert_array_equal(
        predict_labels(gray, SHAPE, again, progress=False), predict_labels(gray, SHAPE, model, progress=False)
    )
    payload["settings"]["extended"] = True
    joblib.dump(payload, path)
    with pytest.raises(InputError, match="expects 20 features per voxel, its settings give 36"):
        predict_labels(gray, SHAPE, load_model(path, ANODE_PHASES), progress=False)
    with pytest.raises(UsageError, match="extended"):
        FeatureSettings(extended="yes")  # type: ignore[arg-type]


def test_training_reads_only_labelled_layers_and_ignores_the_block_plan(aged_case, monkeypatch):
    """Training computes features only of the runs of labelled layers (each with its halo), and
    the model does not depend on the memory budget (the training voxels are put in raster order
    whatever the blocks): a tiled training run gives the labels of the default one."""
    from fem_anode.imaging import trainable

    truth, gray, model = aged_case
    seen: list[tuple[int, int]] = []
    original = trainable._iterate_blocks

    def spy(read, shape, z0, z1, *args, **kwargs):
        seen.append((z0, z1))
        return original(read, shape, z0, z1, *args, **kwargs)

    monkeypatch.setattr(trainable, "_iterate_blocks", spy)
    tiled = train_classifier(
        [(gray, _two_slices(truth.array))], ANODE_PHASES, seed=0, n_estimators=30, chunk_memory=30e6
    )
    assert seen == [(6, 7), (18, 19)]
    monkeypatch.undo()
    np.testing.assert_array_equal(
        predict_labels(gray, SHAPE, tiled, progress=False), predict_labels(gray, SHAPE, model, progress=False)
    )
