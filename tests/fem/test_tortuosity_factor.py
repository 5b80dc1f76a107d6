"""Tortuosity factor from the FE flux on voxel meshes: exact cases, bounds, refinement, MPI.

Exact answers used (the solve is on the voxel geometry itself, so these hold to solver
precision): straight channels and sheets parallel to z give a linear c(z), hence tau = eps /
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

from mpi4py import MPI  # noqa: E402

from fem_anode.fem.tortuosity import (  # noqa: E402
    element_stiffness,
    hex_mesh_arrays,
    percolating_mask,
    reduced_system,
    tortuosity_factor,
    tortuosity_factors,
)

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


def test_straight_channels_and_sheets_exact(comm):
    labels = np.zeros((7, 10, 12), np.uint8)
    labels[:, 1:3, 1:4] = 1  # channel
    labels[:, 6, 2] = 1  # one-voxel channel
    labels[:, 8:10, :] = 1  # a sheet parallel to z
    labels[:, 5, 7] = 1  # a channel in edge contact with nothing else
    labels[:, 4, 6] = 1  # ... touching the previous one along an edge only
    labels[3, 0, 11] = 1  # floating voxel: counts in eps, not in the flux
    labels[:2, 4, 10] = 1  # dead end from the top
    labels[labels == 0] = np.where(np.arange(labels.size).reshape(labels.shape)[labels == 0] % 5 == 0, 2, 0)
    res = tortuosity_factor(image(labels), "pore", comm)
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
    full = tortuosity_factor(image(np.ones((4, 3, 5))), "pore", comm)
    assert full.tau == pytest.approx(1.0, rel=1e-10) and full.relative_diffusivity == pytest.approx(1.0, rel=1e-10)


def test_not_percolating_gives_inf_without_a_solve(comm):
    labels = np.zeros((6, 5, 5), np.uint8)
    labels[:3, 1, 1] = 1
    labels[3:, 2, 2] = 1  # meets the first column along an edge only
    res = tortuosity_factor(image(labels), "pore", comm)
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
    coarse = tortuosity_factor(image(labels, spacing), "pore", comm)
    fine = tortuosity_factor(image(labels.repeat(2, 0).repeat(2, 1).repeat(2, 2), (5e-7,) * 3), "pore", comm)
    n_cross = 36
    series = 1.0 / (0.5 * n_cross / 16 + 0.5 * n_cross / 4)  # D_eff/D of two layers in series (1D)
    narrow = 4 / n_cross  # the narrow columns alone, over the whole depth
    assert narrow < fine.relative_diffusivity < coarse.relative_diffusivity < series
    # the constriction costs a few per cent over the 1D estimate, not more
    assert coarse.relative_diffusivity > 0.9 * series
    assert fine.volume_fraction == pytest.approx(coarse.volume_fraction)


def test_random_volume_bounds_and_rank_independence(comm):
    rng = np.random.default_rng(7)
    labels = (rng.random((12, 10, 10)) < 0.65).astype(np.uint8)
    res = tortuosity_factor(image(labels), "pore", comm)
    assert 1.0 < res.tau < 5.0  # Wiener: D_eff <= eps D
    assert res.relative_diffusivity <= res.percolating_fraction
    assert res.flux_check_rel < 1e-6
    taus = comm.allgather(res.tau)
    assert max(taus) == min(taus)
    # the same volume on one rank gives the same number
    single = tortuosity_factor(image(labels), "pore", MPI.COMM_SELF)
    assert res.tau == pytest.approx(single.tau, rel=1e-7)
    # GAMG instead of the default BoomerAMG: the same answer
    gamg = tortuosity_factor(image(labels), "pore", comm, petsc_options={"pc_type": "gamg"})
    assert gamg.tau == pytest.approx(res.tau, rel=1e-7)
    # the solid phase along z (labels 0): a second phase through the convenience wrapper
    both = tortuosity_factors(image(labels), ["pore", "solid"], comm)
    assert both["pore"].tau == pytest.approx(res.tau, rel=1e-9)
    assert both["solid"].tau > 1.0 or both["solid"].tau == float("inf")


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
def test_reduced_system_equals_plain_triplet_sum(spacing):
    """The sort-free per-slot sum equals the COO sum of the element matrices, also where the four
    voxels around an edge split into two face-connected groups at one end (edge entries, nonzero
    for non-cubic voxels)."""
    import scipy.sparse

    rng = np.random.default_rng(3)
    mask = percolating_mask(rng.random((9, 8, 7)) < 0.6)
    # a diagonal pair around an edge joined at the lower end only: duplicated nodes above it
    mask[4:6, 0:2, 0:2] = [[[True, False], [False, True]], [[True, False], [False, True]]]
    mask[4, 0, 1] = True
    points, cells = hex_mesh_arrays(mask, spacing)
    n = points.shape[0]
    z = points[:, 2]
    n_top, n_bottom = int(np.count_nonzero(z == 0)), int(np.count_nonzero(z == z.max()))
    matrix, load = reduced_system(cells, n, n_top, n_bottom, spacing)
    ke = element_stiffness(spacing)
    triplets = (np.tile(ke.ravel(), cells.shape[0]), (np.repeat(cells, 8, axis=1).ravel(), np.tile(cells, (1, 8)).ravel()))
    full = scipy.sparse.csr_matrix(triplets, shape=(n, n))
    free = slice(n_top, n - n_bottom)
    assert abs(matrix - full[free][:, free]).max() < 1e-14
    np.testing.assert_allclose(load, -full[free][:, :n_top] @ np.ones(n_top), atol=1e-14)
    assert matrix.has_canonical_format


@pytest.mark.parametrize("spacing", [H, (1e-6, 1e-6, 1e-6)])
def test_voxel_assembly_equals_dolfinx_assembly(comm, spacing):
    """The fast path (NumPy stiffness, PETSc) and the plain dolfinx-assembled FE give the same tau."""
    rng = np.random.default_rng(5)
    labels = (rng.random((10, 9, 8)) < 0.6).astype(np.uint8)
    fast = tortuosity_factor(image(labels, spacing), "pore", comm, rtol=1e-12)
    reference = tortuosity_factor(image(labels, spacing), "pore", comm, rtol=1e-12, assembly="dolfinx")
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
    with pytest.raises(UsageError, match="assembly must be"):
        tortuosity_factor(image(np.ones((3, 3, 3))), "pore", comm, assembly="scipy")


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
    # default phase: the pore phase; without the flag no key
    assert main(["metrics", str(path), "--tortuosity-factor", "--out", str(out / "d")]) == 0
    assert list(json.loads((out / "d" / "metrics.json").read_text())["tortuosity_factor"]) == ["pore"]
    assert main(["metrics", str(path), "--out", str(out / "n")]) == 0
    assert "tortuosity_factor" not in json.loads((out / "n" / "metrics.json").read_text())
    assert main(["metrics", str(path), "--tortuosity-factor", "carbon", "--out", str(out / "bad")]) == 2
