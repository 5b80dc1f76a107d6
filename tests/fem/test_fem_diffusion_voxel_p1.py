"""P1 diffusion on 3D voxel images without a mesh (``mesh.voxel_p1 = "image"``, the default): the
same run as on dolfinx's voxel mesh (records, regions, Si-particle report, figure sections) to the
solver tolerance on 1 and 2 ranks, VTK image output of the nodal field, checkpoints that resume
exactly, the exact compiled distance transform, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("dolfinx")

from mpi4py import MPI  # noqa: E402

from fem_anode.errors import UsageError  # noqa: E402
from fem_anode.fem.diffusion.run import run_diffusion, simulate_diffusion  # noqa: E402
from fem_anode.fem.diffusion.settings import DiffusionSettings  # noqa: E402
from fem_anode.io.images import VoxelImage, write_image  # noqa: E402

PHASES = {"pore": 0, "inert": 1, "si": 2, "sei": 3}
SPACING = (2e-8, 3e-8, 1e-8)  # z, y, x (m): anisotropic on purpose


@pytest.fixture
def volume(shared_tmp_path, comm) -> Path:
    """A random 12 x 11 x 13 volume of pore, inert, Si and SEI voxels (seeded): split nodes, pore
    and Si faces, several Si particles."""
    labels = np.random.default_rng(5).choice([0, 3, 3, 3, 2, 1], size=(12, 11, 13)).astype(np.uint8)
    path = shared_tmp_path / "volume.npy"
    if comm.rank == 0:
        write_image(path, VoxelImage(labels, SPACING, PHASES))
    comm.barrier()
    return path


def settings(image: Path, kind: str, **sections) -> DiffusionSettings:
    data = {
        "geometry": {"image": str(image)},
        "mesh": {"voxel_p1": kind},
        "physics": {"k_si": 1e-4},
        "regions": [{"name": "corner", "box": [0.0, 0.0, 0.0, 1.3e-7, 3.3e-7, 1.2e-7]}],
        "time": {"t_end": 1e-3, "output_times": [1e-4, 1e-3], "dt_initial": 1e-7},
        "output": {"fields": False, "figures": True},
    }
    for key, value in sections.items():
        data.setdefault(key, {}).update(value)
    return DiffusionSettings.from_dict(data)


def close(a, b, rtol: float = 1e-9) -> None:
    a, b = np.asarray(a, float), np.asarray(b, float)
    assert np.abs(a - b).max(initial=0.0) <= rtol * max(np.abs(b).max(initial=0.0), 1e-300), (a, b)


@pytest.mark.parametrize("solver", ["direct", "iterative"])
def test_the_run_is_the_run_on_the_mesh(volume, comm, solver):
    """Every record of a run on the voxels equals the run on dolfinx's voxel mesh to the CG tolerance:
    the domain and region means at every step, the Si-particle report and the figure's section;
    with the direct solver (assembled from the rows) and with the fused SSOR-CG on the grid stencil
    (on 2 ranks: the separator order with the couplings across the slab faces)."""
    # CG to 1e-13 (not the default 1e-10): two solves whose SSOR orders differ (another partition on 3
    # ranks) then agree pointwise to 1e-11, well inside the comparisons' 1e-9
    options = {"type": solver, "rtol": 1e-13} if solver == "iterative" else {"type": solver}
    runs = {kind: simulate_diffusion(settings(volume, kind, solver=options), comm) for kind in ("mesh", "image")}
    image, mesh = runs["image"], runs["mesh"]
    assert image.tagged is None and mesh.tagged is not None  # no mesh at all on the voxels
    for key in ("ndofs", "ncells", "steps"):
        assert image.results[key] == mesh.results[key]
    close(image.domain_mean, mesh.domain_mean)
    close(image.region_means["corner"], mesh.region_means["corner"])
    assert 0.1 < image.domain_mean[-1] / 1000.0 < 0.99  # a transient state
    for t in mesh.results["si_particles"]:
        mine, theirs = image.results["si_particles"][t], mesh.results["si_particles"][t]
        assert [p["id"] for p in mine] == [p["id"] for p in theirs] and len(mine) > 1
        for key in ("interface_measure_m", "mean", "min", "max", "fraction_above_half_bulk"):
            close([p[key] for p in mine], [p[key] for p in theirs])
    for t, section in mesh.snapshots.items():
        assert np.array_equal(np.isnan(image.snapshots[t]), np.isnan(section))
        close(np.nan_to_num(image.snapshots[t]), np.nan_to_num(section))
    assert image.results["mass_balance_rel_error"] < 1e-8


def test_same_result_on_one_rank(volume, comm):
    """The world communicator (2 ranks under mpirun: slabs, the separator-order SSOR, couplings
    across ranks) and one rank alone give the same records."""
    from fem_anode.fem.diffusion.transient import FusedEisenstatSolver
    from fem_anode.fem.diffusion.voxel_elements import VoxelP1Problem
    from fem_anode.io.images import open_image_layers

    s = settings(volume, "image", solver={"type": "iterative"})
    problem = VoxelP1Problem(open_image_layers(volume), s, comm)
    try:
        world = problem.run()
        # the fused SSOR-CG on the grid stencil (the slab-face order on several ranks), no matrix
        assert isinstance(problem._fused, FusedEisenstatSolver) and problem._KR is None
        expected = "eisenstat+grid-stencil" if comm.size == 1 else "eisenstat-slab-faces+grid-stencil"
        assert problem._fused.getPC().getType() == expected
    finally:
        problem.destroy()
    alone = simulate_diffusion(s, MPI.COMM_SELF)
    assert world.steps == alone.results["steps"]
    close(world.domain_mean, alone.domain_mean)
    close(world.region_means["corner"], alone.region_means["corner"])


def test_fields_are_vtk_images_of_the_nodes(volume, shared_tmp_path, comm):
    """``c.pvd`` and ``c_<k>.vti``: point data c on the nodes (NaN at nodes of no transporting voxel,
    c_bulk at the steady state) and cell data marking the transporting voxels; no mesh file."""
    from fem_anode.io.vti import read_vti

    s = settings(volume, "image", physics={"k_si": 0.0}, time={"t_end": 30.0, "output_times": [30.0]})
    s = s.replace(output=s.output.replace(fields=True))
    staging = shared_tmp_path / "run"
    if comm.rank == 0:
        staging.mkdir()
    comm.barrier()
    results = run_diffusion(s, staging, comm, render=False)
    if comm.rank == 0:
        assert not (staging / "mesh.xdmf").exists() and not (staging / "c.bp").exists()
        assert "c_1.vti" in (staging / "c.pvd").read_text()
        arrays, spacing = read_vti(staging / "c_1.vti")
        assert spacing == pytest.approx(SPACING, rel=1e-9)
        labels = np.load(volume)
        section, transporting = arrays["transporting"]
        assert section == "CellData" and np.array_equal(transporting == 1, labels == 3)
        section, c = arrays["c"]
        assert section == "PointData" and c.shape == tuple(n + 1 for n in labels.shape)
        padded = np.pad(labels == 3, 1)
        near = np.zeros(c.shape, bool)
        for dz in (0, 1):
            for dy in (0, 1):
                for dx in (0, 1):
                    near |= padded[dz : dz + c.shape[0], dy : dy + c.shape[1], dx : dx + c.shape[2]]
        assert np.array_equal(np.isfinite(c), near)
        # steady: voxels fed through the pore faces at c_bulk, clusters without a pore face at 0; a
        # node split by face connectivity shows the mean of its copies (k of m copies fed)
        values = c[np.isfinite(c)].astype(float) / 1000.0
        fed = np.abs(values - 1.0) < 1e-5
        means = [np.abs(values * m - np.rint(values * m)) < 1e-5 for m in (1, 2, 3, 4)]
        assert np.all(np.logical_or.reduce(means)) and fed.mean() > 0.9 and means[0].mean() > 0.98
        assert results["domain_mean"][-1] == pytest.approx(1000.0 * fed.mean(), rel=0.05)
        assert json.loads((staging / "results.json").read_text())["ndofs"] == results["ndofs"]


def test_a_checkpointed_run_resumes_exactly(volume, shared_tmp_path, comm):
    """A run stopped after its first checkpoint and resumed gives the records of the whole run."""
    from fem_anode.errors import Interrupted
    from fem_anode.io.checkpoint import CheckpointStore

    s = settings(volume, "image", checkpoint={"every_steps": 20})
    whole = simulate_diffusion(s, comm)
    folder = shared_tmp_path / "stopped"

    class Stop(Exception):
        pass

    calls = {"n": 0}
    import fem_anode.fem.diffusion.transient as transient

    original = transient.TransientDiffusion._try_step

    def failing(self, coeff, ratio=None):
        calls["n"] += 1
        if calls["n"] == 30:
            raise Interrupted("test stop")
        return original(self, coeff, ratio)

    transient.TransientDiffusion._try_step = failing
    try:
        with pytest.raises(Interrupted):
            run = simulate_diffusion(s, comm, checkpoint_dir=folder)
            if run.stopped is not None:
                raise run.stopped
    finally:
        transient.TransientDiffusion._try_step = original
    checkpoint = CheckpointStore(folder, comm).load()
    resumed = simulate_diffusion(s, comm, checkpoint_dir=folder, resume=checkpoint)
    assert resumed.results["resumed_from_step"] > 0
    assert resumed.results["steps"] == whole.results["steps"]
    close(resumed.domain_mean, whole.domain_mean, rtol=1e-12)


def test_three_d_only_and_a_mesh_where_asked(volume, shared_tmp_path, comm):
    """2D images and ``voxel_p1 = "mesh"`` keep the mesh; ``load_geometry`` always makes one."""
    from fem_anode.fem.diffusion.geometry import load_geometry, prepare_geometry

    assert prepare_geometry(settings(volume, "image"), None, None, comm).tagged is None
    assert prepare_geometry(settings(volume, "mesh"), None, None, comm).tagged is not None
    tagged, _ = load_geometry(settings(volume, "image"), shared_tmp_path, comm)
    assert tagged.mesh.topology.dim == 3
    flat = shared_tmp_path / "flat.npy"
    if comm.rank == 0:
        write_image(flat, VoxelImage(np.load(volume)[0], SPACING[1:], PHASES))
    comm.barrier()
    s = settings(flat, "image")
    s = s.replace(regions=[])
    assert prepare_geometry(s, None, None, comm).tagged is not None
    with pytest.raises(UsageError, match="voxel_p1"):
        DiffusionSettings.from_dict({"mesh": {"voxel_p1": "voxels"}})


@pytest.mark.skipif(MPI.COMM_WORLD.size < 2, reason="needs several MPI ranks")
def test_too_many_ranks_for_the_layers_is_a_clear_error(shared_tmp_path, comm):
    from fem_anode.fem.diffusion.voxel_elements import VoxelP1Problem
    from fem_anode.io.images import open_image_layers

    labels = np.full((3, 4, 4), 3, np.uint8)
    labels[:, :, 0] = 0
    path = shared_tmp_path / "thin.npy"
    if comm.rank == 0:
        write_image(path, VoxelImage(labels, SPACING, PHASES))
    comm.barrier()
    with pytest.raises(UsageError, match="at least 2 layers per rank"):
        VoxelP1Problem(open_image_layers(path), settings(path, "image"), comm)


def test_the_compiled_distance_transform_is_exact(comm):
    """Squared distances equal scipy's exact transform (anisotropic voxels; no target: inf)."""
    from scipy import ndimage

    from fem_anode.fem.voxel_sweeps import load_sweep_library, squared_distance

    library = load_sweep_library(comm)
    rng = np.random.default_rng(1)
    for shape, fraction, spacing in (((7, 9, 11), 0.1, (1.0, 1.0, 1.0)), ((20, 13, 17), 0.02, (3.0, 2.0, 0.5))):
        targets = rng.random(shape) < fraction
        reference = ndimage.distance_transform_edt(~targets, sampling=spacing) ** 2
        close(squared_distance(targets, spacing, library), reference, rtol=1e-14)
    assert np.isinf(squared_distance(np.zeros((3, 4, 5), bool), (1.0, 1.0, 1.0), library)).all()


@pytest.mark.parametrize(
    ("cells", "ranks", "peak_mib_per_rank"),
    [(834_649, 1, 255), (834_649, 2, 182), (6_677_192, 1, 1211), (6_677_192, 2, 717)],
)
def test_the_memory_estimate_covers_the_measured_peaks(cells, ranks, peak_mib_per_rank):
    """The estimate the memory check uses is 1.0-1.3x the peaks the scale benchmark measured (128^3
    and 256^3 electrode, 1 and 2 ranks, the largest of the runs; docs/benchmarks.md); solvers that
    need assembled matrices add them."""
    from fem_anode.fem.diffusion.voxel_elements import estimate_voxel_p1_memory

    s = DiffusionSettings.from_dict({"output": {"fields": False}})
    estimate = estimate_voxel_p1_memory(1.2 * cells, s, ranks)
    assert 1.0 <= estimate.bytes / (ranks * peak_mib_per_rank * 2**20) <= 1.3
    direct = estimate_voxel_p1_memory(1.2 * cells, s.replace(solver=s.solver.replace(type="direct")), ranks)
    assert direct.bytes > 2.0 * estimate.bytes - ranks * 150e6


@pytest.mark.parametrize(
    "solver",
    [
        {"preconditioner": "mg"},
        {"preconditioner": "gamg"},
        {"preconditioner": "hypre"},
        {"preconditioner": "ssor", "sweep_kernel": "petsc"},
    ],
)
def test_assembled_solvers_agree_with_the_direct_solve(volume, comm, solver):
    """The solvers that need assembled matrices (multigrid, AMG, PETSc's own SSOR) get ``K + R`` and ``M``
    assembled from the voxel rows and give the direct solve's records (CG to 1e-12)."""
    direct = simulate_diffusion(settings(volume, "image", solver={"type": "direct"}), comm)
    run = simulate_diffusion(settings(volume, "image", solver={"type": "iterative", "rtol": 1e-12, **solver}), comm)
    close(run.domain_mean, direct.domain_mean, rtol=1e-10)
    close(run.region_means["corner"], direct.region_means["corner"], rtol=1e-10)


def test_one_planes_dof_numbers_equal_the_whole_slabs(volume, comm):
    """After the set-up drops the per-node dof numbers, a pass over the layers (outputs, the
    Si-particle report, fluxes) gets them plane by plane: each plane's numbers equal the slab's
    recomputed whole, so that pass costs one plane per layer, not the slab."""
    from fem_anode.fem.diffusion.voxel_elements import VoxelP1Problem
    from fem_anode.io.images import open_image_layers

    problem = VoxelP1Problem(open_image_layers(volume), settings(volume, "image"), comm)
    try:
        op = problem.operator
        assert op._first is None  # compacted by the set-up
        whole = op._first_dofs()
        plane = int(op._strides[0])
        for q in range(op.node_shape[0]):
            assert np.array_equal(op._plane_first_dofs(q), whole[q * plane : (q + 1) * plane]), q
    finally:
        problem.destroy()


def test_over_and_undershoots_are_recorded_and_reported(volume, comm, caplog):
    """The exact solution stays in [0, c_bulk]. P1 with its consistent mass matrix undershoots 0 at
    steps far below an element's diffusion time (here 1e-7 s against about 4e-7 s): the run records
    the lowest and highest c of any step with their times and warns. Finite volumes with backward
    Euler (an M-matrix with a diagonal mass) stay in [0, c_bulk] on the same volume and say nothing."""
    with caplog.at_level("WARNING", logger="fem_anode.fem.diffusion"):
        p1 = simulate_diffusion(settings(volume, "image"), comm).results
    low, high = p1["min_c"], p1["max_c"]
    assert low["c"] < -1.0 and 0.0 < low["t_s"] <= 1e-3  # mol/m^3: well below 0, at a step's time
    assert low["c"] <= p1["final_min_c"] and high["c"] >= p1["final_max_c"]
    warned = "c left [0, c_bulk]" in caplog.text and "Over- and undershoots" in caplog.text
    assert warned == (comm.rank == 0)  # once, by rank 0: the extremes are global
    caplog.clear()
    with caplog.at_level("WARNING", logger="fem_anode.fem.diffusion"):
        fv = simulate_diffusion(
            settings(volume, "image", mesh={"discretisation": "fv"}, time={"scheme": "euler"}), comm
        )
    low, high = fv.results["min_c"], fv.results["max_c"]
    assert low["c"] >= -1e-12 * 1000.0 and high["c"] <= 1000.0 * (1 + 1e-12)
    assert 0.1 * 1000.0 < high["c"]  # the record is the run's: c rose from 0
    assert "c left" not in caplog.text


def test_lumped_element_matrices_are_the_row_sums():
    """``lumped``: M and every face mass become the diagonals of their row sums (the same integral of
    each basis function); K is unchanged."""
    from fem_anode.fem.voxel_p1 import element_matrices

    K, M, F = element_matrices(np.array(SPACING), 2.0)
    K_l, M_l, F_l = element_matrices(np.array(SPACING), 2.0, lumped=True)
    assert np.array_equal(K_l, K)
    assert np.array_equal(M_l, np.diag(np.diag(M_l))) and np.allclose(np.diag(M_l), M.sum(axis=1), rtol=1e-15)
    for face, lumped in zip(F, F_l):
        assert np.array_equal(lumped, np.diag(np.diag(lumped))) and np.allclose(np.diag(lumped), face.sum(axis=1))
    assert np.isclose(M_l.sum(), np.prod(SPACING), rtol=1e-14)


def _block(shared_tmp_path: Path, comm, n: int) -> Path:
    """``n`` SEI voxels per edge of a 1 um cube, pore layers below it along every axis, Si (no flux) beyond x."""
    labels = np.full((n + 1, n + 1, n + 2), PHASES["sei"], np.uint8)
    labels[0] = labels[:, 0] = labels[:, :, 0] = PHASES["pore"]
    labels[..., -1] = PHASES["si"]
    path = shared_tmp_path / f"block{n}.npy"
    if comm.rank == 0:
        write_image(path, VoxelImage(labels, (1e-6 / n,) * 3, {"pore": 0, "si": 2, "sei": 3}))
    comm.barrier()
    return path


def test_lumped_mass_converges_to_the_exact_mean_with_order_two(shared_tmp_path, comm):
    """The domain mean on a cube with mass transfer on three faces is exact: ``1 - c / c_bulk`` is the
    product of three plane-sheet solutions, so its mean is ``(1 - M(t))^3`` with ``M`` Crank's
    plane-sheet uptake (eq. 4.53). With the lumped mass the error falls by 4 per halving of the
    voxels, as with the consistent one (about 2.3 times larger), and c never leaves [0, c_bulk]."""
    from fem_anode.fem.analytic import robin_sheet_mean

    t_end = 5e-4
    errors = []
    for n in (4, 8, 16):
        s = DiffusionSettings.from_dict(
            {
                "geometry": {"image": str(_block(shared_tmp_path, comm, n))},
                "mesh": {"mass_lumping": True},
                "time": {"t_end": t_end, "output_times": [t_end], "dt_initial": 1e-8, "steps_per_level": 4},
                "output": {"fields": False, "figures": False},
            }
        )
        s.time.dt_max = t_end / 200
        results = simulate_diffusion(s, MPI.COMM_SELF).results  # (4 voxels: too few layers for 3 ranks)
        physics = s.physics
        uptake = float(robin_sheet_mean(t_end, 1e-6, physics.D_eff, physics.eps, physics.k_f)[0])
        exact = 1.0 - (1.0 - uptake) ** 3
        errors.append(abs(results["domain_mean"][-1] / physics.c_bulk - exact) / exact)
        # (within the iterative solver's tolerance of the bounds)
        assert results["min_c"]["c"] >= -1e-9 * physics.c_bulk and results["max_c"]["c"] <= physics.c_bulk * (1 + 1e-9)
    assert errors[0] / errors[1] > 3.5 and errors[1] / errors[2] > 3.5, errors
    assert errors[2] < 2e-3, errors  # measured 1.3e-3 (the consistent mass: 5.5e-4)


def test_lumped_mass_keeps_c_in_bounds_where_the_consistent_one_does_not(shared_tmp_path, comm):
    """On cubic voxels with backward Euler the lumped step matrix is an M-matrix: c stays in
    [0, c_bulk] at every step of the random volume, where the consistent mass undershoots; the
    records are the same on one rank and on the world communicator."""
    labels = np.random.default_rng(5).choice([0, 3, 3, 3, 2, 1], size=(12, 11, 13)).astype(np.uint8)
    path = shared_tmp_path / "cubic.npy"
    if comm.rank == 0:
        write_image(path, VoxelImage(labels, (2e-8,) * 3, PHASES))
    comm.barrier()
    euler = {"scheme": "euler"}
    consistent = simulate_diffusion(settings(path, "image", time=euler), comm).results
    assert consistent["min_c"]["c"] < -1.0
    lumped_settings = settings(path, "image", time=euler, mesh={"mass_lumping": True})
    lumped = simulate_diffusion(lumped_settings, comm)
    low, high = lumped.results["min_c"]["c"], lumped.results["max_c"]["c"]
    assert low >= -1e-9 * 1000.0 and high <= 1000.0 * (1 + 1e-9)  # (the solver's tolerance)
    assert 0.1 < lumped.domain_mean[-1] / 1000.0 < 0.99  # a transient state
    alone = simulate_diffusion(lumped_settings, MPI.COMM_SELF)
    close(lumped.domain_mean, alone.domain_mean)
    close(lumped.region_means["corner"], alone.region_means["corner"])
    # the direct solve above (assembled from the rows) and the fused SSOR-CG on the grid stencil,
    # whose pattern and runs come from the voxels' couplings, not from M's (now zero) off-diagonals
    iterative = settings(
        path, "image", time=euler, mesh={"mass_lumping": True}, solver={"type": "iterative", "rtol": 1e-13}
    )
    swept = simulate_diffusion(iterative, comm)
    close(swept.domain_mean, lumped.domain_mean)
    close(swept.region_means["corner"], lumped.region_means["corner"])


@pytest.mark.parametrize("mesh", [{"discretisation": "fv"}, {"voxel_p1": "mesh"}, {"order": 2}])
def test_mass_lumping_is_refused_where_it_is_not_implemented(volume, mesh):
    with pytest.raises(UsageError, match="mass_lumping is implemented for P1 on the voxels"):
        settings(volume, "image", mesh={"mass_lumping": True, **mesh})


def test_mass_lumping_on_a_2d_image_is_a_clear_error(shared_tmp_path, comm):
    """A 2D image is meshed (the settings cannot know the image's dimension): the mesh path refuses it."""
    labels = np.random.default_rng(2).choice([0, 3, 3], size=(10, 12)).astype(np.uint8)
    path = shared_tmp_path / "slice.npy"
    if comm.rank == 0:
        write_image(path, VoxelImage(labels, (2e-8, 2e-8), {"pore": 0, "sei": 3}))
    comm.barrier()
    with pytest.raises(
        UsageError, match="mass_lumping is implemented for P1 on the voxels of a 3D image; this geometry"
    ):
        s = DiffusionSettings.from_dict(
            {"geometry": {"image": str(path)}, "mesh": {"mass_lumping": True}, "time": {"t_end": 1e-6}}
        )
        simulate_diffusion(s, comm)
