"""dolfinx on voxel meshes: the mesh loads with named tags on any number of ranks and a steady
diffusion through straight pore channels reproduces the exact linear solution and flux."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("dolfinx")

import ufl  # noqa: E402
from dolfinx import fem  # noqa: E402
from dolfinx.fem.petsc import LinearProblem  # noqa: E402
from mpi4py import MPI  # noqa: E402

from fem_anode.fem import read_mesh  # noqa: E402
from fem_anode.io import VoxelImage  # noqa: E402
from fem_anode.meshing import write_voxel_mesh  # noqa: E402

H = 20e-9  # voxel edge (m): the nanometre scale the package works at


def channels_image() -> VoxelImage:
    """Solid block (label 1) with three straight pore channels (label 0) along z."""
    labels = np.ones((6, 8, 8), dtype=np.uint8)
    labels[:, 1:3, 1:3] = 0
    labels[:, 5:7, 2:4] = 0
    labels[:, 4, 6] = 0
    return VoxelImage(labels, (H, H, H), {"pore": 0, "solid": 1})


def test_mesh_loads_with_names_and_exact_linear_diffusion(shared_tmp_path, comm):
    image = channels_image()
    path = shared_tmp_path / "channels.msh"
    if comm.rank == 0:
        write_voxel_mesh(image, path, keep=["pore"])
    comm.barrier()
    tagged = read_mesh(path, comm)
    mesh = tagged.mesh
    assert tagged.cell_groups == {"pore": 100}
    assert {"pore|solid", "top", "bottom"} <= set(tagged.facet_groups)
    n_cells = comm.allreduce(mesh.topology.index_map(3).size_local, op=MPI.SUM)
    n_pore = int(np.count_nonzero(image.array == 0))
    assert n_cells == n_pore

    V = fem.functionspace(mesh, ("Lagrange", 1))
    fdim = mesh.topology.dim - 1
    top, bottom = tagged.facet_tag("top"), tagged.facet_tag("bottom")
    bcs = [
        fem.dirichletbc(value, fem.locate_dofs_topological(V, fdim, tagged.facet_tags.find(tag)), V)
        for value, tag in ((fem.Constant(mesh, 1.0), top), (fem.Constant(mesh, 0.0), bottom))
    ]
    u, v = ufl.TrialFunction(V), ufl.TestFunction(V)
    D = 3.01e-10
    problem = LinearProblem(
        D * ufl.inner(ufl.grad(u), ufl.grad(v)) * ufl.dx,
        fem.Constant(mesh, 0.0) * v * ufl.dx,
        bcs=bcs,
        petsc_options={"ksp_type": "cg", "pc_type": "jacobi", "ksp_rtol": 1e-14, "ksp_atol": 0.0},
    )
    c = problem.solve()
    length = image.extent[0]
    exact = fem.Function(V)
    exact.interpolate(lambda x: 1.0 - x[2] / length)
    error = np.sqrt(comm.allreduce(fem.assemble_scalar(fem.form((c - exact) ** 2 * ufl.dx)), op=MPI.SUM))
    volume = comm.allreduce(fem.assemble_scalar(fem.form(1.0 * ufl.dx(domain=mesh))), op=MPI.SUM)
    assert volume == pytest.approx(n_pore * H**3, rel=1e-12)
    assert error / np.sqrt(volume) < 1e-9
    # Total flux through the channels: Q = D * A_pore * dc / L, with volume-averaged gradient.
    flux = -D * comm.allreduce(fem.assemble_scalar(fem.form(c.dx(2) * ufl.dx)), op=MPI.SUM) / length
    area = n_pore / image.shape[0] * H**2
    assert flux == pytest.approx(D * area / length, rel=1e-9)


def test_tagged_mesh_lookup_errors(shared_tmp_path, comm):
    from fem_anode.errors import InputError

    with pytest.raises(InputError, match="mesh file not found"):
        read_mesh(shared_tmp_path / "missing.msh", comm)
    image = channels_image()
    path = shared_tmp_path / "all.msh"
    if comm.rank == 0:
        write_voxel_mesh(image, path)
    comm.barrier()
    tagged = read_mesh(path, comm)
    with pytest.raises(InputError, match="no facet group 'pore\\|si'"):
        tagged.facet_tag("pore|si")
