r"""The P1 diffusion model on a 3D voxel image without a mesh (``[mesh] voxel_p1 = "image"``).

The same discretisation as :class:`~fem_anode.fem.diffusion.finite_element.DiffusionProblem` with
P1 on the face-connected voxel mesh of the transporting phase (trilinear elements on the voxels,
Robin faces to the pore and Si voxels, the exact Gauss quadrature): the matrices are those
dolfinx assembles to round-off, built straight from the voxels
(:class:`~fem_anode.fem.voxel_p1.VoxelP1Operator`), and the solver is the fused SSOR-CG on the
grid stencil (:class:`~fem_anode.fem.grid_stencil.GridStencilKernel`). No mesh, no assembled
matrix unless a solver other than SSOR-CG needs one: about a tenth of the memory of the mesh
path and no set-up beyond a second (docs/diffusion.md).

Distribution: every rank owns the nodes of a slab of z layers (plus the last node plane on the
last rank), reads only its layers and two halo layers, and numbers its dofs in grid order after
the dofs of the ranks before it, so the numbering and every result are the same on any number of
ranks. Fields are :class:`~fem_anode.fem.diffusion.finite_volume.VectorField` (checkpoints,
output: point data on the image's nodes, :class:`~fem_anode.fem.diffusion.finite_volume.VoxelFieldWriter`).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from mpi4py import MPI
from petsc4py import PETSc

from fem_anode.errors import InputError, UsageError
from fem_anode.fem.diffusion.finite_volume import VectorField
from fem_anode.fem.diffusion.particles import reduce_particle_statistics
from fem_anode.fem.diffusion.settings import DiffusionSettings
from fem_anode.fem.diffusion.transient import LENGTH_UNIT, FusedEisenstatSolver, TransientDiffusion, checked_phases
from fem_anode.fem.voxel_p1 import PORE, SI, TRANSPORT, VoxelP1Operator, slab_classes
from fem_anode.imaging.slabs import Slab, balanced_slab
from fem_anode.meshing.tags import interface_name
from fem_anode.meshing.voxel import corner_offsets
from fem_anode.resources import release_freed_memory

__all__ = ["BYTES_PER_DOF", "VoxelP1Problem", "estimate_voxel_p1_memory"]

logger = logging.getLogger(__name__)

#: Peak memory per dof of a run with the default solver (the fused SSOR-CG on the grid stencil), the
#: libraries aside: 9 vectors (72 B), the weights (16 B), the stencil's rows, grid map and diagonal
#: (about 30 B) and the operator's numbering; on several ranks also the face plane's CSR rows and
#: the couplings across it (the slab-face order renumbers nothing). Measured on the 128^3 and 256^3
#: electrode: 140-160 B per dof over the libraries on one rank and on two (docs/benchmarks.md),
#: rounded up.
BYTES_PER_DOF = 180.0

#: An assembled 27-point matrix per dof (values and pattern of ``K + R`` or ``M``).
MATRIX_BYTES_PER_DOF = 330.0

_CORNERS = corner_offsets(3)  # (z, y, x) of the 8 corners of a voxel, x fastest


def estimate_voxel_p1_memory(dofs: float, settings: DiffusionSettings, ranks: int = 1) -> Any:
    """Estimated peak memory (:class:`~fem_anode.resources.MemoryEstimate`, all ranks) of a run on
    the voxels (``dofs``: about 1.2 per transporting voxel): ``BYTES_PER_DOF``, the assembled
    matrices where a solver needs them (direct, multigrid, PETSc's sweeps), the libraries per
    rank and the fields kept for the result."""
    from fem_anode.resources import FE_BASE_PER_RANK, MemoryEstimate, kept_fields_memory

    solver = settings.solver
    assembled = (
        solver.type == "direct" or solver.preconditioner not in ("auto", "ssor") or solver.sweep_kernel == "petsc"
    )
    fields = kept_fields_memory(settings, dofs)
    return MemoryEstimate(
        f"P1 diffusion on the voxels with about {int(dofs)} dofs",
        dofs * (BYTES_PER_DOF + (3 * MATRIX_BYTES_PER_DOF if assembled else 0.0)) + ranks * FE_BASE_PER_RANK + fields,
        {"dofs": float(dofs), "kept_fields_bytes": fields},
    )


class VoxelP1Problem(TransientDiffusion):
    """The diffusion model by P1 elements on the transporting voxels of a 3D image (collective).

    Args:
        image: the label image (``read_layers``, voxel size in metres, phase map).
        settings: the run's settings.
        comm: the communicator (each rank a slab of at least two z layers).
    """

    c: VectorField
    _c_old: VectorField
    _c_older: VectorField

    def __init__(self, image: Any, settings: DiffusionSettings, comm: MPI.Intracomm) -> None:
        settings.check()
        self.settings, self.comm, self.image = settings, comm, image
        geometry, physics = settings.geometry, settings.physics
        shape = tuple(int(n) for n in image.shape)
        if len(shape) != 3:
            raise UsageError("P1 on the voxels without a mesh is for 3D images (2D images are meshed)")
        phases = checked_phases(image, settings)
        self.pore_interface = interface_name(geometry.pore_phase, geometry.transport_phase)
        self.si_interface = interface_name(geometry.si_phase, geometry.transport_phase)
        nz = shape[0]
        self.slab = self._slab(image, phases[geometry.transport_phase], comm)
        spacing_m = tuple(float(s) for s in image.require_voxel_size())
        self.spacing_m = spacing_m  # (h_z, h_y, h_x)
        h = np.array(spacing_m) / LENGTH_UNIT
        self.voxel_volume = float(np.prod(h))
        rate_d = physics.D_eff / LENGTH_UNIT**2
        self.eps = physics.eps
        self.rate_f, self.rate_si = physics.k_f / LENGTH_UNIT, physics.k_si / LENGTH_UNIT
        roles = {phases[geometry.transport_phase]: TRANSPORT, phases[geometry.pore_phase]: PORE}
        if geometry.si_phase in phases:
            roles[phases[geometry.si_phase]] = SI
        classes = slab_classes(image, self.slab.z0, self.slab.z1, roles)
        try:
            self.operator = VoxelP1Operator(
                comm,
                classes,
                self.slab.z0,
                self.slab.z1,
                nz,
                h,
                rate_d,
                self.rate_f,
                self.rate_si,
                lumped=settings.mesh.mass_lumping,
            )
        except ValueError as err:  # a slab too large for 32-bit positions: more ranks
            raise UsageError(f"{image.source}: {err}") from err
        del classes
        release_freed_memory()  # the assembly's temporaries (else they stay in the heap, in every later peak)
        op = self.operator
        self._kernel: Any = None
        self._fused: FusedEisenstatSolver | str | None = "unset"
        solver = settings.solver
        ssor_possible = self._solver_kind() == "iterative" and str(
            solver.petsc_options.get("pc_type", solver.preconditioner)
        ) in ("auto", "ssor")
        self._ncells = int(comm.allreduce(op.transport_voxels))
        self._new = lambda: PETSc.Vec().createMPI((op.n, op.ndofs), comm=comm)
        self._work = self._new()
        if ssor_possible:  # before the other vectors: the set-up's temporaries then do not add to them
            self._stencil_solver()
            op.release_rows()  # the solver holds its own copies of the special rows
        op.compact()  # (the per-node numbers: recomputed where the regions and outputs need them)
        release_freed_memory()
        # The vectors of the weights are the operator's arrays (no copies): M 1, rate_f R_pore 1, R_si 1.
        self._w_dx = self._shared(op.w_dx)
        self.pore_measure = float(comm.allreduce(float(op.w_pore.sum())))
        self.si_measure = float(comm.allreduce(float(op.w_si.sum())))
        if self.pore_measure <= 0:
            raise InputError(
                f"the {geometry.transport_phase!r} phase has no face on the {geometry.pore_phase!r} phase (the pore "
                "interface the Li comes through)"
            )
        op.w_pore *= self.rate_f  # in place: the source rate_f R_pore 1
        self._source = self._shared(op.w_pore)
        self._w_si = self._shared(op.w_si) if self.si_measure > 0 else None
        if self._w_si is None:
            op.w_si = np.zeros(0)  # (no Si faces on any rank)
        self.volume = float(self._w_dx.sum())
        self._rhs = self._new()
        self.c = VectorField(self._new(), op.offset)
        self._c_old = VectorField(self._new(), op.offset, "c_old")
        self._c_older = VectorField(self._new(), op.offset, "c_older")
        self._A: PETSc.Mat | None = None
        self._KR: PETSc.Mat | None = None
        self._M: PETSc.Mat | None = None
        self._init_solver_state()
        self.regions = self._region_weights(settings.regions)

    @staticmethod
    def _slab(image: Any, transport: int, comm: MPI.Intracomm) -> Slab:
        """This rank's layers: slabs of about equal numbers of unknowns (the corners of the transporting
        voxels; the work and memory of a rank follow its dofs: equal layer counts left 462k and 534k
        dofs on the two ranks of the 128^3 electrode, equal numbers of transporting voxels 6.54M and
        7.40M on a 300^3 aged anode, whose thin SEI near the bottom has more corners per voxel), each
        of at least two layers (else equal layer counts). Collective."""
        nz = int(image.shape[0])
        slab = balanced_slab(comm, image, transport, weights="nodes")
        if comm.size > 1 and not comm.allreduce(slab.layers >= 2, op=MPI.LAND):
            raise UsageError(f"{comm.size} ranks for {nz} z layers: P1 on the voxels needs at least 2 layers per rank")
        return slab

    def _vector(self, values: np.ndarray) -> PETSc.Vec:
        vec = self._new()
        vec.array[:] = values
        return vec

    def _shared(self, values: np.ndarray) -> PETSc.Vec:
        """A vector on ``values`` (this rank's dofs; the array, not a copy)."""
        op = self.operator
        return PETSc.Vec().createWithArray(values, size=(op.n, op.ndofs), comm=self.comm)

    # -- sizes ------------------------------------------------------------------------------
    @property
    def ndofs(self) -> int:
        """Unknowns: the face-connected copies of the nodes of the transporting voxels (all ranks)."""
        return self.operator.ndofs

    @property
    def ncells(self) -> int:
        """Cells: the transporting voxels (all ranks)."""
        return self._ncells

    @property
    def dim(self) -> int:
        return 3

    @property
    def operator_nonzeros(self) -> int:
        """Entries of the 27-point matrix ``A`` (all ranks), assembled or not."""
        return int(self.comm.allreduce(self.operator.nonzeros))

    # -- operators ----------------------------------------------------------------------------
    def _grid_stencil(self) -> Any:
        """The grid stencil of ``A`` (:class:`~fem_anode.fem.grid_stencil.GridStencilKernel`, made on
        first use; ``None`` without the compiled sweeps). Collective."""
        if self._kernel is None and self._fused == "unset":
            from fem_anode.fem.grid_stencil import GridStencilKernel

            library = self._sweep_library()
            if library is None:
                self._fused = None
                return None
            op = self.operator
            special, _ = op._rows_now()
            self._kernel = GridStencilKernel.from_types(
                op.position,
                op.box,
                op.row_type,
                op.k_table,
                op.m_table,
                special,
                self.grid_ssor_omega,
                library,
                coupled=op.coupled,
            )
        return self._kernel

    def _stencil_solver(self) -> FusedEisenstatSolver | None:
        """The fused SSOR-CG on the grid stencil (made on first use; ``None`` without the compiled
        sweeps). Collective."""
        if self._fused == "unset":
            from fem_anode.fem.slab_sweeps import OffRankCouplings

            kernel = self._grid_stencil()
            self._fused = None
            if kernel is not None:
                op = self.operator
                _, off = op._rows_now()

                def couplings(d: PETSc.Vec) -> OffRankCouplings:
                    return OffRankCouplings.from_rows(
                        op.n, off.rows, off.indptr, off.columns, off.k, off.m, d, kernel.library
                    )

                self._fused = FusedEisenstatSolver.on_stencil(
                    self.comm, kernel, couplings, self.settings.solver.rtol, 500, work=self._work
                )
        return self._fused if isinstance(self._fused, FusedEisenstatSolver) else None

    def _matrices(self) -> tuple[PETSc.Mat, PETSc.Mat]:
        """``K + R`` and ``M`` assembled (made on first use: direct solvers, multigrid, PETSc's sweeps)."""
        if self._KR is None or self._M is None:
            op = self.operator
            indptr, columns, k_values, m_values = op.csr()
            sizes = ((op.n, op.ndofs), (op.n, op.ndofs))
            csr = (indptr.astype(PETSc.IntType), columns.astype(PETSc.IntType))
            self._KR = PETSc.Mat().createAIJ(sizes, csr=(*csr, k_values), comm=self.comm)
            self._M = PETSc.Mat().createAIJ(sizes, csr=(*csr, m_values), comm=self.comm)
            for matrix in (self._KR, self._M):
                matrix.setOption(PETSc.Mat.Option.SPD, True)
        return self._KR, self._M

    def _operator(self, a0: float) -> PETSc.Mat:
        """``A = K + R + a0 eps M`` assembled (values recomputed from ``K + R`` and ``M`` when a0 changes)."""
        KR, M = self._matrices()
        if self._A is None:
            self._A = KR.duplicate(copy=PETSc.Mat.DuplicateOption.SHARE_NONZERO_PATTERN)
        if self._A_a0 != a0:
            KR.copy(self._A, structure=PETSc.Mat.Structure.SAME_NONZERO_PATTERN)
            self._A.axpy(a0 * self.eps, M, structure=PETSc.Mat.Structure.SAME_NONZERO_PATTERN)
            self._A.setOption(PETSc.Mat.Option.SPD, True)
            self._A_a0 = a0
        return self._A

    def _mass_mult(self, x: PETSc.Vec, y: PETSc.Vec) -> None:
        """``y = M x`` by the grid stencil (else the assembled ``M``)."""
        fused = self._stencil_solver()
        if fused is not None:
            fused.mass_mult(x, y)
            return
        self._matrices()[1].mult(x, y)

    def _multigrid_operands(self) -> tuple[PETSc.Mat, PETSc.Mat]:
        return self._matrices()

    def _ksp(self, a0: float) -> Any:
        """As :meth:`TransientDiffusion._ksp`; SSOR is the fused SSOR-CG on the grid stencil unless
        ``solver.petsc_options`` set KSP or PC options or the compiled sweeps are unavailable."""
        if self._preconditioner(a0) != "ssor" or self.settings.solver.petsc_solver_options:
            return super()._ksp(a0)
        fused = self._stencil_solver()
        if fused is None:
            return super()._ksp(a0)
        fused.prepare(float(f"{a0:.12e}") * self.eps)
        return fused

    def _switch_iterations(self) -> int:
        """``solver.switch_iterations`` or 40 (an SSOR-CG iteration is one pass, multigrid 3-4)."""
        value = self.settings.solver.switch_iterations
        if value is None and self._stencil_solver() is not None:
            return 40
        return super()._switch_iterations()

    def solver_memory(self) -> dict[str, float]:
        """Bytes of the solver's operator, vectors, matrices and set-ups, summed over ranks, and per dof."""
        n = self.ndofs
        mats = [m for m in (self._KR, self._M, self._A) if m is not None]
        values = sum(m.getInfo()["nz_used"] for m in mats) * 8.0
        pattern = (self._M.getInfo()["nz_used"] * 4.0 + 4.0 * n) if self._M is not None else 0.0
        fused = self._fused.nbytes if isinstance(self._fused, FusedEisenstatSolver) else 0
        out = {
            "matrices": values + pattern,
            "operator": float(self.comm.allreduce(self.operator.nbytes)),
            "sweeps": float(self.comm.allreduce(fused)),
            "vectors": 8.0 * n * (7 + (self._w_si is not None)),
            "multigrid": self._mg.nbytes() if self._mg is not None else 0.0,
            "factorisations": len(self._direct) * (self._factor_bytes or 0.0),
        }
        out["total"] = sum(out.values())
        out["per_dof"] = out["total"] / n
        return out

    # -- diagnostics ----------------------------------------------------------------------------
    def boundary_inflow(self, c: Any = None) -> float:
        """Net Li inflow rate through pore and Si faces, scaled units (um^3 / s)."""
        vec = (c or self.c).x.petsc_vec
        inflow = self.rate_f * self.pore_measure - self._source.dot(vec)
        if self._w_si is not None and self.rate_si > 0:
            inflow -= self.rate_si * self._w_si.dot(vec)
        return inflow

    def concentration(self) -> VectorField:
        """c in mol/m^3 as a new field (for output)."""
        out = self.c.duplicate("c")
        out.petsc_vec.scale(self.settings.physics.c_bulk)
        return out

    def _region_weights(self, regions: list[Any]) -> dict[str, tuple[PETSc.Vec, float]]:
        """Per region: the integral of every basis function over the transporting voxels whose centres
        lie in its box (the finite-element weights of the mesh path)."""
        ny, nx = (int(n) for n in self.image.shape[1:])
        hz, hy, hx = self.spacing_m
        out = {}
        for region in regions:
            box = np.asarray(region.box, dtype=float)
            if len(box) != 6:
                raise UsageError(f"region {region.name!r} has {len(box)} box numbers; a 3D image needs 6")
            lo, hi = box[:3], box[3:]
            x = (np.arange(nx) + 0.5) * hx
            y = (np.arange(ny) + 0.5) * hy
            z = (np.arange(self.slab.z0 - 2, self.slab.z1 + 1) + 0.5) * hz
            counts = self.operator.voxel_counts(
                (z >= lo[2]) & (z <= hi[2]), (y >= lo[1]) & (y <= hi[1]), (x >= lo[0]) & (x <= hi[0])
            )
            weights = self._vector(counts * (self.voxel_volume / 8.0))
            measure = weights.sum()
            if measure <= 0:
                raise UsageError(f"region {region.name!r} box {region.box} contains none of the transporting phase")
            out[region.name] = (weights, measure)
        return out

    def _voxel_centres(self, values: np.ndarray, z: int) -> np.ndarray:
        """The field at the centres of voxel layer ``z`` (one of this slab's): the mean of each
        transporting voxel's 8 corner dofs (``values``: :meth:`VoxelP1Operator.with_upper_plane`), NaN elsewhere."""
        parts = []
        for corner in _CORNERS:
            dofs = self.operator.corner_dofs(z, corner)
            parts.append(np.where(dofs >= 0, values[np.maximum(dofs, 0)], np.nan))
        return np.asarray(np.mean(parts, axis=0))

    def middle_section(self) -> np.ndarray:
        """c (mol/m^3) at the voxel centres of the middle z layer, NaN outside the transporting
        phase, on every rank (collective; one layer travels, from the rank that owns it)."""
        values = self.operator.with_upper_plane(self.c.x.array)
        middle = int(self.image.shape[0]) // 2
        mine = self.slab.z0 <= middle < self.slab.z1
        owner = self.comm.allreduce(self.comm.rank if mine else -1, op=MPI.MAX)
        layer = self.settings.physics.c_bulk * self._voxel_centres(values, middle) if mine else None
        return self.comm.bcast(layer, root=owner) if self.comm.size > 1 else layer  # type: ignore[return-value]  # the owner's layer

    def si_particle_report(self) -> list[dict[str, Any]]:
        """Per Si particle (26-connected Si component of the image, numbered as ``scipy.ndimage.label``
        numbers them on the whole image): c statistics on its faces to the transporting voxels, each
        face's mean the mean of its 4 corners (exact for the bilinear trace), its minimum and maximum
        those of the corners. Same keys as :func:`~fem_anode.fem.diffusion.particles.si_particle_report`.
        Collective."""
        from fem_anode.imaging.slabs import label_slabs

        geometry = self.settings.geometry
        phases = self.image.require_phases()
        if geometry.si_phase not in phases:
            return []
        op, slab = self.operator, self.slab
        padded = op._padded  # classes of layers z0 - 2 .. z1, padded in y and x
        si = padded[2:-1, 1:-1, 1:-1] == SI
        ids, n_particles, below, above = label_slabs(self.comm, slab, si, np.ones((3, 3, 3), dtype=bool))
        del si
        values = self.settings.physics.c_bulk * op.with_upper_plane(self.c.x.array)
        if n_particles == 0:
            return []
        ny, nx = ids.shape[1:]
        empty = np.zeros((ny, nx), np.int64)
        hz, hy, hx = self.spacing_m
        area = (hy * hx, hz * hx, hz * hy)  # faces normal to z, y, x (m^2)
        sums = np.zeros((3, n_particles))
        lows = np.full(n_particles, np.inf)
        highs = np.full(n_particles, -np.inf)
        for z in range(slab.z0, slab.z1):
            k = z - slab.z0
            layer = np.pad(ids[k].astype(np.int64), 1)
            lower = np.pad((ids[k - 1] if k > 0 else (below if below is not None else empty)).astype(np.int64), 1)
            upper = np.pad(
                (ids[k + 1] if k + 1 < slab.layers else (above if above is not None else empty)).astype(np.int64), 1
            )
            corners = {tuple(c): op.corner_dofs(z, c) for c in _CORNERS}
            inside = corners[(0, 0, 0)] >= 0
            for axis in range(3):
                for side in (0, 1):
                    if axis == 0:
                        owner = (upper if side else lower)[1:-1, 1:-1]
                    elif axis == 1:
                        owner = layer[2:, 1:-1] if side else layer[:-2, 1:-1]
                    else:
                        owner = layer[1:-1, 2:] if side else layer[1:-1, :-2]
                    touching = inside & (owner > 0)
                    if not touching.any():
                        continue
                    face = [values[corners[tuple(c)][touching]] for c in _CORNERS if c[axis] == side]
                    who = owner[touching] - 1
                    mean = np.mean(face, axis=0)
                    np.add.at(sums[0], who, area[axis])
                    np.add.at(sums[1], who, area[axis] * mean)
                    np.add.at(sums[2], who, area[axis] * (mean > 0.5 * self.settings.physics.c_bulk))
                    np.minimum.at(lows, who, np.min(face, axis=0))
                    np.maximum.at(highs, who, np.max(face, axis=0))
        return reduce_particle_statistics(self.comm, sums, lows, highs)

    # -- output ---------------------------------------------------------------------------------
    def vti_grid(self) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
        """The image grid of the field files: voxels ``(nx, ny, nz)`` and spacing ``(h_x, h_y, h_z)`` (m)."""
        nz, ny, nx = (int(n) for n in self.image.shape)
        hz, hy, hx = self.spacing_m
        return (nx, ny, nz), (hx, hy, hz)

    def vti_arrays(self, field: VectorField) -> list[Any]:
        """The arrays of a field file: point data ``c`` on the nodes this rank owns (float32; the mean
        of a split node's copies; NaN at nodes of no transporting voxel) and cell data
        ``transporting`` (1 on the transporting voxels, 0 elsewhere) of its voxel layers."""
        from fem_anode.io.vti import SlabArray

        op, slab = self.operator, self.slab
        nz, ny, nx = (int(n) for n in self.image.shape)
        plane = (ny + 1) * (nx + 1)
        planes = slab.layers + (0 if slab.z1 < nz else 1)
        nodes = op.dof_nodes() - plane  # from the slab's first owned plane
        values = np.asarray(field.x.array)

        def point_blocks() -> Any:
            sums = np.bincount(nodes, weights=values, minlength=planes * plane)
            counts = np.bincount(nodes, minlength=planes * plane)
            with np.errstate(invalid="ignore", divide="ignore"):
                yield np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)

        def cell_blocks() -> Any:
            yield (op._padded[2:-1, 1:-1, 1:-1] == TRANSPORT).astype(np.uint8)

        return [
            SlabArray("PointData", "c", "<f4", (nz + 1) * plane, slab.z0 * plane, point_blocks),
            SlabArray("CellData", "transporting", "|u1", nz * ny * nx, slab.z0 * ny * nx, cell_blocks),
        ]

    def destroy(self) -> None:
        """Free PETSc objects (the fused solver first)."""
        if isinstance(self._fused, FusedEisenstatSolver):
            self._fused.free()
        self._fused = "unset"
        self._kernel = None
        super().destroy()
        vectors = [self._w_dx, self._w_si, self._source, self._rhs, self._work]
        vectors += [self.c.petsc_vec, self._c_old.petsc_vec, self._c_older.petsc_vec]
        vectors += [weights for weights, _ in self.regions.values()]
        for vec in vectors:
            if vec is not None:
                vec.destroy()
        self._KR = self._M = None
