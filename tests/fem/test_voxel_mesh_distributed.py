"""Distributed voxel meshes: the same mesh as the serial mesher on any number of ranks, face
connectivity (no Li through edge or corner contacts), and every rank reads only its slab."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("dolfinx")

import ufl  # noqa: E402
from dolfinx import fem  # noqa: E402
from mpi4py import MPI  # noqa: E402

from fem_anode.errors import InputError, UsageError  # noqa: E402
from fem_anode.fem.diffusion import DiffusionProblem, DiffusionSettings, GeometrySettings, Region, TimeSettings  # noqa: E402
from fem_anode.fem.voxel_mesh import create_voxel_mesh, slab_bounds  # noqa: E402
from fem_anode.io import VoxelImage, write_image  # noqa: E402
from fem_anode.io.images import ImageLayers, open_image_layers  # noqa: E402
from fem_anode.meshing import voxel_mesh_data  # noqa: E402

SPACING = (3e-8, 2e-8, 1e-8)  # z, y, x (m): anisotropic on purpose


def random_volume(seed: int = 3, shape=(9, 7, 8)) -> VoxelImage:
    labels = np.random.default_rng(seed).integers(0, 3, size=shape).astype(np.uint8)
    return VoxelImage(labels, SPACING, {"a": 0, "b": 1, "c": 2})


def global_count(comm, local_indices: np.ndarray, size_local: int) -> int:
    return comm.allreduce(int(np.count_nonzero(local_indices < size_local)))


def integral(comm, form) -> float:
    return comm.allreduce(fem.assemble_scalar(fem.form(form)), op=MPI.SUM)


@pytest.mark.parametrize("keep", [None, ["b"], ["a", "c"]])
@pytest.mark.parametrize("ghost_mode", ["none", "shared_facet"])
def test_distributed_mesh_equals_the_serial_one(comm, keep, ghost_mode):
    """Cell, node and tag counts, volume and interface areas as the serial mesher's, exactly."""
    image = random_volume()
    serial = voxel_mesh_data(image, keep)
    tagged = create_voxel_mesh(image, comm, keep, ghost_mode=ghost_mode)
    mesh = tagged.mesh
    tdim = mesh.topology.dim
    assert mesh.topology.index_map(tdim).size_global == serial.cells.shape[0]
    assert mesh.geometry.index_map().size_global == serial.points.shape[0]
    assert tagged.cell_groups == {name: tag for name, (dim, tag) in serial.groups.items() if dim == 3}
    assert tagged.facet_groups == {name: tag for name, (dim, tag) in serial.groups.items() if dim == 2}
    n_facets = mesh.topology.index_map(tdim - 1).size_local
    n_cells = mesh.topology.index_map(tdim).size_local
    ds = ufl.Measure("ds", domain=mesh, subdomain_data=tagged.facet_tags)
    dS = ufl.Measure("dS", domain=mesh, subdomain_data=tagged.facet_tags)
    hz, hy, hx = SPACING
    face_area = {0: hy * hx, 1: hz * hx, 2: hz * hy}  # facets normal to array axis k
    for name, tag in tagged.facet_groups.items():
        selected = serial.facet_tags == tag
        assert global_count(comm, tagged.facet_tags.find(tag), n_facets) == np.count_nonzero(selected), name
        centres = serial.points[serial.facets[selected]]
        normal = [2 - int(np.argmax(np.ptp(c, axis=0) == 0)) for c in centres]  # x -> axis 2
        expected = sum(face_area[k] for k in normal)
        exterior = integral(comm, 1.0 * ds(tag))
        if ghost_mode == "shared_facet" or comm.size == 1:  # dS needs ghost cells across ranks
            assert exterior + integral(comm, 1.0 * dS(tag)) == pytest.approx(expected, rel=1e-12), name
        elif keep is not None and len(keep) == 1:  # one kept phase: every tagged facet is exterior
            assert exterior == pytest.approx(expected, rel=1e-12), name
    for name, tag in tagged.cell_groups.items():
        assert global_count(comm, tagged.cell_tags.find(tag), n_cells) == np.count_nonzero(serial.cell_tags == tag)
    volume = integral(comm, fem.Constant(mesh, 1.0) * ufl.dx)
    assert volume == pytest.approx(serial.cells.shape[0] * hz * hy * hx, rel=1e-12)


@pytest.mark.parametrize(
    "second, nodes",
    [((1, 1, 0), 16), ((1, 1, 1), 16), ((1, 0, 0), 12), ((0, 1, 1), 16)],
    ids=["edge", "corner", "face", "edge-in-plane"],
)
def test_face_connectivity_duplicates_edge_and_corner_contacts(comm, second, nodes):
    """Two voxels sharing a face share 4 nodes; along an edge or at a corner they share none."""
    labels = np.zeros((2, 2, 2), dtype=np.uint8)
    labels[0, 0, 0] = labels[second] = 1
    image = VoxelImage(labels, (1e-6,) * 3, {"pore": 0, "solid": 1})
    assert voxel_mesh_data(image, ["solid"]).points.shape[0] == nodes
    tagged = create_voxel_mesh(image, comm, ["solid"])
    assert tagged.mesh.geometry.index_map().size_global == nodes


def test_no_li_through_a_diagonal_contact(comm):
    """2D: a transporting block fed by a pore touches a second block at one corner only. With
    face connectivity the second block never sees Li: its c stays exactly 0, while the first
    block fills up. (Shared corner nodes would leak Li into it.)"""
    labels = np.zeros((6, 6), dtype=np.uint8)  # 0 = pore
    labels[:3, 1:3] = 3  # block A, column 0 is pore (its source)
    labels[3:, 3:] = 3  # block B: touches A only at the corner (3, 3)
    labels[:, 0] = 0
    labels[3:, :3] = 2  # inert phase around B's other sides, away from the pore
    labels[:3, 3:] = 2
    image = VoxelImage(labels, (1e-7, 1e-7), {"pore": 0, "inert": 2, "sei": 3})
    assert (labels[3:, 3:] == 3).all() and (labels[3:, :3] != 0).all()
    tagged = create_voxel_mesh(image, comm, ["sei"])
    settings = DiffusionSettings(
        geometry=GeometrySettings(mesh="unused.msh"),
        time=TimeSettings(t_end=1e-3, output_times=[1e-3], dt_initial=1e-6),
        regions=[Region(name="A", box=[1e-7, 0.0, 3e-7, 3e-7]), Region(name="B", box=[3e-7, 3e-7, 6e-7, 6e-7])],
    )
    problem = DiffusionProblem(tagged, settings)
    try:
        result = problem.run()
        assert result.region_means["A"][-1] > 0.5 * settings.physics.c_bulk
        assert result.region_means["B"][-1] == 0.0
        B = problem.V.tabulate_dof_coordinates()[:, :2]
        in_b = np.all(B > 3e-7 + 1e-12, axis=1)
        assert comm.allreduce(float(np.abs(problem.c.x.array[in_b]).max(initial=0.0)), op=MPI.MAX) == 0.0
    finally:
        problem.destroy()


@pytest.mark.parametrize("fmt", ["npy", "tif", "folder"])
def test_layered_files_give_the_same_mesh_and_each_rank_reads_its_slab(comm, shared_tmp_path, fmt, monkeypatch):
    image = random_volume(seed=5, shape=(11, 5, 6))
    path = shared_tmp_path / {"npy": "vol.npy", "tif": "vol.tif", "folder": "slices"}[fmt]
    if comm.rank == 0:
        if fmt == "folder":
            path.mkdir()
            for k in range(image.shape[0]):
                write_image(path / f"slice_{k:03d}.npy", image.array[k])
        else:
            write_image(path, image)
    comm.barrier()
    layers = open_image_layers(path, voxel_size=SPACING, phases=image.phases)
    assert isinstance(layers, ImageLayers) and layers.shape == image.shape
    read: list[tuple[int, int]] = []
    original = ImageLayers.read_layers
    monkeypatch.setattr(ImageLayers, "read_layers", lambda self, a, b: read.append((a, b)) or original(self, a, b))
    from_file = create_voxel_mesh(layers, comm, ["a", "b"])
    from_memory = create_voxel_mesh(image, comm, ["a", "b"])
    counts = np.isin(image.array, [0, 1]).reshape(image.shape[0], -1).sum(axis=1)
    bounds = slab_bounds(counts, comm.size) if comm.size > 1 else np.array([0, image.shape[0]])
    z0, z1 = bounds[comm.rank], bounds[comm.rank + 1]
    equal = np.linspace(0, image.shape[0], comm.size + 1).round().astype(int)  # the counting pass
    *counting, (a, b) = read  # on several ranks: an equal share of layers counted first, then the slab
    assert z0 - 2 <= a and b <= z1 + 2
    assert all(equal[comm.rank] <= a and b <= equal[comm.rank + 1] for a, b in counting)
    for a, b in ((from_file, from_memory),):
        assert a.mesh.topology.index_map(3).size_global == b.mesh.topology.index_map(3).size_global
        assert a.facet_groups == b.facet_groups
        for tag in a.facet_groups.values():
            n = a.mesh.topology.index_map(2).size_local
            assert global_count(comm, a.facet_tags.find(tag), n) == global_count(
                comm, b.facet_tags.find(tag), b.mesh.topology.index_map(2).size_local
            )


def test_slabs_balance_the_cells():
    counts = np.array([0, 10, 10, 0, 0, 40, 0, 0])
    np.testing.assert_array_equal(slab_bounds(counts, 1), [0, 8])
    np.testing.assert_array_equal(slab_bounds(counts, 2), [0, 5, 8])  # 20 | 40 cells
    np.testing.assert_array_equal(slab_bounds(np.full(10, 3), 3), [0, 3, 7, 10])  # 9 | 12 | 9: nearest boundaries
    np.testing.assert_array_equal(slab_bounds(np.zeros(4), 2), [0, 2, 4])
    bounds = slab_bounds(np.array([5, 0, 0, 0]), 3)  # more ranks than layers with cells
    assert bounds[0] == 0 and bounds[-1] == 4 and np.all(np.diff(bounds) >= 0)


def test_bad_input_is_named(comm):
    image = random_volume()
    with pytest.raises(UsageError, match="cannot keep phase"):
        create_voxel_mesh(image, comm, ["graphite"])
    with pytest.raises(UsageError, match="ghost_mode"):
        create_voxel_mesh(image, comm, ghost_mode="full")
    labels = image.array.copy()
    labels[-1, -1, -1] = 7  # on the last rank's slab only: every rank must raise
    with pytest.raises(InputError, match=r"label values \[7\]"):
        create_voxel_mesh(VoxelImage(labels, SPACING, image.phases), comm)
    empty = VoxelImage(np.zeros((4, 3, 3), np.uint8), SPACING, {"pore": 0, "si": 1})
    with pytest.raises(UsageError, match="have no voxels"):
        create_voxel_mesh(empty, comm, ["si"])


def test_si_particle_report_from_slabs_equals_the_whole_image_one(comm):
    """3D: particles labelled slab by slab (each facet's particle from the Si voxel across it)
    give the report of the whole-image labelling with nearest-Si-pixel lookup: same ids, same
    interface areas and concentrations."""
    import dataclasses

    from fem_anode.fem.diffusion.particles import si_particle_report

    rng = np.random.default_rng(11)
    labels = np.full((10, 8, 9), 3, np.uint8)
    labels[:, :, :2] = 0  # pore wall at x = 0
    labels[rng.random(labels.shape) < 0.08] = 1  # scattered Si, many particles, some across slabs
    labels[:, :, :2] = 0
    image = VoxelImage(labels, (4e-8, 3e-8, 2e-8), {"pore": 0, "si": 1, "sei": 3})
    tagged = create_voxel_mesh(image, comm, ["sei"])
    settings = DiffusionSettings(
        geometry=GeometrySettings(mesh="unused.msh"),
        time=TimeSettings(t_end=1e-4, output_times=[1e-4], dt_initial=1e-6),
    )
    problem = DiffusionProblem(tagged, settings)
    try:
        problem.run()
        from_slabs = si_particle_report(problem, image)
        problem.tagged = dataclasses.replace(tagged, slab_bounds=None)
        whole = si_particle_report(problem, image)
    finally:
        problem.destroy()
    assert len(from_slabs) == len(whole) > 5
    for a, b in zip(from_slabs, whole, strict=True):
        assert a["id"] == b["id"]
        for key in ("interface_measure_m", "mean", "min", "max", "fraction_above_half_bulk"):
            assert a[key] == pytest.approx(b[key], rel=1e-12, abs=0), key


@pytest.mark.parametrize("voxel_p1", ["mesh", "image"])
def test_cli_diffusion_on_a_3d_image_reads_by_layers(comm, shared_tmp_path, voxel_p1):
    """`fem-anode diffusion` on a 3D .npy: the image is opened by layers, the results carry the
    exact timescale length (whole-image EDT), Si particles, per-rank memory and the fields: on the
    mesh (``voxel_p1 = "mesh"``) the mesh as XDMF and c as VTX, on the voxels VTK images."""
    import json

    from scipy import ndimage

    from fem_anode.cli import main

    rng = np.random.default_rng(2)
    labels = np.full((12, 10, 10), 3, np.uint8)
    labels[rng.random(labels.shape) < 0.05] = 1
    labels[:, :, 0] = 0
    labels[5, 4:7, 0:5] = 0  # a pore finger into the volume
    image = VoxelImage(labels, (5e-8,) * 3, {"pore": 0, "si": 1, "sei": 3})
    write_image(shared_tmp_path / "vol.npy", image)
    config = shared_tmp_path / "vol.toml"
    if comm.rank == 0:
        config.write_text(
            f'[geometry]\nimage = "vol.npy"\n[mesh]\nvoxel_p1 = "{voxel_p1}"\n'
            "[time]\nt_end = 1e-4\noutput_times = [1e-4]\ndt_initial = 1e-6\n"
            '[[regions]]\nname = "deep"\nbox = [2e-7, 0.0, 0.0, 5e-7, 5e-7, 6e-7]\n'
        )
    comm.barrier()
    out = shared_tmp_path / "out"
    assert main(["diffusion", str(config), "--out", str(out), "-q"]) == 0
    results = json.loads((out / "results.json").read_text())
    expected = ndimage.distance_transform_edt(labels != 0, sampling=image.voxel_size)[labels == 3].max()
    assert results["timescales"]["length_m"] == pytest.approx(expected, rel=1e-12)
    assert len(results["si_particles"]["0.0001"]) > 3
    assert len(results["performance"]["peak_memory_bytes_per_rank"]) == comm.size
    written = ("mesh.xdmf", "mesh.h5", "c.bp") if voxel_p1 == "mesh" else ("c.pvd", "c_1.vti")
    for name in (*written, "c_fields.png", "c_regions.png"):
        assert (out / name).exists(), name
    if voxel_p1 == "image":
        assert not (out / "mesh.xdmf").exists() and not (out / "c.bp").exists()
