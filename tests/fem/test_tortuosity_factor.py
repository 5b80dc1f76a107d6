"""Tortuosity factor: cell-centred finite volumes (default) and the FE (Q1 nodal) option.

Finite volumes (``method="fv"``, TauFactor's discretisation): straight channels and slabs give
tau = eps / eps_percolating exactly; a chain of voxels (a path through faces) is a series of
resistors, 1 / (2 g_z) at each end and 1 / g between face neighbours; parallel paths add their
conductances; voxels touching only along an edge or at a corner are not connected (tau = inf);
general volumes equal an independent resistor-network solve (explicit loops over voxel faces,
dense solve); the distributed cluster labelling equals the serial one; 1 and 2 ranks agree.

FE (``method="fe"``): exact answers used (the solve is on the voxel geometry itself, so these
hold to solver precision): straight channels and sheets parallel to z give a linear c(z), hence tau = eps /
eps_percolating (= 1 without isolated voxels) and D_eff / D = eps_percolating (the Wiener
parallel bound, attained). A channel that narrows in z (series structure) has a 1D piecewise
linear c in the FE space, so by the Dirichlet principle the FE flux is at most the series value
and at least the flux of the narrow part alone; refining the voxels (a nested FE space) can only
lower it.
"""

from __future__ import annotations

import numpy as np
import pytest

from fem_anode.errors import UsageError
from fem_anode.io.images import VoxelImage

pytest.importorskip("dolfinx")

from mpi4py import MPI

from fem_anode.fem.tortuosity import (
    element_stiffness,
    free_node_system,
    hex_mesh_arrays,
    percolating_mask,
    tortuosity_factor,
    tortuosity_factors,
)
from fem_anode.fem.tortuosity.clusters import slab_bounds, spanning_clusters
from fem_anode.fem.tortuosity.fe import RefinedLayers, fe_tortuosity_factor

H = (40e-9, 20e-9, 25e-9)  # anisotropic voxel (z, y, x) in metres


def image(labels: np.ndarray, spacing=H) -> VoxelImage:
    return VoxelImage(labels.astype(np.uint8), spacing, {"solid": 0, "pore": 1, "other": 2})


def test_hex_mesh_duplicates_nodes_at_edge_and_corner_contacts():
    pair_face = np.zeros((2, 2, 2), bool)
    pair_face[0, 0, 0] = pair_face[0, 0, 1] = True
    pair_edge = np.zeros((2, 2, 2), bool)
    pair_edge[0, 0, 0] = pair_edge[0, 1, 1] = True
    pair_corner = np.zeros((2, 2, 2), bool)
    pair_corner[0, 0, 0] = pair_corner[1, 1, 1] = True
    # An L of three voxels: the edge-contact pair is face-connected through the third voxel.
    ell = pair_edge.copy()
    ell[0, 0, 1] = True
    counts = {}
    for name, mask in (("face", pair_face), ("edge", pair_edge), ("corner", pair_corner), ("ell", ell)):
        points, cells = hex_mesh_arrays(mask, (1.0, 2.0, 3.0))
        assert cells.shape == (int(mask.sum()), 8)
        counts[name] = points.shape[0]
        # every cell is a box of the voxel size: (x, y, z) extents (3, 2, 1)
        extent = points[cells].max(axis=1) - points[cells].min(axis=1)
        np.testing.assert_allclose(extent, np.tile([3.0, 2.0, 1.0], (cells.shape[0], 1)))
    assert counts == {"face": 12, "edge": 16, "corner": 16, "ell": 16}


def test_percolating_mask_keeps_only_clusters_touching_both_faces():
    mask = np.zeros((5, 6, 6), bool)
    mask[:, 0, 0] = True  # spans z
    mask[:3, 3, 3] = True  # touches z = 0 only
    mask[1:4, 5, 5] = True  # floating
    mask[:3, 2, 0] = True
    mask[2:, 3, 1] = True  # zig-zag through an edge contact: does not percolate
    kept = percolating_mask(mask)
    assert np.array_equal(kept, np.pad(np.ones((5, 1, 1), bool), ((0, 0), (0, 5), (0, 5))))


@pytest.mark.parametrize("method", ["fv", "fe"])
def test_straight_channels_and_sheets_exact(comm, method):
    labels = np.zeros((7, 10, 12), np.uint8)
    labels[:, 1:3, 1:4] = 1  # channel
    labels[:, 6, 2] = 1  # one-voxel channel
    labels[:, 8:10, :] = 1  # a sheet parallel to z
    labels[:, 5, 7] = 1  # a channel in edge contact with nothing else
    labels[:, 4, 6] = 1  # ... touching the previous one along an edge only
    labels[3, 0, 11] = 1  # floating voxel: counts in eps, not in the flux
    labels[:2, 4, 10] = 1  # dead end from the top
    labels[labels == 0] = np.where(np.arange(labels.size).reshape(labels.shape)[labels == 0] % 5 == 0, 2, 0)
    res = tortuosity_factor(image(labels), "pore", comm, method=method)
    assert res.method == method
    perc = np.count_nonzero(labels[0] == 1) - 1  # columns through z: all top voxels but the dead end
    n_cross = labels.shape[1] * labels.shape[2]
    eps = np.count_nonzero(labels == 1) / labels.size
    assert res.volume_fraction == pytest.approx(eps, rel=1e-12)
    assert res.percolating_fraction == pytest.approx(perc / n_cross, rel=1e-12)
    assert res.relative_diffusivity == pytest.approx(perc / n_cross, rel=1e-9)
    assert res.tau == pytest.approx(eps * n_cross / perc, rel=1e-9)
    assert res.flux_check_rel < 1e-9
    assert res.cells == perc * labels.shape[0]
    assert res.ranks == comm.size
    # a full slab: tau = 1 exactly
    full = tortuosity_factor(image(np.ones((4, 3, 5))), "pore", comm, method=method)
    assert full.tau == pytest.approx(1.0, rel=1e-10) and full.relative_diffusivity == pytest.approx(1.0, rel=1e-10)


@pytest.mark.parametrize("method", ["fv", "fe"])
def test_not_percolating_gives_inf_without_a_solve(comm, method):
    labels = np.zeros((6, 5, 5), np.uint8)
    labels[:3, 1, 1] = 1
    labels[3:, 2, 2] = 1  # meets the first column along an edge only
    res = tortuosity_factor(image(labels), "pore", comm, method=method)
    assert res.tau == float("inf") and res.relative_diffusivity == 0.0 and res.dofs == 0
    assert "does not percolate" in res.note
    assert res.to_json()["tau"] is None
    assert res.volume_fraction == pytest.approx(6 / labels.size)


def test_series_constriction_bounds_and_refinement(comm):
    """Wide channel (4x4) for half the depth, narrow (2x2) for the rest: series structure."""
    labels = np.zeros((8, 6, 6), np.uint8)
    labels[:4, 1:5, 1:5] = 1
    labels[4:, 2:4, 2:4] = 1
    spacing = (1e-6, 1e-6, 1e-6)
    coarse = tortuosity_factor(image(labels, spacing), "pore", comm, method="fe")
    fine = tortuosity_factor(
        image(labels.repeat(2, 0).repeat(2, 1).repeat(2, 2), (5e-7,) * 3), "pore", comm, method="fe"
    )
    n_cross = 36
    series = 1.0 / (0.5 * n_cross / 16 + 0.5 * n_cross / 4)  # D_eff/D of two layers in series (1D)
    narrow = 4 / n_cross  # the narrow columns alone, over the whole depth
    assert narrow < fine.relative_diffusivity < coarse.relative_diffusivity < series
    # the split voxels read layer by layer give the same problem as the repeated array
    split = fe_tortuosity_factor(image(labels, spacing), "pore", comm, refine=2)
    assert split.tau == pytest.approx(fine.tau, rel=1e-9) and split.dofs == fine.dofs
    # the constriction costs a few per cent over the 1D estimate, not more
    assert coarse.relative_diffusivity > 0.9 * series
    assert fine.volume_fraction == pytest.approx(coarse.volume_fraction)


def test_refined_layers_equal_the_repeated_array():
    labels = np.arange(3 * 2 * 4, dtype=np.uint8).reshape(3, 2, 4)
    fine = labels.repeat(3, 0).repeat(3, 1).repeat(3, 2)
    layers = RefinedLayers(image(labels), 3)
    assert layers.shape == fine.shape
    for start in range(10):
        for stop in range(start, 10):
            np.testing.assert_array_equal(layers.read_layers(start, stop), fine[start:stop])


@pytest.mark.parametrize("layers", [1, 3, 5])
def test_fe_with_fewer_than_two_layers_per_rank(comm, layers):
    """Slabs need two layers: the ranks beyond ``layers // 2`` wait and get the same result."""
    labels = np.zeros((layers, 4, 5), np.uint8)
    labels[:, 1:3, 1:4] = 1
    labels[:, 0, 0] = 1
    res = tortuosity_factor(image(labels), "pore", comm, method="fe")
    eps = np.count_nonzero(labels) / labels.size
    assert res.tau == pytest.approx(1.0, rel=1e-9) and res.volume_fraction == pytest.approx(eps, rel=1e-12)
    assert comm.allgather(res.tau) == [res.tau] * comm.size


def test_random_volume_bounds_and_rank_independence(comm):
    rng = np.random.default_rng(7)
    labels = (rng.random((12, 10, 10)) < 0.65).astype(np.uint8)
    res = tortuosity_factor(image(labels), "pore", comm, method="fe", rtol=1e-10)
    assert 1.0 < res.tau < 5.0  # Wiener: D_eff <= eps D
    assert res.relative_diffusivity <= res.percolating_fraction
    assert res.flux_check_rel < 1e-6
    taus = comm.allgather(res.tau)
    assert max(taus) == min(taus)
    # the same volume on one rank gives the same number
    single = tortuosity_factor(image(labels), "pore", MPI.COMM_SELF, method="fe", rtol=1e-10)
    assert res.tau == pytest.approx(single.tau, rel=1e-7)
    # GAMG instead of the default SSOR: the same answer
    gamg = tortuosity_factor(image(labels), "pore", comm, petsc_options={"pc_type": "gamg"}, method="fe", rtol=1e-10)
    assert gamg.tau == pytest.approx(res.tau, rel=1e-7)
    # the memory estimate counts the node copies of the whole phase slab by slab: the same on any
    # number of ranks, the dofs of the hexahedral mesh of the phase, at least those of its spanning part
    from fem_anode.fem.tortuosity.fe import estimate_memory

    unknowns = estimate_memory(image(labels), "pore", comm).details["unknowns"]
    assert unknowns == estimate_memory(image(labels), "pore").details["unknowns"] >= res.dofs
    assert unknowns == hex_mesh_arrays(labels == 1, (1.0, 1.0, 1.0))[0].shape[0]
    assert estimate_memory(image(labels), "pore", refine=3).details["unknowns"] == 27 * unknowns
    lean, assembled = (estimate_memory(image(labels), "pore", pc_type=pc).bytes for pc in ("ssor", "hypre"))
    assert assembled > lean  # BoomerAMG's hierarchy on the assembled matrix
    # the solid phase along z (labels 0): a second phase through the convenience wrapper
    both = tortuosity_factors(image(labels), ["pore", "solid"], comm, method="fe", rtol=1e-10)
    assert both["pore"].tau == pytest.approx(res.tau, rel=1e-9)
    assert both["solid"].tau > 1.0 or both["solid"].tau == float("inf")


@pytest.mark.parametrize("spacing", [H, (1e-6, 1e-6, 1e-6)])
def test_fe_ssor_on_the_stencil_equals_boomeramg_on_the_matrix(comm, spacing, monkeypatch):
    """The default FE solver (CG + SSOR on the grid stencil, Dirichlet rows made identity rows) and
    the assembled matrix of the free nodes with BoomerAMG solve the same problem; without the
    compiled sweeps the default falls back to BoomerAMG."""
    rng = np.random.default_rng(11)
    labels = (rng.random((11, 9, 8)) < 0.6).astype(np.uint8)
    ssor = tortuosity_factor(image(labels, spacing), "pore", comm, rtol=1e-12, method="fe")
    amg = tortuosity_factor(
        image(labels, spacing), "pore", comm, rtol=1e-12, method="fe", petsc_options={"pc_type": "hypre"}
    )
    assert ssor.tau == pytest.approx(amg.tau, rel=1e-9) and ssor.dofs == amg.dofs
    assert ssor.iterations > amg.iterations  # (SSOR needs more iterations: it did run)
    omega = tortuosity_factor(
        image(labels, spacing), "pore", comm, rtol=1e-12, method="fe", petsc_options={"ssor_omega": 1.2}
    )
    assert omega.tau == pytest.approx(amg.tau, rel=1e-9) and omega.iterations != ssor.iterations
    # the default rtol: tau to a few 1e-6
    default = tortuosity_factor(image(labels, spacing), "pore", comm, method="fe")
    assert default.tau == pytest.approx(amg.tau, rel=1e-4)
    from fem_anode.fem import voxel_sweeps

    def unavailable(comm):
        raise voxel_sweeps.SweepKernelUnavailable("no C compiler (test)")

    monkeypatch.setattr(voxel_sweeps, "load_sweep_library", unavailable)
    fallback = tortuosity_factor(image(labels, spacing), "pore", comm, rtol=1e-12, method="fe")
    assert fallback.tau == pytest.approx(amg.tau, rel=1e-9) and fallback.iterations == amg.iterations


def test_element_stiffness_is_the_trilinear_box_stiffness():
    """Closed form against Gauss quadrature of grad N_a . grad N_b on an anisotropic box."""
    h = np.array([0.7, 1.3, 0.4])  # (z, y, x)
    g = 0.5 + np.array([-1.0, 1.0]) / (2.0 * np.sqrt(3.0))  # 2-point Gauss rule on [0, 1], exact here
    ke = np.zeros((8, 8))
    for z in g:
        for y in g:
            for x in g:
                grads = []
                for dz, dy, dx in [(k, j, i) for k in (0, 1) for j in (0, 1) for i in (0, 1)]:
                    f = [(1 - t, t)[d] for t, d in ((z, dz), (y, dy), (x, dx))]
                    s = [(-1.0, 1.0)[d] for d in (dz, dy, dx)]
                    grads.append([s[0] * f[1] * f[2] / h[0], f[0] * s[1] * f[2] / h[1], f[0] * f[1] * s[2] / h[2]])
                grads = np.array(grads)
                ke += grads @ grads.T * np.prod(h) / 8
    np.testing.assert_allclose(element_stiffness(tuple(h)), ke, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(ke.sum(axis=1), 0.0, atol=1e-14)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (1.6, 0.8, 1.0)])
def test_free_node_system_equals_plain_triplet_sum(spacing):
    """The voxel operator's stiffness of the free nodes equals the COO sum of the element matrices
    over the hexahedra of the percolating voxels (same node numbering), also where the four voxels
    around an edge split into two face-connected groups at one end (edge entries, nonzero for
    non-cubic voxels), in blocks of a few rows."""
    import scipy.sparse

    from fem_anode.fem.voxel_p1 import TRANSPORT, VoxelP1Operator

    rng = np.random.default_rng(3)
    mask = percolating_mask(rng.random((9, 8, 7)) < 0.6)
    # a diagonal pair around an edge joined at the lower end only: duplicated nodes above it
    mask[4:6, 0:2, 0:2] = [[[True, False], [False, True]], [[True, False], [False, True]]]
    mask[4, 0, 1] = True
    points, cells = hex_mesh_arrays(mask, spacing)
    n = points.shape[0]
    z = points[:, 2]
    n_top, n_bottom = int(np.count_nonzero(z == 0)), int(np.count_nonzero(z == z.max()))
    classes = np.zeros((mask.shape[0] + 3, *mask.shape[1:]), np.uint8)
    classes[2:-1] = mask * TRANSPORT
    op = VoxelP1Operator(MPI.COMM_SELF, classes, 0, mask.shape[0], mask.shape[0], np.array(spacing), 1.0, 0.0, 0.0)
    assert op.ndofs == n
    np.testing.assert_array_equal(op.grid_indices() * np.asarray(spacing)[::-1], points)  # the same numbering
    # a range of rows in blocks: the rows of the whole CSR
    indptr_all, columns_all, k_all, m_all = op.csr()
    for a, ip, cols, k, m in op.csr_blocks(rows_per_block=10, start=25, stop=61):
        lo, hi = indptr_all[a], indptr_all[a + ip.size - 1]
        np.testing.assert_array_equal(ip, indptr_all[a : a + ip.size] - lo)
        np.testing.assert_array_equal(cols, columns_all[lo:hi])
        np.testing.assert_array_equal(k, k_all[lo:hi])
        np.testing.assert_array_equal(m, m_all[lo:hi])
    assert [a for a, *_ in op.csr_blocks(rows_per_block=10, start=25, stop=61)] == [25, 35, 45, 55]
    blocks = op.csr_blocks
    op.csr_blocks = lambda rows_per_block=1 << 16: blocks(rows_per_block=37)  # several blocks
    free, indptr, columns, values, load = free_node_system(op, n_top, n_bottom)
    matrix = scipy.sparse.csr_matrix((values, columns, indptr), shape=(n - n_top - n_bottom,) * 2)
    ke = element_stiffness(spacing)
    triplets = (
        np.tile(ke.ravel(), cells.shape[0]),
        (np.repeat(cells, 8, axis=1).ravel(), np.tile(cells, (1, 8)).ravel()),
    )
    full = scipy.sparse.csr_matrix(triplets, shape=(n, n))
    inner = slice(n_top, n - n_bottom)
    np.testing.assert_array_equal(free, np.arange(n) == np.clip(np.arange(n), n_top, n - n_bottom - 1))
    assert abs(matrix - full[inner][:, inner]).max() < 1e-14
    np.testing.assert_allclose(load, -full[inner][:, :n_top] @ np.ones(n_top), atol=1e-14)
    assert matrix.has_sorted_indices
    # entries of round-off size are dropped: cubic voxels have no edge entries
    assert np.abs(values).min() > 1e-12 * np.abs(ke).max()


@pytest.mark.parametrize("spacing", [H, (1e-6, 1e-6, 1e-6)])
def test_voxel_assembly_equals_dolfinx_assembly(comm, spacing):
    """The fast path (NumPy stiffness, PETSc) and the plain dolfinx-assembled FE give the same tau."""
    rng = np.random.default_rng(5)
    labels = (rng.random((10, 9, 8)) < 0.6).astype(np.uint8)
    fast = tortuosity_factor(image(labels, spacing), "pore", comm, rtol=1e-12, method="fe")
    reference = tortuosity_factor(image(labels, spacing), "pore", comm, rtol=1e-12, assembly="dolfinx", method="fe")
    assert fast.tau == pytest.approx(reference.tau, rel=1e-8)
    assert fast.relative_diffusivity == pytest.approx(reference.relative_diffusivity, rel=1e-8)
    assert (fast.cells, fast.dofs) == (reference.cells, reference.dofs)
    assert fast.flux_check_rel < 1e-8 and reference.flux_check_rel < 1e-8
    assert 1.0 < fast.tau < 10.0


def test_bad_input(comm):
    with pytest.raises(UsageError, match="not in the phase map"):
        tortuosity_factor(image(np.ones((3, 3, 3))), "carbon", comm)
    with pytest.raises(UsageError, match="needs a 3D volume"):
        tortuosity_factor(VoxelImage(np.ones((3, 3), np.uint8), (1e-8, 1e-8), {"pore": 1}), "pore", comm)
    with pytest.raises(UsageError, match="ssor_omega must lie in"):
        tortuosity_factor(image(np.ones((3, 3, 3))), "pore", comm, method="fe", petsc_options={"ssor_omega": 2.0})
    with pytest.raises(UsageError, match="default SSOR takes only ssor_omega, got ksp_monitor"):
        tortuosity_factor(image(np.ones((3, 3, 3))), "pore", comm, method="fe", petsc_options={"ksp_monitor": True})
    with pytest.raises(UsageError, match="refine must be an integer >= 1"):
        fe_tortuosity_factor(image(np.ones((3, 3, 3))), "pore", comm, refine=0)
    with pytest.raises(UsageError, match="assembly must be"):
        tortuosity_factor(image(np.ones((3, 3, 3))), "pore", comm, assembly="scipy")
    with pytest.raises(UsageError, match="method must be one of fv, fe, fe-extrapolated"):
        tortuosity_factor(image(np.ones((3, 3, 3))), "pore", comm, method="lbm")
    with pytest.raises(UsageError, match="rtol must lie"):
        tortuosity_factor(image(np.ones((3, 3, 3))), "pore", comm, rtol=0.0)
    # the FE path checks on every rank before any collective work: the same error everywhere
    with pytest.raises(UsageError, match="not in the phase map"):
        tortuosity_factor(image(np.ones((3, 3, 3))), "carbon", comm, method="fe")
    with pytest.raises(UsageError, match="needs a 3D volume"):
        tortuosity_factor(VoxelImage(np.ones((3, 3), np.uint8), (1e-8, 1e-8), {"pore": 1}), "pore", comm, method="fe")


def test_metrics_cli_tortuosity_factor(shared_tmp_path, comm):
    import json

    from fem_anode.cli import main
    from fem_anode.io.images import write_image

    labels = np.zeros((6, 8, 8), np.uint8)
    labels[:, 2:5, 1:4] = 1  # straight pore channel: tau = eps / eps_percolating = 1
    labels[2:4, 6, 6] = 1  # floating pore (2 voxels): tau = 56 / 54
    labels[:, :, 7] = 2  # "other": a sheet along z, tau = 1
    path = shared_tmp_path / "vol.npy"
    if comm.rank == 0:
        write_image(path, image(labels))
    comm.barrier()
    out = shared_tmp_path / "m"
    assert main(["metrics", str(path), "--tortuosity-factor", "pore,other", "--out", str(out)]) == 0
    data = json.loads((out / "metrics.json").read_text())
    assert data["tortuosity_factor"]["pore"] == pytest.approx(56 / 54, rel=1e-9)
    assert data["tortuosity_factor"]["other"] == pytest.approx(1.0, rel=1e-9)
    assert data["tortuosity_factor_details"]["pore"]["ranks"] == comm.size
    assert data["tortuosity_factor_method"] == "fv" and data["tortuosity_factor_details"]["pore"]["method"] == "fv"
    for method in ("fe", "fe-extrapolated"):
        assert (
            main(
                ["metrics", str(path), "--tortuosity-factor", "--tortuosity-method", method, "--out", str(out / method)]
            )
            == 0
        )
        data = json.loads((out / method / "metrics.json").read_text())
        assert (
            data["tortuosity_factor_method"] == method and data["tortuosity_factor_details"]["pore"]["method"] == method
        )
        assert data["tortuosity_factor"]["pore"] == pytest.approx(56 / 54, rel=1e-9)
    assert (
        main(["metrics", str(path), "--tortuosity-factor", "--tortuosity-method", "lbm", "--out", str(out / "m")]) == 2
    )
    # default phase: the pore phase; without the flag no key
    assert main(["metrics", str(path), "--tortuosity-factor", "--out", str(out / "d")]) == 0
    assert list(json.loads((out / "d" / "metrics.json").read_text())["tortuosity_factor"]) == ["pore"]
    assert main(["metrics", str(path), "--out", str(out / "n")]) == 0
    assert "tortuosity_factor" not in json.loads((out / "n" / "metrics.json").read_text())
    assert main(["metrics", str(path), "--tortuosity-factor", "carbon", "--out", str(out / "bad")]) == 2


# ---------------------------------------------------------------------------------------------
# Finite volumes (the default): exact resistor networks, diagonal contacts, distribution.


def conductances(spacing):
    """Face conductances (g_z, g_y, g_x) = area / distance of a voxel (any length unit)."""
    hz, hy, hx = spacing
    return hx * hy / hz, hx * hz / hy, hy * hz / hx


def relative_from_resistance(resistance, shape, spacing):
    """D_eff / D of a network of total resistance R (Delta c = 1) across a box of ``shape`` voxels."""
    (nz, ny, nx), (hz, hy, hx) = shape, spacing
    return (1.0 / resistance) * nz * hz / (ny * hy * nx * hx)


def network_relative_diffusivity(mask, spacing):
    """Independent FV reference: the resistor network over voxel faces, built with explicit loops
    and solved densely (every phase voxel; clusters not spanning z carry no flux)."""
    gz, gy, gx = conductances(spacing)
    mask = percolating_mask(mask)
    cells = [tuple(v) for v in np.argwhere(mask)]
    number = {v: i for i, v in enumerate(cells)}
    nz = mask.shape[0]
    A = np.zeros((len(cells), len(cells)))
    b = np.zeros(len(cells))
    for (k, j, i), row in number.items():
        for (dk, dj, di), g in (((1, 0, 0), gz), ((0, 1, 0), gy), ((0, 0, 1), gx)):
            other = number.get((k + dk, j + dj, i + di))
            if other is not None:
                A[row, row] += g
                A[other, other] += g
                A[row, other] -= g
                A[other, row] -= g
        if k == 0:
            A[row, row] += 2 * gz
            b[row] += 2 * gz
        if k == nz - 1:
            A[row, row] += 2 * gz
    c = np.linalg.solve(A, b)
    top = np.array([number[v] for v in cells if v[0] == 0])
    flux = 2 * gz * (1.0 - c[top]).sum()
    return relative_from_resistance(1.0 / flux, mask.shape, spacing)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), H])
def test_fv_chain_of_voxels_is_a_series_resistor(comm, spacing):
    """Column down, one step sideways through a face, column down: a path, R = nz/g_z + 1/g_x + 1/g_y."""
    labels = np.zeros((8, 4, 4), np.uint8)
    labels[:4, 1, 1] = 1
    labels[3, 1, 2] = 1  # step in x at layer 3
    labels[3:6, 2, 2] = 1  # step in y at layer 3, down to layer 5
    labels[5:, 2, 3] = 1  # step in x at layer 5, down to the bottom
    gz, gy, gx = conductances(spacing)
    resistance = 8 / gz + 2 / gx + 1 / gy  # 2 half z faces + 7 z faces = 8 / g_z
    res = tortuosity_factor(image(labels, spacing), "pore", comm, rtol=1e-10)
    expected = relative_from_resistance(resistance, labels.shape, spacing)
    assert res.relative_diffusivity == pytest.approx(expected, rel=1e-9)
    assert res.tau == pytest.approx(labels.mean() / expected, rel=1e-9)
    assert res.method == "fv" and res.dofs == np.count_nonzero(labels) == 4 + 1 + 3 + 3
    # a second, straight path in parallel: the conductances add
    labels[:, 0, 3] = 1
    both = tortuosity_factor(image(labels, spacing), "pore", comm, rtol=1e-10)
    expected = relative_from_resistance(1.0 / (1.0 / resistance + gz / 8), labels.shape, spacing)
    assert both.relative_diffusivity == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("contact", ["edge", "corner"])
def test_fv_diagonal_contact_does_not_connect(comm, contact):
    """Two columns meeting along an edge or at a corner only: no flux (tau = inf); a face bridge
    gives the series resistor exactly."""
    labels = np.zeros((8, 4, 4), np.uint8)
    labels[:4, 1, 1] = 1
    if contact == "edge":
        labels[4:, 1, 2] = 1  # (3, 1, 1) and (4, 1, 2) share an edge
    else:
        labels[4:, 2, 2] = 1  # (3, 1, 1) and (4, 2, 2) share a corner
    res = tortuosity_factor(image(labels), "pore", comm)
    assert res.tau == float("inf") and res.relative_diffusivity == 0.0 and res.dofs == 0
    assert res.volume_fraction == pytest.approx(8 / labels.size, rel=1e-12)
    labels[3, 1, 2] = 1  # face bridge: (3, 1, 1) - (3, 1, 2) [- (3, 2, 2)] - column below
    if contact == "corner":
        labels[3, 2, 2] = 1
    gz, gy, gx = conductances(H)
    resistance = 8 / gz + 1 / gx + (1 / gy if contact == "corner" else 0.0)
    bridged = tortuosity_factor(image(labels), "pore", comm, rtol=1e-10)
    assert bridged.relative_diffusivity == pytest.approx(
        relative_from_resistance(resistance, labels.shape, H), rel=1e-9
    )


def test_fv_series_blocks_equal_the_resistor_network(comm):
    """Wide block (4x4) over a narrow one (2x2), anisotropic voxels: the FV value equals an
    independent resistor-network solve and lies between the narrow-columns-only and 1D bounds."""
    labels = np.zeros((8, 6, 6), np.uint8)
    labels[:4, 1:5, 1:5] = 1
    labels[4:, 2:4, 2:4] = 1
    res = tortuosity_factor(image(labels), "pore", comm, rtol=1e-10)
    reference = network_relative_diffusivity(labels == 1, H)
    assert res.relative_diffusivity == pytest.approx(reference, rel=1e-9)
    gz = conductances(H)[0]
    series = relative_from_resistance(4 / (16 * gz) + 4 / (4 * gz), labels.shape, H)  # 1D, no lateral resistance
    narrow = relative_from_resistance(8 / (4 * gz), labels.shape, H)
    assert narrow < res.relative_diffusivity < series


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), H])
def test_fv_random_volume_equals_the_resistor_network_and_is_rank_independent(comm, spacing):
    rng = np.random.default_rng(11)
    labels = (rng.random((9, 7, 6)) < 0.62).astype(np.uint8)
    res = tortuosity_factor(image(labels, spacing), "pore", comm, rtol=1e-10)
    assert res.relative_diffusivity == pytest.approx(network_relative_diffusivity(labels == 1, spacing), rel=1e-8)
    assert res.flux_check_rel < 1e-6  # the z = 0 and z = end fluxes agree to the solver tolerance
    single = tortuosity_factor(image(labels, spacing), "pore", MPI.COMM_SELF, rtol=1e-10)
    assert res.tau == pytest.approx(single.tau, rel=1e-9)
    taus = comm.allgather(res.tau)
    assert max(taus) == min(taus)
    # GAMG: the same answer; FE (below) and FV bracket the refinement limit
    gamg = tortuosity_factor(image(labels, spacing), "pore", comm, rtol=1e-10, petsc_options={"pc_type": "gamg"})
    assert gamg.tau == pytest.approx(res.tau, rel=1e-8)
    fe = tortuosity_factor(image(labels, spacing), "pore", comm, method="fe")
    assert fe.tau < res.tau


def test_fv_blob_volume_rank_independence(comm):
    """A larger volume whose clusters cross the slab interfaces many times (labels merged by the
    distributed union-find): 1 rank and all ranks agree."""
    from scipy import ndimage

    rng = np.random.default_rng(2)
    field = ndimage.gaussian_filter(rng.standard_normal((30, 24, 24)), 1.5, mode="wrap")
    labels = (field < np.quantile(field, 0.45)).astype(np.uint8)
    res = tortuosity_factor(image(labels), "pore", comm, rtol=1e-9)
    single = tortuosity_factor(image(labels), "pore", MPI.COMM_SELF, rtol=1e-9)
    assert np.isfinite(res.tau) and res.tau > 1.0
    assert res.tau == pytest.approx(single.tau, rel=1e-8)
    assert res.percolating_fraction == single.percolating_fraction


@pytest.mark.parametrize("spacing", [(1e-6, 1e-6, 1e-6), (0.7e-6, 1.3e-6, 1e-6)])
def test_fv_compiled_sweeps_equal_petsc_sor(comm, spacing):
    """The default SSOR runs on the compiled kernel, which is the matrix too (no assembled matrix
    kept); PETSc's SSOR on the SBAIJ matrix (``pc_type = "sor"``, the same omega) gives the same
    factor to the solver tolerance and iterations, on any number of ranks, with anisotropic voxels."""
    from scipy import ndimage

    from fem_anode.fem.tortuosity.fv import fv_solve

    rng = np.random.default_rng(5)
    labels = (ndimage.gaussian_filter(rng.standard_normal((24, 16, 16)), 1.2) < 0.1).astype(np.uint8)
    runs = {
        pc: fv_solve(comm, labels, 1, spacing, phase="pore", rtol=1e-11, max_iterations=2000, petsc_options=options)
        for pc, options in (
            ("compiled", {}),
            ("petsc", {"pc_type": "sor", "pc_sor_omega": 1.6, "pc_sor_local_symmetric": True}),
        )
    }
    assert runs["compiled"]["sweeps"] == "compiled" and runs["petsc"]["sweeps"] == "petsc"
    assert runs["compiled"]["relative"] > 0
    assert runs["compiled"]["relative"] == pytest.approx(runs["petsc"]["relative"], rel=1e-8)
    assert abs(runs["compiled"]["iterations"] - runs["petsc"]["iterations"]) <= 2


def test_distributed_spanning_clusters_equal_the_serial_labelling(comm):
    """Clusters that go down, back up and down again across slab interfaces; dead ends; islands."""
    rng = np.random.default_rng(4)
    mask = rng.random((12, 9, 9)) < 0.35
    mask[:, 0, 0] = True  # spans
    mask[:, 8, :] = False
    mask[:8, 8, 1] = True  # a U: down column 1, across at layer 7, up column 3, ... then down
    mask[7, 8, 1:4] = True
    mask[2:8, 8, 3] = True
    mask[2, 8, 3:6] = True
    mask[2:, 8, 5] = True
    expected = percolating_mask(mask)
    for layers in range(1, 4):  # also fewer layers than ranks
        sub = mask[:layers] if layers < 3 else mask
        slab = slab_bounds(comm, sub.shape[0])
        mine = spanning_clusters(comm, slab, sub[slab.z0 : slab.z1])
        parts = comm.allgather(mine)
        assert np.array_equal(np.concatenate(parts), percolating_mask(sub) if layers < 3 else expected)


def test_fv_memmap_input_and_fewer_layers_than_ranks(shared_tmp_path, comm):
    rng = np.random.default_rng(9)
    labels = (rng.random((10, 8, 8)) < 0.6).astype(np.uint8)
    path = shared_tmp_path / "vol.npy"
    if comm.rank == 0:
        np.save(path, labels)
    comm.barrier()
    mapped = np.load(path, mmap_mode="r")
    res = tortuosity_factor(image(labels), "pore", comm, rtol=1e-9)
    res_mapped = tortuosity_factor(VoxelImage(mapped, H, {"solid": 0, "pore": 1, "other": 2}), "pore", comm, rtol=1e-9)
    assert res_mapped.tau == pytest.approx(res.tau, rel=1e-12)
    one_layer = tortuosity_factor(image(np.ones((1, 3, 4))), "pore", comm)
    assert one_layer.tau == pytest.approx(1.0, rel=1e-12)


def test_fe_extrapolated_lies_between_fe_and_fv(comm):
    rng = np.random.default_rng(5)
    labels = (rng.random((8, 7, 7)) < 0.65).astype(np.uint8)
    fv = tortuosity_factor(image(labels, (1e-6,) * 3), "pore", comm)
    fe = tortuosity_factor(image(labels, (1e-6,) * 3), "pore", comm, method="fe")
    ex = tortuosity_factor(image(labels, (1e-6,) * 3), "pore", comm, method="fe-extrapolated")
    assert ex.method == "fe-extrapolated" and ex.refinement["tau"][0] == pytest.approx(fe.tau, rel=1e-9)
    assert fe.tau < ex.refinement["tau"][1] < ex.refinement["tau"][2] <= ex.tau < fv.tau
    assert ex.to_json()["refinement"]["order"] > 0
