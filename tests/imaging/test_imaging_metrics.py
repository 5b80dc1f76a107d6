"""Image metrics on generated images with analytic answers (anisotropic voxels throughout)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.spatial.distance import directed_hausdorff

from fem_anode.errors import InputError, UsageError
from fem_anode.imaging.metrics import (
    compute_metrics,
    connections_per_depth,
    geodesic_tortuosity,
    phase_fractions,
    pore_perimeter,
    pore_si_distance,
    pore_surface_area,
    relative_change,
    si_particles,
    tortuosity_field,
)
from fem_anode.imaging.synthetic import anode_volume, fib_sem_roi
from fem_anode.io.images import VoxelImage

PHASES = {"pore": 0, "si": 1, "sei": 3}
# Anisotropic voxels as in FIB-SEM (40 nm slices, 20 nm pixels) and a second, odd one.
VOXELS = [(40e-9, 20e-9, 20e-9), (0.5e-6, 0.65e-6, 0.8e-6)]


def _coords(shape, voxel):
    return np.meshgrid(*[np.arange(n) * h for n, h in zip(shape, voxel)], indexing="ij")


def _cylinders(shape, voxel, centres_yx, radius):
    labels = np.full(shape, PHASES["sei"], dtype=np.uint8)
    _, y, x = _coords(shape, voxel)
    for cy, cx in centres_yx:
        labels[(y - cy) ** 2 + (x - cx) ** 2 <= radius**2] = PHASES["pore"]
    return VoxelImage(labels, voxel, dict(PHASES))


@pytest.mark.parametrize("voxel", VOXELS)
def test_straight_cylinders_tortuosity_one_and_connections(voxel):
    shape = (24, 40, 40)
    hy = voxel[1]
    centres = [(10 * hy, 10 * hy), (10 * hy, 29 * hy), (29 * hy, 20 * voxel[2] * 1.0)]
    image = _cylinders(shape, voxel, centres, radius=4.2 * min(voxel[1:]))
    tort = geodesic_tortuosity(image)
    per_depth = np.array(tort["per_depth_mean"])
    assert np.all(np.abs(per_depth - 1.0) <= 0.02)  # the criterion; here it is exact
    np.testing.assert_allclose(per_depth, 1.0, rtol=1e-12)
    assert tort["unreachable_fraction"]["overall"] == 0.0
    assert tort["mean"] == pytest.approx(1.0, rel=1e-12)
    np.testing.assert_allclose(tort["depth_m"], np.arange(shape[0]) * voxel[0])
    conn = connections_per_depth(image)
    assert conn["profile"] == [3] * shape[0]
    assert conn["total_profile"] == [3] * shape[0]


def test_blocked_cylinder_is_unreachable_not_dropped():
    voxel = VOXELS[0]
    image = _cylinders(
        (20, 30, 30), voxel, [(8 * voxel[1], 8 * voxel[2]), (20 * voxel[1], 20 * voxel[2])], 3.5 * voxel[1]
    )
    labels = image.array.copy()
    _, y, x = _coords(labels.shape, voxel)
    second = labels == PHASES["pore"]
    second &= (y - 20 * voxel[1]) ** 2 + (x - 20 * voxel[2]) ** 2 <= (3.5 * voxel[1]) ** 2
    second[:5] = False  # the second cylinder starts at z = 5: closed to the surface
    labels[:5][
        (labels[:5] == PHASES["pore"])
        & ((y[:5] - 20 * voxel[1]) ** 2 + (x[:5] - 20 * voxel[2]) ** 2 <= (3.5 * voxel[1]) ** 2)
    ] = PHASES["sei"]
    image = VoxelImage(labels, voxel, dict(PHASES))
    geodesic, tau = tortuosity_field(image)
    pore = labels == PHASES["pore"]
    assert np.all(np.isinf(tau[second])) and np.all(np.isinf(geodesic[second]))
    assert np.all(np.isnan(tau[~pore]))
    tort = geodesic_tortuosity(image, field=tau)
    expected = second.sum() / pore.sum()
    assert tort["unreachable_fraction"]["overall"] == pytest.approx(expected, rel=1e-12)
    per_depth_unreachable = np.array(tort["unreachable_fraction"]["per_depth"])
    np.testing.assert_allclose(per_depth_unreachable[:5], 0.0)
    np.testing.assert_allclose(per_depth_unreachable[5:], 0.5, rtol=1e-12)  # two equal discs per slice
    np.testing.assert_allclose(tort["per_depth_mean"], 1.0, rtol=1e-12)  # finite values only
    assert tort["unreachable_voxels"] == int(second.sum())
    conn = connections_per_depth(image, field=tau)
    assert conn["profile"] == [1] * 20
    assert conn["total_profile"] == [1] * 5 + [2] * 15


@pytest.mark.parametrize("voxel", [(1e-6, 1e-6, 1e-6), (40e-9, 20e-9, 30e-9), (0.5e-6, 0.65e-6, 1.3e-6)])
def test_zigzag_pore_has_tortuosity_of_its_geometry(voxel):
    """A channel stepping one voxel in x per slice, reversing every 6 slices: tau = 1/cos(theta)."""
    nz, period = 30, 6
    z = np.arange(nz)
    phase = z % (2 * period)
    x = np.where(phase < period, phase, 2 * period - phase) + 2
    labels = np.full((nz, 3, period + 5), PHASES["sei"], dtype=np.uint8)
    labels[z, 1, x] = PHASES["pore"]
    image = VoxelImage(labels, voxel, dict(PHASES))
    hz, hx = voxel[0], voxel[2]
    expected = math.hypot(hz, hx) / hz
    tort = geodesic_tortuosity(image)
    per_depth = np.array(tort["per_depth_mean"])
    np.testing.assert_allclose(per_depth[1:], expected, rtol=1e-9)
    assert tort["mean"] == pytest.approx(expected, rel=1e-9)
    # a straight channel in the same box is not tortuous: the metric really measures the path
    straight = np.full_like(labels, PHASES["sei"])
    straight[:, 1, 4] = PHASES["pore"]
    assert geodesic_tortuosity(VoxelImage(straight, voxel, dict(PHASES)))["mean"] == pytest.approx(1.0)


def test_serpentine_pore_matches_polyline_length():
    """Vertical runs joined by horizontal runs: geodesic = polyline length minus the corner cuts."""
    hz, hx = 2e-7, 1e-7
    a, b, turns = 8, 6, 3
    labels = np.full((a * (turns + 1) + 1, 3, b + 5), PHASES["sei"], dtype=np.uint8)
    xs = [2, 2 + b]
    for k in range(turns + 1):
        labels[k * a : (k + 1) * a + 1, 1, xs[k % 2]] = PHASES["pore"]
        if k < turns:
            labels[(k + 1) * a, 1, 2 : 2 + b + 1] = PHASES["pore"]
    image = VoxelImage(labels, (hz, hx, hx), dict(PHASES))
    geodesic, tau = tortuosity_field(image)
    diagonal = math.hypot(hz, hx)
    for k in range(turns + 1):
        for z in range(k * a + 1 if k else 1, (k + 1) * a):
            # k horizontal runs so far, each entered and left by a diagonal step (corner cut)
            polyline = z * hz + k * b * hx
            expected = polyline - 2 * k * (hz + hx - diagonal)
            assert geodesic[z, 1, xs[k % 2]] == pytest.approx(expected, rel=1e-9)
            assert tau[z, 1, xs[k % 2]] == pytest.approx(expected / (z * hz), rel=1e-9)
            # and within one diagonal per corner of the continuum polyline
            assert abs(geodesic[z, 1, xs[k % 2]] - polyline) <= 2 * k * diagonal + 1e-18


def _spheres(shape, voxel, centres, radius, phase="si", background="sei"):
    labels = np.full(shape, PHASES[background], dtype=np.uint8)
    z, y, x = _coords(shape, voxel)
    for c in centres:
        labels[(z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 <= radius**2] = PHASES[phase]
    return labels


@pytest.mark.parametrize("voxel", [(0.1e-6,) * 3, (0.15e-6, 0.1e-6, 0.1e-6)])
def test_spheres_surface_area_and_equivalent_diameter(voxel):
    r = 1.2e-6
    shape = tuple(round(3.2 * r / h) * 2 for h in voxel)
    shape = (shape[0], shape[1], shape[2] * 2)
    extent = [n * h for n, h in zip(shape, voxel)]
    centres = [(extent[0] / 2, extent[1] / 2, extent[2] / 4), (extent[0] / 2, extent[1] / 2, 3 * extent[2] / 4)]
    as_pore = VoxelImage(_spheres(shape, voxel, centres, r, phase="pore"), voxel, dict(PHASES))
    area = pore_surface_area(as_pore)
    assert area == pytest.approx(2 * 4 * math.pi * r**2, rel=0.03)
    as_si = VoxelImage(_spheres(shape, voxel, centres, r, phase="si"), voxel, dict(PHASES))
    particles = si_particles(as_si)
    assert particles["count"] == 2
    np.testing.assert_allclose(particles["equivalent_diameters_m"], 2 * r, rtol=0.03)
    assert particles["mean_equivalent_diameter_m"] == pytest.approx(2 * r, rel=0.03)
    assert abs(particles["max_extent_m"] - 2 * r) <= max(voxel)
    # per slice: every slice through the spheres holds two discs
    counts = np.array(particles["per_slice"]["count"]["profile"])
    z_centres = np.arange(shape[0]) * voxel[0]
    through = np.abs(z_centres - centres[0][0]) < r - voxel[0]
    assert np.all(counts[through] == 2) and np.all(counts[np.abs(z_centres - centres[0][0]) > r] == 0)
    slice_area = extent[1] * extent[2]
    assert particles["count_per_area_m2"] == pytest.approx(counts.mean() / slice_area)


def test_surface_area_of_a_slab_with_anisotropic_voxels():
    voxel = (0.3e-6, 0.2e-6, 0.1e-6)
    labels = np.full((20, 16, 24), PHASES["sei"], dtype=np.uint8)
    labels[:7] = PHASES["pore"]
    image = VoxelImage(labels, voxel, dict(PHASES))
    # one plane (the image faces are not surface): its area is the slice area
    assert pore_surface_area(image) == pytest.approx(16 * 0.2e-6 * 24 * 0.1e-6, rel=0.08)
    # the marching-cubes plane is clipped half a voxel at the image border, hence the 8 %
    assert pore_surface_area(image) == pytest.approx(15 * 0.2e-6 * 23 * 0.1e-6, rel=1e-6)


def test_disc_perimeter_2d_anisotropic():
    voxel = (0.05e-6, 0.1e-6)
    r = 1.5e-6
    y, x = _coords((120, 60), voxel)
    labels = np.where((y - 3e-6) ** 2 + (x - 3e-6) ** 2 <= r**2, PHASES["pore"], PHASES["sei"]).astype(np.uint8)
    assert pore_perimeter(VoxelImage(labels, voxel, dict(PHASES))) == pytest.approx(2 * math.pi * r, rel=0.03)


@pytest.mark.parametrize("voxel", [(0.2e-6, 0.1e-6, 0.1e-6), (0.1e-6, 0.1e-6, 0.1e-6)])
def test_distances_pore_slab_to_spheres(voxel):
    shape = (60, 30, 50)
    h = np.array(voxel)
    labels = np.full(shape, PHASES["sei"], dtype=np.uint8)
    slab_top = 5  # pore voxels z = 0..4; slab face (last pore voxel centre) at 4 h_z
    labels[:slab_top] = PHASES["pore"]
    r = 0.8e-6
    face = (slab_top - 1) * voxel[0]
    gaps = [1.0e-6, 2.5e-6]  # sphere surface to slab face
    centres = [(face + g + r, 15 * voxel[1], (12 + 25 * i) * voxel[2]) for i, g in enumerate(gaps)]
    labels[_spheres(shape, voxel, centres, r) == PHASES["si"]] = PHASES["si"]
    image = VoxelImage(labels, voxel, dict(PHASES))
    d = pore_si_distance(image)
    one_voxel = float(h.max())
    assert abs(d["per_particle_min"]["mean_m"] - np.mean(gaps)) <= one_voxel
    assert abs(d["per_particle_min"]["max_m"] - max(gaps)) <= one_voxel
    assert abs(d["max_m"] - (max(gaps) + 2 * r)) <= one_voxel
    assert abs(d["mean_m"] - (np.mean(gaps) + r)) <= one_voxel
    counts = np.array(d["histogram"]["counts"])
    assert counts.sum() == d["surface_points"] > 0
    # symmetric Hausdorff distance against a brute-force computation on the surface points
    z, y, x = _coords(shape, voxel)
    points = np.stack([z, y, x], axis=-1)
    from scipy import ndimage

    si = labels == PHASES["si"]
    pore = labels == PHASES["pore"]
    si_surf = si & ~ndimage.binary_erosion(si, border_value=1)
    pore_surf = pore & ~ndimage.binary_erosion(pore, border_value=1)
    expected = max(
        directed_hausdorff(points[si_surf], points[pore_surf])[0],
        directed_hausdorff(points[pore_surf], points[si_surf])[0],
    )
    assert d["hausdorff_m"] == pytest.approx(expected, rel=1e-9)
    assert d["max_m"] == pytest.approx(directed_hausdorff(points[si_surf], points[pore])[0], rel=1e-9)


def test_particle_box_volume_and_extent_anisotropic():
    voxel = (0.3e-6, 0.2e-6, 0.1e-6)
    labels = np.full((20, 20, 20), PHASES["sei"], dtype=np.uint8)
    labels[2:6, 3:12, 5:8] = PHASES["si"]  # 4 x 9 x 3 voxels
    labels[10:12, 10:12, 10:20] = PHASES["si"]  # 2 x 2 x 10, touches the border
    image = VoxelImage(labels, voxel, dict(PHASES))
    p = si_particles(image)
    volumes = sorted([4 * 9 * 3 * np.prod(voxel), 2 * 2 * 10 * np.prod(voxel)])
    np.testing.assert_allclose(p["equivalent_diameters_m"], np.cbrt(6 * np.array(volumes) / np.pi), rtol=1e-12)
    assert p["max_extent_m"] == pytest.approx(max(9 * 0.2e-6, 10 * 0.1e-6, 2 * 0.3e-6))
    assert p["mean_extent_m"] == pytest.approx((1.8e-6 + max(0.6e-6, 0.4e-6, 1.0e-6)) / 2)


def test_fractions_sum_to_one_and_compute_metrics_keys():
    image = anode_volume((16, 32, 32), seed=3)
    fractions = phase_fractions(image)
    assert sum(fractions.values()) == pytest.approx(1.0, abs=1e-12)
    m = compute_metrics(image)
    for key in (
        "image",
        "phase_fractions",
        "per_slice",
        "si_particles",
        "pore_surface_area_m2",
        "tortuosity",
        "connections_per_depth",
        "pore_si_distance",
        "not_applicable",
        "timings_s",
    ):
        assert key in m
    assert m["not_applicable"] == {}
    profiles = np.array([m["per_slice"][p]["profile"] for p in image.phases])
    np.testing.assert_allclose(profiles.sum(axis=0), 1.0)
    assert len(m["tortuosity"]["per_depth_mean"]) == image.shape[0]
    assert len(m["connections_per_depth"]["profile"]) == image.shape[0]
    assert m["pore_si_distance"]["max_m"] <= m["pore_si_distance"]["hausdorff_m"] + 1e-18
    assert m["pore_si_distance"]["mean_m"] <= m["pore_si_distance"]["max_m"]


def test_metrics_scale_with_voxel_size():
    """Stretching z by 2: areas and lengths change as geometry says, counts do not."""
    base = anode_volume((16, 24, 24), seed=5)
    stretched = base.with_metadata(voxel_size=(2 * base.voxel_size[0], base.voxel_size[1], base.voxel_size[2]))
    a, b = compute_metrics(base), compute_metrics(stretched)
    assert a["phase_fractions"] == b["phase_fractions"]
    assert a["si_particles"]["count"] == b["si_particles"]["count"]
    assert b["si_particles"]["mean_equivalent_diameter_m"] == pytest.approx(
        2 ** (1 / 3) * a["si_particles"]["mean_equivalent_diameter_m"], rel=1e-12
    )
    assert b["connections_per_depth"]["profile"] == a["connections_per_depth"]["profile"]
    assert b["tortuosity"]["depth_m"] == pytest.approx([2 * d for d in a["tortuosity"]["depth_m"]])
    # a larger z spacing makes lateral detours relatively shorter: tortuosity decreases
    assert b["tortuosity"]["mean"] < a["tortuosity"]["mean"]
    assert a["pore_surface_area_m2"] < b["pore_surface_area_m2"] < 2 * a["pore_surface_area_m2"]


def test_2d_analogues_and_not_applicable():
    roi = fib_sem_roi(size=(3e-6, 2e-6), seed=1)
    m = compute_metrics(roi)
    assert m["pore_surface_area_m2"] is None
    assert "pore_surface_area_m2" in m["not_applicable"]
    assert m["pore_perimeter_m"] > 0
    assert len(m["per_slice"]["pore"]["profile"]) == roi.shape[0]
    assert m["si_particles"]["count_per_area_m2"] == pytest.approx(m["si_particles"]["count"] / (3e-6 * 2e-6), rel=1e-9)
    assert len(m["tortuosity"]["per_depth_mean"]) == roi.shape[0]


def test_missing_phases_are_reported_not_applicable():
    labels = np.zeros((8, 10, 10), dtype=np.uint8)
    labels[:, :, 5:] = 1
    m = compute_metrics(VoxelImage(labels, (1e-6,) * 3, {"pore": 0, "solid": 1}))
    assert m["si_particles"] is None and m["pore_si_distance"] is None
    assert set(m["not_applicable"]) == {"si_particles", "pore_si_distance"}
    np.testing.assert_allclose(m["tortuosity"]["per_depth_mean"], 1.0)
    with pytest.raises(UsageError):
        si_particles(VoxelImage(labels, (1e-6,) * 3, {"pore": 0, "solid": 1}))


def test_relative_change_of_phase_volume():
    voxel = (1e-6,) * 3
    ref = np.full((10, 10, 10), PHASES["sei"], dtype=np.uint8)
    ref[:, :, :4] = PHASES["pore"]
    ref[5, 5, 6] = PHASES["si"]
    aged = ref.copy()
    aged[:, :, 2:4] = PHASES["sei"]  # pore volume halves, intermediate domain grows by 2/6 - 1/6... exactly
    m_ref = compute_metrics(VoxelImage(ref, voxel, dict(PHASES)))
    m = compute_metrics(VoxelImage(aged, voxel, dict(PHASES)), reference=VoxelImage(ref, voxel, dict(PHASES)))
    change = m["relative_change"]["phase_volume"]
    assert change["pore"] == pytest.approx(-0.5)
    assert change["si"] == pytest.approx(0.0)
    n_sei_ref = 1000 - 400 - 1
    assert change["sei"] == pytest.approx((n_sei_ref + 200) / n_sei_ref - 1)
    assert m["relative_change"] == relative_change(m, m_ref)
    # pore slab moved away from the Si voxel by 2 voxels: distance 3 -> 5 um
    assert m_ref["pore_si_distance"]["mean_m"] == pytest.approx(3e-6)
    assert m["relative_change"]["pore_si_distance_mean_m"] == pytest.approx(5 / 3 - 1)
    assert m["relative_change"]["pore_surface_area"] == pytest.approx(0.0, abs=1e-9)


def test_metrics_object_names_dict_json_and_plot(tmp_path):
    """The result object: attributes under unambiguous names over the metrics.json layout,
    a JSON round trip, the reference's relative change, an overview figure and the CLI's files."""
    from fem_anode.imaging.metrics import Metrics
    from fem_anode.io.output import write_json

    pristine, aged = anode_volume((12, 24, 24), seed=3), anode_volume((12, 24, 24), seed=3, aged=True)
    m = Metrics.compute(aged, reference=pristine)
    raw = compute_metrics(aged, reference=compute_metrics(pristine))
    assert m.phase_fractions == raw["phase_fractions"] and m.geodesic_tortuosity == raw["tortuosity"]
    assert m.connections_per_depth == raw["connections_per_depth"] and m.si_particles == raw["si_particles"]
    assert (
        m.relative_change == raw["relative_change"]
        and m.reference.phase_fractions == raw["reference"]["phase_fractions"]
    )
    assert m.tortuosity_factor == {} and m.tortuosity_factor_details == {}
    # the geodesic tortuosity field is the path length over the straight depth: 1 in slice 0's pores
    tortuosity = m.fields["tortuosity"]
    assert tortuosity.shape == aged.shape and np.all(tortuosity[np.isfinite(tortuosity)] >= 1 - 1e-12)
    write_json(tmp_path / "metrics.json", {"provenance": {"command": "test"}, **m.to_dict()})
    again = Metrics.from_json(tmp_path / "metrics.json")
    assert again.phase_fractions == m.phase_fractions and again.relative_change == m.relative_change
    assert "provenance" not in again.to_dict()
    figure = m.plot(tmp_path / "overview.png")
    assert len(figure.axes) == 4 and (tmp_path / "overview.png").stat().st_size > 10_000
    try:  # every rank writes its own copy (tmp_path is per rank); rank 0 of COMM_WORLD would write alone
        from mpi4py import MPI

        own = MPI.COMM_SELF
    except ImportError:
        own = None
    out = m.save(tmp_path / "out", render=False, fields=True, comm=own)
    for name in ("metrics.json", "reference_metrics.json", "report.html", "per_slice.png", "tortuosity.npy"):
        assert (out / name).is_file(), name
    with pytest.raises(InputError, match="not a metrics record"):
        Metrics({"phase_fractions": {}})
