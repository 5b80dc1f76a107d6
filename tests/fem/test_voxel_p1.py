"""P1 operators built from the voxel image without a mesh (fem_anode.fem.voxel_p1): the same
``K + R``, ``M`` and boundary weights as dolfinx assembles on the face-connected voxel mesh (split
nodes, pore and Si Robin faces, anisotropic voxels), on 1 and 2 ranks, and the grid-stencil kernel
built from them is the kernel built from dolfinx's matrices."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("dolfinx")

import scipy.sparse as sparse  # noqa: E402
from mpi4py import MPI  # noqa: E402

from fem_anode.fem.diffusion import DiffusionProblem, DiffusionSettings, GeometrySettings, TimeSettings  # noqa: E402
from fem_anode.fem.diffusion.settings import PhysicsSettings  # noqa: E402
from fem_anode.fem.diffusion.transient import LENGTH_UNIT  # noqa: E402
from fem_anode.fem.grid_stencil import SPECIAL, GridStencilKernel  # noqa: E402
from fem_anode.fem.tortuosity.clusters import slab_bounds  # noqa: E402
from fem_anode.fem.voxel_mesh import create_voxel_mesh  # noqa: E402
from fem_anode.fem.voxel_p1 import PORE, SI, TRANSPORT, VoxelP1Operator, element_matrices, slab_classes  # noqa: E402
from fem_anode.fem.voxel_sweeps import load_sweep_library  # noqa: E402
from fem_anode.io import VoxelImage  # noqa: E402

SPACING = (3e-8, 2e-8, 1e-8)  # z, y, x (m): anisotropic on purpose
PHASES = {"pore": 0, "sei": 1, "si": 2, "graphite": 3}


def volume(kind: str) -> VoxelImage:
    rng = np.random.default_rng(7)
    if kind == "porous":  # many edge and corner contacts: split nodes
        labels = rng.choice([0, 1, 1, 2, 3], size=(8, 7, 9)).astype(np.uint8)
    else:  # mostly transporting: long runs of interior rows
        labels = np.where(rng.random((10, 9, 12)) < 0.9, 1, rng.choice([0, 2], size=(10, 9, 12))).astype(np.uint8)
    return VoxelImage(labels, SPACING, dict(PHASES))


def settings(k_si: float) -> DiffusionSettings:
    out = DiffusionSettings(
        geometry=GeometrySettings(transport_phase="sei"),
        physics=PhysicsSettings(k_si=k_si),
        time=TimeSettings(t_end=1e-5, output_times=[1e-5], dt_initial=1e-6),
    )
    return out


def operator(comm, image: VoxelImage, s: DiffusionSettings) -> VoxelP1Operator:
    slab = slab_bounds(comm, image.shape[0])
    roles = {PHASES["sei"]: TRANSPORT, PHASES["pore"]: PORE, PHASES["si"]: SI}
    classes = slab_classes(image, slab.z0, slab.z1, roles)
    physics = s.physics
    spacing = np.array(SPACING) / LENGTH_UNIT
    return VoxelP1Operator(
        comm,
        classes,
        slab.z0,
        slab.z1,
        image.shape[0],
        spacing,
        physics.D_eff / LENGTH_UNIT**2,
        physics.k_f / LENGTH_UNIT,
        physics.k_si / LENGTH_UNIT,
    )


def gathered(comm, rows, cols, values, n) -> sparse.csr_matrix:
    """A matrix from every rank's COO entries (test sizes only)."""
    parts = comm.allgather((rows, cols, values))
    r, c, v = (np.concatenate(x) for x in zip(*parts))
    return sparse.csr_matrix((v, (r, c)), shape=(n, n))


def dolfinx_in_grid_numbering(problem: DiffusionProblem):
    """dolfinx's K + R, M (and the weights) renumbered to the voxel mesh's input node numbers."""
    mesh, V = problem.mesh, problem.V
    index_map = V.dofmap.index_map
    n_local = index_map.size_local + index_map.num_ghosts
    to_input = np.empty(n_local, np.int64)
    to_input[V.dofmap.list] = mesh.geometry.input_global_indices[mesh.geometry.dofmap]
    global_of_local = index_map.local_to_global(np.arange(n_local, dtype=np.int32))
    input_of_global = np.empty(index_map.size_global, np.int64)  # (a row's columns may be on no cell of this rank)
    for g, i in problem.comm.allgather((global_of_local, to_input)):
        input_of_global[g] = i

    def coo(mat):
        indptr, indices, values = mat.getValuesCSR()
        rows = np.repeat(to_input[: index_map.size_local], np.diff(indptr))
        return rows, input_of_global[indices], values

    owned = to_input[: index_map.size_local]
    weights = {
        "w_dx": (owned, problem._w_dx.array.copy()),
        "w_pore": (owned, problem._w_pore.array.copy()),
        "w_si": (owned, problem._w_si.array.copy() if problem._w_si is not None else np.zeros(owned.size)),
    }
    return coo(problem._KR), coo(problem._M), weights


@pytest.mark.parametrize("kind", ["porous", "dense"])
@pytest.mark.parametrize("k_si", [0.0, 2e-4])
def test_the_operators_are_dolfinxs_on_the_voxel_mesh(comm, kind, k_si):
    image = volume(kind)
    s = settings(k_si)
    op = operator(comm, image, s)
    problem = DiffusionProblem(create_voxel_mesh(image, comm, ["sei"]), s)
    try:
        n = problem.ndofs
        assert op.ndofs == n
        (kr_rows, kr_cols, kr), (m_rows, m_cols, m), weights = dolfinx_in_grid_numbering(problem)
    finally:
        problem.destroy()
    reference_kr = gathered(comm, kr_rows, kr_cols, kr, n)
    reference_m = gathered(comm, m_rows, m_cols, m, n)
    indptr, columns, k_values, m_values = op.csr()
    rows = np.repeat(np.arange(op.n) + op.offset, np.diff(indptr))
    mine_kr = gathered(comm, rows, columns, k_values, n)
    mine_m = gathered(comm, rows, columns, m_values, n)
    for mine, reference in ((mine_kr, reference_kr), (mine_m, reference_m)):
        scale = abs(reference).max()
        assert abs(mine - reference).max() <= 1e-12 * scale
        # the same pattern: every coupling of the mesh and no other
        assert (mine != 0).nnz >= (abs(reference) > 1e-12 * scale).nnz
    for name, (where, values) in weights.items():
        reference = np.zeros(n)
        for w, v in comm.allgather((where, values)):
            reference[w] = v
        mine = np.zeros(n)
        for offset, v in comm.allgather((op.offset, getattr(op, name))):
            mine[offset : offset + v.size] = v
        scale = max(np.abs(reference).max(), 1e-300)
        assert np.abs(mine - reference).max() <= 1e-12 * scale, name
        if name == "w_pore":
            assert reference.max() > 0
    if kind == "porous":
        assert comm.allreduce(int(np.count_nonzero(op.row_type == SPECIAL))) > 0  # split nodes exercised


def test_element_matrices_integrate_what_they_should():
    """M sums to the voxel volume; K annihilates constants and gives grad x . grad x = volume/h_x^2;
    a face mass sums to the face area."""
    h = np.array([3.0, 2.0, 1.0])
    K, M, F = element_matrices(h, 2.5)
    assert M.sum() == pytest.approx(h.prod(), rel=1e-14)
    assert np.abs(K.sum(axis=1)).max() <= 1e-14 * np.abs(K).max()
    x = np.array([(p & 1) * h[2] for p in range(8)])  # the x coordinate of each corner
    assert x @ K @ x == pytest.approx(2.5 * h.prod(), rel=1e-14)
    assert F[0][np.ix_([0, 1, 2, 3], [0, 1, 2, 3])].sum() == pytest.approx(h[1] * h[2], rel=1e-14)


@pytest.mark.parametrize("kind", ["porous", "dense"])
def test_the_kernel_from_types_is_the_kernel_from_the_assembled_rows(comm, kind):
    """Same operator: A x and the SSOR sweeps agree with the kernel built from the CSR arrays."""
    library = load_sweep_library(comm)
    image = volume(kind)
    op = operator(comm, image, settings(2e-4))
    indptr, columns, k_values, m_values = op.csr()
    local = (columns >= op.offset) & (columns < op.offset + op.n)
    rows = np.repeat(np.arange(op.n), np.diff(indptr))[local]
    block = sparse.csr_matrix((k_values[local], (rows, columns[local] - op.offset)), shape=(op.n, op.n))
    block_m = sparse.csr_matrix((m_values[local], (rows, columns[local] - op.offset)), shape=(op.n, op.n))
    block.sort_indices()
    block_m.sort_indices()
    assert np.array_equal(block.indptr, block_m.indptr) and np.array_equal(block.indices, block_m.indices)
    grid = op.grid_indices()
    reference = GridStencilKernel(
        block.indptr, block.indices.astype(np.int32), block.data, block_m.data, grid, 1.2, library
    )
    kernel = GridStencilKernel.from_types(
        op.position, op.box, op.row_type, op.k_table, op.m_table, op.special, 1.2, library
    )
    assert kernel.identity  # the dofs are in grid order on every rank (the slab-face order needs no renumbering)
    assert np.array_equal(kernel.order, reference.order)
    scale = 3.0
    kernel.set_scale(scale)
    reference.set_scale(scale)
    x = np.random.default_rng(comm.rank).random(op.n)
    for name in ("mult", "mass_mult", "forward", "backward"):
        out, expected = np.zeros(op.n), np.zeros(op.n)
        getattr(kernel, name)(x, out)
        getattr(reference, name)(x, expected)
        assert np.abs(out - expected).max() <= 1e-12 * np.abs(expected).max(), name
    direct = (block + scale * block_m) @ x[kernel._inverse]  # matrix order
    product = np.zeros(op.n)
    kernel.mult(x, product)
    assert np.abs(product[kernel._inverse] - direct).max() <= 1e-12 * np.abs(direct).max()


@pytest.mark.parametrize("kind", ["porous", "dense"])
def test_the_slab_face_sweeps_are_the_dense_ssor_in_their_order(comm, kind):
    """GridSlabSweeps (several ranks, rows in grid order): the forward and backward sweeps and
    ``(D/omega + U) x`` equal the dense ones of the whole matrix in the slab-face order (every
    rank's first-plane rows, then the middles, then the last-plane rows)."""
    from petsc4py import PETSc

    from fem_anode.fem.grid_stencil import GridSlabSweeps
    from fem_anode.fem.slab_sweeps import OffRankCouplings

    if comm.size == 1:
        pytest.skip("needs several MPI ranks")
    library = load_sweep_library(comm)
    op = operator(comm, volume(kind), settings(2e-4))
    kernel = GridStencilKernel.from_types(
        op.position, op.box, op.row_type, op.k_table, op.m_table, op.special, 1.3, library
    )
    vec = PETSc.Vec().createMPI((op.n, op.ndofs), comm=comm)
    off = op.off_rank
    couplings = OffRankCouplings.from_rows(op.n, off.rows, off.indptr, off.columns, off.k, off.m, vec, library)
    sweeps = GridSlabSweeps(comm, kernel, couplings, vec)
    scale = 2.0
    kernel.set_scale(scale)
    couplings.set_scale(scale)
    indptr, columns, k_values, m_values = op.csr()
    rows = np.repeat(np.arange(op.n), np.diff(indptr)) + op.offset
    A = gathered(comm, rows, columns, k_values + scale * m_values, op.ndofs).toarray()
    # the global order: (group, rank, local row) with groups first plane / middle / last plane
    local = np.arange(op.n)
    group = np.where(local < sweeps.low_end, 0, np.where(local < sweeps.high_start, 1, 2))
    keys = np.concatenate(comm.allgather(np.stack([group, np.full(op.n, comm.rank), local], axis=1)))
    order = np.lexsort((keys[:, 2], keys[:, 1], keys[:, 0]))  # position -> global dof
    P = A[np.ix_(order, order)]
    D = np.diag(np.diag(P)) / 1.3
    lower, upper = D + np.tril(P, -1), D + np.triu(P, 1)
    rng = np.random.default_rng(3)
    b = rng.random(op.ndofs)
    mine = slice(op.offset, op.offset + op.n)

    def dense(matrix, solve):
        out = np.empty(op.ndofs)
        out[order] = np.linalg.solve(matrix, b[order]) if solve else matrix @ b[order]
        return out[mine]

    expected = {
        "forward": dense(lower, True),
        "backward": dense(upper, True),
        "apply_upper": dense(upper, False),
    }
    for name, want in expected.items():
        source, result = vec.duplicate(), vec.duplicate()
        source.array[:] = b[mine]
        result.array[:] = rng.random(op.n)  # (overwritten)
        getattr(sweeps, name)(source, result)
        assert np.abs(result.array - want).max() <= 1e-12 * np.abs(want).max(), name
        source.destroy()
        result.destroy()
    with pytest.raises(ValueError, match="q must hold"):  # q: all rows or the part's rows, nothing else
        kernel.forward(b[mine], np.zeros(op.n), q=np.zeros(op.n - sweeps.high_start + 1), part="slab_high")
    assert comm.allreduce(int(sweeps.low_end > 0)) == comm.size - 1  # every rank but the first has a first plane
    assert comm.allreduce(int(sweeps.high_start < op.n)) == comm.size - 1
    couplings.destroy()
    vec.destroy()
