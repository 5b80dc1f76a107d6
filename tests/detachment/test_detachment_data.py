"""CSV input of the detachment study: good files round-trip, bad ones give one clear InputError."""

from __future__ import annotations

import numpy as np
import pytest

from fem_anode.detachment import (
    CapacityData,
    GapData,
    read_capacity_csv,
    read_gap_csv,
    read_radii_csv,
    write_capacity_csv,
    write_gap_csv,
)
from fem_anode.errors import InputError


def test_gap_csv_round_trip(tmp_path):
    data = GapData(np.array([0, 1, 1, 3]), np.array([1e-6, 2e-6, 0.5e-6, 1.5e-6]), np.array([0.0, 3e-7, 1e-7, 6e-7]))
    path = write_gap_csv(tmp_path / "g.csv", data)
    back = read_gap_csv(path)
    np.testing.assert_array_equal(back.cycle, data.cycle)
    np.testing.assert_allclose(back.radius_m, data.radius_m, rtol=1e-9)
    np.testing.assert_allclose(back.gap_m, data.gap_m, rtol=1e-9)
    assert back.cycles() == [0, 1, 3]
    # the radius column of a gap CSV is a valid radii file
    np.testing.assert_allclose(read_radii_csv(path), data.radius_m, rtol=1e-9)


def test_extra_columns_comments_and_column_order_are_accepted(tmp_path):
    path = tmp_path / "g.csv"
    path.write_text("# measured by hand\ngap_m,particle,radius_m,cycle\n2e-7,a,1e-6,1\n\n3e-7,b,2e-6,3\n")
    data = read_gap_csv(path)
    assert data.size == 2 and data.cycle.tolist() == [1, 3]
    np.testing.assert_allclose(data.gap_m, [2e-7, 3e-7])


def test_capacity_csv_round_trip(tmp_path):
    cap = CapacityData(np.arange(4), np.array([1.0, 0.8, 0.6, 0.5]))
    back = read_capacity_csv(write_capacity_csv(tmp_path / "c.csv", cap))
    np.testing.assert_allclose(back.capacity_fraction, cap.capacity_fraction)


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty file"),
        ("   \n\n", "empty file"),
        ("cycle,radius_m,gap_m\n", "no data rows"),
        ("cycle,radius_m\n1,1e-6\n", "missing column.*gap_m"),
        ("cycle;radius_m;gap_m\n1;1e-6;1e-7\n", "missing column"),
        ("cycle,radius_m,gap_m\n1,-1e-6,1e-7\n", "radius_m must be positive"),
        ("cycle,radius_m,gap_m\n1,0,1e-7\n", "radius_m must be positive"),
        ("cycle,radius_m,gap_m\n1,1e-6,nan\n", "row 2, column gap_m"),
        ("cycle,radius_m,gap_m\n1,1e-6,1e-7\n3,NaN,1e-7\n", "row 3, column radius_m"),
        ("cycle,radius_m,gap_m\n1,1e-6,inf\n", "finite"),
        ("cycle,radius_m,gap_m\n1,1e-6,abc\n", "'abc' is not a number"),
        ("cycle,radius_m,gap_m\n1,1e-6\n", "row 2 has 2 field"),
        ("cycle,radius_m,gap_m\n1,1e-6,-2e-7\n", "gap_m must be non-negative"),
        ("cycle,radius_m,gap_m\n1.5,1e-6,2e-7\n", "cycle must be a non-negative integer"),
        ("cycle,radius_m,gap_m\n-1,1e-6,2e-7\n", "cycle must be a non-negative integer"),
    ],
)
def test_bad_gap_csv_gives_clear_input_error(tmp_path, text, message):
    path = tmp_path / "gaps.csv"
    path.write_text(text)
    with pytest.raises(InputError, match=message) as info:
        read_gap_csv(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty file"),
        ("cycle,capacity\n0,1\n", "missing column.*capacity_fraction"),
        ("cycle,capacity_fraction\n0,1\n1,nan\n", "row 3"),
        ("cycle,capacity_fraction\n0,1\n1,-0.2\n", r"\[0, 1.5\]"),
        ("cycle,capacity_fraction\n0,1\n0,0.9\n", "appears twice"),
    ],
)
def test_bad_capacity_csv_gives_clear_input_error(tmp_path, text, message):
    path = tmp_path / "cap.csv"
    path.write_text(text)
    with pytest.raises(InputError, match=message):
        read_capacity_csv(path)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_gap_csv(tmp_path / "nope.csv")
    with pytest.raises(InputError, match="directory"):
        read_gap_csv(tmp_path)


def test_gapdata_validates_arrays():
    with pytest.raises(InputError, match="empty"):
        GapData(np.array([], dtype=int), np.array([]), np.array([]))
    with pytest.raises(InputError, match="equal length"):
        GapData(np.array([1, 2]), np.array([1e-6]), np.array([1e-7]))
    with pytest.raises(InputError, match="NaN"):
        GapData(np.array([1]), np.array([1e-6]), np.array([np.nan]))
