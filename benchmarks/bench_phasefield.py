"""Benchmark 4 (and 5): phase-field half-cycles vs mesh size, MPI ranks and solver configuration.

The built-in nanowire cross-section (disk, radius 20 nm) with the default model (vacancies,
voids, percolation on), meshed at the given element sizes; ``--half-cycles`` half-cycles
(default one lithiation). ``--configs`` runs several solver configurations one after the other
in the same process, so their times are comparable on this shared machine:

* ``default``: the package defaults (Newton to rtol 1e-6, lagged LU as the preconditioner of FGMRES,
  refactorised inside a stalled solve, Eisenstat-Walker linear tolerances, Newton stagnation
  stop, smooth time-step controller, linear predictor; on any number of ranks);
* ``previous``: the configuration before issue 22 (Newton to rtol 1e-9, GMRES at rtol 1e-10 on the lagged LU,
  refactorised at the next Newton iteration after more than 30 iterations, threshold
  controller, Newton always to ``max_it``; the border of the block elimination lagged with the
  factorisation as in the current code);
* ``exact``: an LU at every Newton iteration (``reuse_factorisation = false``);
* ``reuse``: the lagged LU forced (``reuse_factorisation = true``; the default since 2026-12-04);
* ``nopredictor``: the defaults without the linear predictor of the Newton start
  (``solver.predictor = "none"``, the defaults of 2026-12-03);
* ``acrossramp``: the defaults with the predictor extrapolating also across the end of the
  surface ramp (the defaults until 2026-12-04 08:45 UTC; the run's problem class is patched);
* ``superlu``: the defaults with SuperLU_dist instead of MUMPS (``solver.linear_solver``);
* ``round3``: the defaults before 2026-12-04 12:50 UTC: Krylov solves without the floor from the
  Newton tolerance, the border of the block elimination re-solved at every Newton iteration,
  no ``fast_growth`` (the run's solver class is patched);
* ``dcXX``: the defaults with ``cycling.dc_target = 0.XX`` (e.g. ``dc85``); ``maxdcXX``: with
  ``cycling.max_dc = 0.XX``; ``a+b``: both (e.g. ``split+maxdc10``);
* ``refactorXX``: the defaults with ``solver.refactor_iterations = XX`` (the Krylov iterations
  on a lagged factorisation after which it is renewed inside the solve; default 12);
* ``rtolXX``: the defaults with Newton's ``solver.rtol = 1e-XX`` (``rtol9``: the default until
  2026-12-05, issue 22's sixth round);
* ``ewXX``: the defaults with the Eisenstat-Walker forcing term started at and capped by 0.XX
  (PETSc ``snes_ksp_ew_rtol0`` and ``snes_ksp_ew_rtolmax``; the default caps at 0.01);
* ``fieldsplit``: the defaults with a block preconditioner instead of the one LU of the Jacobian
  (issue 22, fifth round; patched in, not kept in the package): PCFIELDSPLIT multiplicative
  (block Gauss-Seidel), the Cahn-Hilliard fields (c, mu, c_v, mu_v) first, then the
  displacement, each block with its own MUMPS LU; the Cahn-Hilliard block's LU renewed at every
  Newton iteration, the displacement block's lagged and renewed like the one LU of the default;
* ``single`` / ``double``: the defaults with the lagged factorisation in single / double precision
  (``solver.factorisation_precision``; the default is single on any number of ranks, since the
  eleventh round substructured on several);
* ``split``: the defaults with Eyre's convex splitting of the homogeneous chemical potentials
  (``solver.time_scheme = "convex_split"``: the concave regular-solution terms explicit);
* ``noceiling``: the defaults without the smooth controller's failure ceiling
  (``cycling.failure_ceiling = 0``, the controller before 2026-12-06);
* ``dolfinxassembly``: the defaults with the Jacobian assembled by dolfinx's CSR assembler
  (``solver.jacobian_assembly = "dolfinx"``, the default before 2026-12-06) instead of the
  cached positions;
* ``cachedassembly``: the defaults with the residual, the Jacobian and its border vectors as
  separate forms (``solver.jacobian_assembly = "cached"``, the default of the ninth round)
  instead of one pass over the cells each;
* ``fieldsplit_lagged``: the same blocks, both LUs lagged; a stalled Krylov solve renews the
  Cahn-Hilliard block's LU first and the displacement block's only if it stalls again.

Reported per half-cycle and configuration: unknowns, steps (rejected), Newton iterations,
factorisations, Krylov iterations, time per Newton iteration and per half-cycle, the void
metrics; per configuration the total time and the largest difference of the records from the
first configuration. ``--profile`` also times, on the same mesh and a state after the first
steps of a lithiation, one Jacobian assembly (matrix and border vectors; also as it was before,
with the element matrices inserted into the PETSc matrix one by one: ``*_petsc_insertion_s``;
by dolfinx's CSR assembler instead of the cached positions: ``jacobian_dolfinx_csr_s``),
one residual, one LU factorisation and one application of the preconditioner (block
elimination with the LU), the yardstick of "time per Newton iteration": with runs, a table gives
each configuration's whole-run time per Newton iteration against it (issue 22's goal: at most
3x). ``--profile-only`` skips the runs.

Usage::

    .venv/bin/python benchmarks/bench_phasefield.py --sizes 1e-9 --half-cycles 4 --configs previous,default --profile
    mpirun -n 2 .venv/bin/python benchmarks/bench_phasefield.py --sizes 5e-10 --half-cycles 1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from mpi4py import MPI  # noqa: E402

#: Record keys compared between configurations (relative differences).
COMPARED = (
    "mean_c_li",
    "outer_radius_m",
    "axial_stretch",
    "void_fraction",
    "electrolyte_fraction",
    "sei_penetration_depth_m",
    "core_connectivity",
    "mean_c_v",
)


def configured(base: Any, config: str) -> Any:
    """The settings of a named solver configuration (see the module docstring); ``a+b`` applies
    ``a`` then ``b``."""
    if "+" in config:
        for part in config.split("+"):
            base = configured(base, part)
        return base
    if config == "default":
        return base
    if config.startswith("maxdc") and config[5:].isdigit():  # cycling.max_dc = 0.XX
        return base.replace(cycling=base.cycling.replace(max_dc=float("0." + config[5:])))
    if config == "previous":
        return base.replace(
            cycling=base.cycling.replace(controller="threshold"),
            solver=base.solver.replace(
                rtol=1e-9,
                refactor_iterations=30,
                refactor_on_stall=False,
                linear_rtol=1e-10,
                stop_on_stagnation=False,
                predictor="none",
            ),
        )
    if config == "exact":
        return base.replace(solver=base.solver.replace(reuse_factorisation=False))
    if config == "reuse":
        return base.replace(solver=base.solver.replace(reuse_factorisation=True))
    if config == "nopredictor":
        return base.replace(solver=base.solver.replace(predictor="none"))
    if config == "acrossramp":
        return base
    if config == "round3":
        return base.replace(cycling=base.cycling.replace(fast_growth=base.cycling.growth))
    if config.startswith("dc") and config[2:].isdigit():
        return base.replace(cycling=base.cycling.replace(dc_target=float("0." + config[2:])))
    if config.startswith("refactor") and config[8:].isdigit():  # solver.refactor_iterations = XX
        return base.replace(solver=base.solver.replace(refactor_iterations=int(config[8:])))
    if config.startswith("rtol") and config[4:].isdigit():  # Newton's relative tolerance 1e-XX
        return base.replace(solver=base.solver.replace(rtol=float("1e-" + config[4:])))
    if config.startswith("ew") and config[2:].isdigit():  # Eisenstat-Walker cap (rtol0, rtolmax) 0.XX
        cap = "0." + config[2:]
        options = {**base.solver.petsc_options, "snes_ksp_ew_rtolmax": cap, "snes_ksp_ew_rtol0": cap}
        return base.replace(solver=base.solver.replace(petsc_options=options))
    if config in ("single", "double"):  # the lagged factorisation's precision (default: single on any ranks)
        return base.replace(solver=base.solver.replace(factorisation_precision=config))
    if config == "split":  # Eyre's convex splitting of the double-well terms (solver.time_scheme)
        return base.replace(solver=base.solver.replace(time_scheme="convex_split"))
    if config == "noceiling":  # the smooth controller without the failure ceiling (before 2026-12-06)
        return base.replace(cycling=base.cycling.replace(failure_ceiling=0.0))
    if config == "cachedassembly":  # residual, Jacobian and border as separate forms (ninth round)
        return base.replace(solver=base.solver.replace(jacobian_assembly="cached"))
    if config == "dolfinxassembly":  # the Jacobian by dolfinx's assembler (before 2026-12-06)
        return base.replace(solver=base.solver.replace(jacobian_assembly="dolfinx"))
    if config == "superlu":
        return base.replace(solver=base.solver.replace(linear_solver="superlu_dist"))
    if config in ("fieldsplit", "fieldsplit_lagged"):
        return base  # the preconditioner is patched in (see ``patched``)
    raise SystemExit(
        f"unknown configuration {config!r} (default, previous, exact, reuse, nopredictor, acrossramp, superlu, "
        "round3, dcXX, refactorXX, rtolXX, ewXX, fieldsplit, single, double, noceiling, split, dolfinxassembly, "
        "cachedassembly)"
    )


def patched(config: str) -> Any:
    """A context in which the configuration's code change holds (``acrossramp``: the predictor
    also extrapolates across the end of the surface ramp; ``round3``: no Krylov floor, the border
    re-solved at every Newton iteration)."""
    import contextlib

    from fem_anode.fem.phasefield.newton import BorderedNewton
    from fem_anode.fem.phasefield.problem import PhaseFieldProblem

    @contextlib.contextmanager
    def round3() -> Any:
        init, jacobian = BorderedNewton.__init__, BorderedNewton._jacobian

        def init_without_floor(self: Any, *args: Any, **kwargs: Any) -> None:
            init(self, *args, **kwargs)
            self._krylov_floor = False

        def jacobian_with_border(self: Any, *args: Any) -> None:
            jacobian(self, *args)
            if not self._fresh:  # lagged P: the border solved again with the current b and c
                self._update_border()

        BorderedNewton.__init__ = init_without_floor  # type: ignore[method-assign]
        BorderedNewton._jacobian = jacobian_with_border  # type: ignore[method-assign]
        try:
            yield
        finally:
            BorderedNewton.__init__ = init  # type: ignore[method-assign]
            BorderedNewton._jacobian = jacobian  # type: ignore[method-assign]

    @contextlib.contextmanager
    def across_ramp() -> Any:
        original = PhaseFieldProblem._leaves_ramp
        PhaseFieldProblem._leaves_ramp = lambda self, dt: False  # type: ignore[method-assign]
        try:
            yield
        finally:
            PhaseFieldProblem._leaves_ramp = original  # type: ignore[method-assign]

    if config == "round3":
        return round3()
    if config in ("fieldsplit", "fieldsplit_lagged"):
        return fieldsplit(config == "fieldsplit_lagged")
    return across_ramp() if config == "acrossramp" else contextlib.nullcontext()


def fieldsplit(lag_blocks: bool) -> Any:
    """A context in which the phase-field Newton solver preconditions with a block Gauss-Seidel
    (PCFIELDSPLIT, multiplicative: the Cahn-Hilliard fields, then the displacement, each block
    with its own LU of the package's direct solver) instead of one LU of the whole Jacobian
    (configurations ``fieldsplit`` and ``fieldsplit_lagged``, docs/phasefield.md, fifth round).

    The displacement block's LU is lagged exactly like the default's one LU (renewed when a
    factorisation is due: ``factorisations`` counts these); the Cahn-Hilliard block's LU is
    renewed at every Newton iteration (``fieldsplit``) or, with ``lag_blocks``, lagged as well
    and renewed first when a Krylov solve stalls (``block_factorisations`` counts these). The
    border of the block elimination is re-solved with each renewal.
    """
    import contextlib

    import numpy as np
    from petsc4py import PETSc

    from fem_anode.fem.petsc_ksp import prefixed_options
    from fem_anode.fem.phasefield import newton as newton_module
    from fem_anode.fem.phasefield.problem import PhaseFieldProblem

    BorderedNewton, Shell = newton_module.BorderedNewton, newton_module._Shell
    make_solver, jacobian, factorise, apply = (
        PhaseFieldProblem._make_solver,
        BorderedNewton._jacobian,
        BorderedNewton._factorise,
        Shell.apply,
    )

    def blocks(nw: Any) -> Any:
        return nw.ksp.getPC().getFieldSplitSubKSP()

    def factorise_blocks(nw: Any, ch: bool, displacement: bool) -> None:
        first = nw._linear_options is not None
        nw.ksp.setOperators(nw.A)
        if first:  # the options of the fieldsplit and of both blocks' direct solvers
            with prefixed_options(nw.ksp.getOptionsPrefix(), nw._linear_options):
                nw.ksp.setFromOptions()
                nw.ksp.setUp()
                for sub in blocks(nw):
                    sub.setFromOptions()
            nw._linear_options = None
        else:
            nw.ksp.setUp()  # the blocks of the current A (the couplings of the Gauss-Seidel sweep)
        for renew, sub in zip((ch or first, displacement or first), blocks(nw)):
            pc = sub.getPC()
            if renew:
                pc.setReusePreconditioner(False)
                sub.getOperators()[1].stateIncrease()  # also when the block's values did not change
            sub.setUp()
            pc.setReusePreconditioner(True)  # the LU survives the next Jacobian
        if ch or first:
            nw.block_factorisations += 1
            nw._ch_fresh = True
        if displacement or first:
            nw.factorisations += 1
            nw._refactor, nw._fresh = False, True
        nw._update_border()

    def split_solver(self: Any, bcs: Any) -> Any:
        nw = make_solver(self, bcs)
        assert nw.reuse, "the fieldsplit configurations need reuse_factorisation"
        n = self.W.dofmap.index_map.size_local * self.W.dofmap.index_map_bs
        start = self.W.dofmap.index_map.local_range[0] * self.W.dofmap.index_map_bs
        displacement = np.zeros(n, bool)
        dofs = np.asarray(self.W.sub(2).collapse()[1])
        displacement[dofs[dofs < n]] = True
        options = {"ksp_type": "preonly", "pc_type": "fieldsplit", "pc_fieldsplit_type": "multiplicative"}
        for block in ("ch", "u"):
            options.update({f"fieldsplit_{block}_{key}": value for key, value in nw._linear_options.items()})
        nw._linear_options = options
        pc = nw.ksp.getPC()
        pc.setType("fieldsplit")
        pc.setFieldSplitIS(
            ("ch", PETSc.IS().createGeneral((np.flatnonzero(~displacement) + start).astype(PETSc.IntType), nw.comm)),
            ("u", PETSc.IS().createGeneral((np.flatnonzero(displacement) + start).astype(PETSc.IntType), nw.comm)),
        )
        nw.split, nw.lag_blocks, nw._ch_fresh, nw.block_factorisations = True, lag_blocks, False, 0
        return nw

    def split_factorise(self: Any) -> None:
        if getattr(self, "split", False):
            factorise_blocks(self, True, True)
        else:
            factorise(self)

    def split_jacobian(self: Any, snes: Any, X: Any, J: Any, P: Any) -> None:
        before = self.factorisations
        jacobian(self, snes, X, J, P)
        if getattr(self, "split", False) and self.factorisations == before:  # the displacement LU stays
            if self.lag_blocks:
                self._ch_fresh = False
            else:
                factorise_blocks(self, True, False)
                self._fresh = False

    def split_apply(self: Any, pc: Any, x: Any, y: Any) -> None:
        nw = self.nw
        if (
            getattr(nw, "split", False)
            and nw.on_stall
            and not nw._ch_fresh
            and nw._applications + 1 > nw.refactor_iterations
        ):  # the cheaper block first
            factorise_blocks(nw, True, False)
            nw._applications, nw._refactored_in_solve = 0, True
        apply(self, pc, x, y)

    @contextlib.contextmanager
    def context() -> Any:
        PhaseFieldProblem._make_solver = split_solver  # type: ignore[method-assign]
        BorderedNewton._factorise = split_factorise  # type: ignore[method-assign]
        BorderedNewton._jacobian = split_jacobian  # type: ignore[method-assign]
        Shell.apply = split_apply  # type: ignore[method-assign]
        try:
            yield
        finally:
            PhaseFieldProblem._make_solver = make_solver  # type: ignore[method-assign]
            BorderedNewton._factorise = factorise  # type: ignore[method-assign]
            BorderedNewton._jacobian = jacobian  # type: ignore[method-assign]
            Shell.apply = apply  # type: ignore[method-assign]

    return context()


def profile(settings: Any, comm: MPI.Comm, repeats: int = 10) -> dict[str, float]:
    """Median times (s) of one Jacobian assembly, residual, factorisation and preconditioner
    application on the settings' mesh, at a state a few steps into a lithiation."""
    import numpy as np

    from fem_anode.fem.phasefield.run import load_geometry
    from fem_anode.fem.phasefield.vacancy import VacancyPhaseFieldProblem

    problem = VacancyPhaseFieldProblem(load_geometry(settings, None, comm), settings)
    problem._ramp = (settings.material.c_min, settings.material.c_max, 0.0, settings.cycling.ramp_time)
    for _ in range(3):
        problem.step(settings.cycling.dt_initial / 16)
    nw = problem.newton
    snes = nw.snes

    def median(action: Any) -> float:
        times = []
        for _ in range(repeats):
            comm.Barrier()
            t = time.perf_counter()
            action()
            comm.Barrier()
            times.append(time.perf_counter() - t)
        return float(np.median(times))

    nw.pack()

    jacobian = nw.assemble_jacobian
    out = {"jacobian_s": median(jacobian), "residual_s": median(lambda: nw._function(snes, nw.X, nw.F))}
    from dolfinx.fem import petsc as fem_petsc

    pruned = nw.A
    nw.A = fem_petsc.create_matrix(nw.jacobian)  # the full pattern for the paths below

    def petsc_insertion() -> None:  # the matrix part as before: element matrices straight into PETSc
        nw.A.zeroEntries()
        fem_petsc.assemble_matrix(nw.A, nw.jacobian, bcs=nw.bcs)
        nw.A.assemble()

    out["matrix_petsc_insertion_s"] = median(petsc_insertion)
    bordered, cached = nw._bordered, nw._cached
    if bordered is not None and nw._csr is not None:  # separate forms (solver.jacobian_assembly = "cached")
        from fem_anode.fem.cell_assembly import CellMatrixAssembler

        nw._bordered, nw._cached = None, CellMatrixAssembler(nw.jacobian, nw._csr[0], nw.bcs)
        out["jacobian_cached_separate_s"] = median(jacobian)
        out["residual_separate_s"] = median(lambda: nw._function(snes, nw.X, nw.F))
    nw._bordered, nw._cached = None, None  # dolfinx's CSR assembly (solver.jacobian_assembly = "dolfinx")
    out["jacobian_dolfinx_csr_s"] = median(jacobian)
    native, nw._csr = nw._csr, None
    out["jacobian_petsc_insertion_s"] = median(jacobian)
    nw._csr = native
    nw._bordered, nw._cached = bordered, cached
    nw.A.destroy()
    nw.A = pruned
    jacobian()

    def factorise() -> None:
        nw.A.stateIncrease()  # marks A as changed: without reuse P is A, and PETSc skips an unchanged operator
        nw._factorise()

    out["factorisation_s"] = median(factorise)
    x, y = nw.X.duplicate(), nw.X.duplicate()
    x.setRandom()
    shell = nw.snes.getKSP().getPC()
    out["pc_apply_s"] = median(lambda: shell.apply(x, y))
    out["matvec_s"] = median(lambda: nw.J.mult(x, y))
    out["single_precision"] = float(nw.lu is not None)  # the factorisation timed
    problem.destroy()
    return out


def main() -> None:
    from fem_anode.fem.phasefield.run import run_phasefield
    from fem_anode.fem.phasefield.settings import PhaseFieldSettings

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2e-9,1e-9", help="element sizes (m)")
    parser.add_argument("--half-cycles", type=int, default=1)
    parser.add_argument(
        "--configs",
        default="default",
        help="comma-separated: default, previous, exact, reuse, nopredictor, acrossramp, superlu, round3, dcXX, "
        "maxdcXX, refactorXX, rtolXX, ewXX, fieldsplit, fieldsplit_lagged, single, double, noceiling, split, "
        "dolfinxassembly, cachedassembly (see the module docstring)",
    )
    parser.add_argument("--profile", action="store_true", help="also time the single operations of a Newton iteration")
    parser.add_argument("--profile-only", action="store_true", help="only time the single operations (no runs)")
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    rows = []
    load_start = common.load()
    for size in map(float, args.sizes.split(",")):
        base = PhaseFieldSettings()
        base = base.replace(
            mesh=base.mesh.replace(size=size),
            cycling=base.cycling.replace(half_cycles=args.half_cycles),
            output=base.output.replace(fields=False, figures=False),
        )
        reference: list[dict[str, Any]] | None = None
        for config in [] if args.profile_only else args.configs.split(","):
            settings = configured(base, config)
            t = time.perf_counter()
            with patched(config):
                result = run_phasefield(settings, None, comm)
            total = time.perf_counter() - t
            records = result["half_cycles"]
            reference = reference or records
            for record, ref in zip(records, reference):
                its = record["newton_iterations_total"]
                diff = max(
                    (abs(record[k] - ref[k]) / max(abs(ref[k]), 1e-30) for k in COMPARED if k in record), default=0.0
                )
                rows.append(
                    {
                        "size_m": size,
                        "ranks": comm.size,
                        "config": config,
                        "cells": result["ncells"],
                        "unknowns": result["unknowns"],
                        "half_cycle": f"{record['index']} {record['kind']}",
                        "steps": record["steps"],
                        "rejected": record["rejected_steps"],
                        "newton_its": its,
                        "factorisations": record["factorisations"],
                        "linear_its": record["linear_iterations"],
                        "single_failures": record["single_precision_failures"],
                        "newton_per_step": its / max(record["steps"], 1),
                        "half_cycle_s": record["wall_time_s"],
                        "s_per_newton": record["wall_time_s"] / max(its, 1),
                        "void_fraction": record.get("void_fraction"),
                        "electrolyte_fraction": record.get("electrolyte_fraction"),
                        "sei_depth_nm": record.get("sei_penetration_depth_m", 0.0) * 1e9,
                        "n_voids": record.get("n_voids"),
                        "max_rel_diff_to_first": diff,
                        "run_total_s": total,
                        "load": common.load(),
                    }
                )
            if comm.rank == 0:
                common.print_table(
                    rows[-len(records) :], title=f"phase-field, element size {size:g} m, {config}: {total:.1f} s"
                )
        if args.profile or args.profile_only:
            prof = profile(base, comm)
            if comm.rank == 0:
                rows.append({"size_m": size, "ranks": comm.size, "config": "profile", **prof, "load": common.load()})
                common.print_table(rows[-1:], title=f"single operations, element size {size:g} m (median of 10, s)")
                yardstick = prof["jacobian_s"] + prof["pc_apply_s"]
                per_config = [r for r in rows if r["size_m"] == size and r["config"] not in ("profile", "yardstick")]
                for config in dict.fromkeys(r["config"] for r in per_config):
                    newton = sum(r["newton_its"] for r in per_config if r["config"] == config)
                    run_s = next(r["run_total_s"] for r in per_config if r["config"] == config)
                    loop_s = sum(r["half_cycle_s"] for r in per_config if r["config"] == config)
                    rows.append(
                        {
                            "size_m": size,
                            "ranks": comm.size,
                            "config": "yardstick",
                            "run": config,
                            "run_s": run_s,
                            "newton_its": newton,
                            "ms_per_newton": 1e3 * run_s / max(newton, 1),
                            "jacobian_plus_pc_ms": 1e3 * yardstick,
                            "ratio": run_s / max(newton, 1) / yardstick,
                            "ratio_half_cycles_only": loop_s / max(newton, 1) / yardstick,
                        }
                    )
                if per_config:
                    common.print_table(
                        [r for r in rows if r["config"] == "yardstick" and r["size_m"] == size],
                        title="time per Newton iteration against one Jacobian plus one preconditioner application "
                        "(issue 22's goal: ratio <= 3)",
                    )
    if comm.rank == 0:
        common.print_table(
            [r for r in rows if r["config"] not in ("profile", "yardstick")], title="phase-field half-cycles"
        )
        command = (
            ("mpirun -n %d " % comm.size if comm.size > 1 else "")
            + "python benchmarks/bench_phasefield.py "
            + " ".join(sys.argv[1:])
        )
        path = common.append_results("phasefield", rows, command, {"load": [load_start, common.load()]})
        print(f"appended to {path}")


if __name__ == "__main__":
    main()
