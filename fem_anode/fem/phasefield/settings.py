"""Settings of the chemo-mechanical phase-field model (``fem-anode phasefield CONFIG.toml``).

Quantities of the model are normalised as in Supplementary Table 1 of the paper: lengths by
``l0`` (``material.length_scale``, 20 nm), energies and stresses by ``c_max R T``, time by the
characteristic time step (1 s), mobilities by ``l0^2 / (c_max R T dt)``. Geometry input
(radius, mesh size, mesh files) is in metres; results give lengths in metres as well.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from fem_anode.errors import UsageError
from fem_anode.io.checkpoint import CheckpointSettings
from fem_anode.settings import Section, Settings, section, setting

__all__ = [
    "PhaseFieldSettings",
    "GeometrySettings",
    "MeshSettings",
    "ModelSettings",
    "MaterialSettings",
    "CyclingSettings",
    "InitialSettings",
    "SolverSettings",
    "OutputSettings",
    "VacancySettings",
]


@dataclasses.dataclass
class GeometrySettings(Section):
    """The cross-section: a disk of given radius (meshed here) or any tagged 2D gmsh mesh."""

    radius: float = setting(20e-9, "nanowire radius of the built-in disk geometry", unit="m", positive=True)
    mesh: Path | None = setting(
        None,
        "tagged 2D gmsh mesh (.msh, metres) instead of the disk, e.g. an image-derived mesh; relative to the config "
        "file",
    )
    surface: list[str] = setting(
        ["surface"],
        "facet group(s) of the outer surface (Dirichlet c, traction-free), e.g. 'pore|si' for an image mesh",
    )
    phase: str = setting("si", "cell group of the Si cross-section (must exist in the mesh)")


@dataclasses.dataclass
class MeshSettings(Section):
    """Meshing of the built-in disk."""

    size: float = setting(1e-9, "target element size of the disk mesh", unit="m", positive=True)
    displacement_degree: int = setting(
        2,
        "Lagrange degree of the displacement (2 avoids the volumetric locking of P1 triangles under isochoric plastic "
        "flow; c and mu are P1)",
        choices=(1, 2),
    )


@dataclasses.dataclass
class ModelSettings(Section):
    """Which physics is switched on."""

    kinematics: str = setting(
        "generalized_plane_strain",
        "'generalized_plane_strain' (uniform axial stretch, zero net axial force) or 'plane_strain' (no axial strain)",
        choices=("generalized_plane_strain", "plane_strain"),
    )
    coupling: bool = setting(True, "mechanical driving force (stress) in the Li chemical potential")
    plasticity: bool = setting(True, "J2 (von Mises) perfect plasticity; false = elastic only")


@dataclasses.dataclass
class MaterialSettings(Section):
    """Material parameters, normalised as in Supplementary Table 1 (defaults: the paper's values)."""

    omega: float = setting(2.6, "regular-solution interaction parameter Omega / (c_max R T)", positive=True)
    kappa_li: float = setting(1e-4, "Li gradient-energy coefficient kappa_Li / (c_max R T l0^2)", positive=True)
    mobility_li: float = setting(10.0, "Li mobility M_Li c_max R T dt / l0^2", positive=True)
    beta: float = setting(
        0.5874, "chemical stretch at full lithiation: Fc = (1 + beta (c - c_min)/(c_max - c_min)) I", bounds=(0.0, 10.0)
    )
    c_min: float = setting(0.14, "normalised Li concentration of (de)lithiated Si", bounds=(1e-6, 1 - 1e-6))
    c_max: float = setting(
        0.86, "normalised Li concentration of fully lithiated Si (Li3.75Si)", bounds=(1e-6, 1 - 1e-6)
    )
    e_max: float = setting(175.0, "Young's modulus of unlithiated Si / (c_max R T)", positive=True)
    e_min: float = setting(
        43.75, "Young's modulus of lithiated Si / (c_max R T); linear in c in between", positive=True
    )
    poisson: float = setting(0.22, "Poisson ratio (Si and Li_xSi; not given by the paper)", bounds=(0.0, 0.49))
    yield_strength: float = setting(
        1.64, "von Mises yield strength (Cauchy stress) / (c_max R T), perfectly plastic", positive=True
    )
    length_scale: float = setting(20e-9, "l0, the length unit of the normalisation", unit="m", positive=True)

    def validate(self) -> None:
        if not self.c_min < self.c_max:
            raise UsageError(f"material.c_min ({self.c_min}) must be below material.c_max ({self.c_max})")
        if self.e_min > self.e_max:
            raise UsageError(f"material.e_min ({self.e_min}) must not exceed material.e_max ({self.e_max})")


@dataclasses.dataclass
class CyclingSettings(Section):
    """Lithiation/delithiation half-cycles and adaptive time stepping (normalised time)."""

    half_cycles: int = setting(2, "number of half-cycles, starting with a lithiation", positive=True)
    half_cycle_time: float = setting(50.0, "duration of each half-cycle (normalised time)", positive=True)
    surface_bc: str = setting(
        "dirichlet",
        "'dirichlet': c = c_max (lithiation) / c_min (delithiation) on the surface; 'no_flux': closed system",
        choices=("dirichlet", "no_flux"),
    )
    ramp_time: float = setting(
        0.01,
        "the surface concentration moves linearly to its new value over this time at the start of each half-cycle",
        nonnegative=True,
    )
    dt_initial: float = setting(0.01, "first time step of every half-cycle", positive=True)
    dt_max: float = setting(5.0, "largest time step", positive=True)
    dt_min: float = setting(1e-7, "smallest time step before the run stops with a solver error", positive=True)
    growth: float = setting(1.5, "step growth factor after an easy step", bounds=(1.0, 10.0))
    fast_growth: float = setting(
        3.0,
        "smooth controller: growth factor after a very easy step (at most half of easy_iterations effective Newton "
        "iterations), still at most dc_target x max_dc / dc; never below 'growth'",
        bounds=(1.0, 10.0),
    )
    cutback: float = setting(0.25, "step reduction factor after a failed step", bounds=(0.01, 0.9))
    easy_iterations: int = setting(
        4, "a step converged in at most this many Newton iterations lets dt grow", positive=True
    )
    max_retries: int = setting(10, "consecutive failed attempts of one step before the run stops", positive=True)
    max_dc: float = setting(
        0.2, "largest change of c at any node in one step; larger changes are rejected and retried", positive=True
    )
    controller: str = setting(
        "smooth",
        "time-step controller: 'smooth' (the next dt from the largest change of c of the step, aimed at dc_target x "
        "max_dc, and from the Newton iterations: grow after easy steps, hold after harder ones, halve after very hard "
        "ones; a step rejected for max_dc is retried with the dt that change predicts), 'threshold' (the previous "
        "controller: grow by 'growth' after an easy step, otherwise keep dt, cut back by 'cutback' after any "
        "rejection)",
        choices=("smooth", "threshold"),
    )
    dc_target: float = setting(
        0.75,
        "smooth controller: aim each step at this fraction of max_dc (below 1 leaves room for the change to grow "
        "faster than dt)",
        bounds=(0.05, 1.0),
    )

    failure_ceiling: float = setting(
        0.5,
        "smooth controller: after a failed Newton attempt of size dt, the next steps of the half-cycle stay below "
        "failure_ceiling x dt, a bound that grows by ceiling_growth with every accepted step and ends once a step "
        "changes c by at most 1 % of dc_target x max_dc (0: off, the controller before 2026-12-06)",
        bounds=(0.0, 0.99),
    )
    ceiling_growth: float = setting(
        1.3, "smooth controller: growth of the failure ceiling per accepted step", bounds=(1.01, 10.0)
    )

    def validate(self) -> None:
        if self.dt_min > self.dt_initial or self.dt_initial > self.dt_max:
            raise UsageError("cycling needs dt_min <= dt_initial <= dt_max")


@dataclasses.dataclass
class VacancySettings(Section):
    """Vacancies, voids and electrolyte percolation (second half of the model; docs/phasefield.md).

    The vacancy field c_v (c_min: Li_xSi, c_max: void) is a second Cahn-Hilliard field. The
    defaults are the paper's accelerated vacancy kinetics (Supplementary Table 1: a high vacancy
    mobility and a strong condensation drive, so that each simulated cycle stands for tens of
    real ones).
    """

    enabled: bool = setting(
        True,
        "solve the vacancy field, nucleate voids on delithiation and let electrolyte percolate into surface-connected "
        "voids",
    )
    kappa_v: float = setting(1e-5, "vacancy gradient-energy coefficient kappa_v / (c_max R T l0^2)", positive=True)
    mobility_v: float = setting(0.1, "vacancy mobility M_v c_max R T dt / l0^2", positive=True)
    omega_v: float = setting(
        2.6, "vacancy double-well parameter Omega_v / (c_max R T) in delithiated Si (condensation drive)", positive=True
    )
    nucleation_rate: float = setting(
        1.0,
        "R0: vacancies created per unit of Li removed at a nucleus centre, R(x) = R0 sum_k exp(-|x - x_k|^2 / 2 r^2) "
        "(capped at R0)",
        bounds=(0.0, 1.0),
    )
    nucleus_spacing: float = setting(
        8e-9,
        "mean distance between random nucleation sites (density 1 / spacing^2), drawn anew for every delithiation",
        unit="m",
        positive=True,
    )
    nucleus_radius: float = setting(1.5e-9, "Gaussian radius r of a nucleation site", unit="m", positive=True)
    threshold: float = setting(0.5, "void indicator: a node is void where c_v exceeds this", bounds=(0.0, 1.0))
    seed: int = setting(
        0,
        "seed of the nucleation sites (the field is defined on the global geometry: same result on any number of "
        "ranks)",
    )
    electrolyte_mobility: float = setting(
        0.0,
        "Li and vacancy mobility in the cells touching electrolyte-filled (SEI-lined) voids, relative to the bulk "
        "values (0: vanishing, as in the paper)",
        bounds=(0.0, 1.0),
    )
    sei_exchange_rate: float = setting(
        10.0,
        "k_S: Li flux per unit surface of electrolyte-filled voids, k_S (c_surface - c), normalised (l0 / "
        "characteristic time)",
        nonnegative=True,
    )
    real_cycles_per_cycle: float = setting(
        20.0,
        "real cycles one simulated cycle stands for (accelerated kinetics; reported as equivalent_real_cycles)",
        positive=True,
    )


@dataclasses.dataclass
class InitialSettings(Section):
    """Initial state: uniform concentration, optionally with a smooth seeded perturbation."""

    c: float | None = setting(
        None, "initial normalised concentration (default material.c_min)", bounds=(1e-6, 1 - 1e-6)
    )
    perturbation: float = setting(
        0.0, "amplitude of a smooth random perturbation of c (rank-count independent)", bounds=(0.0, 0.5)
    )
    seed: int = setting(0, "seed of the perturbation")


@dataclasses.dataclass
class SolverSettings(Section):
    """Newton (PETSc SNES) and the linear solver of its steps."""

    rtol: float = setting(
        1e-6,
        "SNES relative residual tolerance (of the first residual of the attempt, which the predictor already makes "
        "small; Newton's last iteration usually lands far below it: 1e-6 instead of 1e-9 saves 12-14 % of the Newton "
        "iterations with records equal to 1e-9 until the step sequences part, docs/phasefield.md)",
        positive=True,
    )
    atol: float = setting(1e-10, "SNES absolute residual tolerance", positive=True)
    max_it: int = setting(25, "Newton iterations per attempt", positive=True)
    stop_on_stagnation: bool = setting(
        True,
        "end a Newton attempt as failed (the step is retried smaller) once it has run 8 iterations and the last 4 did "
        "not halve the residual, or once its residual is below 1e-2 of its first and each of the last 2 iterations "
        "kept more than 0.9 of it (flat), instead of running on to max_it",
    )
    line_search: str = setting(
        "bt",
        "SNES line search: 'bt' (backtracking; default), 'l2' (secant minimisation of the residual norm; more robust "
        "for large plastic load increments, less for the Dirichlet jumps of cycling), 'basic' (full steps)",
        choices=("bt", "basic", "l2"),
    )
    linear_solver: str = setting(
        "auto",
        "'auto' (MUMPS if PETSc has it, else SuperLU_dist, else PETSc LU in serial), 'mumps', 'superlu_dist', 'petsc'",
        choices=("auto", "mumps", "superlu_dist", "petsc"),
    )
    reuse_factorisation: bool | None = setting(
        None,
        "keep the LU factorisation over Newton iterations and steps as preconditioner of the Krylov solve on the "
        "current Jacobian (still Newton), refactorising when the Krylov solve slows down; false: factorise at every "
        "Newton iteration; default (unset): on, on any number of ranks (with the smooth controller and "
        "refactorisation inside a stalled FGMRES solve, 2-rank runs took the same steps as 1 rank, records equal to "
        "1e-13; the first scheme's GMRES and threshold controller were not reproducible on several ranks)",
    )
    refactor_iterations: int = setting(
        12,
        "with reuse_factorisation: refactorise when a linear solve needs more Krylov iterations than this (during "
        "that solve with refactor_on_stall, else at the next Newton iteration)",
        positive=True,
    )
    refactor_on_stall: bool = setting(
        True,
        "with reuse_factorisation: when a linear solve stalls on the lagged factorisation, refactorise the current "
        "Jacobian inside that solve (FGMRES, which allows the preconditioner to change) instead of failing the Newton "
        "iteration; false: GMRES, refactorise at the next Newton iteration (the previous scheme)",
    )
    factorisation_precision: str = setting(
        "auto",
        "precision of the lagged LU factorisation that preconditions the Krylov solves (with reuse_factorisation; "
        "Newton and the Krylov solves stay in double precision): 'single' (MUMPS in float32: half the bytes per "
        "triangular solve, 1.8x faster solves and 1.5x faster factorisations at 1 nm, the same Krylov iterations; "
        "compiled on first use; on several ranks a float32 LU per rank and a dense Schur complement of the ranks' "
        "interface, which rounds the same way in every run where MUMPS's parallel LU does not; double precision for "
        "the run if the interface exceeds 3000 unknowns), 'double', 'auto' (single where it can be compiled and "
        "linear_solver is auto or mumps)",
        choices=("auto", "single", "double"),
    )
    linear_rtol: float | None = setting(
        None,
        "with reuse_factorisation: relative tolerance of the Krylov solve of each Newton step; default (unset): "
        "Eisenstat-Walker (loose while the Newton residual is large, tighter as it converges; the Newton tolerances "
        "still decide convergence); 1e-10: the previous, nearly exact solves",
        bounds=(1e-14, 0.5),
    )
    predictor: str = setting(
        "linear",
        "initial guess of each Newton solve: 'linear' (extrapolated from the last two accepted steps of the "
        "half-cycle, except across the end of the surface ramp; concentrations move at most halfway to 0 or 1), "
        "'none' (the last accepted state)",
        choices=("linear", "none"),
    )
    time_scheme: str = setting(
        "implicit",
        "time discretisation of the homogeneous chemical potentials: 'implicit' (backward Euler throughout), "
        "'convex_split' (Eyre's convex splitting: the concave regular-solution terms Omega (1 - 2 c) and "
        "omega_v (1 - 2 c_v) from the last accepted state, the rest implicit: no stalled Newton at the porous "
        "fronts and 1.5x faster over 10 cycles at 1 nm, but a first-order time error of the void fraction several "
        "times that of backward Euler (+14 % against -6 % after the first cycle at 1 nm); see docs/phasefield.md)",
        choices=("implicit", "convex_split"),
    )
    jacobian_assembly: str = setting(
        "bordered",
        "how the residual and the Jacobian are assembled: 'bordered' (as 'cached', with the matrix's pattern "
        "leaving out the field blocks the Jacobian's kernel never fills, and under generalised plane strain the "
        "residual with the axial-force equation and the Jacobian with its border vectors each in one pass over the "
        "cells, from two forms on W x DG0: the constitutive law evaluated once instead of four times per Jacobian "
        "and twice per residual, equal to the separate forms up to round-off), 'cached' (each element entry's "
        "place in the "
        "matrix found once, then only the form's kernels and additions: bit for bit dolfinx's matrix in less than "
        "half the time; dolfinx's assembler where the form is not served), 'dolfinx' (dolfinx's assembler at every "
        "Newton iteration)",
        choices=("bordered", "cached", "dolfinx"),
    )
    quadrature_degree: int | None = setting(
        None,
        "quadrature degree of all forms and of the plastic state (default 2 on triangles, 2 x displacement degree on "
        "quadrilaterals: full integration, no hourglass modes)",
        bounds=(1, 8),
    )
    petsc_options: dict[str, str] = setting(
        {}, "extra PETSc options for the SNES (prefix-free), merged over the defaults"
    )

    def validate(self) -> None:
        if self.factorisation_precision == "single" and self.reuse_factorisation is False:
            raise UsageError(
                "solver.factorisation_precision = 'single' needs solver.reuse_factorisation (it is a preconditioner)"
            )
        if self.factorisation_precision == "single" and self.linear_solver not in ("auto", "mumps"):
            raise UsageError(
                f"solver.factorisation_precision = 'single' is MUMPS's; solver.linear_solver is {self.linear_solver!r}"
            )


@dataclasses.dataclass
class OutputSettings(Section):
    """What the run writes besides results.json."""

    fields: bool = setting(
        True, "VTX fields (c, mu, u; von Mises, plastic strain) on the deformed mesh at every half-cycle end"
    )
    figures: bool = setting(True, "PNG snapshots of c and von Mises on the deformed shape at every half-cycle end")
    snapshots_per_half_cycle: int = setting(
        1, "field outputs (VTX and PNG) per half-cycle, evenly spaced, the last at its end", positive=True
    )
    times: list[float] = setting(
        [0.002, 0.01],
        "extra output times after the start of every half-cycle (normalised), e.g. during the front's passage",
        positive=True,
    )


@dataclasses.dataclass
class PhaseFieldSettings(Settings):
    """All settings of a phase-field run; ``PhaseFieldSettings.from_toml(path)`` reads a config."""

    geometry: GeometrySettings = section(GeometrySettings)
    mesh: MeshSettings = section(MeshSettings)
    model: ModelSettings = section(ModelSettings)
    material: MaterialSettings = section(MaterialSettings)
    cycling: CyclingSettings = section(CyclingSettings)
    initial: InitialSettings = section(InitialSettings)
    vacancy: VacancySettings = section(VacancySettings)
    solver: SolverSettings = section(SolverSettings)
    output: OutputSettings = section(OutputSettings)
    checkpoint: CheckpointSettings = section(CheckpointSettings)

    def validate(self) -> None:
        c0 = self.initial.c
        if (
            c0 is not None
            and self.initial.perturbation > 0
            and not (c0 - self.initial.perturbation > 0.0 and c0 + self.initial.perturbation < 1.0)
        ):
            raise UsageError("initial.c +- initial.perturbation must stay inside (0, 1)")
