"""Cell-centred finite volumes on voxel images (``mesh.discretisation = "fv"``): second-order
convergence to Crank's plane sheet, face connectivity, steady state and mass balance, the same
results on 1 and 2 ranks, VTK image output, checkpoint round trip and settings validation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("dolfinx")

from mpi4py import MPI  # noqa: E402

from fem_anode.errors import UsageError  # noqa: E402
from fem_anode.fem.analytic import robin_sheet_mean  # noqa: E402
from fem_anode.fem.diffusion.settings import DiffusionSettings  # noqa: E402
from fem_anode.io.images import VoxelImage, open_image_layers, write_image  # noqa: E402

PHASES = {"pore": 0, "sei": 3}


def _image_file(directory: Path, labels: np.ndarray, h: float, comm, name: str = "image.npy") -> Path:
    path = directory / name
    if comm.rank == 0:
        write_image(path, VoxelImage(labels, (h,) * labels.ndim, PHASES))
    comm.barrier()
    return path


def _settings(image: Path, **sections) -> DiffusionSettings:
    data = {
        "geometry": {"image": str(image)},
        "mesh": {"discretisation": "fv"},
        "output": {"fields": False, "figures": False},
    }
    for key, value in sections.items():
        data.setdefault(key, {}).update(value) if isinstance(value, dict) else data.__setitem__(key, value)
    return DiffusionSettings.from_dict(data)


def _solve(settings: DiffusionSettings, comm):
    from fem_anode.fem.diffusion.finite_volume import VoxelFVProblem

    image = open_image_layers(settings.geometry.image)
    problem = VoxelFVProblem(image, settings, comm)
    try:
        return problem, problem.run()
    finally:
        problem.destroy()


def test_plane_sheet_second_order(shared_tmp_path, comm):
    """A strip of n voxels (no flux at x = 0, pore beyond x = l): the mean c converges to Crank's
    series with order 2 (film resistance in series with the half voxel)."""
    length, t = 1e-6, 2e-3
    errors = []
    for n in (8, 16, 32):
        labels = np.full((2, 2, n + 1), 3, dtype=np.uint8)
        labels[..., n] = 0
        path = _image_file(shared_tmp_path, labels, length / n, comm, f"sheet{n}.npy")
        settings = _settings(path, time={"t_end": t, "output_times": [t], "dt_initial": 1e-7, "dt_max": t / 400})
        _, result = _solve(settings, comm)
        physics = settings.physics
        exact = robin_sheet_mean(t, length, physics.D_eff, physics.eps, physics.k_f)[0]
        errors.append(abs(result.domain_mean[-1] / physics.c_bulk - exact))
        assert result.mass_balance_rel_error < 1e-9
    orders = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    assert 0.2 < result.domain_mean[-1] / 1000.0 < 0.9  # a transient state, not the steady one
    assert all(1.8 < p < 2.3 for p in orders), (errors, orders)
    assert errors[-1] < 2e-4


def test_face_connectivity_and_steady_state(shared_tmp_path, comm):
    """Voxels touching the fed cluster only along an edge or at a corner get no Li (face
    connectivity); the fed cluster reaches c_bulk; mass balance holds."""
    labels = np.full((3, 3, 3), 1, dtype=np.uint8)  # 1: an inert phase
    labels[0, 0, 0] = 0  # pore
    labels[0, 0, 1] = 3  # fed through its face to the pore
    labels[0, 1, 2] = 3  # edge contact with (0, 0, 1) only
    labels[1, 1, 2] = 3  # face contact with the edge-contact voxel only
    labels[1, 2, 1] = 3  # edge contact with (1, 1, 2), corner contact with (0, 1, 2)
    path = shared_tmp_path / "diag.npy"
    if comm.rank == 0:
        write_image(path, VoxelImage(labels, (1e-7,) * 3, {"pore": 0, "inert": 1, "sei": 3}))
    comm.barrier()
    settings = _settings(path, time={"t_end": 1.0, "output_times": [1.0]})
    problem, result = _solve(settings, comm)
    assert result.ndofs == 4
    # one of four voxels is fed and reaches c_bulk; the mean is a quarter of it
    assert result.domain_mean[-1] == pytest.approx(250.0, rel=1e-9)
    assert result.mass_balance_rel_error < 1e-9


def test_si_particle_report_in_2d(shared_tmp_path, comm):
    """A 2D image with two Si particles (one 8-connected across a corner): two particles, each
    with the exact face length to the transporting phase."""
    from fem_anode.fem.diffusion.finite_volume import VoxelFVProblem

    h = 20e-9
    labels = np.full((20, 30), 3, dtype=np.uint8)
    labels[:, :4] = 0  # pore
    labels[8:12, 14:18] = 1  # a 4 x 4 Si particle: 16 faces to the SEI
    labels[2, 24] = labels[3, 25] = 1  # one particle of two voxels touching at a corner: 8 faces
    path = shared_tmp_path / "si2d.npy"
    if comm.rank == 0:
        write_image(path, VoxelImage(labels, (h, h), {"pore": 0, "si": 1, "sei": 3}))
    comm.barrier()
    settings = _settings(path, geometry={"si_phase": "si"}, time={"t_end": 1e-3, "output_times": [1e-3]})
    problem = VoxelFVProblem(open_image_layers(settings.geometry.image), settings, comm)
    try:
        problem.run()
        report = problem.si_particle_report()
    finally:
        problem.destroy()
    assert [p["id"] for p in report] == [1, 2]
    lengths = sorted(p["interface_measure_m"] for p in report)
    assert lengths == pytest.approx([8 * h, 16 * h], rel=1e-12)


@pytest.fixture
def electrode_crop(shared_tmp_path, comm) -> Path:
    from fem_anode.data import real_electrode

    image = real_electrode()
    crop = np.ascontiguousarray(np.asarray(image.array)[:20, :20, :20])
    path = shared_tmp_path / "electrode.npy"
    if comm.rank == 0:
        write_image(path, VoxelImage(crop, image.require_voxel_size(), image.require_phases()))
    comm.barrier()
    return path


@pytest.mark.parametrize("kernel", ["compiled", "petsc"])
@pytest.mark.parametrize("order", ["separators", "block-jacobi"])
def test_same_result_on_any_number_of_ranks(electrode_crop, comm, order, kernel, monkeypatch):
    """The world communicator (2 ranks under mpirun: CG with slab Eisenstat SSOR in the separator
    order, or block Jacobi, the fallback for one-layer slabs; sweeps compiled or PETSc's) and one
    rank alone (a direct solve) give the same histories to the solver tolerance."""
    import fem_anode.fem.diffusion.finite_volume as finite_volume

    if order == "block-jacobi":
        monkeypatch.setattr(finite_volume, "separator_order_possible", lambda comm, slab: False)
    box = [0.0, 0.0, 0.0, 5e-6, 5e-6, 5e-6]
    settings = _settings(
        electrode_crop,
        geometry={"transport_phase": "solid"},
        solver={"type": "iterative", "preconditioner": "ssor", "sweep_kernel": kernel},
        time={"t_end": 1.0, "output_times": [0.01, 1.0]},
        regions=[{"name": "A", "box": box}],
    )
    from fem_anode.fem.diffusion.finite_volume import VoxelFVProblem

    problem = VoxelFVProblem(open_image_layers(electrode_crop), settings, comm)
    try:
        world = problem.run()
        # the slab SSOR runs on several ranks, and on one with the compiled sweeps (else PCEISENSTAT)
        assert (problem._slab_ssor is not None) == (comm.size > 1 or kernel == "compiled")
        assert problem._slab_ssor is None or problem._slab_ssor.order == order
        assert problem._slab_ssor is None or (problem._slab_ssor.sweeps.kernel is not None) == (kernel == "compiled")
        assert (problem._A is None) == (kernel == "compiled")  # the compiled sweeps assemble no matrix
    finally:
        problem.destroy()
    _, alone = _solve(settings.replace(solver=settings.solver.replace(type="direct")), MPI.COMM_SELF)
    assert world.ndofs == alone.ndofs
    assert world.steps == alone.steps
    np.testing.assert_allclose(world.domain_mean, alone.domain_mean, rtol=1e-7, atol=1e-7 * 1000.0)
    np.testing.assert_allclose(world.region_means["A"], alone.region_means["A"], rtol=1e-7, atol=1e-7 * 1000.0)
    assert 0 < world.t90(1000.0)["domain"] < 1.0


@pytest.mark.parametrize("kernel", ["compiled", "petsc"])
def test_slab_ssor_is_one_global_ssor(shared_tmp_path, comm, kernel):
    """The slab Eisenstat applies ``B^{-1} A B^{-T}`` exactly, ``B`` the lower triangle
    (diagonal / omega) of A in the separator order (every slab but the top one's last layer after
    all other voxels): compared with the operator built densely from the whole matrix, with the
    compiled sweeps and with PETSc's. On one rank it is the natural order."""
    from fem_anode.fem.diffusion.finite_volume import VoxelFVProblem, _SlabEisenstat

    labels = np.where(np.random.default_rng(3).random((8, 5, 6)) < 0.75, 3, 0).astype(np.uint8)
    path = _image_file(shared_tmp_path, labels, 1e-7, comm, f"ssor-{kernel}.npy")
    settings = _settings(path, solver={"type": "iterative", "preconditioner": "ssor", "sweep_kernel": kernel})
    problem = VoxelFVProblem(open_image_layers(path), settings, comm)
    a0 = 1e4
    A = problem._operator(a0)
    slab = _SlabEisenstat(problem)
    try:
        slab.prepare(a0)
        assert slab.order == "separators"
        assert (slab.sweeps.kernel is not None) == (kernel == "compiled")
        n = A.getSize()[0]
        lo, hi = A.getOwnershipRange()
        dense = np.vstack(comm.allgather(A.getValues(range(lo, hi), range(n))))  # tiny: the whole matrix
        top = slab.sweeps.slab.next is None
        separators = np.concatenate(comm.allgather(np.zeros(0, int) if top else slab.sweeps.last_rows + lo))
        order = np.concatenate([np.setdiff1d(np.arange(n), separators), separators])
        P = dense[np.ix_(order, order)]
        B = np.tril(P, -1) + np.diag(np.diag(P)) / slab.omega
        y = np.random.default_rng(4).random(n)  # the same on every rank
        expected = np.empty(n)
        expected[order] = np.linalg.solve(B, P @ np.linalg.solve(B.T, y[order]))
        Y, Z = A.createVecLeft(), A.createVecLeft()
        Y.array[:] = y[lo:hi]
        slab.mult(None, Y, Z)
        scale = np.abs(expected).max()
        np.testing.assert_allclose(Z.array, expected[lo:hi], rtol=1e-10, atol=1e-12 * scale)
        Y.destroy()
        Z.destroy()
    finally:
        slab.free()
        problem.destroy()


def test_slabs_hold_equal_shares_of_transporting_voxels(shared_tmp_path, comm):
    """On several ranks every slab holds about the same number of transporting voxels (the sweeps'
    work), not the same number of layers: here the top quarter of the layers holds most of them."""
    from fem_anode.fem.diffusion.finite_volume import VoxelFVProblem

    labels = np.zeros((16, 6, 6), np.uint8)
    labels[:12, :2, :2] = 3  # 4 transporting voxels per layer in the lower 12 layers
    labels[12:] = 3  # 36 per layer in the top 4
    path = _image_file(shared_tmp_path, labels, 1e-7, comm, "balance.npy")
    problem = VoxelFVProblem(open_image_layers(path), _settings(path), comm)
    try:
        rows = comm.allgather(int(problem.per_layer.sum()))
        layers = comm.allgather(problem._layers_info.slab.layers)
    finally:
        problem.destroy()
    assert sum(rows) == 12 * 4 + 4 * 36 and sum(layers) == 16
    if comm.size == 2:
        # equal layers would give 32 / 160 rows; the layer boundary nearest 96 rows each is 13
        assert layers == [13, 3] and rows == [84, 108]


def test_fv_agrees_with_p1_on_the_electrode(electrode_crop, shared_tmp_path, comm):
    """FV and P1 are two discretisations of one model: on the 20^3 crop t90 differs by a few
    per cent (face vs node connectivity, O(h^2) errors), not by a factor."""
    from fem_anode.fem.diffusion.run import run_diffusion

    out = {}
    for kind in ("fv", "fe"):
        settings = _settings(
            electrode_crop,
            geometry={"transport_phase": "solid"},
            mesh={"discretisation": kind},
            time={"t_end": 0.5, "output_times": [0.5]},
        )
        staging = shared_tmp_path / kind
        if comm.rank == 0:
            staging.mkdir()
        comm.barrier()
        out[kind] = run_diffusion(settings, staging, comm)
    assert out["fv"]["discretisation"] == "fv"
    t_fv, t_fe = out["fv"]["t90_s"]["domain"], out["fe"]["t90_s"]["domain"]
    assert abs(t_fv / t_fe - 1) < 0.1, (t_fv, t_fe)


def test_cli_writes_vtk_images_and_resumable_state(electrode_crop, shared_tmp_path, comm):
    """The driver writes c at each output time as VTK image data (NaN outside the phase, the
    values of the solve) and the records; a checkpointed field round-trips."""
    from fem_anode.fem.diffusion.finite_volume import VoxelFVProblem
    from fem_anode.fem.diffusion.run import run_diffusion
    from fem_anode.io.checkpoint import CheckpointStore

    settings = _settings(
        electrode_crop,
        geometry={"transport_phase": "solid"},
        time={"t_end": 0.1, "output_times": [0.01, 0.1]},
        output={"fields": True, "figures": True},
    )
    staging = shared_tmp_path / "run"
    if comm.rank == 0:
        staging.mkdir()
    comm.barrier()
    results = run_diffusion(settings, staging, comm)
    if comm.rank == 0:
        assert (staging / "c.pvd").exists() and (staging / "c_fields.png").exists()
        import vtk
        from vtk.util.numpy_support import vtk_to_numpy

        reader = vtk.vtkXMLImageDataReader()
        reader.SetFileName(str(staging / "c_2.vti"))
        reader.Update()
        data = reader.GetOutput()
        assert data.GetDimensions() == (21, 21, 21)
        c = vtk_to_numpy(data.GetCellData().GetArray("c"))
        labels = np.load(electrode_crop)
        solid = (labels == 128).ravel()
        assert np.isnan(c[~solid]).all() and np.isfinite(c[solid]).all()
        assert np.mean(c[solid]) == pytest.approx(results["domain_mean"][-1], rel=1e-5)
        saved = json.loads((staging / "results.json").read_text())
        assert saved["discretisation"] == "fv" and saved["ndofs"] == int(solid.sum())
    # checkpoint round trip of the distributed unknowns
    problem = VoxelFVProblem(open_image_layers(electrode_crop), settings, comm)
    try:
        problem.c.x.array[:] = problem.c.global_offset + np.arange(len(problem.c.x.array))
        store = CheckpointStore(shared_tmp_path / "ckpt", comm)
        store.save({"t": 0.0}, {"c": problem.c})
        problem.c.x.array[:] = -1.0
        store.load().restore("c", problem.c)
        assert np.array_equal(problem.c.x.array, problem.c.global_offset + np.arange(len(problem.c.x.array)))
    finally:
        problem.destroy()


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"mesh": {"discretisation": "fv", "method": "smooth"}}, "mesh.method = 'voxel'"),
        ({"mesh": {"discretisation": "fv", "order": 2}}, "mesh.order = 1"),
        ({"mesh": {"discretisation": "fvm"}}, "discretisation"),
    ],
)
def test_settings_that_do_not_fit_are_rejected(sections, message):
    data = {"geometry": {"image": "x.npy"}, **sections}
    with pytest.raises(UsageError, match=message):
        DiffusionSettings.from_dict(data).check()


def test_fv_needs_an_image_not_a_mesh():
    with pytest.raises(UsageError, match="geometry.mesh needs 'fe'"):
        DiffusionSettings.from_dict({"geometry": {"mesh": "m.msh"}, "mesh": {"discretisation": "fv"}}).check()


@pytest.mark.parametrize(
    "solver, sweeps",
    [
        ({"type": "iterative", "preconditioner": "ssor"}, True),
        ({"type": "iterative"}, True),  # 'auto': SSOR first
        ({"type": "iterative", "preconditioner": "mg"}, False),
        ({"type": "direct"}, False),
        ({"type": "iterative", "petsc_options": {"pc_type": "jacobi"}}, False),
    ],
)
def test_compiled_sweeps_only_where_ssor_can_run(shared_tmp_path, comm, solver, sweeps):
    """The compiled sweeps (and the matrix-free operator) are made only for solvers that can use
    SSOR; the others assemble the matrix at once and keep no stencil."""
    from fem_anode.fem.diffusion.finite_volume import VoxelFVProblem

    labels = np.where(np.random.default_rng(8).random((6, 5, 5)) < 0.7, 3, 0).astype(np.uint8)
    path = _image_file(shared_tmp_path, labels, 1e-7, comm, "which.npy")
    problem = VoxelFVProblem(open_image_layers(path), _settings(path, solver=solver), comm)
    try:
        assert (problem._kernel is not None) == sweeps
        assert (problem._A is None) == sweeps
        assert problem.operator_nonzeros > problem.ndofs
    finally:
        problem.destroy()


def test_fused_cg_is_petscs_cg(shared_tmp_path, comm):
    """The fused CG iterations of the compiled kernel (``_SlabEisenstat._fused_solve``) are PETSc's
    KSPCG on the same operator: same solution (to round-off of the tolerance), same iterations
    within one (the dot products sum in another order), the same first residual norms, a true
    residual at the tolerance, and PETSc's reason when the iteration limit is hit."""
    from petsc4py import PETSc

    from fem_anode.fem.diffusion.finite_volume import VoxelFVProblem, _SlabEisenstat

    labels = np.where(np.random.default_rng(5).random((12, 9, 10)) < 0.7, 3, 0).astype(np.uint8)
    path = _image_file(shared_tmp_path, labels, 1e-7, comm, "fused.npy")
    a0, results = 1e3, {}
    for kernel in ("compiled", "petsc"):
        settings = _settings(path, solver={"type": "iterative", "preconditioner": "ssor", "sweep_kernel": kernel})
        problem = VoxelFVProblem(open_image_layers(path), settings, comm)
        problem._diagonal(a0)
        if kernel == "petsc":
            problem._operator(a0)
        slab = _SlabEisenstat(problem)
        try:
            slab.prepare(a0)
            assert (slab.cg is not None) == (kernel == "compiled")
            b, x = problem._new_vec(), problem._new_vec()
            lo, hi = b.getOwnershipRange()
            rng = np.random.default_rng(6)
            b.array[:] = rng.random(b.getSize())[lo:hi] - 0.3
            x.array[:] = rng.random(b.getSize())[lo:hi]  # a nonzero initial guess
            slab.solve(b, x)
            reason, its = slab.getConvergedReason(), slab.getIterationNumber()
            history = np.asarray(slab.getConvergenceHistory(), dtype=float)
            residual = problem._new_vec()
            problem._operator(a0).mult(x, residual)
            residual.aypx(-1.0, b)
            relative = residual.norm() / b.norm()
            solution = x.array.copy()
            # the iteration limit: PETSc's reason, after exactly that many iterations
            if slab.ksp is not None:
                slab.ksp.setTolerances(max_it=3)
            if slab.cg is not None:
                slab.cg.max_it = 3
            x.array[:] = 0.0
            slab.solve(b, x)
            limited = (slab.getConvergedReason(), slab.getIterationNumber())
            results[kernel] = (reason, its, history, solution, relative, limited)
            for vec in (b, x, residual):
                vec.destroy()
        finally:
            slab.free()
            problem.destroy()
    fused, petsc = results["compiled"], results["petsc"]
    assert fused[0] == petsc[0] == int(PETSc.KSP.ConvergedReason.CONVERGED_RTOL)
    assert abs(fused[1] - petsc[1]) <= 1 and fused[1] > 5
    assert len(fused[2]) == fused[1] + 1
    np.testing.assert_allclose(fused[2][:4], petsc[2][:4], rtol=1e-8)
    scale = np.abs(petsc[3]).max()
    np.testing.assert_allclose(fused[3], petsc[3], rtol=0, atol=1e-6 * scale)  # both within rtol 1e-10 of A^-1 b
    assert fused[4] < 1e-6 and petsc[4] < 1e-6
    assert fused[5] == petsc[5] == (int(PETSc.KSP.ConvergedReason.DIVERGED_MAX_IT), 3)
