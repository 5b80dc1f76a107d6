"""Ray-traced gap measurement (2D/3D) on images with a known gap, and the stereological conversion."""

from __future__ import annotations

import numpy as np
import pytest

from fem_anode.detachment import DETACHMENT_PHASES, gapped_electrode
from fem_anode.errors import InputError, UsageError
from fem_anode.imaging.gaps import expected_section_gap, measure_gaps, section_to_3d
from fem_anode.io.images import VoxelImage

H = 50e-9  # voxel edge


def shell_image(shape, radius, gap, *, sei=0.0, blocked_half=False):
    """One Si ball at the centre, gap shell (SEI then pore), CBD beyond; optional graphite wall."""
    centre = (np.asarray(shape) - 1) / 2.0
    grid = np.indices(shape).astype(float)
    dist = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre))) * H
    labels = np.full(shape, DETACHMENT_PHASES["cbd"], dtype=np.uint8)
    labels[dist <= radius + gap] = DETACHMENT_PHASES["pore"]
    labels[dist <= radius + sei] = DETACHMENT_PHASES["sei"]
    if blocked_half:
        wall = (grid[-1] > centre[-1]) & (dist > radius) & (dist <= radius + 0.5 * gap)
        labels[wall] = DETACHMENT_PHASES["graphite"]
    labels[dist <= radius] = DETACHMENT_PHASES["si"]
    return VoxelImage(labels, (H,) * len(shape), dict(DETACHMENT_PHASES))


@pytest.mark.parametrize("gap", [0.0, 0.2e-6, 0.5e-6])
def test_3d_sphere_with_known_gap(gap):
    image = shell_image((48, 48, 48), 0.6e-6, gap, sei=min(gap, 0.05e-6))
    m = measure_gaps(image)
    assert m.label.size == 1 and m.ndim == 3
    assert m.radius_m[0] == pytest.approx(0.6e-6, rel=0.02)
    assert abs(m.gap_m[0] - gap) < 0.3 * H  # within a third of a voxel
    assert m.n_valid[0] == m.n_rays[0] > 500
    assert m.gap_std_m[0] < 0.5 * H
    assert m.gap_3d_m[0] == m.gap_m[0]  # no conversion in 3D


def test_2d_disc_with_known_gap_and_stereology_flag():
    image = shell_image((80, 80), 1.0e-6, 0.3e-6)
    m = measure_gaps(image)
    assert m.radius_m[0] == pytest.approx(1.0e-6, rel=0.02)
    assert abs(m.gap_m[0] - 0.3e-6) < 0.3 * H
    assert m.radius_3d_m[0] == pytest.approx(4 / np.pi * m.radius_m[0])
    assert m.gap_3d_m[0] < m.gap_m[0]  # oblique sections widen gaps; the conversion narrows them
    raw = measure_gaps(image, stereology=False)
    assert raw.gap_3d_m[0] == raw.gap_m[0]


def test_blocked_rays_are_left_out():
    # A graphite wall fills half of the gap on one side: those rays stop there and give no value.
    image = shell_image((64, 64), 0.8e-6, 0.4e-6, blocked_half=True)
    m = measure_gaps(image)
    assert 0.3 < m.n_valid[0] / m.n_rays[0] < 0.7
    assert abs(m.gap_m[0] - 0.4e-6) < 0.5 * H
    with_graphite_passable = measure_gaps(image, blocking=[])
    assert with_graphite_passable.n_valid[0] == with_graphite_passable.n_rays[0]


def test_section_of_a_gapped_electrode_matches_truth():
    radii = np.array([0.9e-6, 0.7e-6, 0.6e-6, 0.5e-6, 0.4e-6])
    gaps = np.array([0.4e-6, 0.3e-6, 0.2e-6, 0.1e-6, 0.0])
    image, truth = gapped_electrode(
        radii, gaps, shape=(220, 220), voxel_size=H, sei=0.05e-6, seed=3, graphite_fraction=0.05
    )
    m = measure_gaps(image)
    # match measured particles to the true ones by centroid
    dist = np.linalg.norm(m.centroid_m[:, None, :] - truth["centre_m"][None, :, :], axis=-1)
    match = dist.argmin(axis=1)
    assert m.label.size == truth["radius_m"].size
    np.testing.assert_allclose(m.radius_m, truth["section_radius_m"][match], atol=1.5 * H)
    np.testing.assert_allclose(m.gap_m, truth["section_gap_m"][match], atol=0.35 * H)


def test_expected_section_gap_matches_monte_carlo_and_inverts():
    rng = np.random.default_rng(0)
    R, g = 1.3, 0.25
    z = rng.uniform(0, R, 400_000)
    rho = np.sqrt(R**2 - z**2)
    g2 = np.sqrt((R + g) ** 2 - z**2) - rho
    assert rho.mean() == pytest.approx(np.pi * R / 4, rel=2e-3)
    assert g2.mean() == pytest.approx(float(expected_section_gap(R, g)), rel=2e-3)
    # Averages of sections convert back exactly; single sections scatter around the truth.
    R3, g3 = section_to_3d([rho.mean()], [g2.mean()])
    assert R3[0] == pytest.approx(R, rel=3e-3) and g3[0] == pytest.approx(g, rel=1e-2)
    R3, g3 = section_to_3d(rho, g2)
    assert R3.mean() == pytest.approx(R, rel=3e-3)
    assert g3.mean() == pytest.approx(g, rel=0.1)
    assert section_to_3d([1.0], [0.0])[1][0] == 0.0


def test_bad_inputs():
    image = shell_image((32, 32), 0.3e-6, 0.1e-6)
    with pytest.raises(UsageError, match="phase 'cbdx'"):
        measure_gaps(image, cbd="cbdx")
    with pytest.raises(UsageError, match="blocking"):
        measure_gaps(image, blocking=["binder"])
    no_si = VoxelImage(np.full((16, 16), 3, dtype=np.uint8), (H, H), dict(DETACHMENT_PHASES))
    with pytest.raises(InputError, match="no 'si' voxels"):
        measure_gaps(no_si)
    edge = image.array.copy()
    edge[:, :3] = DETACHMENT_PHASES["si"]
    edge[image.array == DETACHMENT_PHASES["si"]] = DETACHMENT_PHASES["pore"]
    with pytest.raises(InputError, match="image border"):
        measure_gaps(VoxelImage(edge, (H, H), dict(DETACHMENT_PHASES)))
    with pytest.raises(InputError):
        section_to_3d([-1.0], [0.1])


def test_anisotropic_voxels():
    # TXTM-like stack with twice the spacing along z: rays march in physical units.
    vs = (100e-9, 50e-9, 50e-9)
    shape = (30, 56, 56)
    grid = np.indices(shape).astype(float)
    centre = (np.asarray(shape) - 1) / 2
    dist = np.sqrt(sum(((g - c) * h) ** 2 for g, c, h in zip(grid, centre, vs)))
    labels = np.full(shape, DETACHMENT_PHASES["cbd"], np.uint8)
    labels[dist <= 0.8e-6] = DETACHMENT_PHASES["pore"]
    labels[dist <= 0.6e-6] = DETACHMENT_PHASES["si"]
    m = measure_gaps(VoxelImage(labels, vs, dict(DETACHMENT_PHASES)))
    assert m.radius_m[0] == pytest.approx(0.6e-6, rel=0.02)
    assert abs(m.gap_m[0] - 0.2e-6) < 0.3 * 50e-9
