r"""Transient Li diffusion in the SEI/carbon/binder domain with mass-transfer boundaries.

The model of Vorauer et al. (2020), "Modeling the Li-diffusion in the microstructure":

.. math::

    \varepsilon \frac{\partial c}{\partial t} = \nabla\cdot(D_\mathrm{eff}\nabla c)
    \quad\text{in the SEI/C/B domain},\qquad D_\mathrm{eff} = \varepsilon^{b} D,

    -D_\mathrm{eff}\nabla c\cdot n = -k_f (c_\mathrm{bulk} - c)\ \text{on pore interfaces (inflow)},\quad
    -D_\mathrm{eff}\nabla c\cdot n = k_\mathrm{si}\, c\ \text{on Si interfaces},

no flux on the image box, ``c = 0`` at ``t = 0``. SI units: c in mol/m^3, D in m^2/s, k in
m/s, t in s, lengths in m.

Numerics: the mesh stays in metres; the forms are written in a micrometre length unit and in
``c / c_bulk``, so matrix entries are O(1) whatever the physical scale. The mass matrix ``M``
and the operator ``K + R`` (diffusion + Robin) are assembled once; each distinct BDF leading
coefficient ``a0`` gives ``A = K + R + a0 eps M`` (a copy and an AXPY into one operator matrix
that shares their sparsity) and, for a direct solver, one factorisation (kept within a memory
budget); the iterative solvers keep their set-up across step sizes (SSOR needs none, the
multigrid is built once and shifted per a0). A time step costs one mat-vec and one solve.
Mass balance, region means and boundary fluxes are dot products with vectors assembled once.
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

import dolfinx
import numpy as np
import ufl
from dolfinx import fem
from dolfinx.fem import petsc as fem_petsc
from mpi4py import MPI
from petsc4py import PETSc

from fem_anode.errors import InputError, Interrupted, SolverError, UsageError
from fem_anode.fem.diffusion_settings import (
    DiffusionSettings,
    GeometrySettings,
    MeshSettings,
    OutputSettings,
    PhysicsSettings,
    Region,
    SolverSettings,
    TimeSettings,
)
from fem_anode.fem.mesh_io import TaggedMesh
from fem_anode.fem.petsc_ksp import direct_solver_package, prefixed_options, unique_prefix
from fem_anode.fem.time_stepping import StepPlan, bdf_coefficients
from fem_anode.io.checkpoint import Checkpoint, Checkpointer, settings_differences
from fem_anode.io.interrupt import agree_flags
from fem_anode.meshing.tags import interface_name

__all__ = [
    "DiffusionSettings",
    "DiffusionProblem",
    "DiffusionResult",
    "GeometrySettings",
    "MeshSettings",
    "PhysicsSettings",
    "TimeSettings",
    "SolverSettings",
    "OutputSettings",
    "Region",
]

logger = logging.getLogger(__name__)

#: Internal length unit of the forms (m).
LENGTH_UNIT = 1e-6


@dataclasses.dataclass
class DiffusionResult:
    """Time series of a run (SI units), gathered on every rank.

    Attributes:
        times: step end times (s), starting with 0.
        region_means: region name -> mean c (mol/m^3) at ``times``.
        domain_mean: mean c over the domain (mol/m^3) at ``times``.
        output_times: the requested output times (s).
        mass_balance_rel_error: sum over steps of |discrete balance residual| dt relative to the
            total Li taken up.
        ndofs, ncells: global sizes.
        steps, factorisations: time steps taken; factorisations and multigrid set-ups (the
            shifted multigrid ``"mg"`` counts once per run, SSOR none).
        retries: failed steps retried with a halved step.
        status: "completed", or "interrupted" for the partial result of a stopped run.
        resumed_from_step: the checkpoint's step when the run was resumed, else None.
        c_bulk: the run's bulk concentration (mol/m^3), the level of :meth:`t90`.
    """

    times: list[float]
    region_means: dict[str, list[float]]
    domain_mean: list[float]
    output_times: list[float]
    mass_balance_rel_error: float
    ndofs: int
    ncells: int
    steps: int
    factorisations: int
    retries: int = 0
    status: str = "completed"
    resumed_from_step: int | None = None
    c_bulk: float | None = None

    def t90(self, c_bulk: float | None = None) -> dict[str, float | None]:
        """Time (s) at which each region's mean first reaches 0.9 c_bulk (linear in time), or None.

        ``c_bulk`` (mol/m^3): the run's own ``physics.c_bulk`` unless given.
        """
        level = c_bulk if c_bulk is not None else self.c_bulk
        if level is None:
            raise UsageError("t90 needs c_bulk: this result does not know its run's physics.c_bulk")
        out: dict[str, float | None] = {}
        for name, values in {**self.region_means, "domain": self.domain_mean}.items():
            out[name] = _first_crossing(self.times, values, 0.9 * level)
        return out

    def at_output_times(self) -> dict[str, Any]:
        """Region means at the output times only."""
        index = [int(np.argmin(np.abs(np.asarray(self.times) - t))) for t in self.output_times]
        return {
            "times": [self.times[i] for i in index],
            "regions": {k: [v[i] for i in index] for k, v in self.region_means.items()},
            "domain_mean": [self.domain_mean[i] for i in index],
        }


def _first_crossing(times: list[float], values: list[float], level: float) -> float | None:
    for i in range(1, len(values)):
        if values[i] >= level > values[i - 1]:
            fraction = (level - values[i - 1]) / (values[i] - values[i - 1])
            return times[i - 1] + fraction * (times[i] - times[i - 1])
        if values[i] >= level and i == 1 and values[0] >= level:
            return times[0]
    return None


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
    or :class:`~fem_anode.fem.diffusion_fv.VectorField` (finite volumes)."""

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

    @classmethod
    def start(cls, problem: DiffusionProblem) -> _Records:
        for u in (problem.c, problem._c_old, problem._c_older):
            u.x.array[:] = 0.0
        mass = problem.mass()
        return cls([0.0], [0.0], {name: [0.0] for name in problem.regions}, mass, mass)

    @classmethod
    def resume(cls, problem: DiffusionProblem, checkpoint: Checkpoint, plan: StepPlan) -> _Records:
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
        )

    def append(self, t: float, problem: DiffusionProblem) -> None:
        self.times.append(t)
        self.domain.append(problem.domain_mean())
        for name in problem.regions:
            self.regions[name].append(problem.region_mean(name))

    def checkpoint(self, problem: DiffusionProblem, plan: StepPlan) -> tuple[dict[str, Any], dict[str, Any]]:
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
        }
        arrays: dict[str, Any] = {
            "c_old": problem._c_old,
            "c_older": problem._c_older,
            "times": np.asarray(self.times),
            "domain": np.asarray(self.domain),
        }
        arrays.update({f"region.{name}": np.asarray(values) for name, values in self.regions.items()})
        return state, arrays

    def result(self, problem: DiffusionProblem, status: str) -> DiffusionResult:
        uptake = abs(problem.mass())
        return DiffusionResult(
            times=list(self.times),
            region_means={k: list(v) for k, v in self.regions.items()},
            domain_mean=list(self.domain),
            output_times=sorted(problem.settings.time.output_times),
            mass_balance_rel_error=self.residual_sum / uptake if uptake > 0 else 0.0,
            ndofs=problem.ndofs,
            ncells=problem.ncells,
            steps=self.steps,
            factorisations=self.factorisations_before + problem.factorisations,
            retries=self.retries,
            status=status,
            resumed_from_step=self.resumed_from_step,
            c_bulk=problem.settings.physics.c_bulk,
        )


class DiffusionProblem:
    """The diffusion model on a tagged mesh of the transporting phase.

    Args:
        tagged: mesh with the facet groups ``"<pore>|<transport>"`` and (optionally)
            ``"<si>|<transport>"`` (names as written by :mod:`fem_anode.meshing`).
        settings: the run's settings.
    """

    def __init__(self, tagged: TaggedMesh, settings: DiffusionSettings) -> None:
        settings.check()  # the Python API as strict as the CLI (UsageError naming the setting)
        self.tagged = tagged
        self.settings = settings
        self.mesh = tagged.mesh
        self.comm: MPI.Intracomm = tagged.mesh.comm
        geometry, physics = settings.geometry, settings.physics
        self.pore_interface = interface_name(geometry.pore_phase, geometry.transport_phase)
        self.si_interface = interface_name(geometry.si_phase, geometry.transport_phase)
        if self.pore_interface not in tagged.facet_groups:
            raise InputError(
                f"mesh has no facet group {self.pore_interface!r} (the pore interface the Li comes through); "
                f"it has {', '.join(sorted(tagged.facet_groups)) or 'none'}"
            )
        self.V = fem.functionspace(self.mesh, ("Lagrange", settings.mesh.order))
        self.c: Field = fem.Function(self.V, name="c")  # c / c_bulk
        self._c_old: Field = fem.Function(self.V)
        self._c_older: Field = fem.Function(self.V)
        self._assemble_operators(physics)
        #: The iterative solvers' one operator matrix K + R + a0 eps M and its a0 (see _operator).
        self._A: PETSc.Mat | None = None
        self._init_solver_state()
        self.regions = self._region_weights(settings.regions)

    def _init_solver_state(self) -> None:
        """The solvers' caches and counters, empty (shared with the finite-volume problem)."""
        self._A_a0: float | None = None
        #: Iterative: preconditioner family -> [KSP, the a0 it is set up for (None: stale)].
        self._iterative: dict[str, list[Any]] = {}
        self._mg: _ShiftedMultigrid | None = None
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

    @property
    def ndofs(self) -> int:
        """Unknowns of the discrete problem (all ranks)."""
        return int(self.V.dofmap.index_map.size_global)

    @property
    def ncells(self) -> int:
        """Cells of the mesh (all ranks)."""
        return int(self.mesh.topology.index_map(self.mesh.topology.dim).size_global)

    @property
    def dim(self) -> int:
        """Spatial dimension of the problem (2 or 3)."""
        return int(self.mesh.topology.dim)

    # -- assembly -------------------------------------------------------------------------
    def _scaled_measures(self) -> tuple[float, float, float]:
        """Factors turning metre-based integrals into micrometre-based ones (dx', grad', ds')."""
        d = self.mesh.topology.dim
        L = LENGTH_UNIT
        return L**-d, L ** (2 - d), L ** (1 - d)

    def _assemble_operators(self, physics: PhysicsSettings) -> None:
        mesh, V = self.mesh, self.V
        u, v = ufl.TrialFunction(V), ufl.TestFunction(V)
        s_dx, s_grad, s_ds = self._scaled_measures()
        ds = ufl.Measure("ds", domain=mesh, subdomain_data=self.tagged.facet_tags)
        pore = self.tagged.facet_groups[self.pore_interface]
        si = self.tagged.facet_groups.get(self.si_interface)
        rate_D = physics.D_eff / LENGTH_UNIT**2  # 1/s
        rate_f = physics.k_f / LENGTH_UNIT  # 1/s
        rate_si = physics.k_si / LENGTH_UNIT  # 1/s
        self.eps = physics.eps
        self.rate_f, self.rate_si = rate_f, rate_si
        # The diagnostics and the source use exactly the integrals of the scheme: w = M 1,
        # w_pore = R_pore 1, f = rate_f R_pore 1 (c_bulk as a constant of the space). The vectors
        # are assembled as the actions of the matrix forms on the constant 1 (the same integrands
        # and quadrature, so equal to the row sums to round-off): on curved P2 cells, vectors from
        # forms of their own would use other quadrature degrees and break discrete conservation
        # and the exact steady state.
        self._M = self._assemble_matrix(s_dx * u * v * ufl.dx)
        # K + R is assembled in one pass into a matrix that shares M's sparsity pattern (row
        # offsets and column indices: both are cell integrals on the same space, and the Robin
        # terms lie on cell couplings): no second sparsity build, no separate Robin matrices, and
        # the operator A shares the pattern too (_operator), so copies and AXPYs between them are
        # plain value updates.
        one = fem.Function(V)
        one.x.array[:] = 1.0
        robin_pore = s_ds * u * v * ds(pore)
        robin_si = s_ds * u * v * ds(si) if si is not None else None

        # The rates enter as Constants: one compiled form for every value of the physics.
        def constant(value: float) -> fem.Constant:
            return fem.Constant(mesh, PETSc.ScalarType(value))

        kr_form = (
            constant(rate_D) * s_grad * ufl.inner(ufl.grad(u), ufl.grad(v)) * ufl.dx + constant(rate_f) * robin_pore
        )
        if robin_si is not None and rate_si > 0:
            kr_form = kr_form + constant(rate_si) * robin_si
        self._KR = self._M.duplicate(copy=PETSc.Mat.DuplicateOption.SHARE_NONZERO_PATTERN)
        self._KR.zeroEntries()
        fem_petsc.assemble_matrix(self._KR, fem.form(kr_form))
        self._KR.assemble()
        ones = self._M.createVecRight()
        ones.set(1.0)
        self._w_dx = self._M.createVecLeft()
        self._M.mult(ones, self._w_dx)
        ones.destroy()
        self._w_pore = self._assemble_action(robin_pore, one)
        self._w_si = self._assemble_action(robin_si, one) if robin_si is not None else None
        self._source = self._w_pore.copy()
        self._source.scale(rate_f)  # inflow rate_f * (1 - c): constant part
        self.volume = self._w_dx.sum()  # in um^d
        self.pore_measure = self._w_pore.sum()
        self._rhs = self._M.createVecLeft()
        self._work = self._M.createVecLeft()

    def _mass_mult(self, x: PETSc.Vec, y: PETSc.Vec) -> None:
        """``y = M x``."""
        self._M.mult(x, y)

    def _multigrid_operands(self) -> tuple[PETSc.Mat, PETSc.Mat]:
        """``(K + R, M)`` as matrices of one sparsity pattern, for :class:`_ShiftedMultigrid`."""
        return self._KR, self._M

    @staticmethod
    def _assemble_action(form: ufl.Form, function: fem.Function) -> PETSc.Vec:
        """The vector of the bilinear ``form`` applied to ``function`` (owned entries summed)."""
        vector = fem_petsc.assemble_vector(fem.form(ufl.action(form, function)))
        vector.ghostUpdate(addv=PETSc.InsertMode.ADD, mode=PETSc.ScatterMode.REVERSE)
        return vector

    def _assemble_matrix(self, form: ufl.Form) -> PETSc.Mat:
        matrix = fem_petsc.assemble_matrix(fem.form(form))
        matrix.assemble()
        return matrix

    def _region_weights(self, regions: list[Region]) -> dict[str, tuple[PETSc.Vec, float]]:
        mesh = self.mesh
        tdim, gdim = mesh.topology.dim, mesh.geometry.dim
        n_local = mesh.topology.index_map(tdim).size_local + mesh.topology.index_map(tdim).num_ghosts
        midpoints = dolfinx.mesh.compute_midpoints(mesh, tdim, np.arange(n_local, dtype=np.int32))
        Q = fem.functionspace(mesh, ("DG", 0))
        chi = fem.Function(Q)
        v = ufl.TestFunction(self.V)
        form = fem.form(self._scaled_measures()[0] * chi * v * ufl.dx)
        cell_dofs = Q.dofmap.list[:, 0]
        out = {}
        for region in regions:
            box = np.asarray(region.box)
            if len(box) != 2 * gdim:
                raise UsageError(f"region {region.name!r} has {len(box)} box numbers; a {gdim}D mesh needs {2 * gdim}")
            inside = np.all((midpoints[:, :gdim] >= box[:gdim]) & (midpoints[:, :gdim] <= box[gdim:]), axis=1)
            chi.x.array[:] = 0.0
            chi.x.array[cell_dofs[inside]] = 1.0
            weights = fem_petsc.assemble_vector(form)
            weights.ghostUpdate(addv=PETSc.InsertMode.ADD, mode=PETSc.ScatterMode.REVERSE)
            measure = weights.sum()
            if measure <= 0:
                raise UsageError(f"region {region.name!r} box {region.box} contains none of the transporting phase")
            out[region.name] = (weights, measure)
        return out

    # -- solver ---------------------------------------------------------------------------
    def _solver_kind(self) -> str:
        """``"direct"`` or ``"iterative"`` after resolving ``solver.type = "auto"``."""
        kind = self.settings.solver.type
        if kind == "auto":
            # 3D sparse Cholesky fills in: measured (benchmarks/bench_diffusion.py) 71 s for two
            # MUMPS factorisations at 184k P1 dofs versus 1.4 s of AMG setup at 55k; a run with
            # geometric steps refactorises every few steps, so 3D iterates above 50k dofs.
            kind = "direct" if self.dim == 2 or self.ndofs < 50_000 else "iterative"
        if kind == "direct" and self._direct_package() is None and self.comm.size > 1:
            kind = "iterative"
        return kind

    def _direct_package(self) -> str | None:
        """The sparse direct solver: CHOLMOD on one rank (A is SPD), else MUMPS or SuperLU_dist.

        PETSc's own Cholesky (nested dissection) solves faster (13 vs 28 ms on the 261k-dof 2D
        ROI) but factorises 6x slower, a loss for runs that refactorise every few steps.
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
        # iteration fewer per step than starting from c^n (measured on the voxel benchmarks).
        options: dict[str, Any] = {
            "ksp_type": "cg",
            "ksp_rtol": solver.rtol,
            "ksp_atol": 0.0,
            "ksp_max_it": 500,
            "ksp_initial_guess_nonzero": True,
        }
        if preconditioner == "ssor":
            # Symmetric SOR. On one rank with Eisenstat's trick: the preconditioned operator
            # costs about one mat-vec of memory traffic, measured 1.3x faster than PCSOR;
            # PETSc 3.22's PCEISENSTAT fails on MPI matrices (MatSOR_MPIAIJ's Eisenstat branch
            # calls MatMultDiagonalBlock, which plain SeqAIJ blocks lack), so several ranks use
            # PCSOR's local symmetric sweeps. omega = 1.3: 12 instead of 14 iterations on the
            # 184k- and 835k-dof voxel benchmarks. CG's natural norm (r.z, computed anyway)
            # saves one vector norm per iteration.
            if self.comm.size == 1:
                options.update({"pc_type": "eisenstat", "pc_eisenstat_omega": 1.3})
            else:
                options.update({"pc_type": "sor", "pc_sor_omega": 1.3})
            options["ksp_norm_type"] = "natural"
        elif preconditioner == "mg":
            options.update(_ShiftedMultigrid.options(self.comm))
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

    def _operator(self, a0: float) -> PETSc.Mat:
        """The one operator matrix ``A = K + R + a0 eps M`` (values refreshed when a0 changes).

        ``A`` shares its sparsity pattern (row offsets and column indices) with ``K + R`` and
        ``M`` (see :meth:`_assemble_operators`), so it costs only its values (8 B per nonzero).
        The values are always recomputed from ``K + R`` and ``M`` (never updated incrementally),
        so they are a function of a0 alone and a resumed run sees the same matrices as the original.
        """
        if self._A is None:
            self._A = self._KR.duplicate(copy=PETSc.Mat.DuplicateOption.SHARE_NONZERO_PATTERN)
        if self._A_a0 != a0:
            self._KR.copy(self._A, structure=PETSc.Mat.Structure.SAME_NONZERO_PATTERN)
            self._A.axpy(a0 * self.eps, self._M, structure=PETSc.Mat.Structure.SAME_NONZERO_PATTERN)
            # After every change of values (MatCopy forgets it): GAMG builds its graph and eigen
            # estimates differently for a matrix known to be symmetric.
            self._A.setOption(PETSc.Mat.Option.SPD, True)
            self._A_a0 = a0
        return self._A

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
        up once per run (:class:`_ShiftedMultigrid`) and follows a new a0 by AXPYs on its levels;
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
                self._mg = _ShiftedMultigrid(
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
            self._factor_bytes = _factor_bytes(ksp)
        self._direct[key] = ksp
        return ksp

    def _direct_capacity(self) -> int:
        """How many factorisations the pool keeps: ``cache_memory`` / one factorisation's bytes
        on this rank (at least 1, at most ``cache_size``); the same on every rank."""
        solver = self.settings.solver
        per_rank = (self._factor_bytes or 0) / self.comm.size
        fits = int(solver.cache_memory // per_rank) if per_rank > 0 else solver.cache_size
        return max(1, min(solver.cache_size, fits))

    def solver_memory(self) -> dict[str, float]:
        """Bytes held by the solver's matrices and set-ups, summed over ranks, and per dof.

        ``matrices``: ``K + R``, ``M`` and the operator (values and the shared pattern);
        ``multigrid``: the shifted hierarchy's coarse operators and interpolations;
        ``factorisations``: the direct pool (estimated from the first factor's size).
        """
        ndofs = self.ndofs
        mats = [self._KR, self._M] + ([self._A] if self._A is not None else [])
        values = sum(m.getInfo()["nz_used"] for m in mats) * 8.0
        pattern = self._M.getInfo()["nz_used"] * 4.0 + 4.0 * ndofs  # one pattern, shared
        out = {
            "matrices": values + pattern,
            "multigrid": self._mg.nbytes() if self._mg is not None else 0.0,
            "factorisations": len(self._direct) * (self._factor_bytes or 0.0),
        }
        out["total"] = sum(out.values())
        out["per_dof"] = out["total"] / ndofs
        return out

    # -- diagnostics ----------------------------------------------------------------------
    def mass(self, c: fem.Function | None = None) -> float:
        """eps * integral of c/c_bulk in um^d (the scaled Li content)."""
        return self.eps * self._w_dx.dot((c or self.c).x.petsc_vec)

    def boundary_inflow(self, c: fem.Function | None = None) -> float:
        """Net Li inflow rate through pore and Si interfaces, scaled units (um^d / s)."""
        vec = (c or self.c).x.petsc_vec
        inflow = self.rate_f * (self.pore_measure - self._w_pore.dot(vec))
        if self._w_si is not None and self.rate_si > 0:
            inflow -= self.rate_si * self._w_si.dot(vec)
        return inflow

    def region_mean(self, name: str) -> float:
        """Mean c over a region in mol/m^3."""
        weights, measure = self.regions[name]
        return self.settings.physics.c_bulk * weights.dot(self.c.x.petsc_vec) / measure

    def domain_mean(self) -> float:
        """Mean c over the whole transporting domain in mol/m^3."""
        return self.settings.physics.c_bulk * self._w_dx.dot(self.c.x.petsc_vec) / self.volume

    def concentration(self) -> Field:
        """c in mol/m^3 as a new Function (for output)."""
        out = fem.Function(self.V, name="c")
        out.x.array[:] = self.settings.physics.c_bulk * self.c.x.array
        return out

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

        Measured on the 64^3 electrode crop (105k dofs, 164 steps): one rank, an Eisenstat
        SSOR-CG iteration costs about one mat-vec and the 'mg' iteration 3-4 times as much
        (SSOR 1516 iterations in 8.0 s, mg 849 in 19.7 s); two ranks, SOR's local sweeps cost
        three mat-vecs and need more iterations, so 'mg' wins sooner (SOR 2177 iterations in
        15.3 s, mg 1014 in 12.7 s).
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
        on_output: Callable[[float, DiffusionProblem], None] | None = None,
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
            tset.output_times,
            tset.dt_initial,
            growth=tset.growth,
            steps_per_level=tset.steps_per_level,
            dt_max=tset.dt_max,
        )
        outputs = sorted(set(tset.output_times) | {tset.t_end})
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


class _ShiftedMultigrid:
    r"""One multigrid hierarchy for ``A(s) = K + R + s M`` at every shift ``s = a0 eps``.

    Set up once per run, from ``K + R`` alone (so it does not depend on the history of step
    sizes, and a resumed run rebuilds exactly the same one): PETSc GAMG (smoothed aggregation)
    gives the interpolations ``P_l``; the Galerkin products ``(K+R)_l = P_l^T (K+R)_{l+1} P_l``
    and ``M_l = P_l^T M_{l+1} P_l`` are computed once. Since ``P^T A(s) P = P^T (K+R) P + s P^T M P``,
    a new shift costs one copy and one AXPY per coarse level (same sparsity) and the Cholesky
    factorisation of the coarsest level (a few hundred unknowns): no new hierarchy.

    Smoothers: one symmetric SOR sweep (local on each rank) before and after the coarse
    correction, which needs no set-up per shift (no eigenvalue estimates). Measured on the 64^3
    electrode crop (105k dofs, the 164 steps of the 10 s run): 849 CG iterations in 19 s,
    against 1165 in 25 s with two Chebyshev/Jacobi steps and 2018 in 23 s with one.

    Args:
        KR: ``K + R`` (fine level), SPD.
        M: mass matrix (same sparsity as ``KR``).
        eps: the transporting-phase fraction multiplying ``a0 M``.
        prefix: options prefix of the reference GAMG setup (``<prefix>ref_``).
        user_options: the user's ``petsc_options``; ``pc_gamg_*`` entries reach the reference setup.
    """

    def __init__(self, KR: PETSc.Mat, M: PETSc.Mat, eps: float, prefix: str, user_options: dict[str, Any]) -> None:
        start = time.perf_counter()
        comm = KR.getComm()
        self.eps = eps
        reference = PETSc.KSP().create(comm)
        ref_prefix = f"{prefix}ref_"
        reference.setOptionsPrefix(ref_prefix)
        options: dict[str, Any] = {"ksp_type": "preonly", "pc_type": "gamg"}
        options.update({k: v for k, v in user_options.items() if k.startswith("pc_gamg_")})
        KR.setOption(PETSc.Mat.Option.SPD, True)
        reference.setOperators(KR)
        with prefixed_options(ref_prefix, options):
            reference.setFromOptions()
            reference.setUp()
        pc = reference.getPC()
        n = pc.getMGLevels()
        # Level 0 is the coarsest, n - 1 the fine level (PCMG's numbering).
        self.P: list[PETSc.Mat] = [pc.getMGInterpolation(level) for level in range(1, n)]  # P[l - 1]: level l-1 -> l
        reference.destroy()
        self.KR: list[PETSc.Mat] = [KR] * n
        self.M: list[PETSc.Mat] = [M] * n
        for level in range(n - 1, 0, -1):
            P = self.P[level - 1]
            self.KR[level - 1] = self.KR[level].ptap(P)
            self.M[level - 1] = self.M[level].ptap(P)
        # A_l shares the sparsity of (K+R)_l: M_l has the same one (the same symbolic product).
        self.A: list[PETSc.Mat] = [
            self.KR[level].duplicate(copy=PETSc.Mat.DuplicateOption.SHARE_NONZERO_PATTERN) for level in range(n - 1)
        ]
        self.levels = n
        self.shift_a0: float | None = None
        self.setup_s = time.perf_counter() - start
        logger.info(
            "multigrid for every step size: %d levels (%s unknowns), set up once in %.2f s",
            n,
            " / ".join(str(self.KR[level].getSize()[0]) for level in range(n)),
            self.setup_s,
        )

    @staticmethod
    def options(comm: MPI.Comm) -> dict[str, Any]:
        """Options of the CG + shifted-multigrid KSP (the user's are merged over them)."""
        options: dict[str, Any] = {
            "pc_type": "mg",
            "pc_mg_galerkin": "none",
            "pc_mg_type": "multiplicative",
            "pc_mg_cycle_type": "v",
            "mg_levels_ksp_type": "richardson",
            "mg_levels_pc_type": "sor",
            "mg_levels_ksp_max_it": 1,
            "mg_levels_ksp_norm_type": "none",
            "mg_coarse_ksp_type": "preonly",
        }
        if comm.size == 1:
            options["mg_coarse_pc_type"] = "cholesky"
        else:  # GAMG gathers the coarsest level on one rank; every rank solves it
            options.update({"mg_coarse_pc_type": "redundant", "mg_coarse_redundant_pc_type": "cholesky"})
        return options

    def attach(self, ksp: PETSc.KSP, A: PETSc.Mat, a0: float) -> None:
        """Make ``ksp``'s preconditioner this multigrid, on the fine operator ``A = A(a0)``."""
        self.shift(a0)
        pc = ksp.getPC()
        pc.setType("mg")
        pc.setMGLevels(self.levels)
        for level in range(1, self.levels):
            pc.setMGInterpolation(level, self.P[level - 1])
            pc.getMGSmoother(level).setOperators(A if level == self.levels - 1 else self.A[level])
        pc.getMGCoarseSolve().setOperators(self.A[0])

    def shift(self, a0: float) -> None:
        """Coarse operators for ``a0``: ``A_l = (K+R)_l + a0 eps M_l`` (recomputed, not updated)."""
        if a0 == self.shift_a0:
            return
        for level in range(self.levels - 1):
            self.KR[level].copy(self.A[level], structure=PETSc.Mat.Structure.SAME_NONZERO_PATTERN)
            self.A[level].axpy(a0 * self.eps, self.M[level], structure=PETSc.Mat.Structure.SAME_NONZERO_PATTERN)
        self.shift_a0 = a0

    def nbytes(self) -> float:
        """Bytes of the coarse operators (three value arrays, two patterns) and interpolations, all ranks."""
        total = 0.0
        for level in range(self.levels - 1):
            nnz, rows = self.KR[level].getInfo()["nz_used"], self.KR[level].getSize()[0]
            total += nnz * (3 * 8 + 2 * 4) + 2 * 4 * rows
        for P in self.P:
            total += P.getInfo()["nz_used"] * 12 + 4 * P.getSize()[0]
        return total

    def destroy(self) -> None:
        """Free the hierarchy (the fine-level matrices belong to the problem)."""
        for mat in self.KR[:-1] + self.M[:-1] + self.A + self.P:
            mat.destroy()


def _factor_bytes(ksp: PETSc.KSP) -> float | None:
    """Bytes of a factorisation (all ranks): entries of the factor x 12 B, or the solver's own count."""
    try:
        info = ksp.getPC().getFactorMatrix().getInfo()
    except PETSc.Error:
        return None
    return max(float(info.get("memory", 0.0)), 12.0 * float(info.get("nz_used", 0.0))) or None
