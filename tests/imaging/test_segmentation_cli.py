"""``fem-anode segment`` with the trainable method and --truth (serial and under MPI: slabs per rank)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fem_anode.cli import main
from fem_anode.imaging.accuracy import accuracy_report, confusion_matrix
from fem_anode.imaging.synthetic import ANODE_PHASES, anode_volume, render_gray
from fem_anode.imaging.trainable import UNLABELLED, load_model, predict_labels
from fem_anode.io.images import VoxelImage, read_image, write_image

pytest.importorskip("mpi4py")

SHAPE = (20, 40, 40)


@pytest.fixture
def inputs(shared_tmp_path, comm):
    d = shared_tmp_path
    if comm.rank == 0:
        truth = anode_volume(SHAPE, seed=7, aged=True)
        write_image(d / "gray.npy", render_gray(truth, seed=8))
        write_image(d / "truth.npy", truth)
        scribbles = np.full(SHAPE, UNLABELLED, dtype=np.uint8)
        scribbles[[5, 15]] = truth.array[[5, 15]]
        write_image(d / "scribbles.npy", VoxelImage(scribbles, truth.voxel_size))
        write_image(d / "bad_shape.npy", VoxelImage(scribbles[:, :20], truth.voxel_size))
        one_layer = np.full(SHAPE, UNLABELLED, dtype=np.uint8)
        one_layer[5] = truth.array[5]
        write_image(d / "one_layer.npy", VoxelImage(one_layer, truth.voxel_size))
        odd = scribbles.copy()
        odd[0, 0, 0] = 9
        write_image(d / "odd_labels.npy", VoxelImage(odd, truth.voxel_size))
        from fem_anode.imaging.trainable import save_model, train_classifier

        save_model(
            train_classifier(
                [(read_image(d / "gray.npy", kind="gray").array, scribbles)], ANODE_PHASES, n_estimators=2
            ),
            d / "small.joblib",
        )
    comm.barrier()
    return d


@pytest.mark.parametrize(
    "context",
    [[], ["--auto-context"], ["--basic-features"], ["--gray-normalisation", "percentiles"]],
    ids=["plain", "auto-context", "basic-features", "gray-normalisation"],
)
def test_trainable_cli_round_trip_and_ranks(inputs, comm, context):
    """Train + save on any number of ranks, reuse the model: the labels are those of a serial
    prediction voxel for voxel (each rank predicted only its own slab; with auto-context the
    probabilities are smoothed across the slab ends), the accuracy that of the whole volume, and
    the report files are there."""
    d = inputs
    assert (
        main(
            [
                "segment",
                str(d / "gray.npy"),
                "--method",
                "trainable",
                "--train",
                f"{d / 'gray.npy'}:{d / 'scribbles.npy'}",
                "--trees",
                "20",
                *context,
                "--save-model",
                str(d / "model.joblib"),
                "--truth",
                str(d / "truth.npy"),
                "--out",
                str(d / "trained.npy"),
                "-q",
            ]
        )
        == 0
    )
    comm.barrier()
    assert (
        main(
            [
                "segment",
                str(d / "gray.npy"),
                "--method",
                "trainable",
                "--model",
                str(d / "model.joblib"),
                "--truth",
                str(d / "truth.npy"),
                "--out",
                str(d / "reused.tif"),
                "-q",
            ]
        )
        == 0
    )
    comm.barrier()
    gray = read_image(d / "gray.npy", kind="gray")
    model = load_model(d / "model.joblib", ANODE_PHASES)
    auto = "--auto-context" in context
    assert model.settings.auto_context == auto and (model.context_forest is not None) == auto
    assert model.settings.extended == ("--basic-features" not in context)
    assert model.settings.gray_normalisation == ("percentiles" if "--gray-normalisation" in context else "none")
    serial = predict_labels(gray.array, SHAPE, model, progress=False)
    trained = read_image(d / "trained.npy", kind="labels")
    reused = read_image(d / "reused.tif", kind="labels")
    np.testing.assert_array_equal(trained.array, serial)
    np.testing.assert_array_equal(reused.array, serial)
    assert trained.phases == ANODE_PHASES and trained.voxel_size == pytest.approx((0.65e-6,) * 3)
    report = json.loads((d / "trained.npy.report.json").read_text())
    truth = read_image(d / "truth.npy", kind="labels").array
    expected = accuracy_report(serial, truth, ANODE_PHASES)
    assert report["accuracy"]["confusion_matrix"]["counts"] == expected["confusion_matrix"]["counts"]
    assert report["slabs"]["ranks"] == comm.size and report["slabs"]["bounds"][-1] == SHAPE[0]
    assert report["accuracy"]["mean_iou"] > 0.7
    for name in ("trained.npy.report.png", "trained.npy.confusion.png", "reused.tif.report.png"):
        assert (d / name).stat().st_size > 5000


def test_a_2d_model_on_a_volume_over_ranks(inputs, comm):
    """A classifier trained on one exported 2D slice, applied with --model to the 3D stack on any
    number of ranks: the labels of every slice are those of the slice segmented on its own."""
    d = inputs
    if comm.rank == 0:
        gray = read_image(d / "gray.npy", kind="gray").array
        truth = read_image(d / "truth.npy", kind="labels").array
        write_image(d / "slice.npy", VoxelImage(gray[5], (0.65e-6,) * 2))
        write_image(d / "slice_labels.npy", VoxelImage(truth[5], (0.65e-6,) * 2))
    comm.barrier()
    train = ["segment", str(d / "slice.npy"), "--method", "trainable", "--trees", "10"]
    train += ["--train", f"{d / 'slice.npy'}:{d / 'slice_labels.npy'}", "--save-model", str(d / "m2d.joblib")]
    assert main([*train, "--out", str(d / "slice_out.npy"), "-q"]) == 0
    comm.barrier()
    args = ["segment", str(d / "gray.npy"), "--method", "trainable", "--model", str(d / "m2d.joblib")]
    assert main([*args, "--truth", str(d / "truth.npy"), "--out", str(d / "stack_out.npy"), "-q"]) == 0
    comm.barrier()
    model = load_model(d / "m2d.joblib", ANODE_PHASES)
    gray = read_image(d / "gray.npy", kind="gray").array
    expected = np.stack([predict_labels(g, g.shape, model, progress=False) for g in gray])
    np.testing.assert_array_equal(read_image(d / "stack_out.npy", kind="labels").array, expected)
    report = json.loads((d / "stack_out.npy.report.json").read_text())
    assert report["slabs"]["slice_by_slice"] and report["slabs"]["halo_layers"] == 0
    assert report["accuracy"]["mean_iou"] > 0.6


def test_multistage_cli_accuracy_outputs(inputs, comm):
    d = inputs
    assert (
        main(["segment", str(d / "gray.npy"), "--truth", str(d / "truth.npy"), "--out", str(d / "ms.npz"), "-q"]) == 0
    )
    comm.barrier()
    report = json.loads((d / "ms.npz.report.json").read_text())
    labels = read_image(d / "ms.npz", kind="labels").array
    truth = read_image(d / "truth.npy", kind="labels").array
    c = np.asarray(report["accuracy"]["confusion_matrix"]["counts"])
    np.testing.assert_array_equal(c, confusion_matrix(labels, truth, ANODE_PHASES))
    frac = report["accuracy"]["phase_fraction"]
    for name, value in ANODE_PHASES.items():
        assert frac["error_points"][name] == pytest.approx(
            np.mean(labels == value) - np.mean(truth == value), abs=1e-12
        )
    assert report["denoise"]["method"] == "nl_means" and report["cleanup"]["min_size"]["si"] == 3
    assert (d / "ms.npz.confusion.png").exists() and (d / "ms.npz.report.png").exists()
    # the blur-aware refinement ran with parameters estimated from the image, and every rank count
    # writes the labels of the serial API voxel for voxel
    refine = report["refine"]
    assert refine["psf_sigma_estimated"] and refine["noise_sigma_estimated"] and refine["sweeps"] >= 1
    from fem_anode.imaging.segmentation import multistage_threshold

    serial = multistage_threshold(read_image(d / "gray.npy", kind="gray"), ANODE_PHASES)
    np.testing.assert_array_equal(labels, serial.labels.array)
    assert report["settings"] == serial.info["settings"]  # the options' defaults are the API's
    argv = ["segment", str(d / "gray.npy"), "--no-refine", "--out", str(d / "plain.npy"), "-q"]
    assert main(argv) == 0
    argv = ["segment", str(d / "gray.npy"), "--psf-sigma", "1", "--potts-beta", "2", "--out", str(d / "given.npy")]
    assert main([*argv, "-q"]) == 0
    comm.barrier()
    assert json.loads((d / "plain.npy.report.json").read_text())["refine"] is None
    given = json.loads((d / "given.npy.report.json").read_text())["refine"]
    assert given["psf_sigma_voxels"] == 1.0 and not given["psf_sigma_estimated"] and given["beta"] == 2.0
    settings = json.loads((d / "given.npy.report.json").read_text())["settings"]
    assert settings["psf_sigma"] == 1.0 and settings["potts_beta"] == 2.0 and settings["refine"]


ERRORS = [
    (["--method", "trainable", "--out", "{d}/x.npy"], 2, "needs --train GRAY:LABELS"),
    (["--method", "trainable", "--train", "{d}/gray.npy", "--out", "{d}/x.npy"], 2, "expected GRAY:LABELS"),
    (
        ["--method", "trainable", "--train", "{d}/gray.npy:{d}/bad_shape.npy", "--out", "{d}/x.npy"],
        3,
        "must match voxel for voxel",
    ),
    (
        ["--method", "trainable", "--train", "{d}/gray.npy:{d}/odd_labels.npy", "--out", "{d}/x.npy"],
        3,
        "label values [9]",
    ),
    (
        [
            "--method",
            "trainable",
            "--train",
            "{d}/gray.npy:{d}/scribbles.npy",
            "--model",
            "{d}/m.joblib",
            "--out",
            "{d}/x.npy",
        ],
        2,
        "not both",
    ),
    (["--method", "trainable", "--model", "{d}/missing.joblib", "--out", "{d}/x.npy"], 3, "model file not found"),
    (
        ["--method", "trainable", "--model", "{d}/small.joblib", "--illumination", "2", "--out", "{d}/x.npy"],
        3,
        "--illumination 2 differs from the model",
    ),
    (
        ["--method", "trainable", "--model", "{d}/small.joblib", "--auto-context", "--out", "{d}/x.npy"],
        3,
        "--auto-context given differs from the model",
    ),
    (
        ["--method", "trainable", "--model", "{d}/small.joblib", "--basic-features", "--out", "{d}/x.npy"],
        3,
        "--basic-features given differs from the model",
    ),
    (
        [
            "--method",
            "trainable",
            "--model",
            "{d}/small.joblib",
            "--gray-normalisation",
            "percentiles",
            "--out",
            "{d}/x.npy",
        ],
        3,
        "--gray-normalisation percentiles differs from the model",
    ),
    (
        [
            "--method",
            "trainable",
            "--train",
            "{d}/gray.npy:{d}/one_layer.npy",
            "--auto-context",
            "--out",
            "{d}/x.npy",
        ],
        3,
        "auto-context needs labels in at least two layers",
    ),
    (
        ["--method", "multistage", "--save-model", "{d}/m.joblib", "--out", "{d}/x.npy"],
        2,
        "belong to --method trainable",
    ),
    (
        ["--method", "multistage", "--gray-normalisation", "percentiles", "--out", "{d}/x.npy"],
        2,
        "--gray-normalisation belong to --method trainable",
    ),
    (["--out", "{d}/gray.npy"], 2, "the labels would overwrite an input"),
    (["--truth", "{d}/bad_shape.npy", "--out", "{d}/x.npy"], 3, "differs from the image"),
    (["--denoise-strength", "0", "--out", "{d}/x.npy"], 2, "--denoise-strength must be positive"),
    (["--psf-sigma", "0", "--out", "{d}/x.npy"], 2, "--psf-sigma must lie in [0.05, 100.0], got 0.0"),
    (["--potts-beta", "-1", "--out", "{d}/x.npy"], 2, "--potts-beta must lie in [0.0, "),
    (
        [
            "--method",
            "trainable",
            "--train",
            "{d}/gray.npy:{d}/scribbles.npy",
            "--feature-sigma-max",
            "0.1",
            "--out",
            "{d}/x.npy",
        ],
        2,
        "--feature-sigma-max must be >= --feature-sigma-min (0.5), got 0.1",
    ),
]


@pytest.mark.parametrize("argv, code, message", ERRORS)
def test_segment_errors_are_one_line(inputs, comm, capsys, argv, code, message):
    d = inputs
    args = ["segment", str(d / "gray.npy"), *[a.format(d=d) for a in argv]]
    assert main(args) == code
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    comm.barrier()
    assert not (d / "x.npy").exists()


def test_model_on_another_gray_scale_warns(inputs, comm, capsys):
    d = inputs
    if comm.rank == 0:
        gray = read_image(d / "gray.npy", kind="gray")
        write_image(
            d / "rescaled.npy", VoxelImage(1000.0 * gray.array + 200.0, gray.voxel_size)
        )  # e.g. uint16-like counts
    comm.barrier()
    capsys.readouterr()
    assert (
        main(
            [
                "segment",
                str(d / "rescaled.npy"),
                "--method",
                "trainable",
                "--model",
                str(d / "small.joblib"),
                "--out",
                str(d / "b.npy"),
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    if comm.rank == 0:
        assert "differs from the model's training images" in err and "--gray-normalisation percentiles" in err
    comm.barrier()
    # trained in the same command: the same check
    train = ["segment", str(d / "rescaled.npy"), "--method", "trainable", "--trees", "2"]
    train += ["--train", f"{d / 'gray.npy'}:{d / 'scribbles.npy'}"]
    assert main([*train, "--out", str(d / "c.npy")]) == 0
    err = capsys.readouterr().err
    if comm.rank == 0:
        assert "differs from the model's training images" in err
    comm.barrier()
    assert main([*train, "--gray-normalisation", "percentiles", "--out", str(d / "d.npy")]) == 0
    assert "differs from the model's training images" not in capsys.readouterr().err
    comm.barrier()


def test_settings_file_reruns_a_report_and_options_override_it(inputs, comm, capsys):
    """``--settings`` takes a TOML file or an earlier report: the rerun of a report writes the same
    labels and settings; an option given with the file overrides it; bad files are one-line errors."""
    d = inputs
    first = ["--denoise", "none", "--no-refine", "--min-object-size", "5", "--out", str(d / "s1.npy")]
    assert main(["segment", str(d / "gray.npy"), *first, "-q"]) == 0
    comm.barrier()
    report = json.loads((d / "s1.npy.report.json").read_text())
    assert report["settings"]["denoise"] == "none" and report["settings"]["min_object_size"] == 5
    again = ["--settings", str(d / "s1.npy.report.json"), "--out", str(d / "s2.npy")]
    assert main(["segment", str(d / "gray.npy"), *again, "-q"]) == 0
    comm.barrier()
    np.testing.assert_array_equal(np.load(d / "s2.npy"), np.load(d / "s1.npy"))
    assert json.loads((d / "s2.npy.report.json").read_text())["settings"] == report["settings"]
    if comm.rank == 0:
        (d / "s.toml").write_text('denoise = "none"\nrefine = false\nbins = 256\nmin_object_size = { si = 2 }\n')
        (d / "typo.toml").write_text("coating_wieght = 2.0\n")
    comm.barrier()
    given = ["--settings", str(d / "s.toml"), "--coating-weight", "2", "--out", str(d / "s3.npy")]
    assert main(["segment", str(d / "gray.npy"), *given, "-q"]) == 0
    comm.barrier()
    settings = json.loads((d / "s3.npy.report.json").read_text())["settings"]
    assert settings["bins"] == 256 and settings["min_object_size"] == {"si": 2} and not settings["refine"]
    assert settings["coating_weight"] == 2.0 and settings["denoise"] == "none"
    region = ["--method", "region", "--phases", "pore=0,si=1,sei=3", "--denoise", "none", "--scale", "50"]
    assert main(["segment", str(d / "gray.npy"), *region, "--out", str(d / "r1.npy"), "-q"]) == 0
    comm.barrier()
    region_report = json.loads((d / "r1.npy.report.json").read_text())
    assert region_report["settings"]["scale"] == 50.0 and region_report["settings"]["denoise"] == "none"
    rerun = ["--method", "region", "--phases", "pore=0,si=1,sei=3", "--settings", str(d / "r1.npy.report.json")]
    assert main(["segment", str(d / "gray.npy"), *rerun, "--out", str(d / "r2.npy"), "-q"]) == 0
    comm.barrier()
    np.testing.assert_array_equal(np.load(d / "r2.npy"), np.load(d / "r1.npy"))
    assert json.loads((d / "r2.npy.report.json").read_text())["settings"] == region_report["settings"]
    capsys.readouterr()
    for argv, message in (
        (["--settings", str(d / "r1.npy.report.json")], "a report of --method region, not of multistage"),
        (["--settings", str(d / "typo.toml")], "did you mean 'coating_weight'"),
        (["--settings", str(d / "missing.toml")], "settings file not found"),
        (
            ["--settings", str(d / "s.toml"), "--method", "trainable", "--model", str(d / "small.joblib")],
            "--settings holds the settings of --method multistage or region",
        ),
        (["--settings", str(d / "s.toml"), "--coating-weight", "-1"], "--coating-weight must lie in [0.0, "),
    ):
        assert main(["segment", str(d / "gray.npy"), *argv, "--out", str(d / "x.npy")]) != 0
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    comm.barrier()
    assert not (d / "x.npy").exists()


def test_label_outputs_in_every_format_hold_the_same_labels(inputs, comm):
    """A TIFF (one series of pages, rank 0 writing the others' layers as they arrive) and a folder
    of slices (each rank writing its own) hold the labels of the .npy output on any number of ranks."""
    d = inputs
    base = ["segment", str(d / "gray.npy"), "--method", "threshold", "-q"]
    for name in ("t.npy", "t.tif", "t_slices"):
        assert main([*base, "--out", str(d / name)]) == 0
    comm.barrier()
    reference = read_image(d / "t.npy", kind="labels")
    for name in ("t.tif", "t_slices"):
        image = read_image(d / name, kind="labels")
        np.testing.assert_array_equal(image.array, reference.array)
        assert image.phases == reference.phases and image.voxel_size == reference.voxel_size
