"""Settings of the Li-diffusion model (importable without dolfinx; see :mod:`.diffusion`).

Every key is documented with its default and SI unit; ``fem-anode diffusion --defaults`` lists
them. Defaults are the values of Vorauer et al. (2020).

One TOML file (``fem-anode diffusion CONFIG.toml``) holds two kinds of settings:

* **model settings** -- what a solve needs: the phase roles (``geometry.transport_phase``,
  ``pore_phase``, ``si_phase``), ``[mesh]``, ``[physics]``, ``[time]``, ``[solver]`` and
  ``[[regions]]`` (:data:`MODEL_SECTIONS`);
* **run settings** -- where the input comes from and what a run writes: ``geometry.image`` /
  ``geometry.mesh`` with the overrides ``pixel_size`` and ``phases``, ``[output]`` and
  ``[checkpoint]`` (:data:`RUN_SECTIONS`).

A solve from Python (:func:`fem_anode.solve_diffusion`) takes the image or mesh as an argument and
needs no run settings: ``DiffusionSettings(time={"t_end": 1.0})`` is complete. A run from files
(the CLI, :func:`~fem_anode.fem.diffusion.run.run_diffusion`) needs ``geometry.image`` or
``geometry.mesh`` (:meth:`DiffusionSettings.check_source`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from fem_anode.errors import UsageError
from fem_anode.io.checkpoint import CheckpointSettings
from fem_anode.settings import Section, Settings, section, setting

__all__ = [
    "MODEL_SECTIONS",
    "RUN_SECTIONS",
    "CheckpointSettings",
    "DiffusionSettings",
    "GeometrySettings",
    "MeshSettings",
    "OutputSettings",
    "PhysicsSettings",
    "Region",
    "SolverSettings",
    "TimeSettings",
    "uses_voxel_p1",
]


@dataclasses.dataclass
class GeometrySettings(Section):
    """Where the domain comes from (a segmented image, meshed here, or a tagged gmsh mesh; run
    settings) and which phase does what (model settings)."""

    image: Path | None = setting(
        None, "segmented image (.npy/.npz/.tif/.png/folder) of a run from files; relative to the config file"
    )
    mesh: Path | None = setting(
        None, "tagged gmsh mesh instead of an image, for a run from files; relative to the config file"
    )
    pixel_size: float | None = setting(None, "pixel/voxel edge, overrides the image's", unit="m", positive=True)
    phases: dict[str, int] | None = setting(None, "phase map name -> label, overrides the image's")
    transport_phase: str = setting("sei", "phase in which Li diffuses (the SEI/C/B domain)")
    pore_phase: str = setting("pore", "phase acting as Li source through the mass-transfer boundary")
    si_phase: str = setting("si", "Si phase (no flux, or first-order uptake k_si)")

    def validate(self) -> None:
        if self.image is not None and self.mesh is not None:
            raise UsageError("geometry needs exactly one of 'image' or 'mesh', got both")


@dataclasses.dataclass
class MeshSettings(Section):
    """Meshing of an image geometry and the finite element."""

    method: str = setting(
        "voxel",
        "image meshing: 'voxel' (one quad/hex per pixel/voxel, exact pixel geometry) or 'smooth' "
        "(2D: sub-pixel smooth interfaces, refined near interfaces and in gaps; order 2 curves them)",
        choices=("voxel", "smooth"),
    )
    size: float | None = setting(
        None, "global element size H of smooth meshes (default 4 pixels)", unit="m", positive=True
    )
    order: int = setting(
        1, "polynomial degree of the Lagrange elements (P1 or P2); smooth P2 meshes are curved", choices=(1, 2)
    )
    discretisation: str = setting(
        "fe",
        "'fe' (Lagrange finite elements on the mesh) or 'fv' (voxel images only: cell-centred finite volumes, one "
        "unknown per voxel of the transporting phase, face-connected 7-point stencil, no mesh; the field's "
        "convention, about 4x faster and leaner than P1 on 3D volumes, see docs/diffusion.md)",
        choices=("fe", "fv"),
    )
    voxel_p1: str = setting(
        "image",
        "P1 on a 3D voxel mesh: 'image' builds the operators straight from the voxels, without a mesh (the same "
        "matrices to round-off, about 1/8 of the memory and no mesh set-up; fields written as VTK image data c.pvd, "
        "no mesh.xdmf) or 'mesh' (a dolfinx mesh of the voxels: mesh.xdmf, fields as VTX c.bp)",
        choices=("image", "mesh"),
    )
    mass_lumping: bool = setting(
        False,
        "P1 on the voxels of a 3D image only: diagonal (row-sum) mass and Robin face-mass matrices instead of the "
        "consistent ones; on cubic voxels with time.scheme = 'euler' c then stays in [0, c_bulk] at every step, which "
        "the consistent mass does not in steps shorter than an element's diffusion time (docs/diffusion.md, "
        "'Over- and undershoots')",
    )

    def validate(self) -> None:
        if self.size is not None and self.method != "smooth":
            raise UsageError("mesh.size applies to method = 'smooth'; voxel meshes have one cell per pixel")
        if self.mass_lumping and (self.discretisation != "fe" or self.order != 1 or self.voxel_p1 != "image"):
            raise UsageError(
                "mesh.mass_lumping is implemented for P1 on the voxels of a 3D image (discretisation = 'fe', "
                "order = 1, voxel_p1 = 'image'); the finite volumes' mass matrix is diagonal already"
            )
        if self.discretisation == "fv" and (self.method != "voxel" or self.order != 1):
            raise UsageError(
                "mesh.discretisation = 'fv' needs mesh.method = 'voxel' and mesh.order = 1 (one unknown per voxel)"
            )


@dataclasses.dataclass
class PhysicsSettings(Section):
    """Transport parameters (defaults: the paper's values)."""

    D: float = setting(3.01e-10, "Li diffusivity in the SEI/C/B compound", unit="m^2/s", positive=True)
    k_f: float = setting(1e-3, "mass-transfer coefficient at pore interfaces", unit="m/s", nonnegative=True)
    c_bulk: float = setting(1000.0, "bulk Li concentration in the pores (1 mol/L)", unit="mol/m^3", positive=True)
    eps: float = setting(
        0.63985, "transporting-phase fraction (area fraction of SEI/C/B in the ROI)", bounds=(1e-6, 1.0)
    )
    bruggeman: float = setting(1.5, "Bruggeman exponent b in D_eff = eps^b D", nonnegative=True)
    k_si: float = setting(
        0.0, "first-order Li uptake rate at Si interfaces (0 = no flux)", unit="m/s", nonnegative=True
    )

    @property
    def D_eff(self) -> float:
        """Effective diffusivity eps^b D (m^2/s)."""
        return self.eps**self.bruggeman * self.D


#: the output times of the paper's Fig. 8 (s), the default within ``t_end``
PAPER_OUTPUT_TIMES = (2.0, 10.0, 100.0)


@dataclasses.dataclass
class TimeSettings(Section):
    """Implicit time integration with geometrically growing steps."""

    t_end: float = setting(100.0, "final time", unit="s", positive=True)
    output_times: list[float] | None = setting(
        None,
        "times at which fields are written (hit exactly); default: the paper's 2, 10 and 100 s that lie within "
        "t_end, and t_end",
        unit="s",
        positive=True,
    )
    scheme: str = setting("bdf2", "'bdf2' (second order, backward-Euler start) or 'euler'", choices=("bdf2", "euler"))
    dt_initial: float = setting(1e-6, "first time step", unit="s", positive=True)
    growth: float = setting(2.0, "step growth factor per level", bounds=(1.0, 10.0))
    steps_per_level: int = setting(8, "steps per step-size level", positive=True)
    dt_max: float | None = setting(None, "largest time step (default t_end/20)", unit="s", positive=True)

    def validate(self) -> None:
        late = [t for t in self.output_times or () if t > self.t_end]
        if late:
            raise UsageError(f"output_times {late} lie beyond t_end = {self.t_end} s")

    def outputs(self) -> list[float]:
        """The output times (s), sorted: ``output_times`` as given, else the paper's 2, 10 and 100 s
        (:data:`PAPER_OUTPUT_TIMES`) up to ``t_end``, and ``t_end``."""
        if self.output_times is not None:
            return sorted(self.output_times)
        return sorted({t for t in PAPER_OUTPUT_TIMES if t <= self.t_end} | {self.t_end})


#: ``solver.type = "auto"`` factorises in 2D and below this many dofs in 3D, else iterates: 3D sparse
#: Cholesky fills in (its cost grows like n^2) and a run with geometric steps refactorises every few
#: steps (the measured costs: docs/benchmarks.md, "Solver choices made from these measurements").
AUTO_DIRECT_MAX_DOFS_3D = 50_000


def resolve_solver_type(kind: str, ndim: int, dofs: float) -> str:
    """``"direct"`` or ``"iterative"`` for ``solver.type = kind`` on a ``ndim``-D problem of ``dofs`` unknowns."""
    if kind == "auto":
        return "direct" if ndim == 2 or dofs < AUTO_DIRECT_MAX_DOFS_3D else "iterative"
    return kind


@dataclasses.dataclass
class SolverSettings(Section):
    """Linear solver (PETSc)."""

    type: str = setting(
        "auto",
        "'direct' (sparse Cholesky: CHOLMOD on one rank, MUMPS on several; the matrix is SPD), 'iterative' (CG, see "
        f"preconditioner) or 'auto' (direct in 2D or below {AUTO_DIRECT_MAX_DOFS_3D // 1000}k dofs in 3D)",
        choices=("auto", "direct", "iterative"),
    )
    preconditioner: str = setting(
        "auto",
        "CG preconditioner: 'ssor' (symmetric SOR; cheap, good while the mass term dominates), 'mg' (one "
        "smoothed-aggregation multigrid hierarchy for every step size, set up once per run), 'gamg' (PETSc GAMG set "
        "up anew for every step size), 'hypre' (BoomerAMG, likewise) or 'auto' (SSOR until a solve needs more than "
        "switch_iterations, then 'mg' for that and larger steps); petsc_options pc_type overrides it",
        choices=("auto", "ssor", "mg", "gamg", "hypre"),
    )
    switch_iterations: int | None = setting(
        None,
        "preconditioner 'auto': CG + SSOR iterations above which the step size moves to multigrid (default 40 on one "
        "rank, where an 'mg' iteration costs 3-4 of Eisenstat SSOR, 20 on several, where SOR's local sweeps cost "
        "more)",
        positive=True,
    )
    rtol: float = setting(
        1e-10,
        "relative tolerance of CG (residual relative to the right-hand side); the initial guess is extrapolated from "
        "the last two steps",
        positive=True,
    )
    petsc_options: dict[str, str] = setting({}, "extra PETSc options merged over the defaults")
    sweep_kernel: str = setting(
        "auto",
        "SSOR sweeps of finite-volume and P1/P2 runs: 'compiled' (the package's kernels for the voxel stencil, for P1 "
        "on a voxel grid by row types, else for the assembled CSR matrix, with CG fused into them; built with the "
        "system C compiler on first use), 'csr' (compiled, the assembled CSR matrix even on a voxel grid), 'petsc' "
        "(PETSc's MatSOR / PCEISENSTAT and KSPCG) or 'auto' (compiled when a C compiler works, else PETSc's, with a "
        "warning)",
        choices=("auto", "compiled", "csr", "petsc"),
    )
    cache_size: int = setting(
        3,
        "direct solver: at most this many factorisations kept (one per distinct step size; LRU), fewer if "
        "cache_memory is exceeded",
        positive=True,
    )
    cache_memory: float = setting(
        2e9,
        "direct solver: memory budget per rank for the kept factorisations (the first one's size decides how many "
        "fit; at least one is kept)",
        unit="B",
        positive=True,
    )
    max_retries: int = setting(
        4,
        "a failed solve (PETSc divergence or non-finite c) is retried with the step halved up to this many times",
        nonnegative=True,
    )

    @property
    def petsc_solver_options(self) -> bool:
        """Whether ``petsc_options`` set KSP or PC options (then PETSc's solver runs them, never the
        package's fused SSOR-CG)."""
        return any(str(k).lstrip("-").startswith(("ksp_", "pc_")) for k in self.petsc_options)


@dataclasses.dataclass
class OutputSettings(Section):
    """What the run writes besides results.json."""

    fields: bool = setting(
        True,
        "write c at the output times as VTX on a mesh (ParaView: open c.bp), or as VTK image data without one "
        "(P1 on the voxels of a 3D image, finite volumes: open c.pvd)",
    )
    figures: bool = setting(True, "PNG figures of c over the image and c(t) per region")
    mesh: bool = setting(
        True,
        "write the voxel mesh of an image with its cell and facet tags as mesh.xdmf (in parallel; runs that build no "
        "mesh write none: mesh.voxel_p1 = 'mesh' builds one); smooth meshes are always written as mesh.msh",
    )


@dataclasses.dataclass
class Region(Section):
    """An axis-aligned box whose mean concentration is reported over time."""

    name: str = setting("I", "region name")
    box: list[float] = setting(
        [0.0, 0.0, 1e-6, 1e-6], "[x0, y0, x1, y1] (2D) or [x0, y0, z0, x1, y1, z1] (3D)", unit="m"
    )

    def validate(self) -> None:
        n = len(self.box)
        if n not in (4, 6) or any(self.box[i] >= self.box[i + n // 2] for i in range(n // 2)):
            raise UsageError(
                f"region {self.name!r}: box must be [x0, y0, x1, y1] or [x0, y0, z0, x1, y1, z1] with x0 < x1 ..."
            )


#: Sections (and ``geometry`` keys) a solve depends on.
MODEL_SECTIONS: tuple[str, ...] = (
    "geometry.transport_phase",
    "geometry.pore_phase",
    "geometry.si_phase",
    "mesh",
    "physics",
    "time",
    "solver",
    "regions",
)
#: Sections (and ``geometry`` keys) of a run from files: its input and what it writes.
RUN_SECTIONS: tuple[str, ...] = (
    "geometry.image",
    "geometry.mesh",
    "geometry.pixel_size",
    "geometry.phases",
    "output",
    "checkpoint",
)


@dataclasses.dataclass
class DiffusionSettings(Settings):
    """All settings of the diffusion model; ``DiffusionSettings.from_toml(path)`` reads a config.

    Sections may be given as objects or dicts and are validated on construction::

        DiffusionSettings(physics={"D": 1e-10}, time=TimeSettings(t_end=1.0, output_times=[1.0]))

    See the module docstring for the model and the run settings.
    """

    geometry: GeometrySettings = section(GeometrySettings)
    mesh: MeshSettings = section(MeshSettings)
    physics: PhysicsSettings = section(PhysicsSettings)
    time: TimeSettings = section(TimeSettings)
    solver: SolverSettings = section(SolverSettings)
    output: OutputSettings = section(OutputSettings)
    checkpoint: CheckpointSettings = section(CheckpointSettings)
    regions: list[Region] = setting([], "boxes whose mean c(t) and t90 are reported")

    def validate(self) -> None:
        if self.mesh.discretisation == "fv" and self.geometry.mesh is not None:
            raise UsageError(
                "mesh.discretisation = 'fv' solves on the voxels of geometry.image; a geometry.mesh needs 'fe'"
            )
        names = [r.name for r in self.regions]
        if len(set(names)) != len(names):
            raise UsageError(f"region names must be unique, got {names}")

    def check_source(self) -> None:
        """A run from files: exactly one of ``geometry.image`` and ``geometry.mesh`` (UsageError)."""
        if (self.geometry.image is None) == (self.geometry.mesh is None):
            raise UsageError("geometry needs exactly one of 'image' or 'mesh'")


def uses_voxel_p1(settings: DiffusionSettings, ndim: int) -> bool:
    """Whether a run of ``settings`` on an ``ndim``-D image solves P1 on the voxels without a mesh:
    ``mesh.voxel_p1 = "image"`` (the default) with finite elements of order 1 on a voxel mesh of a
    3D image, and the compiled or PETSc sweeps (``solver.sweep_kernel = "csr"`` needs the mesh's
    CSR matrix)."""
    mesh = settings.mesh
    return (
        ndim == 3
        and mesh.discretisation == "fe"
        and mesh.method == "voxel"
        and mesh.order == 1
        and mesh.voxel_p1 == "image"
        and settings.solver.sweep_kernel != "csr"
    )
