"""Benchmark 3 (and 5): transient Li diffusion, fem_anode (dolfinx/PETSc) vs scikit-fem + SciPy.

Cases: the bundled-style 2D FIB-SEM ROI (``fib_sem_roi``, 8 x 5 um at 20 nm, refined k x k)
and a seeded 3D pore/Si/SEI volume (n^3 voxels of 20 nm), P1 and P2, on the voxel mesh of the
SEI phase. Every case takes ``--steps`` BDF2 steps of ``--dt`` (first step backward Euler;
with ``--geometric L`` after a ramp from ``dt / 2^L`` doubling every 4 steps, as real runs do),
with the package's default solver (``auto``: sparse Cholesky in 2D or below 50k dofs, else CG
to rtol 1e-10 with SSOR while it converges in ``switch_iterations``, GAMG beyond). scikit-fem
builds its own matrices on the same mesh and takes the same steps with the same BDF
coefficients (SciPy SuperLU, or CG + PyAMG to our rtol where we iterate); the domain-mean
concentration histories must agree to 1e-6 (relative to c_bulk).

Reported per case: dofs, setup (mesh read + assembly + first factorisation/AMG setup), time per
step after setup (median), CG iterations per step, dofs per second per step, the
memory-bandwidth bound of the average step (mean CG iterations per step x one sparse mat-vec
at the measured copy bandwidth: nnz x 12 B + n x 24 B) and the step's ratio to it, the measured
PETSc MatMult time, and the ratio to scikit-fem.

Scale case ``electrode`` (issue 20): the bundled 128^3 real electrode (``solid`` transporting,
pores as sources, 0.5 um voxels, 996k P1 dofs on hexahedra, paper physics, ``t_end = 10`` s with
the default geometric steps: 164 BDF2 steps), run as ``fem-anode diffusion`` runs it (config
written by this script, mesh through ``load_geometry``); ``electrode-short`` stops at 1e-3 s
(58 steps), ``electrode64`` is its 64^3 corner (105k dofs) for quick checks, ``electrode256``
the electrode mirror-tiled 2 x 2 x 2 (256^3, 6.68M transporting voxels) to 1e-3 s. Reported for the
whole run: mesh, assembly and time-loop seconds, steps, preconditioner set-ups, CG iterations
per step (mean, median, max), peak memory per rank (max over ranks) and per transporting
voxel (sum over ranks), the solver's matrices in bytes per dof, and the whole-run bandwidth
bound: sum over steps of the CG iterations x one operator mat-vec (nnz x 12 B + n x 24 B) at
the copy bandwidth measured in the same run on every rank at once (summed over ranks).

Usage (from the repository root)::

    .venv/bin/python benchmarks/bench_diffusion.py --cases roi1-p1,vol30-p1 [--no-peer]
    mpirun -n 2 .venv/bin/python benchmarks/bench_diffusion.py --cases vol100-p1 --no-peer
    .venv/bin/python benchmarks/bench_diffusion.py --cases electrode --no-peer
    mpirun -n 2 .venv/bin/python benchmarks/bench_diffusion.py --cases electrode --no-peer

Case names: ``roi{k}-p{order}`` (2D ROI refined k times), ``vol{n}-p{order}`` (n^3 volume) and
``electrode``, ``electrode-short``, ``electrode64``, ``electrode256``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from mpi4py import MPI  # noqa: E402

from fem_anode.fem.diffusion import (
    DiffusionSettings,
    GeometrySettings,
    MeshSettings,
    SolverSettings,
    TimeSettings,
)  # noqa: E402
from fem_anode.fem.diffusion.geometry import load_geometry  # noqa: E402
from fem_anode.fem.diffusion.time_stepping import bdf_coefficients, plan_steps  # noqa: E402
from fem_anode.imaging.synthetic import fib_sem_roi  # noqa: E402
from fem_anode.io.images import VoxelImage, write_image  # noqa: E402
from fem_anode.meshing.tags import interface_tag  # noqa: E402
from fem_anode.meshing.voxel import voxel_mesh_data  # noqa: E402


def case_image(name: str) -> tuple[VoxelImage, int]:
    kind, order = name.split("-p")
    if kind.startswith("roi"):
        k = int(kind[3:])
        roi = fib_sem_roi(seed=0)
        labels = roi.array.repeat(k, 0).repeat(k, 1)
        return VoxelImage(labels, tuple(s / k for s in roi.require_voxel_size()), roi.phases), int(order)
    n = int(kind[3:])
    pore = common.blob_volume((n, n, n), 2.5, 0.25, seed=1)
    si = common.blob_volume((n, n, n), 1.5, 0.12, seed=2) & ~pore
    labels = np.full((n, n, n), 3, np.uint8)
    labels[pore] = 0
    labels[si] = 1
    return VoxelImage(labels, (20e-9,) * 3, {"pore": 0, "si": 1, "sei": 3}), int(order)


def _timed(base: type) -> type:
    """``base`` (a DiffusionProblem class) recording set-up and solve times and CG iterations."""

    class Timed(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            self.setup_s, self.solve_s, self.iterations, self.solvers = 0.0, [], [], []
            super().__init__(*args, **kwargs)

        def _ksp(self, a0: float):  # type: ignore[no-untyped-def]
            t = time.perf_counter()
            before = self.factorisations
            ksp = super()._ksp(a0)
            if self.factorisations > before:
                self.setup_s += time.perf_counter() - t
            return _TimedKSP(ksp, self)

    return Timed


def timed_fe_problem(*args, **kwargs):  # type: ignore[no-untyped-def]
    """A timed :class:`DiffusionProblem` (imported here: the finite-volume cases run without dolfinx)."""
    from fem_anode.fem.diffusion.finite_element import DiffusionProblem

    return _timed(DiffusionProblem)(*args, **kwargs)


class _TimedKSP:
    def __init__(self, ksp, problem):  # type: ignore[no-untyped-def]
        self._ksp, self._problem = ksp, problem

    def solve(self, b, x) -> None:  # type: ignore[no-untyped-def]
        t = time.perf_counter()
        self._ksp.solve(b, x)
        self._problem.solve_s.append(time.perf_counter() - t)
        self._problem.iterations.append(self._ksp.getIterationNumber())
        name = f"{self._ksp.getType()}/{self._ksp.getPC().getType()}"
        if name not in self._problem.solvers:
            self._problem.solvers.append(name)

    def __getattr__(self, name):  # type: ignore[no-untyped-def]
        return getattr(self._ksp, name)


ELECTRODE_TOML = """\
[geometry]
image = "{image}"
transport_phase = "solid"
pore_phase = "pore"
pixel_size = 0.5e-6
phases = {{pore = 0, solid = 128}}

[time]
t_end = {t_end}
output_times = {outputs}

[output]
fields = false
figures = false
"""


def run_electrode(name: str, args: argparse.Namespace, comm: MPI.Comm, workdir: Path) -> dict:
    """The scale case of issue 20: a whole run on the bundled electrode (see the module docstring)."""
    from fem_anode.data import real_electrode

    short = name in ("electrode-short", "electrode256")
    t_end, outputs = (1e-3, [1e-3]) if short else (10.0, [1.0, 10.0])
    voxels = 0
    if comm.rank == 0:  # only rank 0 holds the whole image (to write it): the solve reads slabs
        image = real_electrode()
        solid = image.require_phases()["solid"]
        if name == "electrode256":  # mirror-tiled octant by octant into a memory-mapped .npy
            n = image.array.shape[0]
            tiled = np.lib.format.open_memmap(workdir / "electrode.npy", "w+", np.uint8, (2 * n,) * 3)
            for corner in np.ndindex(2, 2, 2):
                flips = tuple(slice(None, None, -1) if k else slice(None) for k in corner)
                tiled[tuple(slice(k * n, (k + 1) * n) for k in corner)] = image.array[flips]
            tiled.flush()
            voxels = 8 * int(np.count_nonzero(image.array == solid))
            del tiled
        else:
            if name == "electrode64":
                image = VoxelImage(
                    np.ascontiguousarray(image.array[:64, :64, :64]), image.require_voxel_size(), image.require_phases()
                )
            voxels = int(np.count_nonzero(image.array == solid))
            write_image(workdir / "electrode.npy", image)
        del image
        (workdir / "electrode.toml").write_text(
            ELECTRODE_TOML.format(image=workdir / "electrode.npy", t_end=t_end, outputs=outputs)
        )
    voxels = comm.bcast(voxels, root=0)
    settings = DiffusionSettings.from_toml(workdir / "electrode.toml")
    settings.mesh.discretisation = args.discretisation
    settings.solver.type = args.solver
    if args.preconditioner:
        settings.solver.preconditioner = args.preconditioner
    settings.solver.petsc_options = dict(args.petsc)
    settings.solver.sweep_kernel = args.sweep_kernel
    settings.mesh.voxel_p1 = args.voxel_p1
    settings.check()
    comm.barrier()
    start = time.perf_counter()
    if args.discretisation == "fv":  # no mesh: image opened by slabs, voxels are the cells
        from fem_anode.fem.diffusion.finite_volume import VoxelFVProblem, open_fv_image

        fv_image, _ = open_fv_image(settings, comm)
        t_mesh = time.perf_counter() - start
        t0 = time.perf_counter()
        problem = _timed(VoxelFVProblem)(fv_image, settings, comm)
    elif settings.mesh.voxel_p1 == "image":  # P1 without a mesh: the operators from the voxels
        from fem_anode.fem.diffusion.geometry import prepare_geometry
        from fem_anode.fem.diffusion.voxel_elements import VoxelP1Problem

        geo = prepare_geometry(settings, None, workdir, comm)
        t_mesh = time.perf_counter() - start
        t0 = time.perf_counter()
        problem = _timed(VoxelP1Problem)(geo.image, settings, comm)
    else:
        tagged, _ = load_geometry(settings, workdir, comm)
        t_mesh = time.perf_counter() - start
        t0 = time.perf_counter()
        problem = timed_fe_problem(tagged, settings)
    t_assembly = time.perf_counter() - t0
    rss_assembled = comm.allreduce(common.peak_rss_mb(), op=MPI.MAX)
    t0 = time.perf_counter()
    result = problem.run()
    t_run = time.perf_counter() - t0
    total = time.perf_counter() - start
    memory = problem.solver_memory()
    nnz = problem.operator_nonzeros if hasattr(problem, "operator_nonzeros") else problem._KR.getInfo()["nz_used"]
    spmv_bytes = nnz * 12 + result.ndofs * 24
    iterations = np.asarray(problem.iterations)
    peaks = comm.allgather(common.peak_rss_mb())
    problem.destroy()
    return {
        "case": name + ("-fv" if args.discretisation == "fv" else ""),
        "voxel_p1": None if args.discretisation == "fv" else args.voxel_p1,
        "ranks": comm.size,
        "ndofs": result.ndofs,
        "voxels": voxels,
        "steps": result.steps,
        "solver": ", ".join(problem.solvers) + ("+opts" if args.petsc else ""),
        "factorisations": result.factorisations,
        "mesh_s": t_mesh,
        "assembly_s": t_assembly,
        "factor_s": problem.setup_s,
        "run_s": t_run,
        "total_s": total,
        "its_total": int(iterations.sum()),
        "cg_its_mean": float(iterations.mean()),
        "cg_its": float(np.median(iterations)),
        "cg_its_max": int(iterations.max()),
        "spmv_bytes": spmv_bytes,
        "solver_B_per_dof": memory["per_dof"],
        "peak_rss_mb_assembled": rss_assembled,
        "peak_rss_mb_rank0": peaks[0],
        "peak_rss_mb_max": max(peaks),
        "peak_B_per_voxel": sum(peaks) * 2**20 / voxels,
        "final_mean": result.domain_mean[-1] / settings.physics.c_bulk,
        "load": common.load(),
        "dolfinx_imported": "dolfinx" in sys.modules,
    }


def run_case(name: str, args: argparse.Namespace, comm: MPI.Comm, workdir: Path, peer_python: Path | None) -> dict:
    if name.startswith("electrode"):
        return run_electrode(name, args, comm, workdir)
    image, order = case_image(name)
    dt = args.dt if args.dt else (5e-4 if image.ndim == 2 else 1e-5)  # about 1/20 of the diffusion time
    # constant steps, or a run's geometric schedule: from dt / 2^levels, doubling every
    # steps_per_level steps up to dt, then --steps steps of dt (every new step size is a new
    # factorisation or preconditioner setup, for both codes)
    levels = args.geometric
    schedule = {"dt_initial": dt / 2**levels, "growth": 2.0 if levels else 1.0, "steps_per_level": 4, "dt_max": dt}
    t_end = dt * args.steps + 4 * dt * (1 - 2.0**-levels)
    settings = DiffusionSettings(
        geometry=GeometrySettings(image=workdir / "image.npy"),
        mesh=MeshSettings(order=order),
        time=TimeSettings(t_end=t_end, output_times=[t_end], **schedule),
        solver=SolverSettings(type=args.solver, petsc_options=dict(args.petsc)),
    )
    if comm.rank == 0:
        write_image(workdir / "image.npy", image)
    comm.barrier()
    load_start = time.perf_counter()
    t0 = time.perf_counter()
    tagged, _ = load_geometry(settings, workdir, comm)
    t_mesh = time.perf_counter() - t0
    t0 = time.perf_counter()
    problem = timed_fe_problem(tagged, settings)
    t_assembly = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = problem.run()
    t_run = time.perf_counter() - t0
    steps = result.steps
    step_times = problem.solve_s
    # time per step after setup: the run minus solver setups, per step (includes rhs and diagnostics)
    step_after_setup = (t_run - problem.setup_s) / steps
    ndofs = result.ndofs
    # bandwidth bound of one mat-vec of the operator; PETSc's measured MatMult time
    A = problem._M
    info = A.getInfo()
    nnz = info["nz_used"]  # getInfo() sums over the ranks already (MAT_GLOBAL_SUM)
    x, y = A.createVecs()
    x.set(1.0)
    t0 = time.perf_counter()
    for _ in range(10):
        A.mult(x, y)
    matmult = (time.perf_counter() - t0) / 10
    spmv_bytes = nnz * 12 + ndofs * 24
    problem.destroy()
    row = {
        "case": name,
        "dt": dt,
        "geometric_levels": levels,
        "steps": steps,
        "ranks": comm.size,
        "ndofs": ndofs,
        "solver": ", ".join(problem.solvers) + ("+opts" if args.petsc else ""),
        "setup_s": t_mesh + t_assembly + problem.setup_s,
        "mesh_s": t_mesh,
        "factorisations": problem.factorisations,
        "factor_s": problem.setup_s,
        "step_s": step_after_setup,
        "solve_median_s": statistics.median(step_times),
        "cg_its": statistics.median(problem.iterations),
        "dofs_per_s": ndofs / step_after_setup,
        "spmv_bytes": spmv_bytes,
        "matmult_s": matmult,
        "total_s": time.perf_counter() - load_start,
        "peak_rss_mb_rank0": common.peak_rss_mb(),
        "load": common.load(),
    }
    bw = args.bandwidth
    # the bound of the average step: its mean iterations (a direct solve counts as one) x one mat-vec
    row["cg_its_mean"] = sum(problem.iterations) / steps
    row["bw_bound_s"] = max(row["cg_its_mean"], 1) * spmv_bytes / bw
    row["step_over_bw"] = step_after_setup / row["bw_bound_s"]
    if peer_python is not None and comm.size == 1 and ndofs > args.peer_max_dofs:
        row["skfem_solver"] = f"skipped: {ndofs} dofs > --peer-max-dofs {args.peer_max_dofs} (memory)"
    elif peer_python is not None and comm.size == 1:
        data = voxel_mesh_data(image, keep=["sei"])
        pore = data.facets[data.facet_tags == interface_tag(0, 3)]
        bdf, previous = [], None
        for _, step in plan_steps(t_end, [t_end], **schedule):
            coeff = bdf_coefficients(step, previous, 2)
            bdf.append((coeff.a0, coeff.a1, coeff.a2))
            previous = step
        physics = settings.physics
        case_file = workdir / "case.npz"
        np.savez(
            case_file,
            points=data.points / 1e-6,
            cells=data.cells,
            facets=pore,
            order=order,
            eps=physics.eps,
            rate_D=physics.D_eff / 1e-12,
            rate_f=physics.k_f / 1e-6,
            bdf=np.array(bdf),
        )
        # SciPy's SuperLU in 3D fills in catastrophically (measured: 12 GB and > 5 min at 180k P1
        # dofs), so the peer iterates (CG + PyAMG) in 3D and factorises only in 2D.
        solver = "direct" if image.ndim == 2 else "amg"
        try:
            peer = common.run_peer(
                peer_python,
                "peer_skfem_diffusion.py",
                [case_file, "--solver", solver, "--rtol", str(settings.solver.rtol)],
                timeout=7200,
            )
        except (RuntimeError, OSError, ValueError) as err:  # a benchmark: record and go on
            row["skfem_solver"] = f"failed: {str(err)[:200]}"
            return row
        ours = np.asarray(result.domain_mean) / physics.c_bulk
        theirs = np.asarray(peer["domain_mean"])
        if peer["ndofs"] != ndofs or len(theirs) != len(ours):
            raise SystemExit(
                f"{name}: scikit-fem has {peer['ndofs']} dofs / {len(theirs)} values, we {ndofs} / {len(ours)}"
            )
        row.update(
            {
                "skfem_solver": peer["solver"],
                "skfem_setup_s": peer["timings_s"]["mesh"]
                + peer["timings_s"]["assembly"]
                + peer["timings_s"]["solver_setup"],
                "skfem_step_s": peer["timings_s"]["steps"] / len(theirs[1:]),
                "skfem_total_s": peer["timings_s"]["total"],
                "max_mean_diff": float(np.max(np.abs(ours - theirs))),
                "final_mean": float(ours[-1]),
            }
        )
        row["speedup_step"] = row["skfem_step_s"] / row["step_s"]
        row["speedup_total"] = row["skfem_total_s"] / (t_mesh + t_assembly + t_run)
        if row["max_mean_diff"] > 1e-6:
            raise SystemExit(f"{name}: answers differ by {row['max_mean_diff']:.3g} > 1e-6")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="roi1-p1,roi1-p2,vol30-p1,vol20-p2")
    parser.add_argument("--steps", type=int, default=20, help="steps of --dt (after the geometric ramp, if any)")
    parser.add_argument(
        "--geometric",
        type=int,
        default=0,
        metavar="LEVELS",
        help="start at dt / 2^LEVELS and double every 4 steps up to dt, as real runs do (default 0: constant steps)",
    )
    parser.add_argument("--dt", type=float, default=None, help="time step (s); default 5e-4 s (2D ROI), 1e-5 s (3D)")
    parser.add_argument(
        "--solver", default="auto", choices=("auto", "direct", "iterative"), help="fem_anode's solver.type"
    )
    parser.add_argument(
        "--preconditioner",
        default=None,
        choices=("auto", "ssor", "mg", "gamg", "hypre"),
        help="fem_anode's solver.preconditioner (electrode cases)",
    )
    parser.add_argument(
        "--discretisation",
        default="fe",
        choices=("fe", "fv"),
        help="electrode cases: P1 finite elements or cell-centred finite volumes",
    )
    parser.add_argument(
        "--sweep-kernel",
        default="auto",
        choices=("auto", "compiled", "csr", "petsc"),
        help="fem_anode's solver.sweep_kernel (electrode cases; 'csr': the CSR sweeps even on the voxel grid)",
    )
    parser.add_argument(
        "--voxel-p1",
        default="image",
        choices=("image", "mesh"),
        help="fem_anode's mesh.voxel_p1 (electrode cases, P1): operators from the voxels or from a dolfinx mesh",
    )
    parser.add_argument("--no-peer", action="store_true", help="skip scikit-fem")
    parser.add_argument(
        "--peer-max-dofs",
        type=int,
        default=300_000,
        help="skip scikit-fem above this many dofs (measured: 16 GB at 800k P1 dofs in 3D, killed)",
    )
    parser.add_argument(
        "--petsc",
        default="",
        help="extra PETSc options for fem_anode, e.g. ksp_initial_guess_nonzero=true,pc_hypre_boomeramg_coarsen_type=HMIS",
    )
    args = parser.parse_args()
    args.petsc = [tuple(item.split("=", 1)) for item in args.petsc.split(",") if item]
    comm = MPI.COMM_WORLD
    scale_only = all(name.startswith("electrode") for name in args.cases.split(","))

    def bandwidth() -> float:
        # measured on every rank at once: the bound of a run on n ranks uses their summed bandwidth
        comm.barrier()
        return comm.allreduce(common.copy_bandwidth())

    # the scale cases measure it after the run, so that its 800 MB of arrays stay out of the peak memory
    args.bandwidth = None if scale_only else bandwidth()
    peer_python = None
    if not args.no_peer and comm.size == 1:
        peer_python, message = common.peers_python()
        if peer_python is None:
            print(f"scikit-fem comparison skipped: {message}")
    rows = []
    load_start = common.load()
    for name in args.cases.split(","):
        with tempfile.TemporaryDirectory() if comm.rank == 0 else _nothing() as tmp:
            workdir = Path(comm.bcast(tmp if comm.rank == 0 else None, root=0))
            rows.append(run_case(name, args, comm, workdir, peer_python))
            comm.barrier()
        if comm.rank == 0:
            common.print_table(rows[-1:], title=f"diffusion {name} (load {rows[-1]['load']})")
            sys.stdout.flush()
    if scale_only:
        args.bandwidth = bandwidth()
        for row in rows:  # the whole-run bound: all CG iterations x one mat-vec at the copy bandwidth
            row["bw_bound_s"] = max(row["its_total"], 1) * row["spmv_bytes"] / args.bandwidth
            row["run_over_bw"] = row["run_s"] / row["bw_bound_s"]
            row["total_over_bw"] = row["total_s"] / row["bw_bound_s"]
    if comm.rank == 0 and scale_only:
        columns = [
            "case",
            "ranks",
            "ndofs",
            "steps",
            "solver",
            "factorisations",
            "mesh_s",
            "assembly_s",
            "run_s",
            "total_s",
            "cg_its_mean",
            "cg_its_max",
            "bw_bound_s",
            "run_over_bw",
            "total_over_bw",
            "solver_B_per_dof",
            "peak_rss_mb_max",
            "peak_B_per_voxel",
        ]
        common.print_table(
            rows,
            columns,
            title=f"transient diffusion, whole runs; copy bandwidth {args.bandwidth / 1e9:.1f} GB/s (all ranks)",
        )
        command = (
            ("mpirun -n %d " % comm.size if comm.size > 1 else "")
            + "python benchmarks/bench_diffusion.py "
            + " ".join(sys.argv[1:])
        )
        path = common.append_results(
            "diffusion", rows, command, {"copy_bandwidth_Bps": args.bandwidth, "load": [load_start, common.load()]}
        )
        print(f"appended to {path}")
    elif comm.rank == 0:
        columns = [
            "case",
            "ranks",
            "ndofs",
            "solver",
            "setup_s",
            "step_s",
            "cg_its",
            "dofs_per_s",
            "bw_bound_s",
            "step_over_bw",
            "skfem_step_s",
            "speedup_step",
            "speedup_total",
            "max_mean_diff",
        ]
        steps = f"{args.steps} BDF2 steps" + (
            f" after a {args.geometric}-level geometric ramp" if args.geometric else ""
        )
        common.print_table(
            rows, columns, title=f"transient diffusion, {steps}; copy bandwidth {args.bandwidth / 1e9:.1f} GB/s"
        )
        command = "mpirun -n %d " % comm.size if comm.size > 1 else ""
        command += "python benchmarks/bench_diffusion.py " + " ".join(sys.argv[1:])
        path = common.append_results(
            "diffusion", rows, command, {"copy_bandwidth_Bps": args.bandwidth, "load": [load_start, common.load()]}
        )
        print(f"appended to {path}")


class _nothing:
    """A context manager standing in for the temporary directory on ranks other than 0."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


if __name__ == "__main__":
    main()
