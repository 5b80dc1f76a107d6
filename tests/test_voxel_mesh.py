"""Voxel meshes: counts, tags and interfaces are exactly those of the image."""

from __future__ import annotations

import numpy as np
import pytest

from fem_anode.errors import UsageError
from fem_anode.io import VoxelImage
from fem_anode.meshing import BOX_SIDE_TAGS, interface_tag, phase_tag, voxel_mesh_data


def two_phase_2d() -> VoxelImage:
    labels = np.zeros((4, 6), dtype=np.uint8)
    labels[:, 4:] = 3  # columns 4,5 are "sei"
    labels[1, 1] = 1  # one "si" pixel inside the pore region
    return VoxelImage(labels, (2e-8, 1e-8), {"pore": 0, "si": 1, "sei": 3})


def test_counts_and_groups_2d():
    data = voxel_mesh_data(two_phase_2d())
    assert data.cells.shape == (24, 4)
    assert data.points.shape == (5 * 7, 2)
    assert np.count_nonzero(data.cell_tags == phase_tag(1)) == 1
    # pore|sei: one vertical unit edge per row; pore|si: the 4 edges of the si pixel.
    assert np.count_nonzero(data.facet_tags == interface_tag(0, 3)) == 4
    assert np.count_nonzero(data.facet_tags == interface_tag(0, 1)) == 4
    assert np.count_nonzero(data.facet_tags == BOX_SIDE_TAGS["top"]) == 6
    assert np.count_nonzero(data.facet_tags == BOX_SIDE_TAGS["left"]) == 4
    assert set(data.groups) == {"pore", "si", "sei", "pore|sei", "pore|si", "left", "right", "top", "bottom"}


def test_dropped_phase_keeps_interface_as_boundary():
    data = voxel_mesh_data(two_phase_2d(), keep=["sei"])
    assert data.cells.shape[0] == 8
    interface = data.facets[data.facet_tags == interface_tag(0, 3)]
    x = data.points[interface][..., 0]
    np.testing.assert_allclose(x, 4 * 1e-8)  # column 4 at x = 4 * pixel width (x is the last axis)
    assert "pore|si" not in data.groups and "left" not in data.groups


def test_interface_facets_lie_exactly_between_the_two_phases_3d():
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 3, size=(5, 6, 7)).astype(np.uint8)
    image = VoxelImage(labels, (3e-8, 2e-8, 1e-8), {"a": 0, "b": 1, "c": 2})
    data = voxel_mesh_data(image)
    h = np.array([1e-8, 2e-8, 3e-8])  # x, y, z spacing
    for la, lb in [(0, 1), (0, 2), (1, 2)]:
        facets = data.facets[data.facet_tags == interface_tag(la, lb)]
        centres = data.points[facets].mean(axis=1) / h  # in voxel units, x y z
        normal_axis = np.argmax(np.ptp(data.points[facets], axis=1) == 0, axis=1)
        for centre, axis in zip(centres, normal_axis):
            lo, hi = centre.copy(), centre.copy()
            lo[axis] -= 0.5
            hi[axis] += 0.5
            pair = {labels[tuple(np.floor(p[::-1]).astype(int))] for p in (lo, hi)}
            assert pair == {la, lb}
        # and every face between those labels is there
        expected = sum(
            np.count_nonzero(
                np.isin(np.stack([np.take(labels, range(n - 1), ax), np.take(labels, range(1, n), ax)]), [la, lb]).all(
                    0
                )
                & (np.take(labels, range(n - 1), ax) != np.take(labels, range(1, n), ax))
            )
            for ax, n in enumerate(labels.shape)
        )
        assert len(facets) == expected
    volume = np.prod(image.extent)
    cell_volume = np.prod(h)
    assert data.cells.shape[0] * cell_volume == pytest.approx(volume)


def test_keep_errors():
    with pytest.raises(UsageError, match="cannot keep phase"):
        voxel_mesh_data(two_phase_2d(), keep=["graphite"])
    image = VoxelImage(np.zeros((3, 3), dtype=np.uint8), (1e-6, 1e-6), {"pore": 0, "si": 1})
    with pytest.raises(UsageError, match="have no voxels"):
        voxel_mesh_data(image, keep=["si"])
