"""The multistage segmentation's settings object: validation, overrides, TOML, the CLI's options."""

from __future__ import annotations

import numpy as np
import pytest

from fem_anode.errors import UsageError
from fem_anode.imaging.segmentation import multistage_threshold, region_segmentation
from fem_anode.imaging.settings import MultistageSettings, RegionSettings
from fem_anode.imaging.synthetic import ROI_PHASES, anode_volume, fib_sem_roi, render_gray
from fem_anode.settings import dumps_toml


@pytest.mark.parametrize(
    "options, message",
    [
        ({"coating_wieght": 2.0}, "did you mean 'coating_weight'"),
        ({"refine": "no"}, "refine must be true or false"),
        ({"denoise": "nlmeans"}, "did you mean 'nl_means'"),
        ({"denoise_strength": 0.0}, "denoise_strength must be positive"),
        ({"psf_sigma": 0.01}, r"psf_sigma must lie in \[0.05, 100.0\]"),
        ({"illumination_degree": 5}, r"illumination_degree must lie in \[1, 4\]"),
        ({"min_object_size": 0}, "min_object_size must lie in"),
        ({"min_object_size": {"si": 4, "pore": 0}}, "min_object_size.pore must lie in"),
        ({"levels": {"pore": 0.1, "sei": 0.4}}, "missing"),
        ({"levels": {"pore": 0.1, "sei": np.nan, "graphite": 0.6, "si": 0.9}}, "finite"),
        ({"noise_sigma": -1.0}, "noise_sigma must be non-negative"),
        ({"bins": 2}, r"bins must lie in \[16, "),
    ],
)
def test_bad_settings_fail_in_python_as_on_the_command_line(options, message):
    with pytest.raises(UsageError, match=message):
        MultistageSettings(**options)
    with pytest.raises(UsageError, match=message):  # before any work: the image is never read
        multistage_threshold(np.zeros((2, 2, 2)), **options)


def test_settings_and_overrides_give_the_same_labels_and_are_reported():
    gray = render_gray(anode_volume((8, 24, 24), seed=3), seed=1)
    base = MultistageSettings(refine=False, cleanup=False)
    by_object = multistage_threshold(gray, None, base, denoise="none")
    by_keywords = multistage_threshold(gray, refine=False, cleanup=False, denoise="none")
    np.testing.assert_array_equal(by_object.labels.array, by_keywords.labels.array)
    assert by_object.info["settings"] == by_keywords.info["settings"]
    assert by_object.info["settings"]["denoise"] == "none" and not by_object.info["settings"]["refine"]
    assert base.denoise == "nl_means"  # the object given is not changed by the overrides
    other = multistage_threshold(gray, refine=False, cleanup=False)  # denoised: other labels
    assert not np.array_equal(other.labels.array, by_object.labels.array)
    with pytest.raises(UsageError, match="MultistageSettings"):
        MultistageSettings.with_overrides({"refine": False})  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="must be a MultistageSettings, got RegionSettings"):
        multistage_threshold(np.zeros((2, 2, 2)), None, RegionSettings())  # type: ignore[arg-type]
    changed = MultistageSettings()
    changed.coating_weight = -1.0  # changed after it was made: checked again when used
    with pytest.raises(UsageError, match="coating_weight must lie in"):
        multistage_threshold(np.zeros((2, 2, 2)), None, changed)


def test_settings_round_trip_through_toml(tmp_path):
    settings = MultistageSettings(
        min_object_size={"si": 2, "pore": 5},
        levels={"pore": 0.1, "sei": 0.4, "graphite": 0.6, "si": 0.9},
        potts_beta=1.5,
    )
    path = tmp_path / "segment.toml"
    path.write_text(dumps_toml(settings))
    assert MultistageSettings.from_toml(path) == settings
    path.write_text(dumps_toml(settings).replace("potts_beta", "pots_beta"))
    with pytest.raises(UsageError, match="did you mean 'potts_beta'"):
        MultistageSettings.from_toml(path)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"scale": 0.0}, "scale must be positive"),
        ({"sigma": -1.0}, "sigma must be non-negative"),
        ({"min_size": 0}, r"min_size must lie in \[1, "),
        ({"dark_fraction": 1.5}, r"dark_fraction must lie in \[None, 1.0\]"),
        ({"bright_fraction": 0.0}, "bright_fraction must be positive"),
        ({"denoise": "median"}, "denoise must be one of"),
        ({"coating_weight": 2.0}, "unknown setting 'coating_weight'"),  # a multistage setting
    ],
)
def test_bad_region_settings_fail_before_any_work(options, message):
    with pytest.raises(UsageError, match=message):
        RegionSettings(**options)
    with pytest.raises(UsageError, match=message):
        region_segmentation(np.zeros((4, 4)), ROI_PHASES, **options)


def test_region_settings_object_and_keywords_agree_and_are_reported():
    gray = render_gray(fib_sem_roi((2e-6, 3e-6), seed=2), shine_through=1.0, seed=12)
    order = ["pore", "sei", "si"]
    by_object = region_segmentation(gray, ROI_PHASES, RegionSettings(scale=50.0, denoise="none"), order=order)
    by_keywords = region_segmentation(gray, ROI_PHASES, order=order, scale=50.0, denoise="none")
    np.testing.assert_array_equal(by_object.labels.array, by_keywords.labels.array)
    assert by_object.info["settings"] == RegionSettings(scale=50.0, denoise="none").to_dict()
    assert by_object.info["felzenszwalb"]["scale"] == 50.0
    finer = region_segmentation(gray, ROI_PHASES, order=order, scale=5.0, denoise="none")
    assert finer.info["regions_per_slice"]["mean"] > by_object.info["regions_per_slice"]["mean"]
