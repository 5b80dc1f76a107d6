r"""The diffusion model by Lagrange finite elements (P1/P2) on a tagged dolfinx mesh.

The mesh stays in metres; the forms are written in a micrometre length unit and in
``c / c_bulk``, so matrix entries are O(1) whatever the physical scale. The mass matrix ``M``
and the operator ``K + R`` (diffusion + Robin) are assembled once into one sparsity pattern;
the operator ``A = K + R + a0 eps M`` shares it (a copy and an AXPY per new a0). Solvers and
the time loop: :class:`~fem_anode.fem.diffusion.transient.TransientDiffusion`.
"""

from __future__ import annotations

from typing import Any

import dolfinx
import numpy as np
import ufl
from dolfinx import fem
from dolfinx.fem import petsc as fem_petsc
from mpi4py import MPI
from petsc4py import PETSc

from fem_anode.errors import InputError, UsageError
from fem_anode.fem.diffusion.settings import DiffusionSettings, PhysicsSettings, Region
from fem_anode.fem.diffusion.transient import LENGTH_UNIT, Field, FusedEisenstatSolver, TransientDiffusion
from fem_anode.fem.mesh_io import TaggedMesh
from fem_anode.meshing.tags import interface_name

__all__ = ["DiffusionProblem"]


class DiffusionProblem(TransientDiffusion):
    """The diffusion model on a tagged mesh of the transporting phase.

    Args:
        tagged: mesh with the facet groups ``"<pore>|<transport>"`` and (optionally)
            ``"<si>|<transport>"`` (names as written by :mod:`fem_anode.meshing`).
        settings: the run's settings.
    """

    # Fields are dolfinx Functions; K + R and M exist from the start.
    c: fem.Function
    _c_old: fem.Function
    _c_older: fem.Function
    _KR: PETSc.Mat
    _M: PETSc.Mat

    def __init__(self, tagged: TaggedMesh, settings: DiffusionSettings) -> None:
        settings.check()  # the Python API as strict as the CLI (UsageError naming the setting)
        if settings.mesh.mass_lumping:
            raise UsageError(
                "mesh.mass_lumping is implemented for P1 on the voxels of a 3D image; this geometry is a mesh "
                f"({tagged.mesh.topology.dim}D: a 2D image, a given mesh or voxel_p1 = 'mesh')"
            )
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
        self.c = fem.Function(self.V, name="c")  # c / c_bulk
        self._c_old = fem.Function(self.V)
        self._c_older = fem.Function(self.V)
        self._assemble_operators(physics)
        #: The iterative solvers' one operator matrix K + R + a0 eps M and its a0 (see _operator).
        self._A: PETSc.Mat | None = None
        #: SSOR-CG in fused passes of the compiled CSR sweeps (see _ksp): "unset" until asked, None if unavailable.
        self._fused: FusedEisenstatSolver | str | None = "unset"
        self._init_solver_state()
        self.regions = self._region_weights(settings.regions)

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

    def _quadrature(self) -> dict[str, Any]:
        """The forms' quadrature (collective): degree ``2 p`` on meshes of parallelepipeds or
        parallelograms (every voxel mesh), else UFL's estimate.

        UFL assumes a multilinear cell map on hexahedra and quadrilaterals, which raises the
        estimated degree of P1 forms to 5 (27 points per hexahedron). On an affine cell every
        integrand here (``u v``, ``grad u . grad v``, ``chi v`` with ``chi`` cellwise constant, and
        ``u v`` on faces) is a polynomial of degree at most ``2 p`` in each coordinate, which the
        tensor Gauss rule of degree ``2 p`` (``p + 1`` points per direction) integrates exactly:
        the same matrices to round-off, assembled 2.3 times as fast (measured on 64^3 cubes).
        """
        mesh = self.mesh
        cell = mesh.topology.cell_type
        if cell not in (dolfinx.mesh.CellType.hexahedron, dolfinx.mesh.CellType.quadrilateral):
            return {}
        affine = mesh.geometry.cmap.degree == 1
        x, dofmap = mesh.geometry.x, mesh.geometry.dofmap
        for start in range(0, dofmap.shape[0] if affine else 0, 16384):  # chunks: bounded memory
            v = x[dofmap[start : start + 16384]]
            # the bilinear (and trilinear) terms of the cell map, vertices in tensor-product order
            defects = [v[:, 3] - v[:, 2] - v[:, 1] + v[:, 0]]
            if cell == dolfinx.mesh.CellType.hexahedron:
                defects += [v[:, 5] - v[:, 4] - v[:, 1] + v[:, 0], v[:, 6] - v[:, 4] - v[:, 2] + v[:, 0]]
                defects += [v[:, 7] - v[:, 6] - v[:, 5] + v[:, 4] - defects[0]]
            size = np.abs(v[:, 1:] - v[:, :1]).max(initial=0.0)
            if max(float(np.abs(d).max(initial=0.0)) for d in defects) > 1e-10 * size:
                affine = False
                break
        affine = bool(self.comm.allreduce(affine, op=MPI.LAND))
        return {"quadrature_degree": 2 * self.settings.mesh.order} if affine else {}

    def _assemble_operators(self, physics: PhysicsSettings) -> None:
        mesh, V = self.mesh, self.V
        u, v = ufl.TrialFunction(V), ufl.TestFunction(V)
        s_dx, s_grad, s_ds = self._scaled_measures()
        quadrature = self._quadrature()
        dx = ufl.Measure("dx", domain=mesh, metadata=quadrature)
        self._measure_dx = dx  # (the region weights use the same quadrature)
        ds = ufl.Measure("ds", domain=mesh, subdomain_data=self.tagged.facet_tags, metadata=quadrature)
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
        self._M = self._assemble_matrix(s_dx * u * v * dx)
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

        kr_form = constant(rate_D) * s_grad * ufl.inner(ufl.grad(u), ufl.grad(v)) * dx + constant(rate_f) * robin_pore
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
        """``y = M x`` (by the grid stencil's table of ``M`` once the fused SSOR-CG has one: about
        twice as fast as ``MatMult`` on the 27-point matrix; equal to round-off, tested)."""
        if isinstance(self._fused, FusedEisenstatSolver) and self._fused.has_mass_mult:
            self._fused.mass_mult(x, y)
            return
        self._M.mult(x, y)

    def _multigrid_operands(self) -> tuple[PETSc.Mat, PETSc.Mat]:
        """``(K + R, M)`` as matrices of one sparsity pattern (for the shifted multigrid)."""
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
        form = fem.form(self._scaled_measures()[0] * chi * v * self._measure_dx)
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

    # -- operator and solver memory ------------------------------------------------------
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

    def _ksp(self, a0: float) -> Any:
        """As :meth:`TransientDiffusion._ksp`; SSOR is :class:`FusedEisenstatSolver` (the compiled
        CSR sweeps per ``solver.sweep_kernel``, CG fused into them: PETSc's CG with Eisenstat's SSOR
        on one rank, with block-Jacobi SSOR as PCSOR's local sweeps on several) unless
        ``solver.petsc_options`` set KSP or PC options (PETSc then runs them)."""
        if self._preconditioner(a0) != "ssor" or self.settings.solver.petsc_solver_options:
            return super()._ksp(a0)
        key = float(f"{a0:.12e}")
        if self._fused == "unset":
            library = self._sweep_library()
            self._fused = None
            if library is not None:
                solver = self.settings.solver
                grid = self._voxel_grid()
                self._fused = FusedEisenstatSolver(
                    self._KR,
                    self._M,
                    self.ssor_omega if grid is None else self.grid_ssor_omega,
                    solver.rtol,
                    500,
                    library,
                    work=self._work,
                    grid=grid,
                )
        if not isinstance(self._fused, FusedEisenstatSolver):
            return super()._ksp(a0)
        self._fused.prepare(key * self.eps)  # A = K + R + a0 eps M, no assembled copy
        return self._fused

    def _voxel_grid(self) -> np.ndarray | None:
        """Integer grid indices ``(n, 3)`` of this rank's dofs when the space is P1 on a mesh of equal
        axis-aligned hexahedra (quadrilaterals: third index 0), for the grid-stencil sweeps
        (:class:`~fem_anode.fem.grid_stencil.GridStencilKernel`); ``None`` otherwise or with
        ``solver.sweep_kernel = "csr"`` (collective). The spacing is the first cell's extent on
        every rank; that every coupling joins grid neighbours is checked by the kernel."""
        from fem_anode.fem.grid_stencil import grid_coordinates

        mesh = self.mesh
        if self.settings.mesh.order != 1 or self.settings.solver.sweep_kernel == "csr":
            return None
        if mesh.topology.cell_name() not in ("hexahedron", "quadrilateral"):
            return None
        x = mesh.geometry.x
        dofmap = mesh.geometry.dofmap
        extent = np.ptp(x[dofmap[0]], axis=0) if len(dofmap) else np.full(3, np.inf)
        extents = self.comm.allgather(extent)
        finite = [e for e in extents if np.all(np.isfinite(e))]
        spacing = finite[0] if finite else None
        low = x.min(axis=0) if len(x) else np.full(3, np.inf)
        origin = np.array([self.comm.allreduce(float(v), op=MPI.MIN) for v in low])
        grid = None
        if spacing is not None and all(np.allclose(e, spacing, rtol=1e-9, atol=0.0) for e in finite):
            spacing = np.where(spacing > 0, spacing, 1.0)
            n_owned = self.V.dofmap.index_map.size_local
            grid = grid_coordinates(self.V.tabulate_dof_coordinates()[:n_owned], origin, spacing)
        if not self.comm.allreduce(grid is not None, op=MPI.LAND):
            return None
        return grid

    def _switch_iterations(self) -> int:
        """``solver.switch_iterations``, or its default: 40 with the fused SSOR-CG on any number of
        ranks (an iteration is one pass over the matrix, a multigrid iteration 3-4), else as
        :meth:`TransientDiffusion._switch_iterations`."""
        value = self.settings.solver.switch_iterations
        if value is None and isinstance(self._fused, FusedEisenstatSolver):
            return 40
        return super()._switch_iterations()

    def destroy(self) -> None:
        """Free PETSc objects (the fused solver before the operator whose arrays it reads)."""
        if isinstance(self._fused, FusedEisenstatSolver):
            self._fused.free()
        self._fused = "unset"
        super().destroy()

    def solver_memory(self) -> dict[str, float]:
        """Bytes held by the solver's matrices and set-ups, summed over ranks, and per dof.

        ``matrices``: ``K + R``, ``M`` and the operator (values and the shared pattern; the fused
        SSOR-CG assembles no operator); ``sweeps``: the fused SSOR-CG's split operator and vectors;
        ``multigrid``: the shifted hierarchy's coarse operators and interpolations;
        ``factorisations``: the direct pool (estimated from the first factor's size).
        """
        ndofs = self.ndofs
        mats = [self._KR, self._M] + ([self._A] if self._A is not None else [])
        values = sum(m.getInfo()["nz_used"] for m in mats) * 8.0
        pattern = self._M.getInfo()["nz_used"] * 4.0 + 4.0 * ndofs  # one pattern, shared
        fused = self._fused.nbytes if isinstance(self._fused, FusedEisenstatSolver) else 0
        out = {
            "matrices": values + pattern,
            "sweeps": float(self.comm.allreduce(fused)),  # the fused SSOR-CG's split operator and vectors
            "multigrid": self._mg.nbytes() if self._mg is not None else 0.0,
            "factorisations": len(self._direct) * (self._factor_bytes or 0.0),
        }
        out["total"] = sum(out.values())
        out["per_dof"] = out["total"] / ndofs
        return out

    # -- diagnostics ----------------------------------------------------------------------
    def boundary_inflow(self, c: Field | None = None) -> float:
        """Net Li inflow rate through pore and Si interfaces, scaled units (um^d / s)."""
        vec = (c or self.c).x.petsc_vec
        inflow = self.rate_f * (self.pore_measure - self._w_pore.dot(vec))
        if self._w_si is not None and self.rate_si > 0:
            inflow -= self.rate_si * self._w_si.dot(vec)
        return inflow

    def concentration(self) -> fem.Function:
        """c in mol/m^3 as a new Function (for output)."""
        out = fem.Function(self.V, name="c")
        out.x.array[:] = self.settings.physics.c_bulk * self.c.x.array
        return out
