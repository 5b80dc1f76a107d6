r"""Finite-element (nodal, trilinear Q1) tortuosity factor of a phase on its voxel mesh.

This is ``method="fe"`` of :func:`fem_anode.fem.tortuosity.tortuosity_factor`; the default there
is the cell-centred finite-volume value of :mod:`.fv` (TauFactor's). The phase of a 3D label
image (axes ``(z, y, x)``) is meshed with one trilinear hexahedron per voxel and the steady
diffusion problem

.. math::

    \nabla\cdot(D\nabla c) = 0 \ \text{in the phase},\qquad c = 1 \ \text{on } z = 0
    \ (\text{mesh group ``top``}),\qquad c = 0 \ \text{on } z = L_z\ (\text{``bottom``}),

with no flux on every other boundary (the phase's interfaces and the box sides) is solved for
the P1 (trilinear) finite-element field with CG + SSOR in fused passes of the compiled
grid-stencil kernel of the P1 diffusion model (no matrix assembled; on several ranks one global
SSOR in the slab-face order), or on request on the assembled matrix of the free nodes with
algebraic multigrid (hypre BoomerAMG with aggressive coarsening, PETSc GAMG). From the total flux
``Q`` through the phase,

.. math::

    D_\mathrm{eff} = \frac{Q\, L_z}{A\, \Delta c},\qquad
    \tau = \frac{\varepsilon\, D}{D_\mathrm{eff}},

with ``A = L_x L_y`` the whole cross-section and ``eps`` the volume fraction of the phase (all its
voxels, as TauFactor and PoreSpy define it). ``tau`` and ``D_eff / D`` are dimensionless; the
solve is scale-free and lengths (voxel sizes, also anisotropic) are in metres.

Voxel-geometry conventions (the same as the finite-volume peers TauFactor and PoreSpy):

* voxels of the phase are connected through shared faces only. Two voxels that touch along an
  edge or at a corner only get separate mesh nodes there, so no flux leaks through contacts of
  zero area;
* only voxels of face-connected clusters that touch both the ``z = 0`` and the ``z = end``
  faces carry flux; the others (isolated or dead-end-free clusters touching one face only) are
  removed before meshing, so they cannot make the matrix singular. They still count in ``eps``;
* a phase with no cluster spanning z gives ``tau = inf`` (``D_eff = 0``) and a note, no solve.

The flux is the consistent (reaction) flux ``Q = integral D |grad c|^2 dx / Delta c``, which for
the Galerkin solution equals the sum of the discrete residual over the ``top`` nodes; the
volume-averaged-gradient flux is reported as a check. For an approximate solution ``c_h + e`` the
energy flux is ``Q + |e|_A^2``: its error is quadratic in the solver error (and always positive),
so a moderate CG tolerance gives tau to many digits.

Assembly and distribution. Every voxel has the same element matrix (:func:`element_stiffness`,
closed form), so a row of the stiffness matrix follows from the voxels around its node. By
default each rank reads only its slab of z layers (slabs of about equal numbers of the phase's
voxels, :func:`~fem_anode.imaging.slabs.balanced_slab`), finds the spanning clusters with the
others (:func:`~fem_anode.fem.tortuosity.clusters.spanning_clusters`), and builds its rows with
the P1 voxel operator of the diffusion model (:class:`~fem_anode.fem.voxel_p1.VoxelP1Operator`:
the face-connected copies of the nodes, numbered in grid order, z slowest, the same on any number
of ranks). For the default SSOR the rows of the node planes 0, 1, nz - 1 and nz become special
(assembled) rows of the grid stencil, those of the Dirichlet nodes identity rows, their couplings
to the Dirichlet nodes moved into the load; every other row keeps its type, so no matrix is
assembled. For multigrid :func:`free_node_system` assembles the rows of the free nodes, the
Dirichlet nodes eliminated into the load. The energy flux is summed voxel by voxel on each rank's
slab. No rank holds more than its slab and one node plane
of its neighbour. ``assembly="dolfinx"`` solves the identical FE problem through a dolfinx mesh
built on rank 0 (:func:`hex_mesh_arrays` of :func:`percolating_mask`), a P1 space and UFL forms:
the reference the tests compare with (same tau to 1e-8), for volumes one process can hold.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from fem_anode.errors import InputError, SolverError, UsageError
from fem_anode.faults import share_error
from fem_anode.fem.petsc_ksp import ksp_from_options
from fem_anode.fem.tortuosity.result import TortuosityResult
from fem_anode.io.images import VoxelImage
from fem_anode.meshing.voxel import _TABLES
from fem_anode.resources import release_freed_memory

if TYPE_CHECKING:
    from mpi4py import MPI

    from fem_anode.fem.voxel_p1 import VoxelP1Operator

__all__ = [
    "BYTES_PER_UNKNOWN",
    "RefinedLayers",
    "element_stiffness",
    "estimate_memory",
    "fe_tortuosity_factor",
    "free_node_system",
    "hex_mesh_arrays",
    "percolating_mask",
]

logger = logging.getLogger(__name__)

# Corner offsets (dz, dy, dx) of a hexahedron in dolfinx's (tensor-product, x fastest) order.
_DOLFINX_HEX = np.array([(k, j, i) for k in (0, 1) for j in (0, 1) for i in (0, 1)])


def percolating_mask(mask: np.ndarray) -> np.ndarray:
    """Voxels of face-connected clusters of ``mask`` (z, y, x) touching both z = 0 and z = end."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 3:
        raise UsageError(f"tortuosity factor needs a 3D volume, got {mask.ndim}D")
    from scipy import ndimage  # here, not at import: 30 MB per process that only some runs need

    labels, n = ndimage.label(mask, structure=ndimage.generate_binary_structure(3, 1))
    if n == 0:
        return np.zeros_like(mask)
    both = np.intersect1d(np.unique(labels[0]), np.unique(labels[-1]))
    both = both[both > 0]
    return np.isin(labels, both)


def hex_mesh_arrays(mask: np.ndarray, spacing: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Hexahedral mesh of the voxels of ``mask`` with face-only connectivity.

    Args:
        mask: boolean (z, y, x) volume.
        spacing: voxel edge lengths (z, y, x) in any length unit.

    Returns:
        ``(points, cells)``: node coordinates (n, 3) as (x, y, z) in the unit of ``spacing``
        and cell nodes (m, 8) in dolfinx's hexahedron order. Nodes where voxels of the mask
        meet only along an edge or at a corner are duplicated, one per face-connected group.
    """
    mask = np.asarray(mask, dtype=bool)
    padded = np.pad(mask, 1).astype(np.uint8)
    nz, ny, nx = mask.shape
    # Occupancy pattern of the 2x2x2 voxel block around every node (K, J, I): bit dz*4+dy*2+dx
    # for voxel (K-1+dz, J-1+dy, I-1+dx) = padded[K+dz, J+dy, I+dx].
    config = np.zeros((nz + 1, ny + 1, nx + 1), dtype=np.uint8)
    for dz in (0, 1):
        for dy in (0, 1):
            for dx in (0, 1):
                shifted = padded[dz : dz + nz + 1, dy : dy + ny + 1, dx : dx + nx + 1] << (dz * 4 + dy * 2 + dx)
                config |= shifted.astype(config.dtype, copy=False)
    voxels = np.argwhere(mask)
    node_shape = (nz + 1, ny + 1, nx + 1)
    keys = np.empty((voxels.shape[0], 8), dtype=np.int64)
    for corner, (a, b, c) in enumerate(_DOLFINX_HEX):
        node = (voxels[:, 0] + a, voxels[:, 1] + b, voxels[:, 2] + c)
        flat = np.ravel_multi_index(node, node_shape)
        position = (1 - a) * 4 + (1 - b) * 2 + (1 - c)  # this voxel's place in the node's block
        component = _TABLES[3][0][config[node], position]  # its face-connected group's ordinal at the node
        keys[:, corner] = flat * 8 + component
    # Number the used keys in increasing order (np.unique without its sort: O(number of keys)).
    used = np.zeros(8 * config.size, dtype=bool)
    used[keys] = True
    unique = np.flatnonzero(used)
    number = np.cumsum(used, dtype=np.int32 if used.size < 2**31 else np.int64) - 1
    cells = number[keys]
    grid = np.stack(np.unravel_index(unique // 8, node_shape), axis=1).astype(np.float64)
    points = (grid * np.asarray(spacing, dtype=np.float64))[:, ::-1].copy()  # (x, y, z)
    return points, cells


def element_stiffness(spacing: tuple[float, float, float]) -> np.ndarray:
    """Exact stiffness matrix ``int grad N_a . grad N_b dx`` of a trilinear box element.

    Args:
        spacing: edge lengths (z, y, x) of the box.

    Returns:
        (8, 8) matrix in dolfinx's hexahedron corner order (corner ``a = 4 dz + 2 dy + dx``), the
        tensor product of the 1D P1 stiffness ``[[1, -1], [-1, 1]] / h`` and mass
        ``[[2, 1], [1, 2]] h / 6`` matrices.
    """
    hz, hy, hx = (float(h) for h in spacing)

    def stiff(h: float) -> np.ndarray:
        return np.array([[1.0, -1.0], [-1.0, 1.0]]) / h

    def mass(h: float) -> np.ndarray:
        return np.array([[2.0, 1.0], [1.0, 2.0]]) * h / 6.0

    return (
        np.kron(mass(hz), np.kron(mass(hy), stiff(hx)))
        + np.kron(mass(hz), np.kron(stiff(hy), mass(hx)))
        + np.kron(stiff(hz), np.kron(mass(hy), mass(hx)))
    )


def _solver_options(rtol: float, max_it: int, petsc_options: dict[str, Any]) -> dict[str, Any]:
    """CG + SSOR in fused passes of the compiled grid-stencil kernel by default (``{"pc_type":
    "ssor"}``, relaxation ``ssor_omega`` 1.6; no matrix, about 200 B per unknown); ``{"pc_type":
    "hypre"}`` assembles the matrix for BoomerAMG with aggressive coarsening, ``{"pc_type":
    "gamg"}`` for PETSc GAMG.

    BoomerAMG (PMIS, ext+i, P_max 4, strong threshold 0.5, one level of aggressive coarsening,
    forward/backward hybrid SOR without C/F ordering) sets up several times faster than GAMG on
    the 21-point stencil for the same iterations, but needs about 1.1 kB per unknown (measurements:
    docs/benchmarks.md, "The FE option").
    """
    options: dict[str, Any] = {"ksp_type": "cg", "ksp_rtol": rtol, "ksp_atol": 0.0, "ksp_max_it": max_it}
    if petsc_options.get("pc_type", "ssor") == "ssor":
        unknown = set(petsc_options) - {"pc_type", "ssor_omega"}
        if unknown:
            raise UsageError(
                f"the FE tortuosity factor's default SSOR takes only ssor_omega, got {', '.join(sorted(unknown))}; "
                "PETSc options need pc_type 'hypre' or 'gamg'"
            )
        omega = float(petsc_options.get("ssor_omega", 1.6))
        if not 0 < omega < 2:
            raise UsageError(f"ssor_omega must lie in (0, 2), got {omega}")
        return {**options, "pc_type": "ssor", "ssor_omega": omega}
    if petsc_options["pc_type"] == "hypre":
        options.update(
            {
                "pc_type": "hypre",
                "pc_hypre_type": "boomeramg",
                "pc_hypre_boomeramg_coarsen_type": "PMIS",
                "pc_hypre_boomeramg_interp_type": "ext+i",
                "pc_hypre_boomeramg_P_max": 4,
                "pc_hypre_boomeramg_strong_threshold": 0.5,
                "pc_hypre_boomeramg_agg_nl": 1,
                # one forward sweep down, one backward sweep up: a symmetric V-cycle at half the
                # smoothing cost of the default symmetric sweeps, same iteration count here
                "pc_hypre_boomeramg_relax_type_down": "SOR/Jacobi",
                "pc_hypre_boomeramg_relax_type_up": "backward-SOR/Jacobi",
                "pc_hypre_boomeramg_no_CF": True,  # plain (not C/F-ordered) sweeps: 20 % faster here
            }
        )
    return {**options, **petsc_options}


_ASSEMBLY = ("voxel", "dolfinx")

#: Peak memory per FE unknown (node copy), the libraries aside, of the default solve (CG + SSOR on
#: the grid stencil: measured 175 B at 200^3, 40 % pore blob, 4.3 M unknowns) and with the assembled
#: matrix and BoomerAMG (1,140 B on one rank, 1,190 B summed over two, three quarters of it
#: BoomerAMG's set-up; docs/benchmarks.md, "The FE option"); rounded up.
BYTES_PER_UNKNOWN = {"ssor": 250.0, "assembled": 1300.0}


def estimate_memory(image: Any, phase: str, comm: Any = None, *, refine: int = 1, pc_type: str = "ssor") -> Any:
    """Estimated peak memory (:class:`~fem_anode.resources.MemoryEstimate`, all ranks) of the FE
    tortuosity factor of ``phase``, with every voxel split into ``refine^3``, solved with
    ``pc_type`` (``"ssor"``, the default, or an assembled matrix for ``"hypre"``/``"gamg"``).

    The unknowns are counted exactly for the whole phase (the face-connected copies of every node,
    an upper bound of those of its spanning clusters), slab by slab: each rank reads only its
    layers and one more, a few at a time. ``refine^3`` times that for the split voxels. Collective
    when ``comm`` is given.
    """
    from fem_anode.fem.tortuosity.clusters import slab_bounds
    from fem_anode.meshing.voxel import SlabNumbering
    from fem_anode.resources import FE_BASE_PER_RANK, MemoryEstimate

    value = image.require_phases()[phase]
    nz, ny, nx = (int(n) for n in image.shape)
    ranks = comm.size if comm is not None else 1
    slab = slab_bounds(comm, nz) if comm is not None else None
    z0, z1 = (slab.z0, slab.z1) if slab is not None else (0, nz)
    unknowns = 0
    for a in range(z0, z1, 32):  # the node copies of the voxel mesh's numbering, 32 layers at a time
        b = min(a + 32, z1)
        kept = np.zeros((b - a + 2, ny, nx), bool)  # layers a - 1 .. b, False outside the image
        lo, hi = max(a - 1, 0), min(b + 1, nz)
        kept[lo - (a - 1) : hi - (a - 1)] = np.asarray(image.array[lo:hi]) == value
        unknowns += SlabNumbering(kept, owns_last_plane=b == nz).owned
    if comm is not None:
        unknowns = comm.allreduce(unknowns)
    unknowns *= refine**3
    per_unknown = BYTES_PER_UNKNOWN["ssor" if pc_type == "ssor" else "assembled"]
    total = FE_BASE_PER_RANK * ranks + per_unknown * unknowns
    return MemoryEstimate(f"FE tortuosity factor of {phase!r}", total, {"unknowns": float(unknowns)})


class RefinedLayers:
    """A label image with every voxel split into ``k^3`` equal voxels, read by layers (each layer of
    the fine image is a coarse layer repeated in y and x): nothing is held beyond the layers read.

    Attributes:
        shape: the fine image's shape ``(k nz, k ny, k nx)``.
    """

    def __init__(self, image: Any, k: int) -> None:
        self.image, self.k = image, int(k)
        self.shape = tuple(self.k * int(n) for n in image.shape)

    def read_layers(self, start: int, stop: int) -> np.ndarray:
        """Fine layers ``start .. stop - 1``."""
        k = self.k
        start, stop = max(int(start), 0), min(int(stop), self.shape[0])
        if stop <= start:
            return np.zeros((0, *self.shape[1:]), np.uint8)
        coarse = np.asarray(self.image.read_layers(start // k, (stop - 1) // k + 1))
        fine = coarse.repeat(k, axis=0)[start - (start // k) * k :][: stop - start]
        return fine.repeat(k, axis=1).repeat(k, axis=2)


def fe_tortuosity_factor(
    image: VoxelImage,
    phase: str,
    comm: Any = None,
    *,
    rtol: float = 1e-5,
    max_iterations: int = 20000,
    petsc_options: dict[str, Any] | None = None,
    assembly: str = "voxel",
    refine: int = 1,
) -> TortuosityResult:
    """FE (Q1 nodal) tortuosity factor of ``phase`` along z (axis 0) of a 3D label image (collective).

    Args:
        image: 3D label image with voxel size (m) and phase map, the same on every rank: with
            ``assembly="voxel"`` each rank reads only its slab of z layers (``image.read_layers``; a
            memory-mapped array keeps the rest on disk); ``"dolfinx"`` uses rank 0's array.
        phase: name of the phase diffusion goes through (e.g. ``"pore"``).
        comm: MPI communicator (default ``MPI.COMM_WORLD``).
        rtol: relative (preconditioned) residual tolerance of CG. The energy flux converges
            quadratically in the solution error: on a 200^3 blob volume the default SSOR gives tau
            to 4.5e-6 (relative) at 1e-5 (101 iterations), 2e-8 at 1e-6 (169), 3e-10 at 1e-7; with
            BoomerAMG 1e-5 gives tau to at most 2e-8 in 7-9 iterations (five random volumes,
            40^3-100^3).
        max_iterations: CG iteration limit.
        petsc_options: the solver: ``{}`` or ``{"pc_type": "ssor"}`` (default): CG + SSOR in
            fused passes of the compiled grid-stencil kernel, no matrix assembled (about 200 B per
            unknown; ``ssor_omega``, default 1.6); ``{"pc_type": "hypre"}``: the matrix assembled,
            CG + BoomerAMG (about 1.1 kB per unknown; the fallback without a C compiler and for
            ``assembly="dolfinx"``); ``{"pc_type": "gamg"}``: PETSc GAMG. With ``"hypre"`` or
            ``"gamg"`` other PETSc options are merged over the defaults.
        assembly: ``"voxel"`` (default): the exact trilinear-hexahedron stiffness built on each
            rank's slab of the image from the voxels around every node
            (:class:`~fem_anode.fem.voxel_p1.VoxelP1Operator`, no mesh, no rank holding more than its
            slab); ``"dolfinx"``: the same FE problem through a dolfinx mesh built on rank 0, a
            function space and compiled forms (the reference for small volumes; 3-5x slower).
        refine: split every voxel into ``refine^3`` (``"voxel"``: read layer by layer, never
            held whole).

    Returns:
        The result, identical on every rank.

    Raises:
        UsageError: not 3D, unknown phase, bad tolerance, assembly or refinement; a slab too large
            for 32-bit node positions.
        SolverError: CG did not converge or the solution is not finite.
    """
    from mpi4py import MPI

    comm = MPI.COMM_WORLD if comm is None else comm
    start = time.perf_counter()
    if not 0 < rtol < 1:
        raise UsageError(f"rtol must lie in (0, 1), got {rtol}")
    if assembly not in _ASSEMBLY:
        raise UsageError(f"assembly must be one of {', '.join(_ASSEMBLY)}, got {assembly!r}")
    if image.ndim != 3:
        raise UsageError(f"tortuosity factor needs a 3D volume, {image.source} is {image.ndim}D")
    if not (isinstance(refine, int) and refine >= 1):
        raise UsageError(f"refine must be an integer >= 1, got {refine!r}")
    phases = image.require_phases()
    if phase not in phases:
        raise UsageError(f"phase {phase!r} is not in the phase map ({', '.join(phases)})")
    spacing = tuple(float(s) / refine for s in image.require_voxel_size())
    h0 = min(spacing)
    shape = tuple(refine * int(n) for n in image.shape)
    geometry = {
        "extent": [n * s / h0 for n, s in zip(shape, spacing)],  # (z, y, x), units of h0
        "spacing": [s / h0 for s in spacing],
    }
    options = _solver_options(rtol, max_iterations, petsc_options or {})
    if options["pc_type"] == "ssor" and (assembly == "dolfinx" or not _sweeps_available(comm)):
        given = {k: v for k, v in (petsc_options or {}).items() if k != "ssor_omega"}
        options = _solver_options(rtol, max_iterations, {**given, "pc_type": "hypre"})
    if assembly == "dolfinx":
        out = _solve_dolfinx(comm, image, phase, geometry, options, refine)
    else:
        layers = image if refine == 1 else RefinedLayers(image, refine)
        out = _solve_on_slabs(comm, layers, phases[phase], phase, geometry, options)
    timings = {key: comm.allreduce(value, op=MPI.MAX) for key, value in sorted(out["timings"].items())}
    timings["total"] = time.perf_counter() - start
    if out["perc"] == 0:
        note = (
            f"phase {phase!r} does not percolate along z: no face-connected cluster touches both the z = 0 and the "
            "z = end faces, so D_eff = 0 and tau = inf"
        )
        logger.info("%s", note)
        return TortuosityResult(
            phase, float("inf"), 0.0, out["eps"], 0.0, 0, 0, 0, 0.0, comm.size, timings, note, method="fe"
        )
    flux_energy, flux_gradient = out["flux_energy"], out["flux_gradient"]
    lz, ly, lx = geometry["extent"]
    relative = flux_energy * lz / (lx * ly)  # D_eff / D
    tau = out["eps"] / relative if relative > 0 else float("inf")
    check = abs(flux_energy - flux_gradient) / flux_energy if flux_energy > 0 else 0.0
    logger.info(
        "FE tortuosity factor of %s along z: tau = %.6g (eps %.4g, D_eff/D %.4g), %d cells, %d dofs, "
        "%d CG iterations, %.2f s",
        phase,
        tau,
        out["eps"],
        relative,
        out["cells"],
        out["dofs"],
        out["iterations"],
        timings["total"],
    )
    return TortuosityResult(
        phase=phase,
        tau=float(tau),
        relative_diffusivity=float(relative),
        volume_fraction=out["eps"],
        percolating_fraction=out["perc"],
        cells=int(out["cells"]),
        dofs=int(out["dofs"]),
        iterations=int(out["iterations"]),
        flux_check_rel=float(check),
        ranks=comm.size,
        timings_s=timings,
        method="fe",
    )


def _sweeps_available(comm: Any) -> bool:
    """Whether the compiled sweep kernels load on every rank (collective); else BoomerAMG, logged."""
    from fem_anode.fem.voxel_sweeps import SweepKernelUnavailable, load_sweep_library

    try:
        load_sweep_library(comm)
    except SweepKernelUnavailable as exc:
        logger.warning("FE tortuosity factor: no compiled SSOR sweeps (%s); CG + BoomerAMG instead", exc)
        return False
    return True


def _check_solution(ksp: Any, phase: str, values: np.ndarray) -> int:
    """CG iterations of ``ksp``; raises SolverError if it diverged or ``values`` are not finite."""
    reason, iterations = ksp.getConvergedReason(), ksp.getIterationNumber()
    if reason < 0:
        raise SolverError(
            f"tortuosity solve for {phase!r} did not converge (PETSc reason {reason}, {iterations} iterations)"
        )
    if not np.isfinite(values).all():
        raise SolverError(f"tortuosity solve for {phase!r} gave a non-finite concentration")
    return int(iterations)


def free_node_system(op: VoxelP1Operator, n_top: int, n_bottom: int) -> tuple[np.ndarray, ...]:
    """This rank's rows of the stiffness ``K`` of ``op`` restricted to the free nodes, and the load.

    The dofs are numbered in grid order, z slowest, so the ``z = 0`` nodes (``c = 1``) are the
    first ``n_top`` global dofs and the ``z = end`` nodes (``c = 0``) the last ``n_bottom``; their
    columns are eliminated into the load ``b = -K[free, top] 1``. Entries of round-off size (the
    edge entries of a cubic voxel vanish exactly) are dropped. Built block by block of rows.

    Returns:
        ``(free, indptr, columns, values, load)``: ``free`` the mask of this rank's rows that are
        free; the CSR rows of those rows (columns are global free-node numbers, i.e. global dof
        minus ``n_top``, as PETSc's index type); the load of those rows.
    """
    from petsc4py import PETSc

    bottom = op.ndofs - n_bottom
    rows_global = op.offset + np.arange(op.n, dtype=np.int64)
    free = (rows_global >= n_top) & (rows_global < bottom)
    drop = 1e-12 * float(np.abs(op.K_e).max())
    capacity = op.nonzeros
    columns = np.empty(capacity, PETSc.IntType)
    values = np.empty(capacity)
    counts = np.zeros(op.n, np.int64)
    load = np.zeros(op.n)
    filled = 0
    for a, indptr, cols, k, _ in op.csr_blocks():
        n_rows = indptr.size - 1
        rows = np.repeat(np.arange(n_rows), np.diff(indptr))  # (in the block)
        top = cols < n_top
        if top.any():
            load[a : a + n_rows] -= np.bincount(rows[top], weights=k[top], minlength=n_rows)
        keep = (cols >= n_top) & (cols < bottom) & (np.abs(k) > drop)
        if not free[a : a + n_rows].all():
            keep &= free[a : a + n_rows][rows]
        kept = int(np.count_nonzero(keep))
        columns[filled : filled + kept] = cols[keep] - n_top
        values[filled : filled + kept] = k[keep]
        counts[a : a + n_rows] = np.bincount(rows[keep], minlength=n_rows)
        filled += kept
    indptr_free = np.zeros(int(np.count_nonzero(free)) + 1, PETSc.IntType)
    np.cumsum(counts[free], out=indptr_free[1:])
    return free, indptr_free, columns[:filled], values[:filled], load[free]


def _active_ranks(comm: Any, layers: int) -> Any:
    """The ranks that get a slab: all if every rank can have two layers, else the first
    ``layers // 2`` (at least one; the others wait for the result). ``None`` on an idle rank."""
    from mpi4py import MPI

    active = max(1, min(comm.size, layers // 2))
    if active == comm.size:
        return comm
    sub = comm.Split(0 if comm.rank < active else MPI.UNDEFINED, comm.rank)
    return None if sub == MPI.COMM_NULL else sub


def _solve_on_slabs(
    comm: Any, image: Any, value: int, phase: str, geometry: dict[str, Any], options: dict[str, Any]
) -> dict[str, Any]:
    """The FE solve distributed by z slabs (see :func:`fe_tortuosity_factor`); the same result on every rank."""
    sub = _active_ranks(comm, int(image.shape[0]))
    out: dict[str, Any] | None = None
    error: Exception | None = None
    if sub is not None:
        try:
            out = _solve_slab(sub, image, value, phase, geometry, options)
        except (SolverError, InputError, UsageError) as err:  # raised the same on every active rank
            error = err
        # (a sub-communicator is not freed here: the solver's PETSc objects may outlive this call)
    if sub is comm:
        if error is not None:
            raise error
        return cast("dict[str, Any]", out)
    share_error(comm, error)
    return cast("dict[str, Any]", comm.bcast(out, root=0))


def _solve_slab(
    comm: Any, image: Any, value: int, phase: str, geometry: dict[str, Any], options: dict[str, Any]
) -> dict[str, Any]:
    """Every rank of ``comm`` a slab of at least two layers (one rank: any)."""
    from mpi4py import MPI
    from petsc4py import PETSc

    from fem_anode.fem.tortuosity.clusters import exchange_layers, spanning_clusters
    from fem_anode.fem.voxel_p1 import TRANSPORT, VoxelP1Operator
    from fem_anode.imaging.slabs import balanced_slab

    t0 = time.perf_counter()
    nz, ny, nx = (int(n) for n in image.shape)
    slab = balanced_slab(comm, image, value)
    read = image.read_layers if hasattr(image, "read_layers") else lambda a, b: image[a:b]
    mask = np.asarray(read(slab.z0, slab.z1)) == value
    solved = spanning_clusters(comm, slab, mask)
    counts = comm.allgather((int(np.count_nonzero(mask)), int(np.count_nonzero(solved))))
    del mask
    out: dict[str, Any] = {
        "eps": sum(c for c, _ in counts) / (nz * ny * nx),
        "perc": sum(p for _, p in counts) / (nz * ny * nx),
        "cells": sum(p for _, p in counts),
    }
    timings = {"percolation": time.perf_counter() - t0}
    out["timings"] = timings
    if out["perc"] == 0:
        return out
    # The classes of layers z0 - 2 .. z1: the spanning clusters transport, nothing else exists.
    classes = np.zeros((slab.layers + 3, ny, nx), np.uint8)
    classes[2:-1] = solved.view(np.uint8) * TRANSPORT
    below, above = exchange_layers(comm, slab, solved[:2], solved[-2:])
    if below is not None:
        classes[:2] = below.view(np.uint8) * TRANSPORT
    if above is not None:
        classes[-1] = above[0].view(np.uint8) * TRANSPORT
    del solved, below, above
    try:
        op = VoxelP1Operator(comm, classes, slab.z0, slab.z1, nz, np.array(geometry["spacing"]), 1.0, 0.0, 0.0)
    except ValueError as err:  # a slab too large for 32-bit positions: more ranks
        raise UsageError(f"{getattr(image, 'source', 'image')}: {err}") from err
    del classes
    node_z = op.node_layers()
    n_top = int(comm.allreduce(int(np.count_nonzero(node_z == 0))))
    n_bottom = int(comm.allreduce(int(np.count_nonzero(node_z == nz))))
    if options.get("pc_type") == "ssor":
        c, iterations, more = _solve_on_stencil(comm, op, node_z, nz, n_top, n_bottom, phase, options)
        timings["assembly"] = more.pop("assembly") - t0 - timings["percolation"]
        timings.update(more)
        return _finish_slab(out, op, c, iterations, geometry, timings)
    free, indptr, columns, values, load = free_node_system(op, n_top, n_bottom)
    op.release_rows()
    n_local = load.size
    n_free = op.ndofs - n_top - n_bottom
    c = np.where(node_z == 0, 1.0, 0.0)  # the solution on this rank's dofs, boundary values set
    guess = 1.0 - node_z[free] / nz  # exact for straight channels
    del node_z
    timings["assembly"] = time.perf_counter() - t0 - timings["percolation"]
    iterations = 0
    if n_free > 0:
        A = PETSc.Mat().createAIJ(size=((n_local, n_free), (n_local, n_free)), csr=(indptr, columns, values), comm=comm)
        A.assemble()
        A.setOption(PETSc.Mat.Option.SPD, True)
        del indptr, columns, values
        release_freed_memory()
        b = PETSc.Vec().createWithArray(load, size=(n_local, n_free), comm=comm)
        x = PETSc.Vec().createWithArray(guess, size=(n_local, n_free), comm=comm)
        ksp = ksp_from_options(comm, A, options, "tortuosity")
        try:
            t1 = time.perf_counter()
            ksp.setUp()
            t2 = time.perf_counter()
            ksp.solve(b, x)
            t3 = time.perf_counter()
            timings.update({"pc_setup": t2 - t1, "cg": t3 - t2, "solve": t3 - t1})
            ok = comm.allreduce(bool(np.isfinite(guess).all()), op=MPI.LAND)
            iterations = _check_solution(ksp, phase, guess if ok else np.array([np.nan]))
        finally:
            ksp.destroy()
            A.destroy()
            b.destroy()
            x.destroy()
        c[free] = guess  # the solution (x was made on the guess's array)
    return _finish_slab(out, op, c, iterations, geometry, timings)


def _finish_slab(
    out: dict[str, Any],
    op: VoxelP1Operator,
    c: np.ndarray,
    iterations: int,
    geometry: dict[str, Any],
    timings: dict[str, float],
) -> dict[str, Any]:
    """The fluxes of the solution ``c`` (this rank's dofs, boundary values included) into ``out``."""
    t4 = time.perf_counter()
    energy, gradient = _slab_fluxes(op, c)
    sums = op.comm.allgather((energy, gradient))  # summed in rank order: the same on every rank
    lz = geometry["extent"][0]
    spacing = geometry["spacing"]
    out["flux_energy"] = float(sum(e for e, _ in sums))
    out["flux_gradient"] = -float(sum(g for _, g in sums)) * spacing[1] * spacing[2] / 4.0 / lz
    out["dofs"] = op.ndofs
    out["iterations"] = iterations
    timings["flux"] = time.perf_counter() - t4
    return out


def _solve_on_stencil(
    comm: Any,
    op: VoxelP1Operator,
    node_z: np.ndarray,
    nz: int,
    n_top: int,
    n_bottom: int,
    phase: str,
    options: dict[str, Any],
) -> tuple[np.ndarray, int, dict[str, float]]:
    """CG with SSOR (Eisenstat's trick, fused passes of the compiled grid-stencil kernel of the P1
    diffusion model; no matrix assembled) on the stiffness of ``op`` with the Dirichlet rows made
    identity rows: the rows of node planes 0, 1, nz - 1 and nz become special rows (assembled, their
    couplings to the Dirichlet nodes moved into the load), every other row keeps its type.

    Returns:
        ``(c, iterations, timings)``: ``c`` on this rank's dofs, boundary values included;
        ``timings["assembly"]`` is the time the set-up ended (``perf_counter``).
    """
    from mpi4py import MPI
    from petsc4py import PETSc

    from fem_anode.fem.diffusion.transient import FusedEisenstatSolver
    from fem_anode.fem.grid_stencil import SPECIAL, GridStencilKernel
    from fem_anode.fem.slab_sweeps import OffRankCouplings
    from fem_anode.fem.voxel_sweeps import load_sweep_library

    library = load_sweep_library(comm)
    old_special, off = op._rows_now()
    # The rows of node planes 0, 1, nz - 1 and nz: the first and last rows (grid order, z slowest).
    lo, hi = (int(i) for i in np.searchsorted(node_z, (2, nz - 1)))
    ranges = [(0, op.n)] if lo >= hi else [(0, lo), (hi, op.n)]
    dirichlet = (node_z == 0) | (node_z == nz)
    bottom = op.ndofs - n_bottom
    load = np.zeros(op.n)
    parts: list[tuple[np.ndarray, ...]] = []
    for start, stop in ranges:
        for a, indptr, cols, k, m in op.csr_blocks(start=start, stop=stop):
            rows = np.repeat(np.arange(a, a + indptr.size - 1), np.diff(indptr))
            top = (cols < n_top) & ~dirichlet[rows]
            np.subtract.at(load, rows[top], k[top])
            local = (cols >= op.offset) & (cols < op.offset + op.n)  # (off-rank couplings stay in ``off``)
            keep = local & np.where(dirichlet[rows], cols == op.offset + rows, (cols >= n_top) & (cols < bottom))
            rows, cols, k, m = rows[keep], cols[keep], k[keep], m[keep]
            fixed = dirichlet[rows]  # identity rows for the Dirichlet nodes
            parts.append((rows, (cols - op.offset).astype(np.int32), np.where(fixed, 1.0, k), np.where(fixed, 0.0, m)))
    # The other special rows (split nodes) as they are: none of them couples to a Dirichlet node.
    s_rows, s_indptr, s_cols, s_k, s_m = old_special
    outside = np.ones(s_rows.size, bool)
    for start, stop in ranges:
        outside &= (s_rows < start) | (s_rows >= stop)
    counts = np.diff(s_indptr)
    pick = np.repeat(outside, counts)
    parts.append((np.repeat(s_rows, counts)[pick], s_cols[pick], s_k[pick], s_m[pick]))
    rows, columns, k_values, m_values = (np.concatenate(column) for column in zip(*parts))
    order = np.argsort(rows, kind="stable")  # rows ascending, each row's columns stay ascending
    rows, columns, k_values, m_values = rows[order], columns[order], k_values[order], m_values[order]
    special_rows, counts = np.unique(rows, return_counts=True)
    indptr = np.zeros(special_rows.size + 1, np.int64)
    np.cumsum(counts, out=indptr[1:])
    special = (special_rows, indptr, columns, k_values, m_values)
    del parts, rows, order
    row_type = op.row_type.copy()
    row_type[special_rows] = SPECIAL
    kernel = GridStencilKernel.from_types(
        op.position, op.box, row_type, op.k_table, op.m_table, special, options["ssor_omega"], library
    )
    del special, row_type, columns, k_values, m_values

    def couplings(d: PETSc.Vec) -> OffRankCouplings:
        return OffRankCouplings.from_rows(op.n, off.rows, off.indptr, off.columns, off.k, off.m, d, kernel.library)

    solver = FusedEisenstatSolver.on_stencil(
        comm, kernel, couplings if comm.size > 1 else None, options["ksp_rtol"], options["ksp_max_it"]
    )
    solver.prepare(0.0)  # K alone (no mass term)
    op.release_rows()
    load[node_z == 0] = 1.0  # the identity rows' values
    load[node_z == nz] = 0.0
    c = 1.0 - node_z / nz  # the initial guess, exact for straight channels and on the Dirichlet nodes
    b = PETSc.Vec().createWithArray(load, size=(op.n, op.ndofs), comm=comm)
    x = PETSc.Vec().createWithArray(c, size=(op.n, op.ndofs), comm=comm)
    t1 = time.perf_counter()
    try:
        solver.solve(b, x)
    finally:
        b.destroy()
        x.destroy()
    t2 = time.perf_counter()
    ok = comm.allreduce(bool(np.isfinite(c).all()), op=MPI.LAND)
    iterations = _check_solution(solver, phase, c if ok else np.array([np.nan]))
    return c, iterations, {"assembly": t1, "pc_setup": 0.0, "cg": t2 - t1, "solve": t2 - t1}


def _slab_fluxes(op: VoxelP1Operator, c: np.ndarray) -> tuple[float, float]:
    """This rank's voxels' shares of the energy flux ``sum_e c_e^T K_e c_e`` (``Q / D`` for
    ``Delta c = 1``) and of ``sum_e (sum of c over the upper corners - over the lower corners)``
    (``4 / (h_x h_y)`` times the integral of ``dc/dz``), layer by layer. Collective."""
    values = op.with_upper_plane(c)
    energy = gradient = 0.0
    for z in range(op.z0, op.z1):
        corners = np.stack([op.corner_dofs(z, corner) for corner in _DOLFINX_HEX], axis=-1)
        corners = corners[corners[..., 0] >= 0]  # (transporting voxels of the layer, 8)
        ce = values[corners]
        energy += float(np.einsum("ij,ij->", ce @ op.K_e, ce))  # (15x faster than one three-operand einsum)
        gradient += float(ce[:, 4:].sum() - ce[:, :4].sum())
    return energy, gradient


def _rank0_mesh(
    comm: MPI.Comm, image: VoxelImage, phase: str, geometry: dict[str, Any], refine: int
) -> tuple[Any, ...]:
    """Rank 0's percolating voxels (each split into ``refine^3``) as a hexahedral mesh (the dolfinx
    reference): ``(eps, perc, points, cells)``, the fractions on every rank, the arrays on rank 0
    (``None`` elsewhere)."""
    error: Exception | None = None
    fractions, points, cells = (0.0, 0.0), None, None
    if comm.rank == 0:
        try:
            mask = image.array == image.require_phases()[phase]
            mask = mask.repeat(refine, 0).repeat(refine, 1).repeat(refine, 2) if refine > 1 else mask
            solved = percolating_mask(mask)
            fractions = (float(np.count_nonzero(mask) / mask.size), float(np.count_nonzero(solved) / mask.size))
            if fractions[1] > 0:
                points, cells = hex_mesh_arrays(solved, tuple(geometry["spacing"]))
        except (UsageError, InputError) as err:
            error = err
    share_error(comm, error)  # rank 0's bad input raised on every rank
    eps, perc = comm.bcast(fractions, root=0)
    return eps, perc, points, cells


def _solve_dolfinx(
    comm: MPI.Comm, image: VoxelImage, phase: str, geometry: dict[str, Any], options: dict[str, Any], refine: int
) -> dict[str, Any]:
    """Reference assembly: the mesh built on rank 0 and distributed by dolfinx, P1 space, compiled
    forms, Dirichlet rows; fluxes by forms. The same result on every rank."""
    import basix.ufl
    import dolfinx
    import scifem
    import ufl
    from dolfinx import fem
    from dolfinx.fem import petsc as fem_petsc
    from mpi4py import MPI
    from petsc4py import PETSc

    t0 = time.perf_counter()
    eps, perc, points, cells = _rank0_mesh(comm, image, phase, geometry, refine)
    out: dict[str, Any] = {"eps": eps, "perc": perc, "timings": {"mesh": time.perf_counter() - t0}}
    if perc == 0:
        return out
    if comm.rank != 0:
        points, cells = np.zeros((0, 3)), np.zeros((0, 8), dtype=np.int64)
    element = basix.ufl.element("Lagrange", "hexahedron", 1, shape=(3,))
    from fem_anode.fem.mesh_io import cell_partitioner

    mesh = dolfinx.mesh.create_mesh(comm, cells, points, ufl.Mesh(element), partitioner=cell_partitioner("none"))
    del points, cells
    t_mesh = time.perf_counter() - t0
    lz = geometry["extent"][0]
    tdim = mesh.topology.dim
    half = 0.25 * geometry["spacing"][0]
    top = dolfinx.mesh.locate_entities_boundary(mesh, tdim - 1, lambda x: x[2] < half)
    bottom = dolfinx.mesh.locate_entities_boundary(mesh, tdim - 1, lambda x: x[2] > lz - half)
    V = fem.functionspace(mesh, ("Lagrange", 1))
    bcs = [
        fem.dirichletbc(PETSc.ScalarType(value), fem.locate_dofs_topological(V, tdim - 1, facets), V)
        for value, facets in ((1.0, top), (0.0, bottom))
    ]
    u, v = ufl.TrialFunction(V), ufl.TestFunction(V)
    a = fem.form(ufl.inner(ufl.grad(u), ufl.grad(v)) * ufl.dx)
    L = fem.form(fem.Constant(mesh, PETSc.ScalarType(0.0)) * v * ufl.dx)
    A = fem_petsc.assemble_matrix(a, bcs=bcs)
    A.assemble()
    A.setOption(PETSc.Mat.Option.SPD, True)
    b = fem_petsc.assemble_vector(L)
    fem_petsc.apply_lifting(b, [a], bcs=[bcs])
    b.ghostUpdate(addv=PETSc.InsertMode.ADD, mode=PETSc.ScatterMode.REVERSE)
    fem_petsc.set_bc(b, bcs)
    c = fem.Function(V)
    c.interpolate(lambda x: 1.0 - x[2] / lz)  # exact for straight channels
    t_assembly = time.perf_counter() - t0 - t_mesh
    ksp = ksp_from_options(comm, A, options, "tortuosity")
    try:
        t1 = time.perf_counter()
        ksp.setUp()
        t2 = time.perf_counter()
        ksp.solve(b, c.x.petsc_vec)
        t3 = time.perf_counter()
        c.x.scatter_forward()
        ok = comm.allreduce(bool(np.isfinite(c.x.array).all()), op=MPI.LAND)
        iterations = _check_solution(ksp, phase, c.x.array if ok else np.array([np.nan]))
    finally:
        ksp.destroy()
        A.destroy()
        b.destroy()

    def integral(form: ufl.Form) -> float:
        return float(scifem.assemble_scalar(form))  # summed over the mesh's ranks

    flux_energy = integral(ufl.inner(ufl.grad(c), ufl.grad(c)) * ufl.dx)  # Q / D for delta c = 1
    flux_gradient = -integral(c.dx(2) * ufl.dx) / lz
    timings = {"mesh_dolfinx": t_mesh, "assembly": t_assembly, "pc_setup": t2 - t1, "cg": t3 - t2, "solve": t3 - t1}
    timings["flux"] = time.perf_counter() - t3
    out["timings"].update(timings)
    out.update(
        {
            "flux_energy": flux_energy,
            "flux_gradient": flux_gradient,
            "cells": mesh.topology.index_map(tdim).size_global,
            "dofs": V.dofmap.index_map.size_global,
            "iterations": iterations,
        }
    )
    return out
