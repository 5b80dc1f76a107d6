r"""Cell-centred finite volumes for the diffusion model on voxel images (``mesh.discretisation = "fv"``).

The model of :mod:`fem_anode.fem.diffusion` discretised on the voxels themselves: one unknown
per voxel of the transporting phase (its mean concentration), no mesh. Voxel ``i`` (volume
``V``, faces of area ``A_a`` normal to axis ``a``, edge ``h_a``) balances

.. math::

    \varepsilon V \frac{dc_i}{dt} = \sum_{j} G_a (c_j - c_i)
        + \sum_{\text{pore faces}} G^f_a (c_\mathrm{bulk} - c_i)
        - \sum_{\text{Si faces}} G^{si}_a c_i,

    G_a = \frac{D_\mathrm{eff} A_a}{h_a},\qquad
    G^f_a = \frac{A_a}{h_a / (2 D_\mathrm{eff}) + 1/k_f},\qquad
    G^{si}_a = \frac{A_a}{h_a / (2 D_\mathrm{eff}) + 1/k_{si}},

where ``j`` runs over the face neighbours in the transporting phase (two-point flux; voxels
touching only along an edge or at a corner are not coupled: face connectivity, the convention of
TauFactor, PoreSpy and OpenImpala). The film resistance ``1/k`` of a pore (or Si) face is in
series with the half voxel between the voxel centre and that face. Faces on the image box carry
no flux. ``G^{si}`` only with ``k_si > 0``. Time integration, solvers, records and checkpoints
are those of :class:`~fem_anode.fem.diffusion.transient.TransientDiffusion` (same scaled units: micrometres,
``c / c_bulk``); the operator is ``A = K + R + a_0 \varepsilon M`` with a diagonal ``M``, so a new
step size changes only the diagonal of the one matrix.

Distribution: every rank owns a slab of consecutive z layers with about equal numbers of
transporting voxels (:func:`~fem_anode.imaging.slabs.balanced_slab`: one counting pass over the
image shared by the ranks), reads only those layers of the image, and numbers its unknowns in the
image's C order after the unknowns of the ranks before it, so the global numbering and the matrix
are the same on any number of ranks (the slab SSOR's separator order, and so the CG iterations,
depend on the slabs). The matrix rows are assembled straight from NumPy (7-point stencil, no copy)
by the tortuosity solver's assembler. A 2D image is one layer of unit thickness.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
from mpi4py import MPI
from petsc4py import PETSc

from fem_anode.errors import InputError, UsageError
from fem_anode.fem.diffusion.particles import reduce_particle_statistics
from fem_anode.fem.diffusion.settings import DiffusionSettings
from fem_anode.fem.diffusion.transient import LENGTH_UNIT, NamedPC, TransientDiffusion, checked_phases
from fem_anode.fem.slab_sweeps import EisenstatCG, SeparatorSweeps, separator_order_possible
from fem_anode.fem.tortuosity.clusters import exchange_layers, slab_bounds
from fem_anode.fem.tortuosity.fv import assemble_face_conductances, layer_chunks, shifted_labels
from fem_anode.fem.voxel_sweeps import VoxelSweepKernel, face_diagonal
from fem_anode.imaging.slabs import balanced_slab, label_slabs
from fem_anode.meshing.tags import interface_name

__all__ = ["BYTES_PER_UNKNOWN", "VectorField", "VoxelFieldWriter", "VoxelFVProblem", "estimate_fv_memory"]

logger = logging.getLogger(__name__)

#: Peak memory per unknown of a run with the default solver (CG + Eisenstat SSOR by the compiled
#: sweeps, no assembled matrix): about 16 vectors (128 B), the sweeps' stencil (25 B) and the
#: set-up temporaries; 178 B on one rank and 197 B on two at 256^3 (docs/benchmarks.md), rounded
#: up. PETSc's sweeps need the 7-point matrix as well (about 100 B more; the estimate of
#: ``sweep_kernel = "petsc"`` adds it). The per-rank libraries come on top.
BYTES_PER_UNKNOWN = 220.0

#: The assembled 7-point matrix per unknown (AIJ: 7 entries of 12 B and the row pointer).
MATRIX_BYTES_PER_UNKNOWN = 90.0

_OUTSIDE = -1  # neighbour label beyond the image box


class VectorField:
    """The finite-volume unknowns of this rank as a PETSc vector, with the parts of
    :class:`dolfinx.fem.Function`'s interface the time loop and the checkpoints use.

    ``x`` is the object itself: ``x.array`` (this rank's values, a view), ``x.petsc_vec``,
    ``x.scatter_forward()`` (nothing to do: no ghosts); ``global_offset``/``global_size`` place
    the local block in the rank-independent global order.
    """

    def __init__(self, vec: PETSc.Vec, global_offset: int, name: str = "c") -> None:
        self.petsc_vec = vec
        self.x = self
        self.name = name
        self.global_offset = int(global_offset)
        self.global_size = int(vec.getSize())
        self.comm: MPI.Comm = vec.getComm().tompi4py()

    @property
    def array(self) -> np.ndarray:
        """This rank's values (a writable view of the vector)."""
        return self.petsc_vec.array

    def scatter_forward(self) -> None:
        """No ghost values to update."""

    def duplicate(self, name: str | None = None) -> VectorField:
        """A copy with its own vector."""
        return VectorField(self.petsc_vec.copy(), self.global_offset, name or self.name)


def estimate_fv_memory(unknowns: float, settings: DiffusionSettings, ranks: int = 1) -> Any:
    """Estimated peak memory (:class:`~fem_anode.resources.MemoryEstimate`, all ranks) of a run:
    the solver's ``BYTES_PER_UNKNOWN``, the libraries per rank, and the fields kept for the result."""
    from fem_anode.resources import FE_BASE_PER_RANK, MemoryEstimate, kept_fields_memory

    fields = kept_fields_memory(settings, unknowns)
    return MemoryEstimate(
        f"finite-volume diffusion with {int(unknowns)} unknowns",
        unknowns * (BYTES_PER_UNKNOWN + (MATRIX_BYTES_PER_UNKNOWN if settings.solver.sweep_kernel == "petsc" else 0.0))
        + ranks * FE_BASE_PER_RANK
        + fields,
        {"unknowns": float(unknowns), "kept_fields_bytes": fields},
    )


class _Layers:
    """This rank's slab of the label image with one layer of halo on each side (``_OUTSIDE`` beyond
    the box); on several ranks the slabs hold about equal numbers of ``transport`` voxels, with at
    least two layers each where the image has them (the separator order needs them)."""

    def __init__(self, comm: MPI.Comm, image: Any, transport: int) -> None:
        shape = tuple(int(n) for n in image.shape)
        self.dim = len(shape)
        if self.dim == 2:
            whole = np.asarray(image.read_layers(0, shape[0]))
            self.nz, (self.ny, self.nx) = 1, shape
            self.slab = slab_bounds(comm, 1)
            labels = whole[None] if self.slab.layers else np.zeros((0, *shape), whole.dtype)
        else:
            self.nz, self.ny, self.nx = shape
            self.slab = balanced_slab(comm, image, transport)
            labels = np.asarray(image.read_layers(self.slab.z0, self.slab.z1))
        if labels.size and not np.issubdtype(labels.dtype, np.integer):
            raise InputError(f"{image.source}: labels must be integers, got {labels.dtype}")
        self.labels = labels
        empty = np.full((self.ny, self.nx), _OUTSIDE, dtype=np.int64)
        first = labels[0].astype(np.int64) if self.slab.layers else empty
        last = labels[-1].astype(np.int64) if self.slab.layers else empty
        below, above = exchange_layers(comm, self.slab, first, last)
        self.below = below if below is not None else empty
        self.above = above if above is not None else empty

    def chunk(self, a: int, b: int) -> np.ndarray:
        """Layers ``a - 1 .. b`` of the slab (local indices) as int64, halo included."""
        inner = self.labels[a:b].astype(np.int64)
        lower = self.labels[a - 1].astype(np.int64) if a > 0 else self.below
        upper = self.labels[b].astype(np.int64) if b < self.slab.layers else self.above
        return np.concatenate([lower[None], inner, upper[None]])


def _neighbours(block: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """``(axis, labels of the face neighbours)`` of the inner layers of ``block`` (halo-extended
    along z), for the six face directions; ``_OUTSIDE`` beyond the box."""
    inner = block[1:-1]
    return [
        (0, block[:-2]),
        (0, block[2:]),
        (1, shifted_labels(inner, 1, 1)),
        (1, shifted_labels(inner, 1, -1)),
        (2, shifted_labels(inner, 2, 1)),
        (2, shifted_labels(inner, 2, -1)),
    ]


class VoxelFVProblem(TransientDiffusion):
    """The diffusion model by cell-centred finite volumes on a segmented voxel image (collective).

    Args:
        image: the segmented image (:class:`~fem_anode.io.images.ImageLayers` or
            :class:`~fem_anode.io.images.VoxelImage`), 2D or 3D, with its voxel size and phases.
        settings: the run's settings (``mesh.discretisation = "fv"``).
        comm: communicator; every rank reads and solves its own slab of z layers.
    """

    # The fields are vectors of the voxels, the operator exists from the start, there is no mesh.
    c: VectorField
    _c_old: VectorField
    _c_older: VectorField
    _A: PETSc.Mat | None

    def __init__(self, image: Any, settings: DiffusionSettings, comm: MPI.Intracomm) -> None:
        settings.check()
        self.settings, self.comm, self.image = settings, comm, image
        geometry, physics = settings.geometry, settings.physics
        phases = checked_phases(image, settings)
        self.pore_interface = interface_name(geometry.pore_phase, geometry.transport_phase)
        self.si_interface = interface_name(geometry.si_phase, geometry.transport_phase)
        spacing = [float(s) for s in image.require_voxel_size()]
        layers = _Layers(comm, image, phases[geometry.transport_phase])
        self._layers_info = layers
        self._dim = layers.dim
        # Scaled units: micrometres; a 2D image is one layer 1 um thick.
        h = np.array(([1.0] if layers.dim == 2 else []) + [s / LENGTH_UNIT for s in spacing])
        self.spacing_m = tuple(spacing) if layers.dim == 3 else (LENGTH_UNIT, *spacing)
        area = np.array([h[1] * h[2], h[0] * h[2], h[0] * h[1]])
        rate_D = physics.D_eff / LENGTH_UNIT**2
        rate_f = physics.k_f / LENGTH_UNIT
        rate_si = physics.k_si / LENGTH_UNIT
        self.eps, self.rate_f, self.rate_si = physics.eps, rate_f, rate_si
        conductance = (float(rate_D * area[0] / h[0]), float(rate_D * area[1] / h[1]), float(rate_D * area[2] / h[2]))
        film = [float(area[a] / (h[a] / (2 * rate_D) + 1 / rate_f)) if rate_f > 0 else 0.0 for a in range(3)]
        si_value = phases.get(geometry.si_phase)
        si_film = (
            [float(area[a] / (h[a] / (2 * rate_D) + 1 / rate_si)) for a in range(3)]
            if rate_si > 0 and si_value is not None
            else None
        )
        transport_value, pore_value = phases[geometry.transport_phase], phases[geometry.pore_phase]
        slab = layers.slab
        transport = layers.labels == transport_value
        self.per_layer = (
            np.count_nonzero(transport.reshape(slab.layers, -1), axis=1) if slab.layers else np.zeros(0, np.int64)
        )
        n_local = int(self.per_layer.sum())
        self._offset = int(comm.exscan(n_local) or 0) if comm.size > 1 else 0
        # Robin terms per unknown (row order: C order of the slab = chunks in order).
        extra = np.zeros(n_local)
        source = np.zeros(n_local)
        si_out = np.zeros(n_local) if si_film is not None else None
        faces = np.zeros(2)  # pore face area, Si face area (um^2)
        row = 0
        for a, b in layer_chunks(slab, layers.ny, layers.nx):
            block = layers.chunk(a, b)
            inside = transport[a:b]
            rows = int(np.count_nonzero(inside))
            for axis, neighbour in _neighbours(block):
                at = neighbour[inside]
                pore_face = at == pore_value
                extra[row : row + rows] += film[axis] * pore_face
                source[row : row + rows] += film[axis] * pore_face
                faces[0] += area[axis] * np.count_nonzero(pore_face)
                if si_value is not None:
                    si_face = at == si_value
                    faces[1] += area[axis] * np.count_nonzero(si_face)
                    if si_out is not None:
                        extra[row : row + rows] += si_film[axis] * si_face  # type: ignore[index]  # set with si_out
                        si_out[row : row + rows] += si_film[axis] * si_face  # type: ignore[index]  # set with si_out
            row += rows
        faces = comm.allreduce(faces, op=MPI.SUM)
        if faces[0] <= 0:
            raise InputError(
                f"the {geometry.transport_phase!r} phase has no face on the {geometry.pore_phase!r} phase (the pore "
                "interface the Li comes through)"
            )
        self._g_z = conductance[0]
        self._conductance = conductance
        self._transport = transport  # kept for outputs and the compiled sweeps (1 B per voxel of the slab)
        self._slab_ssor: _SlabEisenstat | None = None
        self._kernel: VoxelSweepKernel | None = None
        self._kernel_state = "unset"
        self._n_local = n_local
        self._A = None
        self._ndofs = int(comm.allreduce(n_local))
        self._kr_diag = self._new_vec()
        solver = settings.solver
        ssor_possible = self._solver_kind() == "iterative" and str(
            solver.petsc_options.get("pc_type", solver.preconditioner)
        ) in ("auto", "ssor")
        if ssor_possible and self._sweep_kernel() is not None:
            # The compiled sweeps are the operator: no matrix unless a solver needs one (_matrix).
            # Runs that never use SSOR (direct, multigrid from the start) keep the matrix instead.
            faces_sum, entries = face_diagonal(comm, slab, transport, self._kernel)  # type: ignore[arg-type]
            self._kr_diag.array[:] = faces_sum + extra
            self._nonzeros = int(comm.allreduce(n_local + entries))
            del faces_sum
        else:
            self._A = self._assemble()
            self._A.getDiagonal(self._kr_diag)
            self._kr_diag.array[:] += extra
            self._nonzeros = int(self._A.getInfo()["nz_used"])
        del extra
        self._m = self._new_vec()
        self._m.set(float(np.prod(h)))
        self._w_dx = self._m
        self._source = self._new_vec()
        self._source.array[:] = source
        self._source_total = float(self._source.sum())
        self._w_si: PETSc.Vec | None = None
        if si_out is not None:
            self._w_si = self._new_vec()
            self._w_si.array[:] = si_out
        self._diag = self._new_vec()
        self._diag_a0: float | None = None
        self._rhs = self._new_vec()
        self._work = self._new_vec()
        self.volume = float(self._w_dx.sum())
        self.pore_measure, self.si_measure = float(faces[0]), float(faces[1])
        self.c = VectorField(self._new_vec(), self._offset)
        self._c_old = VectorField(self._new_vec(), self._offset, "c_old")
        self._c_older = VectorField(self._new_vec(), self._offset, "c_older")
        self._M: PETSc.Mat | None = None  # diagonal: the vector _m; matrices only for the multigrid
        self._KR: PETSc.Mat | None = None
        self._init_solver_state()
        self.regions = self._region_weights(settings.regions)

    # -- sizes ------------------------------------------------------------------------------
    @property
    def ndofs(self) -> int:
        """Unknowns: voxels of the transporting phase (all ranks)."""
        return self._ndofs

    @property
    def ncells(self) -> int:
        """Cells: the same voxels."""
        return self._ndofs

    @property
    def dim(self) -> int:
        """Dimension of the image (2 or 3)."""
        return self._dim

    @property
    def operator_nonzeros(self) -> int:
        """Entries of the 7-point matrix ``A`` (all ranks), assembled or not."""
        return self._nonzeros

    # -- operators ----------------------------------------------------------------------------
    def _new_vec(self) -> PETSc.Vec:
        """A vector of the unknowns (this rank's rows)."""
        return PETSc.Vec().createMPI((self._n_local, self._ndofs), comm=self.comm)

    def _assemble(self) -> PETSc.Mat:
        """The 7-point matrix of ``K`` (its diagonal the face sum only; :meth:`_operator` sets the rest)."""
        A, _, _, _, _ = assemble_face_conductances(
            self.comm, self._layers_info.slab, self._transport, self._conductance, False, ends=False
        )
        return A

    def _diagonal(self, a0: float) -> PETSc.Vec:
        """``diag(A) = diag(K + R) + a0 eps M`` (the vector ``_diag``), recomputed when a0 changes."""
        if self._diag_a0 != a0:
            self._diag.waxpy(a0 * self.eps, self._m, self._kr_diag)
            self._diag_a0 = a0
        return self._diag

    def _matrix(self) -> PETSc.Mat:
        """The assembled matrix, made on first use (direct and multigrid solvers, a failed step's
        residual; the compiled sweeps need none)."""
        if self._A is None:
            self._A = self._assemble()
            self._A_a0 = None
        return self._A

    def _operator(self, a0: float) -> PETSc.Mat:
        """``A = K + R + a0 eps M``: only the diagonal depends on a0 (M is diagonal); recomputed from
        ``diag(K + R)`` and ``M``, never updated incrementally (a resumed run sees the same matrix)."""
        A = self._matrix()
        if self._A_a0 != a0:
            A.setDiagonal(self._diagonal(a0), addv=PETSc.InsertMode.INSERT_VALUES)
            A.setOption(PETSc.Mat.Option.SPD, True)
            self._A_a0 = a0
        return A

    def _mass_mult(self, x: PETSc.Vec, y: PETSc.Vec) -> None:
        y.pointwiseMult(x, self._m)

    def _ksp(self, a0: float) -> Any:
        """As :meth:`TransientDiffusion._ksp`; SSOR is :class:`_SlabEisenstat` on several ranks
        (Eisenstat's trick on each rank's block of rows, which PETSc 3.22 lacks for MPI matrices)
        and on one rank with the compiled sweeps (else PETSc's ``PCEISENSTAT``)."""
        if self._preconditioner(a0) != "ssor" or "pc_type" in self.settings.solver.petsc_options:
            return super()._ksp(a0)
        if self.comm.size == 1 and self._sweep_kernel() is None:
            return super()._ksp(a0)
        key = float(f"{a0:.12e}")
        if self._kernel is None:
            self._operator(key)  # PETSc's sweeps read the assembled matrix's diagonal
        else:
            self._diagonal(key)
        if self._slab_ssor is None:
            self._slab_ssor = _SlabEisenstat(self)
        self._slab_ssor.prepare(key)
        return self._slab_ssor

    def _sweep_kernel(self) -> VoxelSweepKernel | None:
        """The compiled sweeps of this rank's rows per ``solver.sweep_kernel`` (made on first use;
        ``None``: PETSc's sweeps). Collective."""
        if self._kernel_state == "unset":
            library = self._sweep_library()
            self._kernel_state = "petsc"
            if library is not None:
                self._kernel = VoxelSweepKernel(self._transport, self._conductance, _SlabEisenstat.omega, library)
                self._kernel_state = "compiled"
        return self._kernel

    def _switch_iterations(self) -> int:
        """``solver.switch_iterations`` or 40: Eisenstat's SSOR on any number of ranks (see :meth:`_ksp`)."""
        value = self.settings.solver.switch_iterations
        return value if value is not None else 40

    def _multigrid_operands(self) -> tuple[PETSc.Mat, PETSc.Mat]:
        """``K + R`` and ``M`` as matrices of ``A``'s pattern, made when the multigrid needs them."""
        if self._KR is None:
            A = self._matrix()
            self._KR = A.duplicate(copy=True)
            self._KR.setDiagonal(self._kr_diag, addv=PETSc.InsertMode.INSERT_VALUES)
            self._M = A.duplicate(copy=True)
            self._M.zeroEntries()
            self._M.setDiagonal(self._m, addv=PETSc.InsertMode.INSERT_VALUES)
        return self._KR, self._M

    def solver_memory(self) -> dict[str, float]:
        """Bytes of the solver's matrices, vectors and set-ups, summed over ranks, and per unknown."""
        n = self.ndofs
        one = self._nonzeros * 12.0 + 8.0 * n
        mats = (one if self._A is not None else 0.0) + (2 * one if self._KR is not None else 0.0)
        out = {
            "matrices": mats,
            "vectors": 8.0 * n * (12 + (self._w_si is not None)),
            "multigrid": self._mg.nbytes() if self._mg is not None else 0.0,
            "factorisations": len(self._direct) * (self._factor_bytes or 0.0),
            "sweeps": float(self.comm.allreduce(self._kernel.nbytes if self._kernel is not None else 0)),
        }
        out["total"] = sum(out.values())
        out["per_dof"] = out["total"] / n
        return out

    # -- diagnostics ----------------------------------------------------------------------------
    def boundary_inflow(self, c: Any = None) -> float:
        """Net Li inflow rate through pore and Si faces, scaled units (um^d / s)."""
        vec = (c or self.c).x.petsc_vec
        inflow = self._source_total - self._source.dot(vec)
        if self._w_si is not None:
            inflow -= self._w_si.dot(vec)
        return inflow

    def concentration(self) -> VectorField:
        """c in mol/m^3 as a new field (for output)."""
        out = self.c.duplicate("c")
        out.petsc_vec.scale(self.settings.physics.c_bulk)
        return out

    def _voxel_values(self, field: VectorField, a: int, b: int, fill: float = math.nan) -> np.ndarray:
        """Layers ``a..b-1`` of this rank's slab as a dense ``(b - a, ny, nx)`` array of ``field``."""
        info = self._layers_info
        start = int(self.per_layer[:a].sum())
        stop = start + int(self.per_layer[a:b].sum())
        dense = np.full((b - a, info.ny, info.nx), fill)
        dense[self._transport[a:b]] = field.x.array[start:stop]
        return dense

    def vti_grid(self) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
        """The image grid of the field files: voxels ``(nx, ny, nz)`` and spacing ``(h_x, h_y, h_z)`` (m)."""
        info = self._layers_info
        hz, hy, hx = self.spacing_m
        return (info.nx, info.ny, info.nz), (hx, hy, hz)

    def vti_arrays(self, field: VectorField) -> list[Any]:
        """The arrays of a field file (:class:`VoxelFieldWriter`): cell data ``c`` of this rank's slab."""
        from fem_anode.io.vti import SlabArray

        info = self._layers_info
        slab = info.slab
        plane = info.ny * info.nx

        def blocks() -> Any:
            for a, b in layer_chunks(slab, info.ny, info.nx):
                yield self._voxel_values(field, a, b)

        return [SlabArray("CellData", "c", "<f4", info.nz * plane, slab.z0 * plane, blocks)]

    def middle_section(self) -> np.ndarray:
        """c (mol/m^3, NaN outside the transporting phase) on the middle z layer of a 3D image, or
        on the 2D image, on every rank (collective; one layer travels, from the rank that owns it)."""
        info = self._layers_info
        slab = info.slab
        middle = info.nz // 2
        mine = slab.z0 <= middle < slab.z1
        owner = self.comm.allreduce(self.comm.rank if mine else -1, op=MPI.MAX)
        layer = None
        if mine:
            layer = self.settings.physics.c_bulk * self._voxel_values(self.c, middle - slab.z0, middle - slab.z0 + 1)[0]
        return self.comm.bcast(layer, root=owner) if self.comm.size > 1 else layer  # type: ignore[return-value]  # the owner's layer

    def _region_weights(self, regions: list[Any]) -> dict[str, tuple[PETSc.Vec, float]]:
        """Per region: the voxel volumes of the transporting voxels whose centres lie in its box."""
        info = self._layers_info
        slab = info.slab
        hz, hy, hx = self.spacing_m
        gdim = info.dim
        out = {}
        for region in regions:
            box = np.asarray(region.box, dtype=float)
            if len(box) != 2 * gdim:
                raise UsageError(f"region {region.name!r} has {len(box)} box numbers; a {gdim}D image needs {2 * gdim}")
            lo, hi = box[:gdim], box[gdim:]
            x = (np.arange(info.nx) + 0.5) * hx
            y = (np.arange(info.ny) + 0.5) * hy
            in_x = (x >= lo[0]) & (x <= hi[0])
            in_y = (y >= lo[1]) & (y <= hi[1])
            if gdim == 3:
                z = (np.arange(slab.z0, slab.z1) + 0.5) * hz
                in_z = (z >= lo[2]) & (z <= hi[2])
            else:
                in_z = np.ones(slab.layers, dtype=bool)
            inside = in_z[:, None, None] & in_y[None, :, None] & in_x[None, None, :]
            weights = self._new_vec()
            weights.array[:] = inside[self._transport] * self._m.array
            measure = weights.sum()
            if measure <= 0:
                raise UsageError(f"region {region.name!r} box {region.box} contains none of the transporting phase")
            out[region.name] = (weights, measure)
        return out

    def si_particle_report(self) -> list[dict[str, Any]]:
        """Per Si particle (8/26-connected Si component of the image, numbered as ``scipy.ndimage.label``
        numbers them on the whole image): c statistics on its faces to the transporting phase.

        The face value is the voxel's (with ``k_si = 0`` the exact face value of the two-point flux).
        Same keys as :func:`~fem_anode.fem.diffusion.particles.si_particle_report`. Collective.
        """
        geometry = self.settings.geometry
        phases = self.image.require_phases()
        if geometry.si_phase not in phases:
            return []
        info = self._layers_info
        slab = info.slab
        si = info.labels == phases[geometry.si_phase]
        structure = np.ones((3, 3, 3), dtype=bool)
        if info.dim == 2:  # the image is one layer: 8-connected in it, nothing across layers
            structure[0] = structure[2] = False
        ids, n_particles, below, above = label_slabs(self.comm, slab, si, structure)
        del si
        if n_particles == 0:
            return []
        plane = np.zeros((info.ny, info.nx), dtype=np.int64)
        hz, hy, hx = self.spacing_m
        # Face areas (m^2) normal to z, y, x; in 2D the face lengths (m) normal to y and x.
        area_m = np.array([hy * hx, hz * hx, hz * hy]) if info.dim == 3 else np.array([0.0, hx, hy])
        c_bulk = self.settings.physics.c_bulk
        sums = np.zeros((3, n_particles))
        lows = np.full(n_particles, np.inf)
        highs = np.full(n_particles, -np.inf)
        row = 0
        values = self.c.x.array
        for a, b in layer_chunks(slab, info.ny, info.nx):
            inner = ids[a:b].astype(np.int64)
            lower = ids[a - 1].astype(np.int64) if a > 0 else (below if below is not None else plane)
            upper = ids[b].astype(np.int64) if b < slab.layers else (above if above is not None else plane)
            block = np.concatenate([lower[None], inner, upper[None]])
            inside = self._transport[a:b]
            rows = int(np.count_nonzero(inside))
            c = c_bulk * values[row : row + rows]
            for axis, neighbour in _neighbours(block):
                owner = neighbour[inside]
                touching = owner > 0
                if not touching.any():
                    continue
                who = owner[touching] - 1
                cc = c[touching]
                np.add.at(sums[0], who, area_m[axis])
                np.add.at(sums[1], who, area_m[axis] * cc)
                np.add.at(sums[2], who, area_m[axis] * (cc > 0.5 * c_bulk))
                np.minimum.at(lows, who, cc)
                np.maximum.at(highs, who, cc)
            row += rows
        return reduce_particle_statistics(self.comm, sums, lows, highs)

    def destroy(self) -> None:
        """Free PETSc objects."""
        if self._slab_ssor is not None:
            self._slab_ssor.free()
            self._slab_ssor = None
        super().destroy()
        for vec in (
            self._kr_diag,
            self._m,
            self._source,
            self._w_si,
            self._diag,
            self._rhs,
            self._work,
            self.c.petsc_vec,
            self._c_old.petsc_vec,
            self._c_older.petsc_vec,
        ):
            if vec is not None:
                vec.destroy()
        for weights, _ in self.regions.values():
            weights.destroy()


class _SlabEisenstat:
    r"""CG with symmetric SOR by Eisenstat's trick on several ranks (the matrix of a
    :class:`VoxelFVProblem`, whose ranks own slabs of z layers), the sweeps running in parallel.

    With ``B = D/omega + L`` (``L``: the strictly lower triangle of ``A`` in the sweep order), CG
    runs on the symmetric ``Â = B^{-1} A B^{-T}`` with the diagonal ``D`` as preconditioner,
    which is CG on ``A`` with SSOR (``B D^{-1} B^T``), as PETSc's ``PCEISENSTAT`` does on one
    rank. Since ``A = B + B^T - (2/omega - 1) D``, applying ``Â`` costs two triangular sweeps
    (about one mat-vec) instead of a mat-vec and two sweeps:

    .. math::  Â y = t + B^{-1}\left(y + (1 - 2/\omega) D t\right),\qquad t = B^{-T} y.

    **Sweep order** (``separators``, the default when every slab between two others has at least
    two layers): the separator order of :mod:`fem_anode.fem.slab_sweeps`, one global SSOR whose
    sweeps still run on all ranks at once, so CG needs about the iterations of one rank.

    Otherwise (``block-jacobi``): ``B`` is block diagonal (each rank's own rows), the couplings
    ``O`` across slabs enter as ``Â y = t + B^{-1}(y + (1 - 2/omega) D t + O t)``: block-Jacobi
    SSOR, which needs more CG iterations (docs/benchmarks.md).

    The right-hand side is ``B^{-1} b``, the initial guess ``B^T x_0`` and the solution
    ``x = B^{-T} ŷ``; the convergence test is CG's natural norm of the transformed system, as
    with ``PCEISENSTAT``.

    **Fused iterations** (the compiled kernel in the separator order, the default): the same CG in
    three passes over the vectors per iteration instead of eight, by
    :class:`~fem_anode.fem.slab_sweeps.EisenstatCG` instead of PETSc's ``KSPCG``.
    """

    omega = 1.3

    def __init__(self, problem: VoxelFVProblem) -> None:
        solver = problem.settings.solver
        self.problem = problem
        self.comm = problem.comm
        kernel = problem._sweep_kernel()
        # the compiled sweeps need no matrix; PETSc's sweep the assembled one
        A = problem._matrix() if kernel is None else None
        # Borrowed from the problem (no copies, one vector each per rank less): its work vector is
        # free while a step's system is solved (it only builds the right-hand side before), and
        # its diagonal vector is the diagonal D of A for the current a0 (see VoxelFVProblem._operator).
        self.w_work = problem._work
        self.d = problem._diag
        self.mid_scale = 1.0 - 2.0 / self.omega  # Eisenstat's middle term: (1 - 2/omega) D
        self.a0: float | None = None
        info = problem._layers_info
        slab, transport = info.slab, problem._transport
        plane = info.ny * info.nx
        # Which voxels of this rank's first and last layers have rows.
        first = transport[0].ravel() if slab.layers else np.zeros(plane, bool)
        last = transport[-1].ravel() if slab.layers else np.zeros(plane, bool)
        self.sweeps = SeparatorSweeps(self.comm, slab, A, first, last, problem._g_z, self.omega, kernel=kernel)
        self.order = "separators" if separator_order_possible(self.comm, slab) else "block-jacobi"
        max_it = 500
        #: The fused CG on the compiled kernel (see the class docstring), else PETSc's KSPCG on the
        #: shell operator ``Â`` with the vectors of the transformed system.
        self.cg: EisenstatCG | None = None
        self.ksp: PETSc.KSP | None = None
        self.shell: PETSc.Mat | None = None
        self.bhat = self.yhat = self.bhat_work = None
        if self.order == "separators" and kernel is not None:
            self.cg = EisenstatCG(self.sweeps, self.d, solver.rtol, max_it, work=problem._work)
        else:
            self.bhat, self.yhat = problem._new_vec(), problem._new_vec()
            self.bhat_work = problem._new_vec()
            sizes = (problem._n_local, problem.ndofs)
            self.shell = PETSc.Mat().createPython((sizes, sizes), context=self, comm=self.comm)
            self.shell.setUp()
            self.ksp = PETSc.KSP().create(self.comm)
            self.ksp.setType("cg")
            self.ksp.setNormType(PETSc.KSP.NormType.NATURAL)
            self.ksp.setOperators(self.shell)
            self.ksp.setTolerances(rtol=solver.rtol, atol=0.0, max_it=max_it)
            self.ksp.setInitialGuessNonzero(True)
            pc = self.ksp.getPC()
            pc.setType("python")
            pc.setPythonContext(_DiagonalScaling(self))
            self.ksp.setConvergenceHistory(reset=True)
            self.ksp.setUp()

    def prepare(self, a0: float) -> None:
        """Use the operator's current values (only its diagonal changes with a0; ``self.d`` is the
        problem's diagonal vector, already refreshed by ``_operator``; the sweeps take the new
        diagonal and extract their layer blocks again, one layer each)."""
        if self.a0 == a0:
            return
        self.a0 = a0
        self.sweeps.refresh(self.d)

    def mult(self, mat: PETSc.Mat, y: PETSc.Vec, z: PETSc.Vec) -> None:
        """``z = Â y``."""
        t = self.bhat_work if self.cg is None else self.cg.t  # the CG's t is free between its solves
        w = self.w_work
        assert t is not None
        if self.order == "separators" and self.sweeps.kernel is not None:
            self.sweeps.backward(y, t)
            self.sweeps.forward_eisenstat(y, t, self.d, self.mid_scale, z)  # w below, on the fly
        elif self.order == "separators":
            self.sweeps.backward(y, t)
            w.pointwiseMult(self.d, t)
            w.aypx(self.mid_scale, y)  # w = y + (1 - 2/omega) D t
            self.sweeps.forward(w, z)
        else:
            self.sweeps.block_sweep(y, t, PETSc.Mat.SORType.BACKWARD_SWEEP | PETSc.Mat.SORType.ZERO_INITIAL_GUESS)
            w.pointwiseMult(self.d, t)
            w.aypx(self.mid_scale, y)
            self.sweeps.add_off_rank(t, w)
            self.sweeps.block_sweep(w, z, PETSc.Mat.SORType.FORWARD_SWEEP | PETSc.Mat.SORType.ZERO_INITIAL_GUESS)
        z.axpy(1.0, t)

    def solve(self, b: PETSc.Vec, x: PETSc.Vec) -> None:
        """Solve ``A x = b`` from the initial guess in ``x``."""
        if self.cg is not None:
            self.cg.solve(b, x)
            return
        assert self.ksp is not None and self.bhat is not None and self.yhat is not None
        if self.order == "separators":
            self.sweeps.forward(b, self.bhat)
            self.sweeps.apply_upper(x, self.yhat)
            self.ksp.solve(self.bhat, self.yhat)
            self.sweeps.backward(self.yhat, x)
            return
        zero = PETSc.Mat.SORType.ZERO_INITIAL_GUESS
        self.sweeps.block_sweep(b, self.bhat, PETSc.Mat.SORType.FORWARD_SWEEP | zero)
        self.sweeps.block_sweep(x, self.yhat, PETSc.Mat.SORType.APPLY_UPPER)
        self.ksp.solve(self.bhat, self.yhat)
        self.sweeps.block_sweep(self.yhat, x, PETSc.Mat.SORType.BACKWARD_SWEEP | zero)

    def getConvergedReason(self) -> int:
        if self.cg is not None:
            return self.cg.reason
        assert self.ksp is not None
        return int(self.ksp.getConvergedReason())

    def getIterationNumber(self) -> int:
        if self.cg is not None:
            return self.cg.iterations
        assert self.ksp is not None
        return int(self.ksp.getIterationNumber())

    def getConvergenceHistory(self) -> Any:
        if self.cg is not None:
            return self.cg.history
        assert self.ksp is not None
        return self.ksp.getConvergenceHistory()

    def getType(self) -> str:
        return "cg"

    def getPC(self) -> Any:
        name = "eisenstat-slabs" if self.order == "separators" else "eisenstat-block-jacobi"
        if self.comm.size == 1:
            name = "eisenstat"
        return NamedPC(name + ("+compiled" if self.sweeps.kernel is not None else ""))

    def free(self) -> None:
        """Free the PETSc objects (not ``destroy``: PETSc calls a shell context's ``destroy(mat)`` itself)."""
        if self.ksp is not None and self.shell is not None:
            self.ksp.destroy()
            self.shell.setPythonContext(None)
            self.shell.destroy()
        if self.cg is not None:
            self.cg.destroy()
        for vec in (self.bhat, self.yhat, self.bhat_work):  # w_work and d belong to the problem
            if vec is not None:
                vec.destroy()
        self.sweeps.destroy()


class _DiagonalScaling:
    """The preconditioner of the transformed system: ``D`` (see :class:`_SlabEisenstat`)."""

    def __init__(self, owner: _SlabEisenstat) -> None:
        self.owner = owner

    def apply(self, pc: Any, x: PETSc.Vec, y: PETSc.Vec) -> None:
        y.pointwiseMult(x, self.owner.d)


class VoxelFieldWriter:
    """c at the output times as VTK image data, one ``c_<k>.vti`` per time plus ``c.pvd`` (ParaView).

    Each rank writes its own slab into the one file by MPI-IO (no gather,
    :func:`~fem_anode.io.vti.write_vti`), on the image grid (origin 0, spacing the voxel size in
    metres, x along the image's last axis), the arrays the problem gives (``vti_arrays``): finite
    volumes cell data ``c`` (float32, mol/m^3, NaN outside the transporting phase); P1 on the
    voxels point data ``c`` on the nodes and cell data ``transporting``
    (:class:`~fem_anode.fem.diffusion.voxel_elements.VoxelP1Problem`).
    """

    def __init__(self, directory: Path, problem: Any) -> None:
        self.directory = Path(directory)
        self.problem = problem
        self.times: list[float] = []

    def write(self, t: float, field: Any) -> None:
        """Write ``field`` (mol/m^3) as the output at time ``t`` (s). Collective."""
        from fem_anode.io.vti import write_pvd, write_vti

        problem = self.problem
        dims, spacing = problem.vti_grid()
        write_vti(problem.comm, self.directory / f"c_{len(self.times)}.vti", dims, spacing, problem.vti_arrays(field))
        self.times.append(t)
        if problem.comm.rank == 0:
            write_pvd(self.directory / "c.pvd", [(time_, f"c_{k}.vti") for k, time_ in enumerate(self.times)])

    def close(self) -> None:
        """Nothing to flush (every write is complete)."""


def open_fv_image(settings: DiffusionSettings, comm: MPI.Comm) -> tuple[Any, dict[int, int]]:
    """The image of ``geometry.image`` opened by layers, its label counts checked, and the memory
    check for a finite-volume run (collective)."""
    from fem_anode.fem.diffusion.geometry import check_phases, label_counts
    from fem_anode.io.images import open_image_layers
    from fem_anode.resources import check_memory

    geometry = settings.geometry
    image = open_image_layers(geometry.image, voxel_size=geometry.pixel_size, phases=geometry.phases)  # type: ignore[arg-type]  # callers pass settings with an image
    counts = label_counts(image, comm)
    check_phases(image, counts, settings)
    unknowns = counts[image.require_phases()[geometry.transport_phase]]
    check_memory(
        estimate_fv_memory(unknowns, settings, comm.size), comm, hint="crop or coarsen the image, or run on more nodes"
    )
    return image, counts
