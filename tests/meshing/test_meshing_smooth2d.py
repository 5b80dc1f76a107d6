"""Smooth 2D meshes of images with known geometry (serial gmsh; runs identically on every rank)."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("gmsh")
meshio = pytest.importorskip("meshio")

from fem_anode.errors import InputError, UsageError  # noqa: E402
from fem_anode.io.images import VoxelImage  # noqa: E402
from fem_anode.meshing import BOX_SIDE_TAGS, interface_tag, phase_tag  # noqa: E402
from fem_anode.meshing.build import mesh_image  # noqa: E402
from fem_anode.meshing.smooth2d import SmoothMeshOptions  # noqa: E402

PIXEL = 20e-9
R = 30.0


def disk_image(n: int = 80, r: float = R, centre: tuple[float, float] = (40.3, 39.7)) -> VoxelImage:
    yy, xx = np.mgrid[:n, :n]
    labels = ((xx + 0.5 - centre[0]) ** 2 + (yy + 0.5 - centre[1]) ** 2 < r * r).astype(np.uint8)
    return VoxelImage(labels, (PIXEL, PIXEL), {"pore": 0, "si": 1}, "disk")


def three_phase_image() -> VoxelImage:
    """Pore / Si / SEI with triple junctions, a Si particle with an SEI hole, and a box-touching pore."""
    ny, nx = 60, 90
    yy, xx = np.mgrid[:ny, :nx] + 0.5
    labels = np.full((ny, nx), 3, dtype=np.uint8)  # sei
    labels[(xx - 30) ** 2 + (yy - 30) ** 2 < 18**2] = 1  # si particle
    labels[(xx - 30) ** 2 + (yy - 30) ** 2 < 6**2] = 3  # sei hole inside it (kept)
    labels[(xx - 55) ** 2 + (yy - 20) ** 2 < 12**2] = 0  # pore overlapping the particle: triple junctions
    labels[yy > 52] = 0  # pore band along the bottom
    labels[(xx - 75) ** 2 + (yy - 40) ** 2 < 7**2] = 1  # second particle touching the band
    return VoxelImage(labels, (PIXEL, PIXEL), {"pore": 0, "si": 1, "sei": 3}, "three_phase")


def edges_of(triangles: np.ndarray) -> np.ndarray:
    e = np.concatenate([triangles[:, [0, 1]], triangles[:, [1, 2]], triangles[:, [2, 0]]])
    return np.sort(e, axis=1)


def test_disk_area_and_perimeter_match_the_circle(tmp_path):
    result = mesh_image(
        disk_image(), tmp_path / "disk.msh", options=SmoothMeshOptions(size=3 * PIXEL), quality_path=tmp_path / "q.json"
    )
    q = result.quality
    r = R * PIXEL
    area = q["phase_measure"]["si"]["mesh"]
    perimeter = q["groups"]["pore|si"]["measure"]
    assert abs(area / (np.pi * r**2) - 1) < 0.01
    assert abs(perimeter / (2 * np.pi * r) - 1) < 0.02
    box = (80 * PIXEL) ** 2
    total = q["phase_measure"]["si"]["mesh"] + q["phase_measure"]["pore"]["mesh"]
    assert total == pytest.approx(box, rel=1e-12)
    assert json.loads((tmp_path / "q.json").read_text())["cells"] == q["cells"]
    assert q["min_angle_deg"]["min"] > 20


def test_voxel_staircase_is_27_percent_too_long(tmp_path):
    """The reference the smooth mesher is judged against: the pixel staircase perimeter."""
    q = mesh_image(disk_image(), None, method="voxel").quality
    ratio = q["groups"]["pore|si"]["measure"] / (2 * np.pi * R * PIXEL)
    assert 1.2 < ratio < 1.35


def test_groups_and_tags_in_meshio(tmp_path):
    path = tmp_path / "three.msh"
    mesh_image(three_phase_image(), path, options=SmoothMeshOptions(size=3 * PIXEL))
    m = meshio.read(path)
    names = {name: tuple(v) for name, v in m.field_data.items()}
    expected = {
        "pore": (phase_tag(0), 2),
        "si": (phase_tag(1), 2),
        "sei": (phase_tag(3), 2),
        "pore|si": (interface_tag(0, 1), 1),
        "pore|sei": (interface_tag(0, 3), 1),
        "sei|si": (interface_tag(1, 3), 1),
        **{side: (BOX_SIDE_TAGS[side], 1) for side in ("left", "right", "top", "bottom")},
    }
    assert names == expected
    assert np.allclose(m.points[:, :2].max(axis=0), [90 * PIXEL, 60 * PIXEL], rtol=1e-12, atol=0)


def _interface_check(path, phases):
    """Every tagged interface edge lies between one triangle of each phase, and vice versa."""
    m = meshio.read(path)
    tri = np.concatenate([c.data for c in m.cells if c.type == "triangle"])
    tri_tag = np.concatenate([d for c, d in zip(m.cells, m.cell_data["gmsh:physical"]) if c.type == "triangle"])
    lines = np.concatenate([c.data for c in m.cells if c.type == "line"])
    line_tag = np.concatenate([d for c, d in zip(m.cells, m.cell_data["gmsh:physical"]) if c.type == "line"])
    edges = edges_of(tri)
    owner_tag = np.tile(tri_tag, 3)
    keys, inverse, counts = np.unique(edges, axis=0, return_inverse=True, return_counts=True)
    assert counts.max() <= 2  # no overlaps
    tags_per_edge = np.full((len(keys), 2), -1)
    first = np.full(len(keys), True)
    for i, k in enumerate(inverse.ravel()):
        tags_per_edge[k, 0 if first[k] else 1] = owner_tag[i]
        first[k] = False
    lookup = {tuple(k): i for i, k in enumerate(keys)}
    line_edges = np.sort(lines, axis=1)
    for (a, b), tag in zip(line_edges, line_tag):
        pair = tags_per_edge[lookup[(a, b)]]
        if tag >= 10000:
            lo, hi = divmod(tag - 10000, 256)
            kept = {phase_tag(lo), phase_tag(hi)} & set(phases)
            assert set(pair[pair >= 0]) == kept
    # Conversely: every edge between two different phases is tagged with their interface.
    tagged = {tuple(e): t for e, t in zip(line_edges, line_tag)}
    between = np.nonzero((tags_per_edge[:, 1] >= 0) & (tags_per_edge[:, 0] != tags_per_edge[:, 1]))[0]
    assert between.size > 0 or len(phases) == 1
    for k in between:
        lo, hi = sorted(tags_per_edge[k] - 100)
        assert tagged[tuple(keys[k])] == interface_tag(lo, hi)
    # Boundary edges (one triangle) are all tagged.
    for k in np.nonzero(counts == 1)[0]:
        assert tuple(keys[k]) in tagged


def test_interface_facets_lie_exactly_between_the_two_phases(tmp_path):
    path = tmp_path / "three.msh"
    mesh_image(three_phase_image(), path, options=SmoothMeshOptions(size=3 * PIXEL))
    _interface_check(path, [100, 101, 103])


def test_no_gaps_or_overlaps_and_areas_close_to_pixel_counts(tmp_path):
    image = three_phase_image()
    q = mesh_image(image, tmp_path / "m.msh", options=SmoothMeshOptions(size=2 * PIXEL, order=2)).quality
    areas = {k: v["mesh"] for k, v in q["phase_measure"].items()}
    assert sum(areas.values()) == pytest.approx(90 * 60 * PIXEL**2, rel=1e-12)
    for entry in q["phase_measure"].values():
        assert abs(entry["relative_difference"]) < 0.02
    assert q["scaled_jacobian_minSICN"]["negative"] == 0


def test_dropped_phases_become_tagged_boundaries(tmp_path):
    path = tmp_path / "sei.msh"
    result = mesh_image(three_phase_image(), path, keep=["sei"], options=SmoothMeshOptions(size=3 * PIXEL))
    assert set(result.groups) == {"sei", "pore|sei", "sei|si", "left", "right", "top", "bottom"} - {"bottom"}
    _interface_check(path, [103])
    q = result.quality
    assert q["phase_measure"]["sei"]["relative_difference"] == pytest.approx(0, abs=0.02)
    assert set(q["phase_measure"]) == {"sei"}


def test_halving_the_size_quadruples_the_elements():
    image = disk_image()
    counts = [mesh_image(image, None, options=SmoothMeshOptions(size=h * PIXEL)).quality["cells"] for h in (4.0, 2.0)]
    assert 3.3 < counts[1] / counts[0] < 4.7


def test_refinement_near_interfaces_and_in_gaps():
    """Interface refinement adds elements; a narrow gap is meshed with several elements across."""
    ny, nx = 40, 80
    labels = np.zeros((ny, nx), dtype=np.uint8)
    labels[:, :38] = 1
    labels[:, 41:] = 1  # a 3-pixel pore gap between two si blocks
    image = VoxelImage(labels, (PIXEL, PIXEL), {"pore": 0, "si": 1})
    plain = SmoothMeshOptions(size=8 * PIXEL, interface_ratio=1.0, gap_width=0)
    refined = SmoothMeshOptions(size=8 * PIXEL, interface_ratio=0.25, gap_width=0)
    gap = SmoothMeshOptions(size=8 * PIXEL, interface_ratio=1.0, gap_width=12 * PIXEL)
    n_plain = mesh_image(image, None, options=plain).quality["cells"]
    n_refined = mesh_image(image, None, options=refined).quality["cells"]
    gap_quality = mesh_image(image, None, keep=["pore"], options=gap).quality
    plain_gap = mesh_image(image, None, keep=["pore"], options=plain).quality
    assert n_refined > 1.5 * n_plain
    assert gap_quality["cells"] > 3 * plain_gap["cells"]


def test_small_islands_removed_and_holes_kept():
    n = 60
    yy, xx = np.mgrid[:n, :n] + 0.5
    labels = np.zeros((n, n), dtype=np.uint8)
    labels[(xx - 30) ** 2 + (yy - 30) ** 2 < 20**2] = 1  # particle
    labels[(xx - 30) ** 2 + (yy - 30) ** 2 < 5**2] = 0  # hole of ~78 px inside it: kept
    labels[5:7, 5:7] = 1  # 4-pixel si speck: removed
    labels[40, 30] = 0  # 1-pixel pore speck inside the particle: removed
    image = VoxelImage(labels, (PIXEL, PIXEL), {"pore": 0, "si": 1})
    q = mesh_image(image, None, options=SmoothMeshOptions(size=3 * PIXEL, min_island_pixels=10)).quality
    assert q["cleaning"]["islands_removed"] == 2 and q["cleaning"]["island_pixels"] == 5
    hole = np.count_nonzero((xx - 30) ** 2 + (yy - 30) ** 2 < 5**2) * PIXEL**2
    ring = np.count_nonzero(labels == 1) * PIXEL**2 - 4 * PIXEL**2 + PIXEL**2
    assert q["phase_measure"]["si"]["meshed_labels"] == pytest.approx(ring, rel=1e-12)
    assert q["phase_measure"]["si"]["mesh"] == pytest.approx(ring, rel=0.02)
    assert hole > 0 and q["phase_measure"]["pore"]["mesh"] > hole  # the hole is still pore


@pytest.mark.parametrize(
    ("labels", "keep", "size", "error", "match"),
    [
        (np.zeros((20, 20), np.uint8), ["si"], None, UsageError, "si have no voxels"),
        (np.zeros((20, 20), np.uint8), ["graphite"], None, UsageError, "not in the phase map"),
        (np.zeros((20, 20), np.uint8), [], None, UsageError, "empty"),
        (np.zeros((20, 20), np.uint8), None, 30 * PIXEL, UsageError, "larger than the domain"),
        (np.zeros((1, 20), np.uint8), None, None, InputError, "too small"),
    ],
)
def test_bad_input_gives_clear_errors(labels, keep, size, error, match):
    image = VoxelImage(labels, (PIXEL, PIXEL), {"pore": 0, "si": 1})
    with pytest.raises(error, match=match):
        mesh_image(image, None, keep=keep, options=SmoothMeshOptions(size=size))


def test_bad_options_and_empty_image():
    image = disk_image(20, 5)
    with pytest.raises(UsageError, match="order"):
        mesh_image(image, None, order=3)
    with pytest.raises(UsageError, match="method"):
        mesh_image(image, None, method="marching")
    with pytest.raises(UsageError, match=".msh"):
        mesh_image(image, "mesh.vtk")
    empty = VoxelImage(np.zeros((0, 4), np.uint8), (PIXEL, PIXEL), {"pore": 0})
    with pytest.raises(InputError, match="empty"):
        mesh_image(empty, None)


def test_pixel_noise_and_single_pixels_mesh_without_collapsing():
    """Worst case: random labels. Every region (even single pixels) is meshed, areas tile the box."""
    labels = np.random.default_rng(0).integers(0, 3, (24, 24)).astype(np.uint8)
    image = VoxelImage(labels, (PIXEL, PIXEL), {"a": 0, "b": 1, "c": 2})
    q = mesh_image(image, None, options=SmoothMeshOptions(size=2 * PIXEL)).quality
    areas = [v["mesh"] for v in q["phase_measure"].values()]
    assert sum(areas) == pytest.approx((24 * PIXEL) ** 2, rel=1e-12)
    assert q["scaled_jacobian_minSICN"]["negative"] == 0
    single = np.zeros((9, 9), dtype=np.uint8)
    single[4, 4] = 1
    q = mesh_image(
        VoxelImage(single, (PIXEL, PIXEL), {"a": 0, "b": 1}), None, options=SmoothMeshOptions(size=PIXEL)
    ).quality
    assert q["phase_measure"]["b"]["mesh"] == pytest.approx(0.5 * PIXEL**2, rel=0.05)  # marching-squares diamond


def test_binary_msh_reads_back_the_same(tmp_path):
    image = disk_image(40, 12, (20.2, 19.7))
    mesh_image(image, tmp_path / "a.msh", options=SmoothMeshOptions(size=3 * PIXEL), binary=False)
    mesh_image(image, tmp_path / "b.msh", options=SmoothMeshOptions(size=3 * PIXEL), binary=True)
    a, b = meshio.read(tmp_path / "a.msh"), meshio.read(tmp_path / "b.msh")
    assert a.field_data.keys() == b.field_data.keys()
    assert np.allclose(a.points, b.points, rtol=1e-6, atol=0)
    assert b"4.1 1 8" in (tmp_path / "b.msh").read_bytes()[:40] and b"4.1 0 8" in (tmp_path / "a.msh").read_bytes()[:40]
