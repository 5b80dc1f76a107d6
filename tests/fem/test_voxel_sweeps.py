"""The compiled SOR sweeps of voxel matrices (fem_anode.fem.voxel_sweeps) equal PETSc's MatSOR on
the same matrix (anisotropic voxels, empty and single layers, 2D), and a machine without a C
compiler falls back to PETSc's sweeps ('auto', warned) or stops with a clear error ('compiled')."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("petsc4py")

from mpi4py import MPI
from petsc4py import PETSc

import fem_anode.fem.voxel_sweeps as voxel_sweeps
from fem_anode.fem.tortuosity.clusters import slab_bounds
from fem_anode.fem.tortuosity.fv import assemble_face_conductances

CONDUCTANCE = (0.7, 1.9, 1.3)  # z, y, x: non-cubic voxels
OMEGA = 1.3
SOR = PETSc.Mat.SORType


@pytest.mark.parametrize(
    "shape, fill",
    [((7, 6, 5), 0.7), ((1, 9, 8), 0.6), ((5, 4, 6), 0.35), ((6, 1, 7), 0.8)],
    ids=["3d", "one-layer", "sparse", "one-row-per-layer"],
)
def test_kernel_sweeps_equal_petsc_matsor(shape, fill):
    comm = MPI.COMM_SELF
    mask = np.random.default_rng(sum(shape)).random(shape) < fill
    if shape[0] > 2:
        mask[1] = False  # a layer without rows
    slab = slab_bounds(comm, shape[0])
    extra = np.random.default_rng(1).random(int(mask.sum()))  # a varying diagonal, as the Robin terms make
    A = assemble_face_conductances(comm, slab, mask, CONDUCTANCE, False, ends=False, extra_diagonal=extra)[0]
    kernel = voxel_sweeps.VoxelSweepKernel(mask, CONDUCTANCE, OMEGA, voxel_sweeps.load_sweep_library(comm))
    kernel.set_diagonal(A.getDiagonal().array)
    b, x = A.createVecLeft(), A.createVecLeft()
    b.array[:] = np.random.default_rng(2).standard_normal(kernel.n)
    out = np.empty(kernel.n)
    try:
        for flag, sweep in (
            (SOR.FORWARD_SWEEP | SOR.ZERO_INITIAL_GUESS, kernel.forward),
            (SOR.BACKWARD_SWEEP | SOR.ZERO_INITIAL_GUESS, kernel.backward),
            (SOR.APPLY_UPPER, kernel.apply_upper),
        ):
            A.SOR(b, x, OMEGA, flag, 0.0, 1, 1)
            sweep(b.array_r, out)
            np.testing.assert_allclose(out, x.array, rtol=1e-13, atol=1e-14 * np.abs(x.array).max())
        # Eisenstat's fused forward sweep: the forward sweep of y + (1 - 2/omega) d t
        d = A.getDiagonal().array
        y, tt = np.random.default_rng(3).random((2, kernel.n))
        mid = 1.0 - 2.0 / OMEGA
        b.array[:] = y + mid * d * tt
        A.SOR(b, x, OMEGA, SOR.FORWARD_SWEEP | SOR.ZERO_INITIAL_GUESS, 0.0, 1, 1)
        kernel.forward_eisenstat(y, tt, d, mid, out)
        np.testing.assert_allclose(out, x.array, rtol=1e-13, atol=1e-14 * np.abs(x.array).max())
        # the fused CG kernels: p = d r + beta p then t = B^{-T} p; w = t + B^{-1}(p + mid d t) and p.w;
        # y += alpha p, r -= alpha w and r.(d r); each against its definition by the sweeps above
        rng = np.random.default_rng(4)
        r, p0, y0 = rng.standard_normal((3, kernel.n))
        beta, alpha = 0.37, -0.8
        p_expected = d * r + beta * p0
        t_expected, z_expected = np.empty(kernel.n), np.empty(kernel.n)
        kernel.backward(p_expected, t_expected)
        kernel.forward_eisenstat(p_expected, t_expected, d, mid, z_expected)
        w_expected = z_expected + t_expected
        p, t, w = p0.copy(), np.empty(kernel.n), np.empty(kernel.n)
        kernel.cg_direction_backward(r, d, beta, p, t)
        np.testing.assert_allclose(p, p_expected, rtol=1e-15)
        np.testing.assert_allclose(t, t_expected, rtol=1e-13, atol=1e-14 * np.abs(t_expected).max())
        pw = kernel.cg_forward_product(p, t, d, mid, w)
        np.testing.assert_allclose(t, z_expected, rtol=1e-13, atol=1e-14 * np.abs(z_expected).max())
        np.testing.assert_allclose(w, w_expected, rtol=1e-13, atol=1e-14 * np.abs(w_expected).max())
        assert pw == pytest.approx(float(p_expected @ w_expected), rel=1e-12)
        y, rr = y0.copy(), r.copy()
        rz = kernel.cg_update(alpha, p, w, d, y, rr)
        np.testing.assert_allclose(y, y0 + alpha * p_expected, rtol=1e-14, atol=1e-15)
        np.testing.assert_allclose(rr, r - alpha * w_expected, rtol=1e-12, atol=1e-14 * np.abs(rr).max())
        assert rz == pytest.approx(float(rr @ (d * rr)), rel=1e-12)
        assert kernel.weighted_dot(r, d, p0) == pytest.approx(float(r @ (d * p0)), rel=1e-12)
        # the sweeps see the stencil: a wrong conductance along any one axis is noticed
        for axis in range(3):
            wrong = list(CONDUCTANCE)
            wrong[axis] *= 1.5
            other = voxel_sweeps.VoxelSweepKernel(mask, tuple(wrong), OMEGA, kernel.library)
            other.set_diagonal(A.getDiagonal().array)
            A.SOR(b, x, OMEGA, SOR.FORWARD_SWEEP | SOR.ZERO_INITIAL_GUESS, 0.0, 1, 1)
            other.forward(b.array_r, out)
            moved = np.abs(out - x.array).max() / np.abs(x.array).max()
            couples = [mask[1:] & mask[:-1], mask[:, 1:] & mask[:, :-1], mask[:, :, 1:] & mask[:, :, :-1]][axis]
            assert (moved > 1e-3) == bool(couples.any())
    finally:
        for obj in (A, b, x):
            obj.destroy()


def test_sweeps_in_two_row_ranges_equal_one_sweep():
    """A sweep split at a z layer (what lets a slab's boundary layer travel to its neighbour while
    the rest is swept) gives the same values bit for bit, and the products add up."""
    mask = np.random.default_rng(5).random((6, 5, 7)) < 0.7
    kernel = voxel_sweeps.VoxelSweepKernel(mask, CONDUCTANCE, OMEGA, voxel_sweeps.load_sweep_library(MPI.COMM_SELF))
    rng = np.random.default_rng(6)
    d = 6.0 + rng.random(kernel.n)
    kernel.set_diagonal(d)
    split = int(mask[:2].sum())  # rows of the first two layers
    assert 0 < split < kernel.n
    b, tt, r, p0 = rng.standard_normal((4, kernel.n))
    mid = 1.0 - 2.0 / OMEGA
    whole, parts = np.empty(kernel.n), np.empty(kernel.n)
    for name, forward in (("forward", True), ("backward", False)):
        getattr(kernel, name)(b, whole)
        for rows in ((0, split), (split, kernel.n)) if forward else ((split, kernel.n), (0, split)):
            getattr(kernel, name)(b, parts, rows=rows)
        np.testing.assert_array_equal(parts, whole)
    kernel.forward_eisenstat(b, tt, d, mid, whole)
    kernel.forward_eisenstat(b, tt, d, mid, parts, rows=(0, split))
    kernel.forward_eisenstat(b, tt, d, mid, parts, rows=(split, kernel.n))
    np.testing.assert_array_equal(parts, whole)
    p_whole, p_parts, t_whole, t_parts = p0.copy(), p0.copy(), np.empty(kernel.n), np.empty(kernel.n)
    kernel.cg_direction_backward(r, d, 0.4, p_whole, t_whole)
    kernel.cg_direction_backward(r, d, 0.4, p_parts, t_parts, rows=(split, kernel.n))
    kernel.cg_direction_backward(r, d, 0.4, p_parts, t_parts, rows=(0, split))
    np.testing.assert_array_equal(p_parts, p_whole)
    np.testing.assert_array_equal(t_parts, t_whole)
    w_whole, w_parts = np.empty(kernel.n), np.empty(kernel.n)
    pw = kernel.cg_forward_product(p_whole, t_whole, d, mid, w_whole)
    pw_parts = kernel.cg_forward_product(p_parts, t_parts, d, mid, w_parts, rows=(0, split))
    pw_parts += kernel.cg_forward_product(p_parts, t_parts, d, mid, w_parts, rows=(split, kernel.n))
    np.testing.assert_array_equal(w_parts, w_whole)
    assert pw_parts == pytest.approx(pw, rel=1e-13)
    with pytest.raises(ValueError, match="outside"):
        kernel.forward(b, whole, rows=(split, kernel.n + 1))


def test_deferred_solution_update_is_the_same_bit_for_bit():
    """CG's ``y += alpha p`` moved from the update pass into the next direction pass (before ``p``
    changes) and the update pass without it give the values and the sum of ``cg_update``."""
    mask = np.random.default_rng(7).random((5, 6, 7)) < 0.7
    kernel = voxel_sweeps.VoxelSweepKernel(mask, CONDUCTANCE, OMEGA, voxel_sweeps.load_sweep_library(MPI.COMM_SELF))
    rng = np.random.default_rng(8)
    d = 6.0 + rng.random(kernel.n)
    kernel.set_diagonal(d)
    r, p, w, y = rng.standard_normal((4, kernel.n))
    alpha, beta = 0.37, 0.81
    # together: update (y and r), then the direction pass
    y1, r1, p1, t1 = y.copy(), r.copy(), p.copy(), np.empty(kernel.n)
    rz1 = kernel.cg_update(alpha, p1, w, d, y1, r1)
    kernel.cg_direction_backward(r1, d, beta, p1, t1)
    # deferred: update r only, then the direction pass does y's update on the way
    y2, r2, p2, t2 = y.copy(), r.copy(), p.copy(), np.empty(kernel.n)
    rz2 = kernel.cg_update_residual(alpha, w, d, r2)
    kernel.cg_direction_backward(r2, d, beta, p2, t2, pending=(alpha, y2))
    assert rz2 == rz1
    for name, a, b in (("y", y2, y1), ("r", r2, r1), ("p", p2, p1), ("t", t2, t1)):
        np.testing.assert_array_equal(a, b, err_msg=name)
    y3 = y.copy()
    kernel.axpy(alpha, p, y3)  # the last deferred update of a solve
    y4, r4 = y.copy(), r.copy()
    kernel.cg_update(alpha, p, w, d, y4, r4)
    np.testing.assert_array_equal(y3, y4)


def test_kernel_checks_its_vectors():
    mask = np.ones((2, 3, 3), bool)
    kernel = voxel_sweeps.VoxelSweepKernel(mask, (1.0, 1.0, 1.0), OMEGA, voxel_sweeps.load_sweep_library(MPI.COMM_SELF))
    with pytest.raises(ValueError, match="18 float64"):
        kernel.forward(np.zeros(17), np.zeros(18))


def test_without_a_compiler_auto_falls_back_and_compiled_is_an_error(tmp_path, monkeypatch, caplog, comm):
    """No C compiler (``CC`` names a missing program) and an empty cache: the kernels are
    unavailable on every rank; a finite-volume run with ``sweep_kernel = 'auto'`` warns and solves
    with PETSc's sweeps on the assembled matrix, ``'compiled'`` stops before any work with a clear
    message."""
    pytest.importorskip("dolfinx")
    from fem_anode.errors import UsageError
    from fem_anode.fem.diffusion.finite_volume import VoxelFVProblem
    from fem_anode.fem.diffusion.settings import DiffusionSettings
    from fem_anode.io.images import VoxelImage, open_image_layers, write_image

    monkeypatch.setattr(voxel_sweeps, "_library", None)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("FEM_ANODE_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(voxel_sweeps.SweepKernelUnavailable, match="no-such-compiler"):
        voxel_sweeps.load_sweep_library(comm)

    path = tmp_path / f"image-{comm.rank}.npy"
    labels = np.where(np.random.default_rng(3).random((6, 5, 5)) < 0.7, 3, 0).astype(np.uint8)
    write_image(path, VoxelImage(labels, (1e-7,) * 3, {"pore": 0, "sei": 3}))

    def settings(kernel):
        return DiffusionSettings.from_dict(
            {
                "geometry": {"image": str(path)},
                "mesh": {"discretisation": "fv"},
                "solver": {"type": "iterative", "preconditioner": "ssor", "sweep_kernel": kernel},
                "time": {"t_end": 1e-3, "output_times": [1e-3]},
                "output": {"fields": False, "figures": False},
            }
        )

    problem = VoxelFVProblem(open_image_layers(path), settings("auto"), MPI.COMM_SELF)
    try:
        with caplog.at_level("WARNING", logger="fem_anode.fem.diffusion"):
            result = problem.run()
        assert result.status == "completed" and "compiled SSOR sweeps unavailable" in caplog.text
        assert problem._kernel is None and problem._A is not None
    finally:
        problem.destroy()
    with pytest.raises(UsageError, match="sweep_kernel = 'compiled' is unavailable"):
        VoxelFVProblem(open_image_layers(path), settings("compiled"), MPI.COMM_SELF)
