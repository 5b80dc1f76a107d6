"""Loading smooth/voxel/tet meshes into dolfinx on any number of ranks, with names and XDMF."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("gmsh")
dolfinx = pytest.importorskip("dolfinx")
import ufl  # noqa: E402
from dolfinx import fem  # noqa: E402
from mpi4py import MPI  # noqa: E402

from fem_anode.errors import InputError, UsageError  # noqa: E402
from fem_anode.fem.mesh_io import image_to_tagged_mesh, read_mesh, write_xdmf  # noqa: E402
from fem_anode.io.images import VoxelImage  # noqa: E402
from fem_anode.meshing.build import mesh_image  # noqa: E402
from fem_anode.meshing.smooth2d import SmoothMeshOptions  # noqa: E402

PIXEL = 20e-9


def three_phase() -> VoxelImage:
    ny, nx = 40, 60
    yy, xx = np.mgrid[:ny, :nx] + 0.5
    labels = np.full((ny, nx), 3, dtype=np.uint8)
    labels[(xx - 20) ** 2 + (yy - 20) ** 2 < 12**2] = 1
    labels[(xx - 38) ** 2 + (yy - 14) ** 2 < 8**2] = 0
    labels[yy > 34] = 0
    return VoxelImage(labels, (PIXEL, PIXEL), {"pore": 0, "si": 1, "sei": 3}, "three")


def integral(comm, form) -> float:
    return comm.allreduce(fem.assemble_scalar(fem.form(form)), op=MPI.SUM)


def check_interfaces(tagged, pairs_interior, pairs_exterior):
    """Interface facets lie between cells of exactly the two phases (checked by integrals on all ranks)."""
    mesh = tagged.mesh
    V = fem.functionspace(mesh, ("DG", 0))
    c = fem.Function(V)
    c.x.array[tagged.cell_tags.indices] = tagged.cell_tags.values
    c.x.scatter_forward()
    dS = ufl.Measure("dS", domain=mesh, subdomain_data=tagged.facet_tags)
    ds = ufl.Measure("ds", domain=mesh, subdomain_data=tagged.facet_tags)
    for name, (a, b) in pairs_interior.items():
        tag = tagged.facet_tag(name)
        p, m = c("+"), c("-")
        mismatch = ((p - a) * (p - b)) ** 2 + ((m - a) * (m - b)) ** 2 + (p + m - a - b) ** 2
        assert integral(mesh.comm, 1.0 * dS(tag)) > 0
        assert integral(mesh.comm, mismatch * dS(tag)) == pytest.approx(0.0, abs=1e-30)
    for name, a in pairs_exterior.items():
        tag = tagged.facet_tag(name)
        assert integral(mesh.comm, 1.0 * ds(tag)) > 0
        assert integral(mesh.comm, (c - a) ** 2 * ds(tag)) == pytest.approx(0.0, abs=1e-30)


@pytest.mark.parametrize("order", [1, 2])
def test_smooth_mesh_file_loads_with_names_on_all_ranks(comm, shared_tmp_path, order):
    path = shared_tmp_path / f"three_{order}.msh"
    quality = None
    if comm.rank == 0:
        quality = mesh_image(three_phase(), path, options=SmoothMeshOptions(size=3 * PIXEL, order=order)).quality
    quality = comm.bcast(quality, root=0)
    tagged = read_mesh(path, comm)
    assert tagged.cell_groups == {"pore": 100, "si": 101, "sei": 103}
    assert set(tagged.facet_groups) == {"pore|si", "pore|sei", "sei|si", "left", "right", "top", "bottom"}
    assert tagged.mesh.geometry.cmap.degree == order
    assert tagged.mesh.topology.index_map(2).size_global == quality["cells"]
    dx = ufl.Measure("dx", domain=tagged.mesh, subdomain_data=tagged.cell_tags)
    for name, tag in tagged.cell_groups.items():
        assert integral(tagged.comm, 1.0 * dx(tag)) == pytest.approx(quality["phase_measure"][name]["mesh"], rel=1e-10)
    assert integral(tagged.comm, 1.0 * dx) == pytest.approx(60 * 40 * PIXEL**2, rel=1e-12)
    check_interfaces(tagged, {"pore|si": (100, 101), "pore|sei": (100, 103), "sei|si": (101, 103)}, {"top": 103})
    ds = ufl.Measure("ds", domain=tagged.mesh, subdomain_data=tagged.facet_tags)
    assert integral(tagged.comm, 1.0 * ds(tagged.facet_tag("bottom"))) == pytest.approx(60 * PIXEL, rel=1e-12)


def test_in_memory_mesh_with_dropped_phases(comm):
    tagged = image_to_tagged_mesh(three_phase(), comm, keep=["sei"], options=SmoothMeshOptions(size=3 * PIXEL))
    assert tagged.cell_groups == {"sei": 103}
    assert "pore|sei" in tagged.facet_groups and "sei|si" in tagged.facet_groups
    check_interfaces(tagged, {}, {"pore|sei": 103, "sei|si": 103, "left": 103})
    with pytest.raises(InputError, match="no cell group 'si'"):
        tagged.cell_tag("si")


def test_in_memory_errors_reach_every_rank(comm):
    with pytest.raises(UsageError, match="not in the phase map"):
        image_to_tagged_mesh(three_phase(), comm, keep=["graphite"])


@pytest.mark.parametrize("method", ["voxel", "tet"])
def test_3d_meshes_conserve_volumes_and_load(comm, method):
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, (6, 7, 8)).astype(np.uint8)
    image = VoxelImage(labels, (0.5e-6, 0.2e-6, 0.1e-6), {"pore": 0, "si": 1, "sei": 2})
    tagged = image_to_tagged_mesh(image, comm, method=method, keep=["si", "sei"])
    assert tagged.cell_groups == {"si": 101, "sei": 102}
    assert {"pore|si", "pore|sei", "sei|si", "top", "bottom", "left", "right", "front", "back"} <= set(
        tagged.facet_groups
    )
    dx = ufl.Measure("dx", domain=tagged.mesh, subdomain_data=tagged.cell_tags)
    voxel = 0.5e-6 * 0.2e-6 * 0.1e-6
    for name, value in (("si", 1), ("sei", 2)):
        assert integral(comm, 1.0 * dx(tagged.cell_tag(name))) == pytest.approx(
            np.count_nonzero(labels == value) * voxel, rel=1e-12
        )
    check_interfaces(tagged, {"sei|si": (101, 102)}, {"pore|si": 101, "pore|sei": 102})
    ds = ufl.Measure("ds", domain=tagged.mesh, subdomain_data=tagged.facet_tags)
    top = integral(comm, 1.0 * ds(tagged.facet_tag("top")))
    assert top == pytest.approx(np.count_nonzero(labels[0] > 0) * 0.2e-6 * 0.1e-6, rel=1e-12)
    z = comm.allreduce(tagged.mesh.geometry.x[:, 2].max(), op=MPI.MAX)
    assert z == pytest.approx(6 * 0.5e-6, rel=1e-12)  # mesh z = array axis 0


def test_xdmf_has_mesh_and_tags(comm, shared_tmp_path):
    tagged = image_to_tagged_mesh(three_phase(), comm, options=SmoothMeshOptions(size=4 * PIXEL), order=2)
    path = write_xdmf(tagged, shared_tmp_path / "three.xdmf")
    with dolfinx.io.XDMFFile(comm, str(path), "r") as xdmf:
        mesh = xdmf.read_mesh()
        mesh.topology.create_connectivity(1, 2)
        cells = xdmf.read_meshtags(mesh, "cell_tags")
        facets = xdmf.read_meshtags(mesh, "facet_tags")
    assert mesh.topology.index_map(2).size_global == tagged.mesh.topology.index_map(2).size_global

    def owned_count(tags, m, value):
        return comm.allreduce(
            np.count_nonzero(tags.values[tags.indices < m.topology.index_map(2).size_local] == value), op=MPI.SUM
        )

    for value in (100, 101, 103):
        assert owned_count(cells, mesh, value) == owned_count(tagged.cell_tags, tagged.mesh, value) > 0
    assert set(np.unique(np.concatenate(comm.allgather(facets.values)))) == set(tagged.facet_groups.values())


def test_mesh_measures_of_a_voxel_block(comm):
    """A 6 x 4 pixel SEI block left of a pore column: area, cell count and every boundary length exact."""
    from fem_anode.fem.mesh_measures import mesh_measures

    labels = np.full((4, 7), 3, dtype=np.uint8)
    labels[:, -1] = 0
    image = VoxelImage(labels, (PIXEL, PIXEL), {"pore": 0, "sei": 3})
    measures = mesh_measures(image_to_tagged_mesh(image, comm, method="voxel", keep=["sei"]))
    assert measures["ranks"] == comm.size and measures["cells"] == 24
    assert measures["measure"] == pytest.approx(24 * PIXEL**2, rel=1e-12)
    lengths = measures["facet_groups"]
    assert lengths["pore|sei"] == pytest.approx(4 * PIXEL, rel=1e-12)
    assert lengths["left"] == pytest.approx(4 * PIXEL, rel=1e-12)
    assert lengths["top"] == pytest.approx(6 * PIXEL, rel=1e-12)
    assert lengths["bottom"] == pytest.approx(6 * PIXEL, rel=1e-12)


def test_the_same_mesh_is_partitioned_the_same_way_every_time(comm):
    """PT-SCOTCH with several threads split this disk differently at every call (1530/1532,
    1537/1525, ... cells on two ranks); the package's partitioner runs it on one thread, so runs
    on the same ranks share their partition and their rounding."""
    import hashlib

    from fem_anode.fem.phasefield.geometry import disk_mesh

    partitions = []
    for _ in range(3):
        tagged = disk_mesh(20e-9, 1e-9, comm)
        cells = tagged.mesh.topology.index_map(tagged.mesh.topology.dim).size_local
        points = np.sort(tagged.mesh.geometry.x[:, 0])
        partitions.append((cells, hashlib.sha256(points.tobytes()).hexdigest()))
    assert partitions[0] == partitions[1] == partitions[2]
