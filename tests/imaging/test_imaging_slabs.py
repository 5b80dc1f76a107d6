"""Slab-distributed image analysis equals the whole-volume SciPy result on any number of ranks."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from fem_anode.imaging.slabs import Slab, label_slabs, max_distance_to


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
