r"""The chemo-mechanical phase-field problem: Li Cahn-Hilliard + finite-strain J2 mechanics.

Unknowns on the reference cross-section (P1 Lagrange, one mixed space): the normalised Li
concentration ``c``, its chemical potential ``mu`` and the in-plane displacement ``u``; plus
the uniform axial stretch ``lambda`` (generalised plane strain) as a global scalar (see
:mod:`fem_anode.fem.phasefield.newton`). Backward Euler in time:

.. math::

    \int \frac{c - c_n}{\Delta t} q + M\nabla\mu\cdot\nabla q = 0,\qquad
    \int (\mu - f'(c) - \mu_\mathrm{mech}) v - \kappa\nabla c\cdot\nabla v = 0,

    \int P : \nabla w = 0,\qquad \int P_{zz} = 0\ \text{(generalised plane strain)},

with ``P = s^3 tau F^-T`` (first Piola-Kirchhoff stress of the return map of
:mod:`~fem_anode.fem.phasefield.plasticity`) and the mechanical driving force
``mu_mech = d(s^3 W)/dc`` at fixed ``F`` and plastic state,
``s^2 s'(3W - tr tau) + s^3 W E'/E``. Everything is in the normalisation of
Supplementary Table 1 (lengths in ``l0``). The mesh stays in metres: the forms are written in
the length unit ``l0`` (gradients times ``l0``, cell integrals divided by ``l0^2``, facet
integrals by ``l0``, coordinates divided by ``l0``), so their entries are O(1) whatever the
physical scale.

Extension points, used by the vacancy/void model
(:class:`~fem_anode.fem.phasefield.vacancy.VacancyPhaseFieldProblem`):
:attr:`PhaseFieldProblem.before_half_cycle` and :attr:`after_half_cycle` (callables run
around each half-cycle; the latter may extend the record), :attr:`after_step` (after each
accepted step), the residual assembled from :meth:`_residual_terms` (a subclass adds fields to
:meth:`_elements` and terms there), :attr:`_bounded_dofs` (dofs that must stay in (0, 1)),
:attr:`_frozen_in_equilibrium` (rate constants zeroed by :meth:`equilibrate`) and
:meth:`scalar_fields` (extra P1 output fields).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import basix.ufl
import numpy as np
import ufl
from dolfinx import default_scalar_type, fem
from mpi4py import MPI
from petsc4py import PETSc

from fem_anode.errors import InputError, SolverError, UsageError
from fem_anode.fem.mesh_io import TaggedMesh
from fem_anode.fem.phasefield import chemistry, kinematics
from fem_anode.fem.phasefield.mumps_single import single_precision_available
from fem_anode.fem.phasefield.newton import BorderedNewton, linear_solver_options
from fem_anode.fem.phasefield.plasticity import STATE_SIZE, return_map_ufl, state_update_ufl
from fem_anode.fem.phasefield.settings import PhaseFieldSettings

__all__ = ["HalfCycleProgress", "PhaseFieldProblem", "ScaledMeasure", "StepResult", "PREDICTOR_MAX_RATIO"]

logger = logging.getLogger(__name__)

#: Largest ratio of the new to the last step in the linear predictor (the smooth controller grows
#: dt by at most ``growth`` = 1.5 anyway).
PREDICTOR_MAX_RATIO = 2.0


class ScaledMeasure:
    """A UFL measure times a constant: ``integrand * m`` is ``(factor * integrand) * measure``.

    The forms are written in the length unit ``l0`` on a mesh in metres: ``dx / l0^2`` and
    ``ds / l0`` are the measures of the normalised coordinates. Calling it restricts the measure
    (``m(tag)``, ``m(metadata=...)``) and keeps the factor.
    """

    def __init__(self, measure: ufl.Measure, factor: float) -> None:
        self.measure, self.factor = measure, factor

    def __rmul__(self, integrand: Any) -> ufl.Form:
        return (self.factor * integrand) * self.measure

    def __call__(self, *args: Any, **kwargs: Any) -> ScaledMeasure:
        return ScaledMeasure(self.measure(*args, **kwargs), self.factor)


#: The failure ceiling is dropped after an accepted step whose largest change of c is at most this
#: fraction of the smooth controller's target change (the quiet end of a half-cycle).
QUIET = 0.01


@dataclasses.dataclass
class HalfCycleProgress:
    """Where a half-cycle is (JSON-serialisable for checkpoints): remaining output marks, the
    next step size and the counters of its record."""

    index: int
    kind: str
    t0: float
    marks: list[float]
    dt: float
    iterations: int = 0
    steps: int = 0
    rejected: int = 0
    peak_vm: float = 0.0
    peak_ep: float = 0.0
    elapsed_s: float = 0.0
    factorisations: int = 0
    linear_iterations: int = 0
    single_failures: int = 0  # float32 factorisations that failed (each followed by a float64 run)
    dt_ceiling: float | None = None  # the smooth controller's bound after a failed Newton attempt


class StepResult:
    """Outcome of one time-step attempt."""

    def __init__(self, ok: bool, iterations: int, reason: str, history: list[float], dc: float | None = None) -> None:
        self.ok, self.iterations, self.reason, self.history = ok, iterations, reason, history
        self.dc = dc  #: largest change of a bounded concentration at a free node (None: Newton failed)


class PhaseFieldProblem:
    """Li Cahn-Hilliard coupled to finite-strain J2 mechanics on a 2D cross-section.

    Args:
        tagged: the 2D mesh (coordinates in metres) with the cell group ``geometry.phase`` and
            the facet group(s) ``geometry.surface``. It is not modified.
        settings: the run's settings.

    Raises:
        InputError: the mesh is not 2D or lacks the named groups.
    """

    def __init__(self, tagged: TaggedMesh, settings: PhaseFieldSettings) -> None:
        self.tagged, self.settings = tagged, settings
        self.mesh = tagged.mesh
        self.comm: MPI.Comm = self.mesh.comm
        mat, model = settings.material, settings.model
        if self.mesh.topology.dim != 2 or self.mesh.geometry.dim != 2:
            raise InputError(
                f"the phase-field model needs a 2D mesh in the (x, y) plane, got tdim {self.mesh.topology.dim}, gdim "
                f"{self.mesh.geometry.dim}"
            )
        tagged.cell_tag(settings.geometry.phase)
        self.surface_tags = [tagged.facet_tag(name) for name in settings.geometry.surface]
        self.l0 = mat.length_scale
        #: the reference coordinates in units of ``l0`` (UFL)
        self.x_l0 = ufl.SpatialCoordinate(self.mesh) / self.l0
        self.gps = model.kinematics == "generalized_plane_strain"
        self.t = 0.0
        self._first_dt: dict[str, float] = {}
        # Hooks take the problem first (Any: a subclass registers its own unbound methods).
        self.after_step: list[Callable[[Any], None]] = []
        self.before_half_cycle: list[Callable[[Any, int, str], None]] = []
        self.after_half_cycle: list[Callable[[Any, dict[str, Any]], None]] = []
        qd = settings.solver.quadrature_degree
        if qd is None:
            simplex = self.mesh.topology.cell_name() == "triangle"
            qd = 2 if simplex else 2 * settings.mesh.displacement_degree
        self.quadrature_degree = qd
        # measures in the length unit l0: dx' = dx / l0^2, ds' = ds / l0
        self.dx = ScaledMeasure(
            ufl.Measure("dx", domain=self.mesh, metadata={"quadrature_degree": qd, "quadrature_scheme": "default"}),
            self.l0**-2,
        )
        self.ds = ScaledMeasure(ufl.Measure("ds", domain=self.mesh, subdomain_data=tagged.facet_tags), 1 / self.l0)
        self.dx_vertex = ScaledMeasure(
            ufl.Measure("dx", domain=self.mesh, metadata={"quadrature_rule": "vertex", "quadrature_degree": 1}),
            self.l0**-2,
        )
        self.W = fem.functionspace(self.mesh, basix.ufl.mixed_element(self._elements()))
        self.w = fem.Function(self.W, name="w")
        self.w_old = fem.Function(self.W)
        self._w_saved = fem.Function(self.W)
        self._w_prev = fem.Function(self.W)  # accepted state before w_old (predictor)
        self._dt_prev: float | None = None  # its step; None: no predictor for the next step
        self._lam_prev = 1.0
        qe = basix.ufl.quadrature_element(
            self.mesh.basix_cell(), value_shape=(STATE_SIZE,), scheme="default", degree=qd
        )
        self.Q = fem.functionspace(self.mesh, qe)
        self.state = fem.Function(self.Q, name="plastic_state")
        self.state.x.array.reshape(-1, STATE_SIZE)[:] = [1.0, 0.0, 1.0, 1.0, 0.0]
        self.lam = fem.Constant(self.mesh, default_scalar_type(1.0))
        self.lam_old = 1.0
        self.dt = fem.Constant(self.mesh, default_scalar_type(settings.cycling.dt_initial))
        self.mobility = fem.Constant(self.mesh, default_scalar_type(mat.mobility_li))
        # continuation factor of the chemical swelling (equilibrate)
        self.load = fem.Constant(self.mesh, default_scalar_type(1.0))
        self.c_surface = fem.Constant(self.mesh, default_scalar_type(mat.c_max))
        self._ramp: tuple[float, float, float, float] | None = None  # (from, to, t0, duration)
        self._first_dt = {}  # kind -> first step size learnt (smooth controller)
        self._c_dofs = self.W.sub(0).collapse()[1]
        self._frozen_in_equilibrium: list[fem.Constant] = [self.mobility]
        self._setup_fields()
        self._build_forms()
        self.bcs = self._boundary_conditions()
        self._bc_c_dofs = np.intersect1d(
            self._c_dofs,
            np.concatenate([bc.dof_indices()[0] for bc in self.bcs_c]) if self.bcs_c else np.zeros(0, np.int32),
        )
        self._bounded_dofs = self._concentration_dofs()
        self._free_bounded_dofs = np.setdiff1d(self._bounded_dofs, self._bc_c_dofs)
        self.newton = self._make_solver(self.bcs)
        self.set_initial_condition()

    # -- set-up ---------------------------------------------------------------------------
    def _setup_fields(self) -> None:
        """Create a subclass's extra functions and constants (called before the forms are built)."""

    def _concentration_dofs(self) -> np.ndarray:
        """Dofs of the normalised concentrations (kept in (0, 1), limited by ``max_dc`` per step)."""
        return self._c_dofs

    def scalar_fields(self) -> dict[str, Any]:
        """Extra scalar fields for output: name -> sub-function or P1 function (none here)."""
        return {}

    def _elements(self) -> list:
        """Sub-elements of the mixed space: c, mu (P1) and u (P1 or P2 vector)."""
        cell = self.mesh.basix_cell()
        p1 = basix.ufl.element("Lagrange", cell, 1)
        return [p1, p1, basix.ufl.element("Lagrange", cell, self.settings.mesh.displacement_degree, shape=(2,))]

    def grad(self, f: Any) -> Any:
        """Gradient with respect to the normalised coordinates (the mesh is in metres)."""
        return self.l0 * ufl.grad(f)

    def kinematic_quantities(self, w: Any, lam: Any) -> dict[str, Any]:
        """UFL quantities of the state ``w`` (c, u, F, s, E, return map, stresses)."""
        mat, model = self.settings.material, self.settings.model
        c, mu, u = ufl.split(w)[:3]
        F2 = ufl.Identity(2) + self.grad(u)
        s = 1 + self.load * (kinematics.chemical_stretch(c, mat.beta, mat.c_min, mat.c_max) - 1)
        E = kinematics.youngs_modulus(c, mat.e_max, mat.e_min, mat.c_min, mat.c_max)
        rm = return_map_ufl(F2, lam, s, self.state, E, mat.poisson, mat.yield_strength, model.plasticity)
        P2 = s**3 * rm.tau * ufl.inv(F2).T
        Pzz = s**3 * rm.tau_zz / lam
        ds_dc = self.load * kinematics.chemical_stretch_derivative(mat.beta, mat.c_min, mat.c_max)
        dE_dc = kinematics.youngs_modulus_derivative(mat.e_max, mat.e_min, mat.c_min, mat.c_max)
        mu_mech = s**2 * ds_dc * (3 * rm.energy - 3 * rm.pressure) + s**3 * rm.energy / E * dE_dc
        return {"c": c, "mu": mu, "u": u, "F2": F2, "s": s, "E": E, "rm": rm, "P2": P2, "Pzz": Pzz, "mu_mech": mu_mech}

    def _residual_terms(self, k: dict[str, Any], tests: tuple) -> Any:
        """Integrand of the residual (sum of the Li Cahn-Hilliard and mechanics terms)."""
        mat = self.settings.material
        q, v, wt = tests[:3]
        c, mu = k["c"], k["mu"]
        mu_mech = k["mu_mech"] if self.settings.model.coupling else 0.0
        chem = (
            self.mobility * ufl.inner(self.grad(mu), self.grad(q))
            - mu_mech * v
            - mat.kappa_li * ufl.inner(self.grad(c), self.grad(v))
        )
        mech = ufl.inner(k["P2"], self.grad(wt))
        return chem + mech

    def _lumped_terms(self, k: dict[str, Any], tests: tuple) -> Any:
        """Integrand of the residual terms integrated with the vertex rule: Li storage and the
        homogeneous chemical potential (mass lumping).

        At the nodes the logarithms of ``f'(c)`` bar every nodal ``c`` from leaving (0, 1): an
        iterate outside gives a non-finite residual and the line search backtracks. Evaluated at
        Gauss points inside the cells, a strong driving force (e.g. the stress next to a void)
        can push a node below 0 while every Gauss point stays positive.
        """
        q, v = tests[:2]
        c, mu = k["c"], k["mu"]
        c_old = ufl.split(self.w_old)[0]
        omega = self.settings.material.omega
        c_concave = c_old if self.settings.solver.time_scheme == "convex_split" else c
        f_prime = ufl.ln(c) - ufl.ln(1 - c) + omega * (1 - 2 * c_concave)
        return (c - c_old) / self.dt * q + (mu - f_prime) * v

    def _build_forms(self) -> None:
        lam_v = ufl.variable(self.lam)
        self.k = self.kinematic_quantities(self.w, lam_v)
        tests = ufl.TestFunctions(self.W)
        r = self._residual_terms(self.k, tests)
        dx = self.dx
        residual = r * dx
        residual = residual + self._lumped_terms(self.k, tests) * self.dx_vertex  # independent of lambda
        self.residual_form = fem.form(residual)
        self.jacobian_form = fem.form(ufl.derivative(residual, self.w, ufl.TrialFunction(self.W)))
        Pzz = self.k["Pzz"]
        self.axial_forms: tuple[fem.Form, fem.Form, fem.Form, fem.Form] | None = None
        if self.gps:
            self.axial_forms = (
                fem.form(Pzz * dx),
                fem.form(ufl.diff(r, lam_v) * dx),
                fem.form(ufl.derivative(Pzz * dx, self.w, ufl.TestFunction(self.W))),
                fem.form(ufl.diff(Pzz, lam_v) * dx),
            )
        self.bordered_forms: tuple[fem.Form, fem.Form] | None = None
        if self.gps and self.settings.solver.jacobian_assembly == "bordered":
            self.bordered_forms = self._bordered_forms(lam_v)

        rm = self.k["rm"]
        points = self.Q.element.interpolation_points()
        self._state_expr = fem.Expression(state_update_ufl(rm, self.state[4]), points)
        self._vm_expr = fem.Expression(ufl.as_vector([rm.q / rm.Je, self.state[4] + rm.dgamma]), points)
        c, u, F2, s = self.k["c"], self.k["u"], self.k["F2"], self.k["s"]
        mat = self.settings.material
        x = self.x_l0
        ds_s = self.ds(tuple(self.surface_tags))
        one = fem.Constant(self.mesh, default_scalar_type(1.0))
        self._scalar_forms = {
            "area_ref": fem.form(one * dx),
            "mass": fem.form(c * dx),
            "area": fem.form(ufl.det(F2) * dx),
            # f(c) with the vertex rule, as in the residual: the discrete Lyapunov functional
            "chem_energy": fem.form(
                chemistry.free_energy(c, mat.omega) * self.dx_vertex
                + mat.kappa_li / 2 * ufl.inner(self.grad(c), self.grad(c)) * dx
            ),
            "mech_energy": fem.form(s**3 * rm.energy * dx),
            "surface_ref": fem.form(one * ds_s),
            "surface_x": fem.form((x[0] + u[0]) * ds_s),
            "surface_y": fem.form((x[1] + u[1]) * ds_s),
        }
        self._xc = fem.Constant(self.mesh, np.zeros(2))
        self._radius_form = fem.form(ufl.sqrt(ufl.inner(x + u - self._xc, x + u - self._xc)) * ds_s)

    def _bordered_forms(self, lam_v: Any) -> tuple[fem.Form, fem.Form]:
        """The residual and Jacobian of ``[w, lambda]`` as two forms on ``W x DG0``, whose DG0
        dof per cell carries ``lambda`` and the axial-force equation
        (:class:`~fem_anode.fem.cell_assembly.BorderedCellAssembler`): each is assembled in one
        pass over the cells instead of six forms evaluating the constitutive law again."""
        extended = fem.functionspace(
            self.mesh, basix.ufl.mixed_element([*self._elements(), basix.ufl.element("DG", self.mesh.basix_cell(), 0)])
        )
        *tests, q0 = ufl.TestFunctions(extended)
        trial = ufl.TrialFunction(extended)
        dw = ufl.as_vector([trial[i] for i in range(self.w.ufl_shape[0])])
        dlam = ufl.TrialFunctions(extended)[-1]
        r = self._residual_terms(self.k, tuple(tests))
        Pzz = self.k["Pzz"]
        residual = r * self.dx + self._lumped_terms(self.k, tuple(tests)) * self.dx_vertex + Pzz * q0 * self.dx
        jacobian = (
            ufl.derivative(residual, self.w, dw) + (ufl.diff(r, lam_v) + ufl.diff(Pzz, lam_v) * q0) * dlam * self.dx
        )
        return fem.form(residual), fem.form(jacobian)

    def _boundary_conditions(self) -> list[fem.DirichletBC]:
        """Dirichlet c on the surface (if cycling) and three point constraints on u.

        The point constraints (both components at the node nearest the centroid, the
        component across the line to the node farthest from it) are statically determinate:
        they remove the rigid-body modes and carry no force for a traction-free body.
        """
        mesh, tdim = self.mesh, 2
        self.bcs_c: list[fem.DirichletBC] = []
        if self.settings.cycling.surface_bc == "dirichlet":
            facets = np.concatenate([self.tagged.facet_tags.find(t) for t in self.surface_tags]).astype(np.int32)
            dofs = fem.locate_dofs_topological(self.W.sub(0), tdim - 1, facets)
            if self.comm.allreduce(len(dofs)) == 0:
                raise InputError(f"surface facet group(s) {self.settings.geometry.surface} have no facets")
            self.bcs_c.append(fem.dirichletbc(self.c_surface, dofs, self.W.sub(0)))
        n_owned = mesh.geometry.index_map().size_local
        X = mesh.geometry.x[:n_owned, :2] / self.l0
        area = self.comm.allreduce(fem.assemble_scalar(self._scalar_forms["area_ref"]))
        xs = self.x_l0
        centroid = (
            np.array([self.comm.allreduce(fem.assemble_scalar(fem.form(xs[i] * self.dx))) for i in range(2)]) / area
        )
        a = self._extreme_node(X, centroid, nearest=True)
        b = self._extreme_node(X, a, nearest=False)
        across = 1 if abs(b[0] - a[0]) >= abs(b[1] - a[1]) else 0
        Vu = self.W.sub(2)
        bcs_u = []
        tol = 1e-9 * max(1.0, float(np.linalg.norm(b - a)))
        for point, components in ((a, (0, 1)), (b, (across,))):
            for comp in components:
                sub = Vu.sub(comp)
                collapsed, _ = sub.collapse()
                dofs = fem.locate_dofs_geometrical(
                    (sub, collapsed), lambda x, p=point: np.hypot(x[0] / self.l0 - p[0], x[1] / self.l0 - p[1]) < tol
                )
                zero = fem.Function(collapsed)
                bcs_u.append(fem.dirichletbc(zero, dofs, sub))
        self.pin_points = (a * self.l0, b * self.l0)
        return self.bcs_c + bcs_u

    def _extreme_node(self, X: np.ndarray, ref: np.ndarray, nearest: bool) -> np.ndarray:
        """Node (over all ranks) nearest to / farthest from ``ref``; ties broken by coordinates."""
        if len(X):
            d = np.hypot(X[:, 0] - ref[0], X[:, 1] - ref[1])
            i = int(np.argmin(d) if nearest else np.argmax(d))
            cand = (round(float(d[i]), 12) * (1 if nearest else -1), float(X[i, 0]), float(X[i, 1]))
        else:
            cand = (math.inf, 0.0, 0.0)
        best = min(self.comm.allgather(cand))
        return np.array(best[1:])

    def _make_solver(self, bcs: list[fem.DirichletBC]) -> BorderedNewton:
        sol = self.settings.solver
        linear = linear_solver_options(sol.linear_solver, self.comm.size)
        snes = {
            "snes_type": "newtonls",
            "snes_linesearch_type": sol.line_search,
            "snes_rtol": sol.rtol,
            "snes_atol": sol.atol,
            "snes_stol": 0.0,
            "snes_max_it": sol.max_it,
            "snes_divergence_tolerance": 1e12,
            **sol.petsc_options,
        }
        reuse = True if sol.reuse_factorisation is None else sol.reuse_factorisation
        return BorderedNewton(
            self.w,
            self.residual_form,
            self.jacobian_form,
            bcs,
            self.axial_forms,
            self.lam,
            linear,
            snes,
            reuse_factorisation=reuse,
            refactor_iterations=sol.refactor_iterations,
            refactor_on_stall=sol.refactor_on_stall,
            linear_rtol=sol.linear_rtol,
            stagnation=sol.stop_on_stagnation,
            single_precision=self._single_precision(reuse),
            cached_assembly=sol.jacobian_assembly in ("bordered", "cached"),
            bordered=self.bordered_forms,
            prune_pattern=sol.jacobian_assembly == "bordered",
        )

    def _single_precision(self, reuse: bool) -> bool:
        """Whether the lagged factorisation is single precision (``solver.factorisation_precision``).

        Raises:
            UsageError: ``'single'`` where this PETSc has no MUMPS or the single-precision MUMPS
                cannot be compiled (the settings refuse it without reuse or with another solver).
        """
        sol = self.settings.solver
        if sol.factorisation_precision == "double":
            return False
        mumps = sol.linear_solver in ("auto", "mumps") and PETSc.Sys.hasExternalPackage("mumps")
        if sol.factorisation_precision == "auto":
            return reuse and mumps and single_precision_available(self.comm) is None
        if not mumps:
            raise UsageError("solver.factorisation_precision = 'single' is MUMPS's, and this PETSc has no MUMPS")
        reason = single_precision_available(self.comm)
        if reason is not None:
            raise UsageError(f"solver.factorisation_precision = 'single' is not available here: {reason}")
        return True

    # -- state ----------------------------------------------------------------------------
    def set_initial_condition(self, c: Callable[[np.ndarray], np.ndarray] | float | None = None) -> None:
        """Set c (a value, a function of the normalised coordinates ``x`` (3, n), or the settings'
        initial state), ``mu = f'(c)``, ``u = 0``, ``lambda = 1`` and a virgin plastic state."""
        init, mat = self.settings.initial, self.settings.material
        if c is None:
            c0 = init.c if init.c is not None else mat.c_min
            amplitude, seed = init.perturbation, init.seed
            if amplitude > 0:
                rng = np.random.default_rng(seed)
                waves = rng.normal(size=(12, 2)) * 8.0
                phases = rng.uniform(0, 2 * np.pi, 12)
                weights = rng.uniform(-1, 1, 12)
                weights *= amplitude / np.abs(weights).sum()

                def c(x: np.ndarray) -> np.ndarray:
                    return c0 + np.cos(waves @ x[:2] + phases[:, None]).T @ weights
            else:
                c = c0
        self.w.x.array[:] = 0.0
        self.set_concentration(c)
        self.lam.value = 1.0
        self.lam_old = 1.0
        self.state.x.array.reshape(-1, STATE_SIZE)[:] = [1.0, 0.0, 1.0, 1.0, 0.0]
        self.t = 0.0
        self._first_dt = {}
        self._dt_prev = None

    def set_concentration(self, c: Callable[[np.ndarray], np.ndarray] | float | np.ndarray) -> None:
        """Set c (value, function of the normalised coordinates, or c-dof values) and mu = f'(c)
        in the current and previous state; displacement, stretch and plastic state are kept."""
        V0, dofs0 = self.W.sub(0).collapse()
        cf = fem.Function(V0)
        if callable(c):
            cf.interpolate(self.normalised(c))
        else:
            cf.x.array[:] = c
        self.w.x.array[dofs0] = cf.x.array
        dofs1 = self.W.sub(1).collapse()[1]
        self.w.x.array[dofs1] = chemistry.chemical_potential(cf.x.array, self.settings.material.omega)
        self.w.x.scatter_forward()
        self.w_old.x.array[:] = self.w.x.array
        self._dt_prev = None

    def normalised(self, function: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
        """``function`` of the normalised coordinates as a function of the mesh's (metres), for
        ``interpolate``."""
        l0 = self.l0
        return lambda x: function(x / l0)

    def _before_accept(self) -> None:
        """Called after a step converged, before the new state replaces the old one."""

    def _update_state(self) -> None:
        """Evaluate the return map at the quadrature points and store the new plastic state."""
        cells = np.arange(
            self.mesh.topology.index_map(2).size_local + self.mesh.topology.index_map(2).num_ghosts, dtype=np.int32
        )
        values = self._state_expr.eval(self.mesh, cells)
        dofs = self.Q.dofmap.list[cells]
        self.state.x.array.reshape(-1, STATE_SIZE)[dofs.ravel()] = values.reshape(-1, STATE_SIZE)

    def step(self, dt: float) -> StepResult:
        """One backward-Euler step of length ``dt``; on failure the state is left unchanged."""
        self.dt.value = dt
        self._w_saved.x.array[:] = self.w.x.array
        lam_saved = float(self.lam.value)
        if self._ramp is not None:
            start, end, t0, duration = self._ramp
            fraction = 1.0 if duration <= 0 else min(1.0, (self.t + dt - t0) / duration)
            self.c_surface.value = start + fraction * (end - start)
        if self._dt_prev is not None and self.settings.solver.predictor == "linear" and not self._leaves_ramp(dt):
            self._predict(dt, self._dt_prev)
        for bc in self.bcs_c:
            bc.set(self.w.x.array)
        ok, its, reason = self.newton.solve()
        history = list(self.newton.history)
        dc = None
        if ok:
            arr = self.w.x.array
            c_loc = arr[self._bounded_dofs]
            bad = int(not (np.all(np.isfinite(arr)) and (c_loc.size == 0 or (c_loc.min() > 0 and c_loc.max() < 1))))
            dc = np.abs(arr[self._free_bounded_dofs] - self.w_old.x.array[self._free_bounded_dofs]).max(initial=0.0)
            bad = self.comm.allreduce(bad, op=MPI.MAX)
            dc = float(self.comm.allreduce(dc, op=MPI.MAX))
            if bad:
                ok, reason = False, "c left (0, 1)"
            elif dc > self.settings.cycling.max_dc:
                ok, reason = False, f"c changed by {dc:.3g} > max_dc"
        if not ok:
            self.w.x.array[:] = self._w_saved.x.array
            self.lam.value = lam_saved
            return StepResult(False, its, reason, history, dc)
        self._before_accept()
        self._update_state()
        self._w_prev.x.array[:] = self.w_old.x.array
        self._lam_prev, self._dt_prev = self.lam_old, dt
        self.w_old.x.array[:] = self.w.x.array
        self.lam_old = float(self.lam.value)
        self.t += dt
        for hook in self.after_step:
            hook(self)
        return StepResult(True, its, reason, history, dc)

    def _leaves_ramp(self, dt: float) -> bool:
        """Whether the last accepted step lay (partly) in the surface ramp and a step of ``dt``
        ends after it. The surface value has a kink at the ramp's end: extrapolating across it
        moves the nodes next to the surface along the ramp's slope while the surface stops, a
        worse Newton start than the last state (measured: that step failed with a stagnating
        Newton at every half-cycle start but the first)."""
        if self._ramp is None or self._dt_prev is None:
            return False
        end = self._ramp[2] + self._ramp[3]
        tol = 1e-12 * max(1.0, abs(end))
        return self.t - self._dt_prev < end - tol and self.t + dt > end + tol

    def _predict(self, dt: float, dt_prev: float) -> None:
        """Initial Newton guess by linear extrapolation of the last two accepted states,
        ``w_n + r (w_n - w_{n-1})`` with ``r = dt / dt_{n-1}`` (at most :data:`PREDICTOR_MAX_RATIO`).
        A concentration moves at most halfway to 0 or 1 (the logarithms of the residual need
        ``0 < c < 1`` at every node). Node-wise, so the same on any partition. Only the start of
        Newton changes: the converged state is the same to the Newton tolerance."""
        r = min(dt / dt_prev, PREDICTOR_MAX_RATIO)
        arr = self.w.x.array
        guess = arr + r * (arr - self._w_prev.x.array)
        b = self._bounded_dofs
        guess[b] = np.clip(guess[b], 0.5 * arr[b], 0.5 * (1 + arr[b]))
        arr[:] = guess
        self.lam.value = self.lam_old + r * (self.lam_old - self._lam_prev)

    def equilibrate(self, increments: int = 1) -> StepResult:
        """Solve the mechanics (and mu) for the current c held fixed (zero mobilities); time stays.

        Args:
            increments: the chemical swelling is applied in this many equal load steps
                (proportional loading; the plastic state is updated after each); a failed
                increment is retried with a quarter of it (at most 6 times).

        Returns:
            The last increment's result; the Newton residual histories of all increments are
            in ``history`` (concatenated) only for the last one.
        """
        rates = [float(k.value) for k in self._frozen_in_equilibrium]
        for k in self._frozen_in_equilibrium:
            k.value = 0.0
        self.newton.invalidate()
        self._dt_prev = None
        t = self.t
        loaded, increment, cuts = 0.0, 1.0 / increments, 0
        try:
            while loaded < 1.0 - 1e-12:
                increment = min(increment, 1.0 - loaded)
                self.load.value = loaded + increment
                result = self.step(1.0)
                self._dt_prev = None  # load increments, not time steps: no extrapolation
                self.t = t
                if result.ok:
                    loaded += increment
                    continue
                cuts += 1
                increment /= 4
                if cuts > 6:
                    break
        finally:
            for k, value in zip(self._frozen_in_equilibrium, rates):
                k.value = value
            self.newton.invalidate()
            self.load.value = 1.0
            self.t = t
            self._dt_prev = None
        return result

    def run_half_cycle(
        self,
        index: int,
        kind: str,
        duration: float,
        on_output: Callable[[PhaseFieldProblem, float], None] | None = None,
        n_outputs: int = 1,
        output_offsets: list[float] | None = None,
        *,
        progress: HalfCycleProgress | None = None,
        on_step: Callable[[PhaseFieldProblem, HalfCycleProgress], None] | None = None,
    ) -> dict[str, Any]:
        """Advance one half-cycle with adaptive steps; return its record.

        Args:
            index: half-cycle number (1-based) for the record.
            kind: ``"lithiation"`` (surface c = c_max) or ``"delithiation"`` (c_min).
            duration: normalised time.
            on_output: called at ``n_outputs`` evenly spaced times (the last at the end) and at
                ``output_offsets`` (times after the half-cycle start, hit exactly).
            progress: continue a half-cycle from this state (a checkpoint's; the problem's own
                state must have been restored with :meth:`restore`).
            on_step: called after every accepted step (and its outputs) with the progress,
                e.g. to write checkpoints or stop safely (it may raise).

        Raises:
            SolverError: a step failed ``max_retries`` times in a row or dt fell below dt_min;
                ``err.report`` has the failing time and every attempt's dt, reason and Newton
                residual history.
        """
        cyc = self.settings.cycling
        if progress is None:
            mat = self.settings.material
            target_c = mat.c_max if kind == "lithiation" else mat.c_min
            self._ramp = (self._surface_c_mean(), target_c, self.t, min(cyc.ramp_time, duration))
            for hook in self.before_half_cycle:
                hook(self, index, kind)
            self._dt_prev = None  # the surface condition jumps: the last steps say nothing about the next
            offsets = {duration * (i + 1) / n_outputs for i in range(n_outputs)}
            offsets |= {o for o in (output_offsets or []) if 0 < o < duration}
            progress = HalfCycleProgress(
                index=index,
                kind=kind,
                t0=self.t,
                marks=[self.t + o for o in sorted(offsets)],
                dt=self._initial_dt(kind),
                factorisations=self.newton.factorisations,
                linear_iterations=self.newton.linear_iterations,
                single_failures=self.newton.single_failures,
            )
        p = progress
        rejected_at_start = p.rejected
        start = last_report = time.perf_counter()
        attempts: list[dict[str, Any]] = []
        while p.marks:
            target = p.marks[0]
            dt_try = min(p.dt, target - self.t)
            if target - self.t - dt_try < 1e-3 * dt_try:
                dt_try = target - self.t
            attempts_before = p.rejected > rejected_at_start
            result = self.step(dt_try)
            p.iterations += result.iterations
            if time.perf_counter() - last_report > 10.0:  # progress on long runs
                last_report = time.perf_counter()
                logger.info(
                    "  ... %s %d: t = %.5g of %.5g, dt = %.3g, %d steps, %d Newton its",
                    kind,
                    index,
                    self.t - p.t0,
                    duration,
                    dt_try,
                    p.steps,
                    p.iterations,
                )
            if result.ok:
                attempts.clear()
                p.steps += 1
                if p.steps == 1:
                    self._learn_initial_dt(kind, dt_try, result, first_try=not attempts_before)
                vm, ep = self.quadrature_values()
                p.peak_vm = max(p.peak_vm, float(vm.max(initial=0.0)))
                p.peak_ep = max(p.peak_ep, float(ep.max(initial=0.0)))
                if abs(self.t - target) <= 1e-9 * max(1.0, abs(target)):
                    self.t = target
                    p.marks.pop(0)
                    if on_output is not None:
                        on_output(self, self.t)
                p.dt = self._next_dt(p.dt, dt_try, result)
                self._apply_ceiling(p, dt_try, result)
                p.elapsed_s += time.perf_counter() - start
                start = time.perf_counter()
                if on_step is not None and p.marks:
                    on_step(self, p)
                continue
            p.rejected += 1
            attempts.append(
                {
                    "t": self.t,
                    "dt": dt_try,
                    "reason": result.reason,
                    "newton_iterations": result.iterations,
                    "residual_history": result.history,
                }
            )
            p.dt = self._next_dt(p.dt, dt_try, result)
            self._apply_ceiling(p, dt_try, result)
            logger.debug("t = %.6g: step dt = %.3g rejected (%s), retry with %.3g", self.t, dt_try, result.reason, p.dt)
            if len(attempts) > cyc.max_retries or p.dt < cyc.dt_min:
                err = SolverError(
                    f"phase-field {kind} (half-cycle {index}) failed at t = {self.t:.6g}: {len(attempts)} attempts in "
                    f"a row, last dt = {dt_try:.3g} ({result.reason}); try a finer mesh, a smaller dt_initial or "
                    "solver.max_it"
                )
                err.report = {"half_cycle": index, "kind": kind, "t_last_good": self.t, "attempts": attempts}
                err.progress = p  # where to resume: the state is the last good one
                raise err
        p.elapsed_s += time.perf_counter() - start
        record = {"index": index, "kind": kind, "t": self.t, **self.diagnostics()}
        record["peak_von_mises"] = float(self.comm.allreduce(p.peak_vm, op=MPI.MAX))
        record["peak_eq_plastic_strain"] = float(self.comm.allreduce(p.peak_ep, op=MPI.MAX))
        record.update(
            {
                "newton_iterations_total": p.iterations,
                "steps": p.steps,
                "rejected_steps": p.rejected,
                "wall_time_s": p.elapsed_s,
                "factorisations": self.newton.factorisations - p.factorisations,
                "linear_iterations": self.newton.linear_iterations - p.linear_iterations,
                "single_precision_failures": self.newton.single_failures - p.single_failures,
            }
        )
        for record_hook in self.after_half_cycle:
            record_hook(self, record)
        logger.info(
            "half-cycle %d (%s) to t = %g: %d steps (%d rejected), %d Newton its, mean c %.4f, lambda %.4f, max vM "
            "%.3f",
            index,
            kind,
            self.t,
            p.steps,
            p.rejected,
            p.iterations,
            record["mean_c_li"],
            record["axial_stretch"],
            record["max_von_mises"],
        )
        return record

    # -- checkpoints ----------------------------------------------------------------------
    def checkpoint_state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The state at a safe point (after an accepted step): scalars and arrays/Functions.

        ``w`` is stored per sub-space by dof coordinates (any number of ranks on resume), the
        plastic state (quadrature space) in global dof order (same number of ranks).
        """
        state = {
            "t": self.t,
            "lambda": float(self.lam.value),
            "lambda_old": self.lam_old,
            "c_surface": float(self.c_surface.value),
            "ramp": list(self._ramp) if self._ramp is not None else None,
            "factorisations": self.newton.factorisations,
            "linear_iterations": self.newton.linear_iterations,
            "single_failures": self.newton.single_failures,
            "first_dt": dict(self._first_dt),
            "dt_prev": self._dt_prev,
            "lambda_prev": self._lam_prev,
        }
        return state, {"w": self.w, "plastic_state": self.state, "w_prev": self._w_prev}

    def restore(self, state: dict[str, Any], checkpoint: Any) -> None:
        """Put back a :meth:`checkpoint_state` (``checkpoint`` restores the Functions by name
        ``"problem.<name>"``, as :class:`~fem_anode.io.checkpoint.Checkpoint` does)."""
        checkpoint.restore("problem.w", self.w)
        checkpoint.restore("problem.plastic_state", self.state)
        self.w.x.scatter_forward()
        self.w_old.x.array[:] = self.w.x.array
        self.t = float(state["t"])
        self.lam.value = float(state["lambda"])
        self.lam_old = float(state["lambda_old"])
        self.c_surface.value = float(state["c_surface"])
        self._ramp = tuple(state["ramp"]) if state["ramp"] is not None else None
        self.newton.factorisations = int(state["factorisations"])
        self.newton.linear_iterations = int(state["linear_iterations"])
        self.newton.single_failures = int(state.get("single_failures", 0))  # checkpoints before 2026-12-06
        self._first_dt = {str(k): float(v) for k, v in state.get("first_dt", {}).items()}
        self._dt_prev = state.get("dt_prev")
        self._lam_prev = float(state.get("lambda_prev", self.lam_old))
        if self._dt_prev is not None:
            checkpoint.restore("problem.w_prev", self._w_prev)
            self._w_prev.x.scatter_forward()
        self.newton.invalidate()

    def _initial_dt(self, kind: str) -> float:
        """First step of a half-cycle: ``dt_initial``, or with the smooth controller the size the
        first step of the last half-cycle of this kind needed (never above ``dt_initial``)."""
        cyc = self.settings.cycling
        if cyc.controller != "smooth":
            return cyc.dt_initial
        return min(cyc.dt_initial, self._first_dt.get(kind, cyc.dt_initial))

    def _learn_initial_dt(self, kind: str, dt_try: float, result: StepResult, first_try: bool) -> None:
        """Remember the size of this half-cycle's first accepted step (grown after an easy first
        try) for the next half-cycle of the same kind: the Dirichlet jump at a half-cycle start
        is the same each time, and the attempts that fail on it cost most of a half-cycle's
        rejected Newton iterations."""
        cyc = self.settings.cycling
        if first_try and self._effective_iterations(result.history) <= cyc.easy_iterations:
            dt_try *= cyc.growth
        self._first_dt[kind] = min(cyc.dt_initial, dt_try)

    def _next_dt(self, dt: float, dt_try: float, result: StepResult) -> float:
        """The step size after an attempt of ``dt_try`` (``dt``: the controller's current size,
        larger than ``dt_try`` when the step was shortened to hit an output time).

        ``threshold``: grow by ``growth`` after an accepted step with at most ``easy_iterations``
        effective Newton iterations, cut back by ``cutback`` after a rejection. ``smooth``: the
        change of c is about proportional to dt, so the step after one that changed c by ``dc``
        is aimed at ``dc_target max_dc``: ``dt (dc_target max_dc / dc)``, at most ``growth``
        times larger (``fast_growth`` after a step of at most half of ``easy_iterations``
        effective iterations: the quiet end of a half-cycle, where c hardly changes, is crossed
        in fewer steps); the Newton iterations bound it as well (at most ``easy_iterations``: may
        grow; up to twice that: may not grow; more: halve). A step rejected for ``max_dc`` is
        retried with the size its change predicts (between 0.1 and 0.9 times), a failed Newton
        solve with ``cutback``. Both are capped by ``dt_max``.
        """
        cyc = self.settings.cycling
        effective = self._effective_iterations(result.history)
        if cyc.controller == "threshold":
            if not result.ok:
                return dt_try * cyc.cutback
            if effective <= cyc.easy_iterations and dt_try >= 0.999 * dt:
                return min(dt * cyc.growth, cyc.dt_max)
            return dt
        target = cyc.dc_target * cyc.max_dc
        if not result.ok:
            if result.dc is not None and result.dc > cyc.max_dc:  # converged, but changed c too much
                return dt_try * min(0.9, max(0.1, target / result.dc))
            return dt_try * cyc.cutback
        cap = max(cyc.growth, cyc.fast_growth) if 2 * effective <= cyc.easy_iterations else cyc.growth
        factor = cap if result.dc is None or result.dc <= 0 else min(cap, target / result.dc)
        if effective > 2 * cyc.easy_iterations:
            factor = min(factor, 0.5)
        elif effective > cyc.easy_iterations:
            factor = min(factor, 1.0)
        if dt_try < 0.999 * dt:  # shortened to hit an output time: its size says little about growth
            return min(dt if factor >= 1 else min(dt, dt_try * factor), cyc.dt_max)
        return min(dt_try * factor, cyc.dt_max)

    def _apply_ceiling(self, p: HalfCycleProgress, dt_try: float, result: StepResult) -> None:
        """The smooth controller's failure ceiling: after a failed attempt of ``dt_try`` (not a
        ``max_dc`` rejection, not the half-cycle's first step, whose surface jump has its own rule)
        the next steps stay below ``failure_ceiling dt_try``, a bound growing by ``ceiling_growth``
        per accepted step and dropped once a step changes c by at most ``QUIET`` of the target
        change (the front that failed has passed) or the bound reaches ``dt_max``. Caps ``p.dt``."""
        cyc = self.settings.cycling
        if not result.ok:
            not_max_dc = not (result.dc or 0.0) > cyc.max_dc  # Newton failed, or c left (0, 1)
            if cyc.controller == "smooth" and cyc.failure_ceiling > 0 and p.steps > 0 and not_max_dc:
                p.dt_ceiling = cyc.failure_ceiling * dt_try
            return
        if p.dt_ceiling is not None and result.dc is not None and result.dc <= QUIET * cyc.dc_target * cyc.max_dc:
            p.dt_ceiling = None
        if p.dt_ceiling is not None:
            p.dt = min(p.dt, p.dt_ceiling)
            p.dt_ceiling *= cyc.ceiling_growth
            if p.dt_ceiling >= cyc.dt_max:
                p.dt_ceiling = None

    def _effective_iterations(self, history: list[float]) -> int:
        """Newton iterations to reduce the residual by 1e-6 (or below 1e3 atol).

        The step-size control uses this count rather than the SNES iteration number, which
        near a tight tolerance depends on round-off (and so on the number of ranks).
        """
        if not history:
            return 0
        target = max(1e-6 * history[0], 1e3 * self.settings.solver.atol)
        for k, norm in enumerate(history):
            if norm <= target:
                return k
        return len(history)

    # -- diagnostics ----------------------------------------------------------------------
    def _surface_c_mean(self) -> float:
        """Mean of c over the surface nodes (owned dofs; all ranks)."""
        n_owned = self.W.dofmap.index_map.size_local
        dofs = self._bc_c_dofs[self._bc_c_dofs < n_owned]
        total = self.comm.allreduce(float(self.w.x.array[dofs].sum()))
        count = self.comm.allreduce(len(dofs))
        return total / count if count else float(self.c_surface.value)

    def scalar(self, name: str) -> float:
        """Global value of one of the diagnostic integrals (normalised units)."""
        return float(self.comm.allreduce(fem.assemble_scalar(self._scalar_forms[name])))

    def free_energy(self) -> dict[str, float]:
        """Chemical (f + kappa/2 |grad c|^2) and elastic energy over the reference section."""
        chem, mech = self.scalar("chem_energy"), self.scalar("mech_energy")
        return {"chemical": chem, "elastic": mech, "total": chem + mech}

    def quadrature_values(self) -> tuple[np.ndarray, np.ndarray]:
        """Cauchy von Mises stress and eq. plastic strain at this rank's owned-cell quadrature points."""
        cells = np.arange(self.mesh.topology.index_map(2).size_local, dtype=np.int32)
        values = self._vm_expr.eval(self.mesh, cells).reshape(-1, 2)
        return values[:, 0], values[:, 1]

    def diagnostics(self) -> dict[str, float]:
        """Half-cycle record quantities (SI lengths; normalised stresses). Collective."""
        area_ref = self.scalar("area_ref")
        perimeter = self.scalar("surface_ref")
        self._xc.value = np.array([self.scalar("surface_x"), self.scalar("surface_y")]) / perimeter
        radius = self.comm.allreduce(fem.assemble_scalar(self._radius_form)) / perimeter
        vm, ep = self.quadrature_values()
        arr = self.w.x.array[self._c_dofs]
        energy = self.free_energy()
        return {
            "mean_c_li": self.scalar("mass") / area_ref,
            "min_c_li": float(self.comm.allreduce(arr.min(initial=np.inf), op=MPI.MIN)),
            "max_c_li": float(self.comm.allreduce(arr.max(initial=-np.inf), op=MPI.MAX)),
            "outer_radius_m": float(radius * self.l0),
            "area_m2": self.scalar("area") * self.l0**2,
            "reference_area_m2": area_ref * self.l0**2,
            "axial_stretch": float(self.lam.value),
            "max_von_mises": float(self.comm.allreduce(vm.max(initial=0.0), op=MPI.MAX)),
            "max_eq_plastic_strain": float(self.comm.allreduce(ep.max(initial=0.0), op=MPI.MAX)),
            "chemical_energy": energy["chemical"],
            "elastic_energy": energy["elastic"],
        }

    def stress_expression(self) -> Any:
        """UFL Cauchy stress components ``(sxx, syy, sxy, szz)`` of the current state (normalised)."""
        rm = self.k["rm"]
        tau = rm.tau
        return ufl.as_vector([tau[0, 0], tau[1, 1], tau[0, 1], rm.tau_zz]) / rm.Je

    def evaluate_at_quadrature(self, expr: Any) -> tuple[np.ndarray, np.ndarray]:
        """Values of a UFL expression and the quadrature points (normalised coordinates) on owned cells."""
        points = self.Q.element.interpolation_points()
        cells = np.arange(self.mesh.topology.index_map(2).size_local, dtype=np.int32)
        values = fem.Expression(expr, points).eval(self.mesh, cells)
        xq = fem.Expression(self.x_l0, points).eval(self.mesh, cells).reshape(-1, 2)
        return values.reshape(len(xq), -1), xq

    def destroy(self) -> None:
        """Free the PETSc objects."""
        self.newton.destroy()
