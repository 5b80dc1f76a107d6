r"""The discretisation-independent part of the transient diffusion: solvers, BDF loop, records.

:class:`TransientDiffusion` integrates ``eps M dc/dt + (K + R) c = f`` (scaled units: lengths in
micrometres, ``c / c_bulk``) from ``c = 0`` to ``t_end`` with BDF1/BDF2 on a planned step sequence
(:mod:`~fem_anode.fem.diffusion.time_stepping`). Each distinct BDF leading coefficient ``a0``
gives ``A = K + R + a0 eps M``; for a direct solver one factorisation per ``a0`` (kept within a
memory budget), for CG a preconditioner that keeps its set-up across step sizes (SSOR needs none,
the multigrid is built once and shifted per a0: :class:`~fem_anode.fem.diffusion.multigrid.ShiftedMultigrid`).
A time step costs one mat-vec and one solve. Mass balance, region means and boundary fluxes are
dot products with vectors assembled once.

The discretisations supply the operators, vectors and fields: the finite elements of
:class:`~fem_anode.fem.diffusion.finite_element.DiffusionProblem` (dolfinx) and the voxel finite
volumes of :class:`~fem_anode.fem.diffusion.finite_volume.VoxelFVProblem` (PETSc and NumPy only).
This module imports no dolfinx.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
from mpi4py import MPI
from petsc4py import PETSc

from fem_anode.errors import Interrupted, SolverError, UsageError
from fem_anode.fem.diffusion.multigrid import ShiftedMultigrid, factor_bytes
from fem_anode.fem.diffusion.results import DiffusionResult
from fem_anode.fem.diffusion.settings import DiffusionSettings, resolve_solver_type
from fem_anode.fem.diffusion.time_stepping import StepPlan, bdf_coefficients
from fem_anode.fem.petsc_ksp import direct_solver_package, prefixed_options, unique_prefix
from fem_anode.io.checkpoint import Checkpoint, Checkpointer, settings_differences
from fem_anode.io.interrupt import agree_flags

__all__ = ["Field", "FieldValues", "FusedEisenstatSolver", "TransientDiffusion", "checked_phases"]

logger = logging.getLogger(__name__)

#: Internal length unit of the scaled equations (m).
LENGTH_UNIT = 1e-6


_KSP_REASONS = {
    int(getattr(PETSc.KSP.ConvergedReason, k)): k
    for k in dir(PETSc.KSP.ConvergedReason)
    if k.isupper() and k != "ITERATING"
}


class FieldValues(Protocol):
    """This rank's values of a field: a dolfinx ``la.Vector`` or a finite-volume ``VectorField``."""

    @property
    def array(self) -> np.ndarray: ...

    @property
    def petsc_vec(self) -> PETSc.Vec: ...

    def scatter_forward(self) -> None: ...


class Field(Protocol):
    """What the time loop, its records and checkpoints need of c: a dolfinx ``Function`` (P1/P2)
    or :class:`~fem_anode.fem.diffusion.finite_volume.VectorField` (finite volumes)."""

    name: str

    @property
    def x(self) -> FieldValues: ...


@dataclasses.dataclass
class _Records:
    """The time loop's bookkeeping: records so far, mass balance, counters (checkpointed)."""

    times: list[float]
    domain: list[float]
    regions: dict[str, list[float]]
    mass_old: float
    mass_older: float
    residual_sum: float = 0.0
    steps: int = 0
    retries: int = 0
    factorisations_before: int = 0
    resumed_from_step: int | None = None
    #: the lowest and highest c / c_bulk of any accepted step and their times (s): the exact
    #: solution stays in [0, 1], so an excursion is the discretisation's (docs/diffusion.md)
    low: float = 0.0
    t_low: float = 0.0
    high: float = 0.0
    t_high: float = 0.0

    @classmethod
    def start(cls, problem: TransientDiffusion) -> _Records:
        for u in (problem.c, problem._c_old, problem._c_older):
            u.x.array[:] = 0.0
        mass = problem.mass()
        return cls([0.0], [0.0], {name: [0.0] for name in problem.regions}, mass, mass)

    @classmethod
    def resume(cls, problem: TransientDiffusion, checkpoint: Checkpoint, plan: StepPlan) -> _Records:
        state: dict[str, Any] = checkpoint.state["problem"]
        arrays: dict[str, np.ndarray] = checkpoint.arrays
        time_settings = json.loads(json.dumps(problem.settings.time.to_dict()))
        if state.get("time") != time_settings or state.get("regions") != list(problem.regions):
            stored = {"time": state.get("time"), "regions": state.get("regions")}
            wanted = {"time": time_settings, "regions": list(problem.regions)}
            raise UsageError(
                f"the checkpoint in {checkpoint.path} was written with other time settings or regions "
                f"({settings_differences(stored, wanted)})"
            )
        checkpoint.restore("problem.c_old", problem._c_old)
        checkpoint.restore("problem.c_older", problem._c_older)
        problem.c.x.array[:] = problem._c_old.x.array
        plan.load_state(state["plan"])
        problem.amg_from_a0 = state.get("amg_from_a0")
        problem.multigrid_fits = state.get("multigrid_fits")
        logger.info("resuming at t = %.6g s (step %d) from %s", plan.t, state["steps"], checkpoint.path)
        return cls(
            times=[float(v) for v in arrays["problem.times"]],
            domain=[float(v) for v in arrays["problem.domain"]],
            regions={name: [float(v) for v in arrays[f"problem.region.{name}"]] for name in problem.regions},
            mass_old=float(state["mass_old"]),
            mass_older=float(state["mass_older"]),
            residual_sum=float(state["residual_sum"]),
            steps=int(state["steps"]),
            retries=int(state["retries"]),
            factorisations_before=int(state["factorisations"]),
            resumed_from_step=int(state["steps"]),
            # (absent from checkpoints written before the extremes were recorded)
            **{key: float(state.get(key, 0.0)) for key in ("low", "t_low", "high", "t_high")},
        )

    def append(self, t: float, problem: TransientDiffusion) -> None:
        values = problem.c.x.array
        local = np.array([-float(values.min(initial=np.inf)), float(values.max(initial=-np.inf))])
        extremes = np.empty(2)
        problem.comm.Allreduce(local, extremes, op=MPI.MAX)
        if -extremes[0] < self.low:
            self.low, self.t_low = float(-extremes[0]), t
        if extremes[1] > self.high:
            self.high, self.t_high = float(extremes[1]), t
        self.times.append(t)
        self.domain.append(problem.domain_mean())
        for name in problem.regions:
            self.regions[name].append(problem.region_mean(name))

    def checkpoint(self, problem: TransientDiffusion, plan: StepPlan) -> tuple[dict[str, Any], dict[str, Any]]:
        state = {
            "t": plan.t,
            "steps": self.steps,
            "plan": plan.state_dict(),
            "time": problem.settings.time.to_dict(),
            "regions": list(problem.regions),
            "mass_old": self.mass_old,
            "mass_older": self.mass_older,
            "residual_sum": self.residual_sum,
            "retries": self.retries,
            "factorisations": self.factorisations_before + problem.factorisations,
            "amg_from_a0": problem.amg_from_a0,
            "multigrid_fits": problem.multigrid_fits,
            "low": self.low,
            "t_low": self.t_low,
            "high": self.high,
            "t_high": self.t_high,
        }
        arrays: dict[str, Any] = {
            "c_old": problem._c_old,
            "c_older": problem._c_older,
            "times": np.asarray(self.times),
            "domain": np.asarray(self.domain),
        }
        arrays.update({f"region.{name}": np.asarray(values) for name, values in self.regions.items()})
        return state, arrays

    def result(self, problem: TransientDiffusion, status: str) -> DiffusionResult:
        uptake = abs(problem.mass())
        return DiffusionResult(
            times=list(self.times),
            region_means={k: list(v) for k, v in self.regions.items()},
            domain_mean=list(self.domain),
            output_times=problem.settings.time.outputs(),
            mass_balance_rel_error=self.residual_sum / uptake if uptake > 0 else 0.0,
            ndofs=problem.ndofs,
            ncells=problem.ncells,
            steps=self.steps,
            factorisations=self.factorisations_before + problem.factorisations,
            retries=self.retries,
            status=status,
            resumed_from_step=self.resumed_from_step,
            c_bulk=problem.settings.physics.c_bulk,
            c_extremes=(self.low, self.t_low, self.high, self.t_high),
        )


def checked_phases(image: Any, settings: DiffusionSettings) -> dict[str, int]:
    """The phase map of a voxel ``image`` (name -> label), checked for the settings' transporting and
    pore phases (:class:`~fem_anode.errors.InputError` naming a missing one)."""
    from fem_anode.errors import InputError

    geometry = settings.geometry
    phases: dict[str, int] = image.require_phases()
    for role, name in (("transport_phase", geometry.transport_phase), ("pore_phase", geometry.pore_phase)):
        if name not in phases:
            raise InputError(f"geometry.{role} {name!r} is not in the phase map {phases}")
    return phases


class TransientDiffusion:
    """Solvers and time loop of the diffusion model over a discretisation given by a subclass.

    A subclass sets, before calling :meth:`_init_solver_state`: ``settings``, ``comm``, ``eps``,
    the fields ``c``, ``_c_old``, ``_c_older`` (:class:`Field`), the vectors ``_w_dx`` (``M 1``),
    ``_source``, ``_rhs``, ``_work``, ``volume`` (um^d), the matrices ``_A``, ``_KR``, ``_M`` (or
    None until needed), and ``regions`` (name -> (weights, measure)); it implements the sizes,
    :meth:`_operator`, :meth:`_mass_mult`, :meth:`_multigrid_operands`, :meth:`solver_memory`,
    :meth:`boundary_inflow` and :meth:`concentration`.
    """

    settings: DiffusionSettings
    comm: MPI.Intracomm
    eps: float
    c: Field
    _c_old: Field
    _c_older: Field
    _w_dx: PETSc.Vec
    _source: PETSc.Vec
    _rhs: PETSc.Vec
    _work: PETSc.Vec
    volume: float
    regions: dict[str, tuple[PETSc.Vec, float]]
    _A: PETSc.Mat | None
    _KR: PETSc.Mat | None
    _M: PETSc.Mat | None

    #: SSOR's relaxation factor (fewer CG iterations than 1.0 on the voxel benchmarks).
    ssor_omega = 1.3
    #: SSOR's relaxation factor in the grid order of the grid stencil: the iterations have a flat
    #: minimum at 1.1-1.2 there (128^3 electrode, 164 steps: 1398-1418 CG iterations, 1492 at 1.3)
    grid_ssor_omega = 1.15

    # -- what a discretisation provides ---------------------------------------------------
    @property
    def ndofs(self) -> int:
        """Unknowns of the discrete problem (all ranks)."""
        raise NotImplementedError

    @property
    def ncells(self) -> int:
        """Cells of the discretisation (all ranks)."""
        raise NotImplementedError

    @property
    def dim(self) -> int:
        """Spatial dimension of the problem (2 or 3)."""
        raise NotImplementedError

    def _operator(self, a0: float) -> PETSc.Mat:
        """The one operator matrix ``A = K + R + a0 eps M`` (values refreshed when a0 changes)."""
        raise NotImplementedError

    def _mass_mult(self, x: PETSc.Vec, y: PETSc.Vec) -> None:
        """``y = M x``."""
        raise NotImplementedError

    def _multigrid_operands(self) -> tuple[PETSc.Mat, PETSc.Mat]:
        """``(K + R, M)`` as matrices of one sparsity pattern, for :class:`ShiftedMultigrid`."""
        raise NotImplementedError

    def solver_memory(self) -> dict[str, float]:
        """Bytes held by the solver's matrices and set-ups, summed over ranks, and per unknown."""
        raise NotImplementedError

    def boundary_inflow(self, c: Field | None = None) -> float:
        """Net Li inflow rate through pore and Si interfaces, scaled units (um^d / s)."""
        raise NotImplementedError

    def concentration(self) -> Field:
        """c in mol/m^3 as a new field (for output)."""
        raise NotImplementedError

    def _init_solver_state(self) -> None:
        """The solvers' caches and counters, empty (called by every discretisation's constructor)."""
        self._A_a0: float | None = None
        #: Iterative: preconditioner family -> [KSP, the a0 it is set up for (None: stale)].
        self._iterative: dict[str, list[Any]] = {}
        self._mg: ShiftedMultigrid | None = None
        #: Direct: a0 -> factorised KSP (LRU), sized by solver.cache_memory.
        self._direct: OrderedDict[float, PETSc.KSP] = OrderedDict()
        self._factor_bytes: float | None = None
        #: Preconditioner set-ups and factorisations so far (the shifted multigrid counts once).
        self.factorisations = 0
        #: ``preconditioner = "auto"``: multigrid for every a0 at or below this (None: SSOR so far).
        self.amg_from_a0: float | None = None
        #: ``preconditioner = "auto"``: whether the multigrid's set-up fits into the available
        #: memory (None: not asked yet; False: SSOR for the rest of the run).
        self.multigrid_fits: bool | None = None

    def _sweep_library(self) -> Any | None:
        """The compiled sweep kernels per ``solver.sweep_kernel`` (``None``: PETSc's sweeps; a
        warning for ``"auto"`` without a C compiler, a :class:`UsageError` for ``"compiled"``). Collective."""
        choice = self.settings.solver.sweep_kernel
        if choice == "petsc":
            return None
        from fem_anode.fem.voxel_sweeps import SweepKernelUnavailable, load_sweep_library

        try:
            return load_sweep_library(self.comm)
        except SweepKernelUnavailable as exc:
            if choice in ("compiled", "csr"):
                raise UsageError(f"solver.sweep_kernel = {choice!r} is unavailable: {exc}") from exc
            logger.warning("compiled SSOR sweeps unavailable (%s); using PETSc's MatSOR", exc)
            return None

    # -- solver ---------------------------------------------------------------------------
    def _solver_kind(self) -> str:
        """``"direct"`` or ``"iterative"`` after resolving ``solver.type = "auto"``."""
        kind = resolve_solver_type(self.settings.solver.type, self.dim, self.ndofs)
        if kind == "direct" and self._direct_package() is None and self.comm.size > 1:
            kind = "iterative"
        return kind

    def _direct_package(self) -> str | None:
        """The sparse direct solver: CHOLMOD on one rank (A is SPD), else MUMPS or SuperLU_dist.

        PETSc's own Cholesky (nested dissection) solves faster but factorises several times
        slower, a loss for runs that refactorise every few steps (docs/benchmarks.md).
        """
        return direct_solver_package(self.comm.size, symmetric_positive_definite=True)

    def _switches(self) -> bool:
        """True if CG's preconditioner is chosen per step size (``preconditioner = "auto"``, no ``pc_type``)."""
        solver = self.settings.solver
        return (
            self._solver_kind() == "iterative"
            and solver.preconditioner == "auto"
            and "pc_type" not in solver.petsc_options
        )

    def _preconditioner(self, a0: float) -> str:
        """Solver family for ``A(a0)``: ``"direct"``, or the CG preconditioner (``"ssor"``, ``"mg"``, ...)."""
        solver = self.settings.solver
        if self._solver_kind() == "direct":
            return "direct"
        if self._switches():
            return "mg" if self.amg_from_a0 is not None and a0 <= self.amg_from_a0 * (1 + 1e-12) else "ssor"
        return str(solver.petsc_options.get("pc_type", solver.preconditioner))

    def _solver_options(self, preconditioner: str) -> dict[str, Any]:
        solver = self.settings.solver
        if preconditioner == "direct":
            package = self._direct_package()
            # A is symmetric positive definite: Cholesky (SuperLU_DIST only does LU).
            direct: dict[str, Any] = {
                "ksp_type": "preonly",
                "pc_type": "lu" if package == "superlu_dist" else "cholesky",
                "pc_factor_mat_solver_type": package,
            }
            if package == "petsc":
                direct["pc_factor_mat_ordering_type"] = "nd"
            return {**direct, **solver.petsc_options}
        # The initial guess is c^n extrapolated through c^{n-1} (_predict): about one
        # iteration fewer per step than starting from c^n (docs/benchmarks.md).
        options: dict[str, Any] = {
            "ksp_type": "cg",
            "ksp_rtol": solver.rtol,
            "ksp_atol": 0.0,
            "ksp_max_it": 500,
            "ksp_initial_guess_nonzero": True,
        }
        if preconditioner == "ssor":
            # Symmetric SOR. On one rank with Eisenstat's trick: the preconditioned operator
            # costs about one mat-vec of memory traffic instead of three (PCSOR);
            # PETSc 3.22's PCEISENSTAT fails on MPI matrices (MatSOR_MPIAIJ's Eisenstat branch
            # calls MatMultDiagonalBlock, which plain SeqAIJ blocks lack), so several ranks use
            # PCSOR's local symmetric sweeps. omega = 1.3 (fewer iterations than 1.0 on the voxel
            # benchmarks). CG's natural norm (r.z, computed anyway) saves one vector norm per
            # iteration. Measurements: docs/benchmarks.md, "Solver choices made from these measurements".
            if self.comm.size == 1:
                options.update({"pc_type": "eisenstat", "pc_eisenstat_omega": self.ssor_omega})
            else:
                options.update({"pc_type": "sor", "pc_sor_omega": self.ssor_omega})
            options["ksp_norm_type"] = "natural"
        elif preconditioner == "mg":
            options.update(ShiftedMultigrid.options(self.comm))
        elif preconditioner == "hypre":
            # BoomerAMG tuned for 27-point voxel rows: 4x cheaper steps than hypre's defaults.
            options.update(
                {
                    "pc_type": "hypre",
                    "pc_hypre_type": "boomeramg",
                    "pc_hypre_boomeramg_coarsen_type": "HMIS",
                    "pc_hypre_boomeramg_interp_type": "ext+i",
                    "pc_hypre_boomeramg_P_max": 4,
                    "pc_hypre_boomeramg_strong_threshold": 0.5,
                }
            )
        else:
            options["pc_type"] = preconditioner
        return {**options, **solver.petsc_options}

    def _new_ksp(self, preconditioner: str) -> tuple[PETSc.KSP, str, dict[str, Any]]:
        """A KSP with its own options prefix, and the options it will read at its first set-up."""
        ksp = PETSc.KSP().create(self.comm)
        prefix = unique_prefix("diffusion")
        ksp.setOptionsPrefix(prefix)
        ksp.setConvergenceHistory(reset=True)  # residuals of each solve, for failure reports
        return ksp, prefix, self._solver_options(preconditioner)

    @staticmethod
    def _first_setup(ksp: PETSc.KSP, prefix: str, options: dict[str, Any]) -> None:
        """``setFromOptions`` and the first ``setUp`` (multigrid levels read their options then)."""
        with prefixed_options(prefix, options):
            ksp.setFromOptions()
            ksp.setUp()

    def _ksp(self, a0: float) -> PETSc.KSP:
        """The solver for ``A = K + R + a0 eps M``, set up for this a0.

        Iterative: one KSP per preconditioner family, all on the one operator matrix
        (:meth:`_operator`). SSOR needs no set-up worth caching; the multigrid ``"mg"`` is set
        up once per run (:class:`ShiftedMultigrid`) and follows a new a0 by AXPYs on its levels;
        ``"gamg"``/``"hypre"`` set up a hierarchy whenever a0 changes. Direct: a pool of
        factorisations (one per a0, LRU) limited by ``solver.cache_memory`` and
        ``solver.cache_size``; a new a0 refactors the least recently used one numerically,
        keeping its symbolic analysis.
        """
        key = float(f"{a0:.12e}")
        preconditioner = self._preconditioner(a0)
        if preconditioner == "direct":
            return self._direct_ksp(key)
        A = self._operator(key)
        entry = self._iterative.get(preconditioner)
        if entry is None:
            ksp, prefix, options = self._new_ksp(preconditioner)
            if preconditioner == "mg":
                self._mg = ShiftedMultigrid(
                    *self._multigrid_operands(), self.eps, prefix, self.settings.solver.petsc_options
                )
                self._mg.attach(ksp, A, key)
                self.factorisations += 1  # the hierarchy: once per run
            ksp.setOperators(A)
            self._first_setup(ksp, prefix, options)
            self._iterative[preconditioner] = [ksp, key]
            if preconditioner in ("gamg", "hypre"):
                self.factorisations += 1
            return ksp
        ksp, ready_for = entry
        if ready_for != key:
            if preconditioner == "mg" and self._mg is not None:
                self._mg.shift(key)
            ksp.setOperators(A)
            ksp.setUp()
            entry[1] = key
            if preconditioner in ("gamg", "hypre"):
                self.factorisations += 1
        return ksp

    def _direct_ksp(self, key: float) -> PETSc.KSP:
        """A factorised solver for this a0 from the pool (see :meth:`_ksp`)."""
        if key in self._direct:
            self._direct.move_to_end(key)
            return self._direct[key]
        A = self._operator(key)
        ksp = None
        while self._direct and len(self._direct) >= self._direct_capacity():
            _, oldest = self._direct.popitem(last=False)  # keeps the symbolic factorisation
            if ksp is not None:
                ksp.destroy()
            ksp = oldest
        if ksp is None:
            ksp, prefix, options = self._new_ksp("direct")
            ksp.setOperators(A)
            ksp.getPC().setReusePreconditioner(False)
            self._first_setup(ksp, prefix, options)
        else:  # a pooled solver: its options were read at its first set-up
            ksp.setOperators(A)
            ksp.getPC().setReusePreconditioner(False)
            ksp.setUp()
        # The pool shares the operator matrix, whose values change with a0: a cached
        # factorisation must not be redone when the matrix it was made from changes.
        ksp.getPC().setReusePreconditioner(True)
        self.factorisations += 1
        if self._factor_bytes is None:
            self._factor_bytes = factor_bytes(ksp)
        self._direct[key] = ksp
        return ksp

    def _direct_capacity(self) -> int:
        """How many factorisations the pool keeps: ``cache_memory`` / one factorisation's bytes
        on this rank (at least 1, at most ``cache_size``); the same on every rank."""
        solver = self.settings.solver
        per_rank = (self._factor_bytes or 0) / self.comm.size
        fits = int(solver.cache_memory // per_rank) if per_rank > 0 else solver.cache_size
        return max(1, min(solver.cache_size, fits))

    # -- diagnostics ----------------------------------------------------------------------
    def mass(self, c: Field | None = None) -> float:
        """eps * integral of c/c_bulk in um^d (the scaled Li content)."""
        return self.eps * self._w_dx.dot((c or self.c).x.petsc_vec)

    def region_mean(self, name: str) -> float:
        """Mean c over a region in mol/m^3."""
        weights, measure = self.regions[name]
        return self.settings.physics.c_bulk * weights.dot(self.c.x.petsc_vec) / measure

    def domain_mean(self) -> float:
        """Mean c over the whole transporting domain in mol/m^3."""
        return self.settings.physics.c_bulk * self._w_dx.dot(self.c.x.petsc_vec) / self.volume

    # -- time loop ------------------------------------------------------------------------
    def _solve(self, ksp: PETSc.KSP, rhs: PETSc.Vec) -> None:
        """Solve ``A c = rhs`` into ``self.c`` (one method, so tests can inject failures)."""
        ksp.solve(rhs, self.c.x.petsc_vec)

    def _predict(self, ratio: float | None) -> None:
        """Initial guess of an iterative solve: ``c^n + ratio (c^n - c^{n-1})``, linear extrapolation.

        ``ratio = dt / dt_previous`` (``None`` on the first step: start from c^n). The guess is
        a function of the stored levels only, so a resumed run repeats it exactly.
        """
        self._c_old.x.petsc_vec.copy(self.c.x.petsc_vec)
        if ratio is not None:
            self.c.x.petsc_vec.axpy(ratio, self._c_old.x.petsc_vec)
            self.c.x.petsc_vec.axpy(-ratio, self._c_older.x.petsc_vec)

    def _try_step(self, coeff: Any, ratio: float | None = None) -> dict[str, Any] | None:
        """Solve one step into ``self.c``: ``None`` if it succeeded, else what went wrong (collective).

        ``ratio`` is ``dt / dt_previous`` for the initial guess (``None``: start from c^n).
        """
        # rhs = source - eps M (a1 c^n + a2 c^{n-1})
        work = self._work
        self._c_old.x.petsc_vec.copy(work)
        work.scale(coeff.a1)
        if coeff.a2:
            work.axpy(coeff.a2, self._c_older.x.petsc_vec)
        self._mass_mult(work, self._rhs)
        self._rhs.scale(-self.eps)
        self._rhs.axpy(1.0, self._source)
        key = float(f"{coeff.a0:.12e}")
        try:
            for _ in range(2):  # a second solve only after switching from SSOR to multigrid
                self._predict(ratio)
                ksp = self._ksp(coeff.a0)
                self._solve(ksp, self._rhs)
                reason = int(ksp.getConvergedReason())
                if not self._switch_to_multigrid(coeff.a0, ksp, reason):
                    break
        except PETSc.Error as err:  # e.g. a factorisation that breaks down
            self._discard(key)
            return {
                "reason": int(PETSc.KSP.ConvergedReason.DIVERGED_PCSETUP_FAILED),
                "reason_name": f"PETSc error {err.ierr}",
                "residual_history": [],
                "relative_residual": math.nan,
            }
        self.c.x.scatter_forward()
        (nonfinite,) = agree_flags(self.comm, not bool(np.isfinite(self.c.x.array).all()))
        if reason >= 0 and not nonfinite:
            return None
        history = [float(r) for r in ksp.getConvergenceHistory()]
        residual = self._rhs.duplicate()
        self._operator(key).mult(self.c.x.petsc_vec, residual)
        residual.aypx(-1.0, self._rhs)
        rhs_norm = self._rhs.norm()
        relative = residual.norm() / rhs_norm if rhs_norm > 0 else residual.norm()
        residual.destroy()
        self._discard(key)
        name = (
            _KSP_REASONS.get(reason, str(reason))
            if reason < 0
            else f"{_KSP_REASONS.get(reason, reason)} but non-finite c"
        )
        return {
            "reason": reason,
            "reason_name": name,
            "residual_history": history,
            "relative_residual": float(relative) if math.isfinite(relative) else math.nan,
        }

    def _switch_iterations(self) -> int:
        """``solver.switch_iterations``, or its default: 40 on one rank, 20 on several.

        On one rank an Eisenstat SSOR-CG iteration costs about one mat-vec and an 'mg' iteration
        3-4 times as much; on several, SOR's local sweeps cost three mat-vecs and need more
        iterations, so 'mg' wins sooner (measured on the 64^3 electrode crop: docs/benchmarks.md).
        """
        value = self.settings.solver.switch_iterations
        return value if value is not None else (40 if self.comm.size == 1 else 20)

    def _switch_to_multigrid(self, a0: float, ksp: PETSc.KSP, reason: int) -> bool:
        """``preconditioner = "auto"``: after an SSOR solve that needed ``n > switch_iterations``
        iterations (or failed), use the multigrid for every ``a0' <= a0 (n / switch_iterations)^2``.

        SSOR-CG needs about sqrt(condition number) iterations and the condition number of
        ``K + R + a0 eps M`` grows like 1/a0, so ``n sqrt(a0 / a0')`` predicts the iterations at
        ``a0'``: the slightly larger a0 of the next BDF2 steps (1.5/dt after the 1/dt of
        backward Euler) moves to multigrid at once instead of paying for another slow SSOR solve.
        Returns True if the step should be solved again (the SSOR solve failed).
        """
        if not self._switches() or self._preconditioner(a0) != "ssor":
            return False
        switch = self._switch_iterations()
        iterations = ksp.getIterationNumber()
        if reason >= 0 and iterations <= switch:
            return False
        if not self._multigrid_fits():
            return False
        reach = a0 * (max(iterations, switch) / switch) ** 2
        self.amg_from_a0 = reach if self.amg_from_a0 is None else max(self.amg_from_a0, reach)
        # Cached SSOR solvers now below the threshold are replaced when next asked for (_ksp).
        logger.info(
            "CG + SSOR took %d iterations (switch_iterations = %d) at a0 = %.4g 1/s: multigrid for a0 <= %.4g 1/s",
            iterations,
            switch,
            a0,
            self.amg_from_a0,
        )
        return reason < 0

    def _multigrid_fits(self) -> bool:
        """``preconditioner = "auto"``: whether the multigrid's one-time set-up fits (collective, asked once).

        Its peak (:func:`~fem_anode.resources.estimate_multigrid_setup_memory`, summed over the
        ranks) is compared with the memory available now on the nodes of the communicator
        (``MemAvailable``, capped by ``FEM_ANODE_MEMORY_LIMIT``). If it does not fit, the run
        stays on SSOR (more iterations, no set-up) instead of meeting the out-of-memory killer:
        measured on the 256^3 electrode (7.8M dofs) on two ranks of a 24 GB machine, the set-up
        went past 12 GB per rank.
        """
        if self.multigrid_fits is None:
            from fem_anode.resources import available_memory, estimate_multigrid_setup_memory, format_bytes

            need = estimate_multigrid_setup_memory(self.ndofs, self.comm.size)
            available = available_memory(self.comm)
            self.multigrid_fits = need.bytes <= available
            if not self.multigrid_fits:
                logger.warning(
                    "CG + SSOR needs more than switch_iterations = %d iterations, but the %s needs about %s and "
                    "only %s is available: staying on SSOR for the rest of the run",
                    self._switch_iterations(),
                    need.what,
                    format_bytes(need.bytes),
                    format_bytes(available),
                )
        return self.multigrid_fits

    def _discard(self, key: float) -> None:
        """Forget the solver set up for this a0 after a failure (rebuilt when next asked for)."""
        ksp = self._direct.pop(key, None)
        if ksp is not None:
            ksp.destroy()
        for entry in self._iterative.values():
            if entry[1] == key:
                entry[1] = None
        self._A_a0 = None

    def run(
        self,
        on_output: Callable[[float, TransientDiffusion], None] | None = None,
        *,
        checkpointer: Checkpointer | None = None,
        resume: Checkpoint | None = None,
    ) -> DiffusionResult:
        """Integrate from c = 0 (or a checkpoint) to ``t_end``; call ``on_output(t, self)`` at each output time.

        A failed step (PETSc reports divergence, the factorisation breaks down or c is not
        finite) is retried with the step halved, at most ``solver.max_retries`` times; the
        remaining steps are re-planned from the shorter step.

        Args:
            on_output: called at t = 0 and after each output time's step.
            checkpointer: writes periodic checkpoints and polls its safe-stop flag after
                every accepted step (all ranks stop at the same step).
            resume: continue from this checkpoint (of a run with the same settings): c, the
                two previous levels, the step planner, the mass bookkeeping and the records
                are restored; factorisations are rebuilt. ``on_output`` is not called again
                for output times before it.

        Raises:
            Interrupted: a stop was requested; a checkpoint was written (if the checkpointer
                has a store) and ``err.result`` is the :class:`DiffusionResult` so far.
            SolverError: a step failed ``max_retries + 1`` times; the last good state was
                checkpointed, ``err.report`` holds the failing time, the step sizes tried,
                the PETSc reasons and residual histories, ``err.result`` the records so far.
        """
        settings = self.settings
        tset = settings.time
        order = 2 if tset.scheme == "bdf2" else 1
        plan = StepPlan(
            tset.t_end,
            tset.outputs(),
            tset.dt_initial,
            growth=tset.growth,
            steps_per_level=tset.steps_per_level,
            dt_max=tset.dt_max,
        )
        outputs = sorted(set(tset.outputs()) | {tset.t_end})
        record = _Records.start(self) if resume is None else _Records.resume(self, resume, plan)
        if resume is None and on_output is not None:
            on_output(0.0, self)
        last_report = time.monotonic()
        failures: list[dict[str, Any]] = []
        while not plan.done:
            t, dt = plan.propose()
            coeff = bdf_coefficients(dt, plan.dt_previous, order)
            failure = self._try_step(coeff, dt / plan.dt_previous if plan.dt_previous else None)
            if failure is not None:
                if not failures:  # the last good state, saved as such if the step never succeeds
                    good = (plan.state_dict(), record.retries)
                failures.append({"t": t, "dt": dt, **failure})
                self.c.x.array[:] = self._c_old.x.array  # back to the last good state
                if len(failures) > settings.solver.max_retries:
                    plan.load_state(good[0])
                    record.retries = good[1]
                    self._give_up(failures, plan, record, checkpointer)
                logger.warning(
                    "step to t = %.6g s (dt = %.3g s) failed: %s; retrying with dt/2", t, dt, failure["reason_name"]
                )
                plan.cut(dt)
                record.retries += 1
                continue
            failures = []
            mass = self.mass()
            balance = (
                coeff.a0 * mass + coeff.a1 * record.mass_old + coeff.a2 * record.mass_older - self.boundary_inflow()
            )
            record.residual_sum += abs(balance) * dt
            record.mass_older, record.mass_old = record.mass_old, mass
            self._c_older.x.array[:] = self._c_old.x.array
            self._c_old.x.array[:] = self.c.x.array
            plan.accept(t, dt)
            record.steps += 1
            record.append(t, self)
            if time.monotonic() - last_report > 5.0:  # progress on long runs, at most every 5 s
                logger.info("  ... t = %.4g s of %g s (step %d, dt = %.3g s)", t, tset.t_end, record.steps, dt)
                last_report = time.monotonic()
            if any(math.isclose(t, s, rel_tol=1e-12) for s in outputs):
                last_report = time.monotonic()
                logger.info(
                    "t = %-8.4g s  step %4d  dt = %.3g s  mean c = %.4g mol/m^3", t, record.steps, dt, record.domain[-1]
                )
                if on_output is not None:
                    on_output(t, self)
            if checkpointer is not None and not plan.done:
                save_now, stop_now = checkpointer.poll(record.steps)
                if save_now:
                    checkpointer.save(record.steps, *record.checkpoint(self, plan))
                if stop_now:
                    reason = checkpointer.stop_reason()
                    raise Interrupted(
                        f"stopped by {reason} at t = {t:.6g} s (step {record.steps})",
                        result=record.result(self, "interrupted"),
                    )
        return record.result(self, "completed")

    def _give_up(
        self, failures: list[dict[str, Any]], plan: StepPlan, record: _Records, checkpointer: Checkpointer | None
    ) -> None:
        last = failures[-1]
        report = {
            "t_last_good": plan.t,
            "t_failed": failures[0]["t"],
            "step": record.steps + 1,
            "max_retries": self.settings.solver.max_retries,
            "attempts": failures,
        }
        where = ""
        if checkpointer is not None and checkpointer.store is not None:
            state, arrays = record.checkpoint(self, plan)
            checkpointer.save(record.steps, {**state, "failure": report}, arrays)
            where = f"; last good state saved in {checkpointer.store.path}"
        dts = ", ".join(f"{f['dt']:.3g}" for f in failures)
        history = last["residual_history"]
        err = SolverError(
            f"linear solver failed on the step from t = {plan.t:.6g} s to {failures[0]['t']:.6g} s after "
            f"{len(failures)} attempts (dt = {dts} s): PETSc reason {last['reason_name']} ({last['reason']}), "
            f"relative residual {last['relative_residual']:.3g}"
            + (
                f", residual history {history[0]:.3g} ... {history[-1]:.3g} ({len(history)} iterations)"
                if history
                else ""
            )
            + where
        )
        err.report = report
        err.result = record.result(self, "failed")
        raise err

    def destroy(self) -> None:
        """Free PETSc objects (matrices, cached solvers)."""
        for ksp in list(self._direct.values()) + [entry[0] for entry in self._iterative.values()]:
            ksp.destroy()
        self._direct.clear()
        self._iterative.clear()
        if self._mg is not None:
            self._mg.destroy()
            self._mg = None
        for obj in (self._A, self._M, self._KR):
            if obj is not None:
                obj.destroy()
        self._A = None


class FusedEisenstatSolver:
    """CG with Eisenstat's SSOR on ``A = K + s M`` (two assembled AIJ matrices of one pattern) in
    fused passes of a compiled kernel (:class:`~fem_anode.fem.slab_sweeps.EisenstatCG`; no ``A`` is
    assembled, ``K`` and ``M`` are read in place). Offers what the time loop asks of a ``KSP``.

    * Rows that are the nodes of a voxel grid (``grid``): ``A`` by row types, swept in grid order
      (:class:`~fem_anode.fem.grid_stencil.GridStencilKernel`): on one rank PETSc's ``KSPCG`` +
      ``PCEISENSTAT`` on the matrix renumbered in grid order, on several one global SSOR in a
      separator order (:class:`~fem_anode.fem.grid_stencil.GridSeparatorSweeps`).
    * Else ``A``'s lower and upper parts in CSR arrays of their own
      (:class:`~fem_anode.fem.voxel_sweeps.SplitCSRSweepKernel`): PETSc's ``KSPCG`` +
      ``PCEISENSTAT`` on one rank (the same iterates: same algorithm, stopping test and reasons),
      ``PCSOR``'s local symmetric sweeps on several (block-Jacobi SSOR, the same preconditioner).
      An iteration streams the matrix once and the vectors three times, against about twice (one
      rank) or three times (several) the matrix and eight times the vectors for PETSc.

    Args:
        K, M: the matrices (``seqaij`` or ``mpiaij``, one pattern, every row with a diagonal entry).
        omega: SSOR's relaxation factor.
        rtol: relative tolerance (CG's natural norm, relative to the transformed right-hand side).
        max_it: iteration limit.
        library: the compiled kernels (:func:`~fem_anode.fem.voxel_sweeps.load_sweep_library`).
        work: a vector the solver may use for ``w`` (free during a solve), else one is made.
        grid: integer grid indices ``(n, 3)`` of this rank's rows when they are the nodes of a
            voxel grid (P1 on equal axis-aligned cells): then ``A`` is kept by row types and swept
            in grid order (:class:`~fem_anode.fem.grid_stencil.GridStencilKernel`; each solve
            renumbers ``b`` and ``x`` into that order and back), unless some rank's matrix is not a
            grid stencil (then the CSR kernel everywhere).
    """

    def __init__(
        self,
        K: PETSc.Mat,
        M: PETSc.Mat,
        omega: float,
        rtol: float,
        max_it: int,
        library: Any,
        work: PETSc.Vec | None = None,
        grid: np.ndarray | None = None,
    ) -> None:
        from fem_anode.fem.grid_stencil import GridStencilKernel
        from fem_anode.fem.slab_sweeps import OffRankCouplings
        from fem_anode.fem.voxel_sweeps import SplitCSRSweepKernel, mpiaij_off_block, seqaij_arrays

        comm = K.getComm().tompi4py()
        blocks = (K.getDiagonalBlock(), M.getDiagonalBlock()) if comm.size > 1 else (K, M)
        indptr, indices, k_values = seqaij_arrays(blocks[0])
        m_indptr, m_indices, m_values = seqaij_arrays(blocks[1])
        if not (np.array_equal(m_indptr, indptr) and np.array_equal(m_indices, indices)):
            raise ValueError("FusedEisenstatSolver: K and M must share one sparsity pattern")
        # on several ranks the rows with couplings to other ranks (needed by the grid stencil's separator order)
        coupled = np.diff(mpiaij_off_block(K)[0][0]) > 0 if comm.size > 1 else None
        stencil: GridStencilKernel | None = None
        failure = ""
        if grid is not None:
            try:
                stencil = GridStencilKernel(indptr, indices, k_values, m_values, grid, omega, library, last=coupled)
            except ValueError as exc:
                failure = str(exc)
            if comm.allreduce(bool(failure), op=MPI.LOR):  # one kind of kernel on every rank
                logger.info("grid stencil unavailable (%s): CSR sweeps", failure or "on another rank")
                stencil = None
        kernel = (
            SplitCSRSweepKernel(indptr, indices, k_values, m_values, omega, library) if stencil is None else stencil
        )
        self._finish(
            comm, kernel, stencil, rtol, max_it, work, lambda d: OffRankCouplings(K, d, library, M, order=self.order)
        )

    @classmethod
    def on_stencil(
        cls,
        comm: MPI.Comm,
        stencil: Any,
        off_rank: Callable[[PETSc.Vec], Any] | None,
        rtol: float,
        max_it: int,
        work: PETSc.Vec | None = None,
    ) -> FusedEisenstatSolver:
        """The solver on a grid stencil built without assembled matrices
        (:meth:`~fem_anode.fem.grid_stencil.GridStencilKernel.from_types`); ``off_rank(d)`` makes the
        :class:`~fem_anode.fem.slab_sweeps.OffRankCouplings` of its rows (``d``: a vector of the
        kernel's layout; ``None`` on one rank). Other arguments as for the constructor."""
        out = cls.__new__(cls)
        out._finish(comm, stencil, stencil, rtol, max_it, work, off_rank)
        return out

    def _finish(
        self,
        comm: MPI.Comm,
        kernel: Any,
        stencil: Any,
        rtol: float,
        max_it: int,
        work: PETSc.Vec | None,
        off_rank: Callable[[PETSc.Vec], Any] | None,
    ) -> None:
        """The vectors, the couplings to other ranks, the sweeps and the CG (see the constructor)."""
        from fem_anode.fem.grid_stencil import GridSeparatorSweeps, GridSlabSweeps, GridStencilKernel
        from fem_anode.fem.slab_sweeps import EisenstatCG, LocalSweeps

        self._stencil = stencil
        self.kernel = kernel
        n = self.kernel.n
        self.d = PETSc.Vec().createWithArray(self.kernel.d, size=(n, PETSc.DECIDE), comm=comm)
        self.off = off_rank(self.d) if comm.size > 1 and off_rank is not None else None
        # vectors in the kernel's order (when it is not the matrix's)
        self._b = self.d.duplicate() if self.order is not None else None
        self._x = self.d.duplicate() if self.order is not None else None
        self._product: np.ndarray | None = None
        sweeps: LocalSweeps | GridSeparatorSweeps | GridSlabSweeps
        self._several = ""  # the preconditioner's name on several ranks with the grid stencil
        if isinstance(self.kernel, GridStencilKernel) and self.off is not None:
            if self.kernel.n_first == self.kernel.n:  # rows in grid order, z slabs: global SSOR, slab-face order
                sweeps = GridSlabSweeps(comm, self.kernel, self.off, self.d)
                self._several = "eisenstat-slab-faces+grid-stencil"
            else:  # global SSOR, separator order
                sweeps = GridSeparatorSweeps(comm, self.kernel, self.off, self.d)
                self._several = "eisenstat-separator+grid-stencil"
        else:
            sweeps = LocalSweeps(comm, self.kernel, self.off)
        self.cg = EisenstatCG(sweeps, self.d, rtol, max_it, work=work)
        self.scale: float | None = None

    @property
    def order(self) -> np.ndarray | None:
        """Kernel row ``i`` holds the matrix's local row ``order[i]`` (the grid stencil's grid order);
        ``None``: the matrix's own order (the CSR kernel, or rows numbered in grid order already)."""
        return None if self._stencil is None or self._stencil.identity else self._stencil.order

    def prepare(self, scale: float) -> None:
        """Use ``A = K + scale M`` (recomputed from ``K`` and ``M`` when ``scale`` changes)."""
        if self.scale != scale:
            self.kernel.set_scale(scale)
            if self.off is not None:
                self.off.set_scale(scale)
            self.scale = scale

    def solve(self, b: PETSc.Vec, x: PETSc.Vec) -> None:
        """Solve ``A x = b`` from the initial guess in ``x``."""
        if self._stencil is None or self._b is None or self._x is None:
            self.cg.solve(b, x)
            return
        self._stencil.to_kernel_order(b.array_r, self._b.array)
        self._stencil.to_kernel_order(x.array_r, self._x.array)
        self.cg.solve(self._b, self._x)
        self._stencil.from_kernel_order(self._x.array_r, x.array)

    @property
    def has_mass_mult(self) -> bool:
        """Whether :meth:`mass_mult` runs on the grid stencil (else use ``M`` itself)."""
        return self._stencil is not None

    def mass_mult(self, x: PETSc.Vec, y: PETSc.Vec) -> None:
        """``y = M x`` by the grid stencil's table of ``M`` (vectors in the matrix's order; collective)."""
        stencil, kernel_x = self._stencil, self._x
        if stencil is None:
            raise ValueError("FusedEisenstatSolver.mass_mult needs the grid stencil")
        if kernel_x is None:  # rows in grid order already
            stencil.mass_mult(x.array_r, y.array)
            if self.off is not None:
                y.array[self.off.rows] += self.off.mass_product_on_rows(x)
            return
        if self._product is None:
            self._product = np.empty(stencil.n)
        stencil.to_kernel_order(x.array_r, kernel_x.array)
        stencil.mass_mult(kernel_x.array_r, self._product)
        if self.off is not None:
            self._product += self.off.mass_product(kernel_x)
        stencil.from_kernel_order(self._product, y.array)

    def getConvergedReason(self) -> int:
        return self.cg.reason

    def getIterationNumber(self) -> int:
        return self.cg.iterations

    def getConvergenceHistory(self) -> np.ndarray:
        return self.cg.history

    def getType(self) -> str:
        return "cg"

    def getPC(self) -> Any:
        if self._stencil is not None:  # the grid stencil: global SSOR (in a separator order on several ranks)
            return NamedPC("eisenstat+grid-stencil" if self.off is None else self._several)
        return NamedPC("eisenstat+compiled" if self.off is None else "eisenstat-block-jacobi+compiled")

    @property
    def nbytes(self) -> int:
        """Bytes held beyond ``K`` and ``M``: the kernel's operator and the CG's vectors (this rank)."""
        vectors = 4 + (2 if self.order is not None else 0)
        return self.kernel.nbytes + 8 * self.kernel.n * vectors

    def free(self) -> None:
        """Free the vectors and the scatter (the matrix belongs to the caller)."""
        self.cg.destroy()
        self.d.destroy()
        for vec in (self._b, self._x):
            if vec is not None:
                vec.destroy()
        if self.off is not None:
            self.off.destroy()


class NamedPC:
    """A stand-in for a PETSc ``PC`` that only names the preconditioner (for the solvers run in the package)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def getType(self) -> str:
        return self.name
