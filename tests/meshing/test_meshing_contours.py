"""Boundary network of 2D label images: shared chains, closed loops, cleaning (pure NumPy)."""

from __future__ import annotations

import numpy as np
import pytest

from fem_anode.errors import InputError
from fem_anode.meshing.contours import _signed_area, boundary_network, clean_labels


def loop_points(net, loop):
    return np.concatenate([net.oriented_points(i) for i in loop])


def test_region_loops_tile_the_box_exactly():
    """Loops share their chains, so the region areas (polygon areas) add up to the box."""
    rng = np.random.default_rng(3)
    from scipy import ndimage

    labels = (ndimage.gaussian_filter(rng.standard_normal((40, 50)), 3) * 10).astype(int) % 3
    net = boundary_network(labels, tolerance=0.2)
    total = 0.0
    for region in range(net.n_regions):
        loops = net.loops(region)
        areas = [_signed_area(loop_points(net, lp)) for lp in loops]
        assert areas[0] > 0 and all(a < 0 for a in areas[1:])  # outer loop first, holes negative
        total += sum(areas)
    assert total == pytest.approx(40 * 50, rel=1e-12)
    # Each interface chain is used by exactly its two regions, each box chain by one.
    for ch in net.chains:
        assert ch.left < net.n_regions and ch.left != ch.right


def test_sub_pixel_circle():
    n, r = 64, 20.0
    yy, xx = np.mgrid[:n, :n] + 0.5
    labels = ((xx - 31.7) ** 2 + (yy - 32.2) ** 2 < r * r).astype(np.uint8)
    staircase = boundary_network(labels, sigma=0, tolerance=0)
    smooth = boundary_network(labels, sigma=1.0, tolerance=0.1)
    disk = int(np.nonzero(smooth.region_label == 1)[0][0])

    def perimeter(net):
        pts = loop_points(net, net.loops(disk)[0])
        return np.linalg.norm(np.diff(np.vstack([pts, pts[:1]]), axis=0), axis=1).sum()

    assert abs(perimeter(smooth) / (2 * np.pi * r) - 1) < 0.01
    assert perimeter(staircase) / (2 * np.pi * r) > 1.04  # marching squares on raw labels: 45-degree steps
    assert _signed_area(loop_points(smooth, smooth.loops(disk)[0])) == pytest.approx(np.pi * r * r, rel=0.01)


def test_pinches_are_removed_and_islands_merged():
    labels = np.zeros((8, 8), dtype=np.uint8)
    labels[1:3, 1:3] = labels[3:5, 3:5] = 1  # two 2x2 blocks in diagonal (corner-only) contact
    labels[6, 6] = 2  # single-pixel island
    cleaned, report = clean_labels(labels, min_island_pixels=2)
    assert report.pinch_pixels == 1
    assert report.islands_removed == 1 and cleaned[6, 6] == 0
    assert np.count_nonzero(cleaned == 1) == 9  # the two blocks joined by one more pixel


def test_bad_images():
    with pytest.raises(InputError, match="too small"):
        boundary_network(np.zeros((1, 5), dtype=int))
    with pytest.raises(InputError, match="2D"):
        boundary_network(np.zeros((2, 2, 2), dtype=int))
