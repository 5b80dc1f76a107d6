"""Slab-distributed image analysis equals the whole-volume SciPy result on any number of ranks."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from fem_anode.imaging.slabs import Slab, balanced_bounds, balanced_slab, label_slabs, layer_counts, max_distance_to


def slab_of(comm, nz: int) -> Slab:
    return Slab.from_bounds(np.linspace(0, nz, comm.size + 1).round().astype(int), comm.rank)


@pytest.mark.parametrize("connectivity", [1, 3])
@pytest.mark.parametrize("shape, fraction", [((13, 9, 10), 0.35), ((17, 12), 0.45), ((6, 20, 20), 0.3)])
def test_labels_equal_scipy_on_the_whole_volume(comm, connectivity, shape, fraction):
    """Same labels, same numbering and count; the neighbouring layers are the whole volume's."""
    volume = np.random.default_rng(len(shape) * 10 + connectivity).random(shape) < fraction
    structure = ndimage.generate_binary_structure(len(shape), connectivity)
    expected, count = ndimage.label(volume, structure=structure)
    slab = slab_of(comm, shape[0])
    labels, total, below, above = label_slabs(comm, slab, volume[slab.z0 : slab.z1], structure)
    np.testing.assert_array_equal(labels, expected[slab.z0 : slab.z1])
    assert total == count
    if slab.layers:
        assert (below is None) == (slab.z0 == 0) and (above is None) == (slab.z1 == shape[0])
        if below is not None:
            np.testing.assert_array_equal(below, expected[slab.z0 - 1])
        if above is not None:
            np.testing.assert_array_equal(above, expected[slab.z1])


def test_a_serpentine_crossing_the_slabs_many_times_is_one_component(comm):
    volume = np.zeros((12, 8, 8), dtype=bool)
    volume[:, 1, 1] = True  # down ...
    volume[-1, 1:6, 1] = True  # across ...
    volume[:, 5, 1] = True  # ... and up again
    volume[0, 5:8, 1] = True
    volume[:, 7, 1] = True
    volume[3, 3, 5] = True  # a separate speck, first seen after the serpentine starts
    slab = slab_of(comm, 12)
    labels, total, _, _ = label_slabs(comm, slab, volume[slab.z0 : slab.z1])
    assert total == 2
    serpentine = labels[volume[slab.z0 : slab.z1] & (np.arange(8)[None, None, :] == 1)]
    assert np.all(serpentine == 1)


@pytest.mark.parametrize("halo", [1, 16])
def test_max_distance_equals_the_whole_volume_edt(comm, halo):
    rng = np.random.default_rng(4)
    labels = np.where(rng.random((20, 9, 11)) < 0.02, 0, 3).astype(np.uint8)  # sparse targets: halos must grow
    labels[:, :, -1] = 5  # neither source nor target
    spacing = (2.0, 1.0, 1.5)
    distance = ndimage.distance_transform_edt(labels != 0, sampling=spacing)
    expected = distance[labels == 3].max()
    slab = slab_of(comm, labels.shape[0])
    got = max_distance_to(comm, slab, lambda a, b: labels[a:b], lambda a: a == 3, lambda a: a == 0, spacing, halo=halo)
    assert got == pytest.approx(expected, rel=1e-12)
    assert max_distance_to(comm, slab, lambda a, b: labels[a:b], lambda a: a == 3, lambda a: a == 7, spacing) == np.inf
    assert max_distance_to(comm, slab, lambda a, b: labels[a:b], lambda a: a == 7, lambda a: a == 0, spacing) == 0.0


def test_balanced_bounds_cut_at_the_nearest_layer_boundary():
    counts = np.array([4] * 12 + [36] * 4)  # 192 voxels: 96 each would fall inside layer 13
    np.testing.assert_array_equal(balanced_bounds(counts, 2), [0, 13, 16])  # 84 / 108 (120 / 72 is farther)
    np.testing.assert_array_equal(balanced_bounds(np.ones(9), 3), [0, 3, 6, 9])
    np.testing.assert_array_equal(balanced_bounds(np.zeros(8), 2), [0, 4, 8])  # nothing to balance: equal layers


def test_balanced_slabs_split_the_kept_voxels_evenly(comm):
    """Every rank's slab, from an array or an image with ``read_layers``: the slabs tile the layers
    in rank order and hold about equal numbers of the kept voxels; equal layers when a balanced
    cut would leave a slab thinner than two layers."""
    from fem_anode.io.images import VoxelImage

    labels = np.zeros((16, 6, 6), np.uint8)
    labels[:12, :2, :2] = 3
    labels[12:] = 3
    image = VoxelImage(labels, (1e-7,) * 3, {"pore": 0, "sei": 3})
    np.testing.assert_array_equal(layer_counts(labels, np.array([3]), comm), [4] * 12 + [36] * 4)
    np.testing.assert_array_equal(layer_counts(image, np.array([3]), comm), [4] * 12 + [36] * 4)
    for source in (labels, image):
        slab = balanced_slab(comm, source, 3)
        bounds = comm.allgather((slab.z0, slab.z1))
        assert bounds[0][0] == 0 and bounds[-1][1] == 16
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
        if comm.size == 2:
            assert bounds == [(0, 13), (13, 16)]
    one_layer = np.zeros((8, 4, 4), np.uint8)
    one_layer[-1] = 3  # all the work in one layer: a balanced cut would leave a one-layer slab
    slab = balanced_slab(comm, one_layer, 3)
    assert (slab.z0, slab.z1) == ((8 * comm.rank) // comm.size, (8 * (comm.rank + 1)) // comm.size)


def test_node_plane_counts_are_the_p1_nodes_of_each_slab_start(comm):
    """Per layer z, the nodes of node plane z that are a corner of a kept voxel (the last layer also
    the last plane): equal to a brute-force count on the whole grid of nodes, from an array and from
    an image read by layers; so a slab [z0, z1) owns the nodes the sums of its layers give, and the
    P1 operator of the transporting voxels has that many unknowns plus the copies of split nodes."""
    from fem_anode.imaging.slabs import node_plane_counts
    from fem_anode.io.images import VoxelImage

    labels = np.random.default_rng(3).choice([0, 3, 3], size=(9, 7, 5)).astype(np.uint8)
    labels[4] = 0  # an empty layer: its two node planes see only their other neighbours
    kept = labels == 3
    nodes = np.zeros((10, 8, 6), bool)
    for dz, dy, dx in np.ndindex(2, 2, 2):
        nodes[dz : dz + 9, dy : dy + 7, dx : dx + 5] |= kept
    expected = nodes.reshape(10, -1).sum(axis=1)
    expected = np.concatenate([expected[:8], [expected[8] + expected[9]]])
    image = VoxelImage(labels, (1e-7,) * 3, {"pore": 0, "sei": 3})
    for source in (labels, image):
        np.testing.assert_array_equal(node_plane_counts(source, np.array([3]), comm), expected)
    slab = balanced_slab(comm, labels, 3, weights="nodes")
    bounds = comm.allgather((slab.z0, slab.z1))
    assert bounds[0][0] == 0 and bounds[-1][1] == 9
    if comm.size == 2:  # the cut nearest half of the nodes
        cumulative = np.concatenate([[0], np.cumsum(expected)])
        assert bounds[0][1] == int(np.argmin(np.abs(cumulative - cumulative[-1] / 2)))
