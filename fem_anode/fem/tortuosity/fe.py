r"""Finite-element (nodal, trilinear Q1) tortuosity factor of a phase on its voxel mesh.

This is ``method="fe"`` of :func:`fem_anode.fem.tortuosity.tortuosity_factor`; the default there
is the cell-centred finite-volume value of :mod:`.fv` (TauFactor's). The phase of a 3D label
image (axes ``(z, y, x)``) is meshed with one trilinear hexahedron per voxel and the steady
diffusion problem

.. math::

    \nabla\cdot(D\nabla c) = 0 \ \text{in the phase},\qquad c = 1 \ \text{on } z = 0
    \ (\text{mesh group ``top``}),\qquad c = 0 \ \text{on } z = L_z\ (\text{``bottom``}),

with no flux on every other boundary (the phase's interfaces and the box sides) is solved for
the P1 (trilinear) finite-element field with CG + algebraic multigrid (hypre BoomerAMG with
aggressive coarsening; PETSc GAMG on request). From the total flux ``Q`` through the phase,

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

Assembly. Every voxel has the same element matrix (:func:`element_stiffness`, closed form), so by
default the stiffness matrix of the free nodes is summed with NumPy per node and stencil slot
(:func:`reduced_system`, no sorting, no compiled forms), the Dirichlet nodes are eliminated, and
rank 0 hands each rank a slab of rows of a PETSc matrix (the nodes are numbered z slowest).
``assembly="dolfinx"`` solves the identical FE problem through a dolfinx mesh, P1 space and UFL
forms: the reference the tests compare with (same tau to 1e-8), 3-5x slower in total at 100^3
(mesh distribution, form assembly and the GAMG/BoomerAMG setup on 27-point rows).
"""

from __future__ import annotations

import itertools
import logging
import time
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from fem_anode.errors import InputError, SolverError, UsageError
from fem_anode.faults import share_error
from fem_anode.fem.petsc_ksp import ksp_from_options
from fem_anode.fem.tortuosity.result import TortuosityResult
from fem_anode.io.images import VoxelImage

if TYPE_CHECKING:
    from mpi4py import MPI

__all__ = [
    "element_stiffness",
    "fe_tortuosity_factor",
    "hex_mesh_arrays",
    "percolating_mask",
    "reduced_system",
]

logger = logging.getLogger(__name__)

# Face-connected components inside the 2 x 2 x 2 block of voxels around a mesh node: for each of
# the 256 occupancy patterns (bit p = dz*4 + dy*2 + dx) and each block position, the smallest
# position of its component. Voxels around a node share the node only if face-connected there.


def _block_components() -> np.ndarray:
    lut = np.zeros((256, 8), dtype=np.int64)
    for config in range(256):
        label = list(range(8))
        for _ in range(3):  # the block graph has diameter 3
            for p in range(8):
                if not config >> p & 1:
                    continue
                for bit in (1, 2, 4):
                    q = p ^ bit
                    if config >> q & 1:
                        m = min(label[p], label[q])
                        label[p] = label[q] = m
        lut[config] = label
    return lut


_BLOCK_COMPONENTS = _block_components()
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
        component = _BLOCK_COMPONENTS[config[node], position]
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


# Stencil slot (0..26) of corner b seen from corner a: offset (dz, dy, dx) + 1 in base 3.
_SLOT = ((_DOLFINX_HEX[None, :, :] - _DOLFINX_HEX[:, None, :] + 1) * np.array([9, 3, 1])).sum(axis=-1)
# Corner pairs along one cell edge (offset in exactly one direction).
_EDGE_PAIR = np.abs(_DOLFINX_HEX[None, :, :] - _DOLFINX_HEX[:, None, :]).sum(axis=-1) == 1


def reduced_system(
    cells: np.ndarray, n_nodes: int, n_top: int, n_bottom: int, spacing: tuple[float, float, float]
) -> tuple[Any, np.ndarray]:
    """Q1 stiffness matrix of a voxel mesh restricted to its free nodes, and the lifted load.

    The nodes of :func:`hex_mesh_arrays` are numbered by grid position, z slowest, so the
    ``z = 0`` nodes (c = 1) come first and the ``z = end`` nodes (c = 0) last; the free nodes
    are ``n_top ... n_nodes - n_bottom - 1``. Every cell has the same element matrix, so the
    matrix is summed per node and stencil slot (offset of the other node) without sorting:
    cells sharing a node and a face or body diagonal from it share the other node too. Along
    an edge that is not so (four voxels around an edge may split into two face-connected
    groups at one end only): edge entries, zero for cubic voxels, are summed as COO triplets.

    Args:
        cells: (m, 8) cell nodes in dolfinx's hexahedron order (from :func:`hex_mesh_arrays`).
        n_nodes, n_top, n_bottom: node count and the numbers of nodes on z = 0 and z = end.
        spacing: voxel edge lengths (z, y, x).

    Returns:
        ``(A, b)``: ``A`` a ``scipy.sparse.csr_matrix`` (free x free, sorted indices) and the
        load ``b = -K[free, top] @ 1`` of the boundary values.
    """
    import scipy.sparse

    ke = element_stiffness(spacing)
    nonzero = np.abs(ke) > 1e-12 * np.abs(ke).max()  # for cubic voxels the edge entries vanish exactly
    # Box symmetry: an entry depends only on the offset between the corners (one value per slot).
    slot_value = np.zeros(27)
    slot_value[_SLOT.ravel()] = ke.ravel()
    index = np.int32 if n_nodes < 2**31 else np.int64
    cells32 = np.ascontiguousarray(cells, dtype=index)
    # Slot-major (27, n) arrays: each pair writes one contiguous row, nearly in order.
    count: np.ndarray = np.zeros((27, n_nodes), dtype=np.int8)  # at most 8 cells share a node
    column: np.ndarray = np.full((27, n_nodes), -1, dtype=index)
    edges = []
    for a in range(8):
        rows: np.ndarray = cells32[:, a]
        for b in range(8):
            if not nonzero[a, b]:
                continue
            if _EDGE_PAIR[a, b]:
                edges.append((a, b))
                continue
            slot = _SLOT[a, b]
            count[slot][rows] += 1  # rows are distinct for one (a, b): no lost updates
            column[slot][rows] = cells32[:, b]
    free = slice(n_top, n_nodes - n_bottom)
    count, column = count[:, free].T, column[:, free].T  # (free, 27) views
    n_free = count.shape[0]
    top = (column >= 0) & (column < n_top)
    near = np.flatnonzero(top.any(axis=1))  # rows coupled to the c = 1 nodes
    load = np.zeros(n_free)
    load[near] = -(count[near] * slot_value * top[near]).sum(axis=1)
    keep = (count > 0) & (column >= n_top) & (column < n_nodes - n_bottom)
    indptr = np.zeros(n_free + 1, dtype=np.int64)
    np.cumsum(keep.sum(axis=1), out=indptr[1:])
    data = count[keep] * np.broadcast_to(slot_value, count.shape)[keep]
    matrix = scipy.sparse.csr_matrix((data, column[keep] - n_top, indptr), shape=(n_free, n_free))
    if edges:
        rows = np.concatenate([cells[:, a] for a, _ in edges]) - n_top
        cols = np.concatenate([cells[:, b] for _, b in edges]) - n_top
        vals = np.concatenate([np.full(cells.shape[0], ke[a, b]) for a, b in edges])
        inside = (rows >= 0) & (rows < n_free)
        rows, cols, vals = rows[inside], cols[inside], vals[inside]
        top = cols < 0
        load -= np.bincount(rows[top], weights=vals[top], minlength=n_free)
        interior = (cols >= 0) & (cols < n_free)
        extra = (vals[interior], (rows[interior], cols[interior]))
        matrix = matrix + scipy.sparse.csr_matrix(extra, shape=(n_free, n_free))
        matrix.sum_duplicates()
    return matrix, load


def _solver_options(rtol: float, max_it: int, petsc_options: dict[str, Any]) -> dict[str, Any]:
    """CG + BoomerAMG with aggressive coarsening; ``{"pc_type": "gamg"}`` selects PETSc GAMG.

    BoomerAMG (PMIS, ext+i, P_max 4, strong threshold 0.5, one level of aggressive coarsening,
    forward/backward hybrid SOR without C/F ordering) sets up several times faster than GAMG on
    the 21-point stencil for the same iterations (measurements: docs/benchmarks.md, "The FE option").
    """
    options: dict[str, Any] = {"ksp_type": "cg", "ksp_rtol": rtol, "ksp_atol": 0.0, "ksp_max_it": max_it}
    if petsc_options.get("pc_type", "hypre") == "hypre":
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


def fe_tortuosity_factor(
    image: VoxelImage,
    phase: str,
    comm: Any = None,
    *,
    rtol: float = 1e-5,
    max_iterations: int = 1000,
    petsc_options: dict[str, Any] | None = None,
    assembly: str = "voxel",
) -> TortuosityResult:
    """FE (Q1 nodal) tortuosity factor of ``phase`` along z (axis 0) of a 3D label image (collective).

    Args:
        image: 3D label image with voxel size (m) and phase map; read on rank 0 (other ranks may
            pass the same image; only rank 0's array is used).
        phase: name of the phase diffusion goes through (e.g. ``"pore"``).
        comm: MPI communicator (default ``MPI.COMM_WORLD``).
        rtol: relative (preconditioned) residual tolerance of CG. The energy flux converges
            quadratically in the solution error: measured on five random volumes (40^3-100^3,
            tau 1.6-4.5), 1e-5 gives tau to at most 2e-8 (relative) in 7-9 iterations, 1e-4 to
            1.5e-6, 1e-3 to 1.7e-4.
        max_iterations: CG iteration limit.
        petsc_options: extra PETSc options merged over the defaults (CG + BoomerAMG;
            ``{"pc_type": "gamg"}`` for PETSc GAMG).
        assembly: ``"voxel"`` (default): the exact trilinear-hexahedron stiffness of the voxel
            mesh summed with NumPy straight into a PETSc matrix of the free nodes (rank 0 builds it,
            each rank gets a slab of rows); ``"dolfinx"``: the same FE problem through a dolfinx
            mesh, function space and compiled forms (the reference; 3-5x slower in total).

    Returns:
        The result, identical on every rank.

    Raises:
        UsageError: not 3D, unknown phase, bad tolerance or assembly.
        SolverError: CG did not converge or the solution is not finite.
    """
    from mpi4py import MPI

    comm = MPI.COMM_WORLD if comm is None else comm
    start = time.perf_counter()
    if not 0 < rtol < 1:
        raise UsageError(f"rtol must lie in (0, 1), got {rtol}")
    if assembly not in _ASSEMBLY:
        raise UsageError(f"assembly must be one of {', '.join(_ASSEMBLY)}, got {assembly!r}")
    meta: dict[str, Any] = {}
    error: Exception | None = None
    points = cells = None
    timings: dict[str, float] = {}
    if comm.rank == 0:
        try:
            if image.ndim != 3:
                raise UsageError(f"tortuosity factor needs a 3D volume, {image.source} is {image.ndim}D")
            phases = image.require_phases()
            if phase not in phases:
                raise UsageError(f"phase {phase!r} is not in the phase map ({', '.join(phases)})")
            spacing = tuple(float(s) for s in image.require_voxel_size())
            mask = image.array == phases[phase]
            solved = percolating_mask(mask)
            h0 = min(spacing)
            meta = {
                "eps": float(np.count_nonzero(mask) / mask.size),
                "perc": float(np.count_nonzero(solved) / mask.size),
                "extent": [n * s / h0 for n, s in zip(image.shape, spacing)],  # (z, y, x), units of h0
                "spacing": [s / h0 for s in spacing],
            }
            timings["percolation"] = time.perf_counter() - start
            if meta["perc"] > 0:
                points, cells = hex_mesh_arrays(solved, tuple(meta["spacing"]))
            timings["mesh"] = time.perf_counter() - start - timings["percolation"]
        except (UsageError, InputError) as err:
            error = err
    share_error(comm, error)  # rank 0's bad input raised on every rank
    meta = comm.bcast(meta, root=0)
    if meta["perc"] == 0:
        note = (
            f"phase {phase!r} does not percolate along z: no face-connected cluster touches both the z = 0 and the "
            "z = end faces, so D_eff = 0 and tau = inf"
        )
        logger.info("%s", note)
        return TortuosityResult(
            phase,
            float("inf"),
            0.0,
            meta["eps"],
            0.0,
            0,
            0,
            0,
            0.0,
            comm.size,
            {"mesh": 0.0, "solve": 0.0, "total": time.perf_counter() - start},
            note,
            method="fe",
        )
    options = _solver_options(rtol, max_iterations, petsc_options or {})
    solve = _solve_voxel if assembly == "voxel" else _solve_dolfinx
    flux_energy, flux_gradient, cells_global, dofs, iterations, more = solve(comm, phase, meta, points, cells, options)
    timings = comm.bcast(timings, root=0)
    timings.update(more)
    lz, ly, lx = meta["extent"]
    relative = flux_energy * lz / (lx * ly)  # D_eff / D
    tau = meta["eps"] / relative if relative > 0 else float("inf")
    check = abs(flux_energy - flux_gradient) / flux_energy if flux_energy > 0 else 0.0
    timings["total"] = time.perf_counter() - start
    logger.info(
        "FE tortuosity factor of %s along z: tau = %.6g (eps %.4g, D_eff/D %.4g), %d cells, %d dofs, "
        "%d CG iterations, %.2f s",
        phase,
        tau,
        meta["eps"],
        relative,
        cells_global,
        dofs,
        iterations,
        timings["total"],
    )
    return TortuosityResult(
        phase=phase,
        tau=float(tau),
        relative_diffusivity=float(relative),
        volume_fraction=meta["eps"],
        percolating_fraction=meta["perc"],
        cells=int(cells_global),
        dofs=int(dofs),
        iterations=int(iterations),
        flux_check_rel=float(check),
        ranks=comm.size,
        timings_s=timings,
        method="fe",
    )


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


def _scatter_rows(comm: Any, parts: list[tuple] | None) -> tuple:
    """Rank 0's per-rank ``(n, indptr, indices, data, load, guess)`` slabs, each to its rank.

    The arrays travel as raw buffers (``Send``/``Recv``), not pickled; rank 0 keeps its own.
    """
    if comm.rank == 0:
        parts = cast("list[tuple[Any, ...]]", parts)  # rank 0 has them
        for rank in range(1, comm.size):
            n, *arrays = parts[rank]
            comm.send((n, [(a.dtype.str, a.size) for a in arrays]), dest=rank, tag=71)
            for array in arrays:
                comm.Send(np.ascontiguousarray(array), dest=rank, tag=72)
        return parts[0]
    n, layout = comm.recv(source=0, tag=71)
    arrays = []
    for dtype, size in layout:
        array = np.empty(size, dtype=np.dtype(dtype))
        comm.Recv(array, source=0, tag=72)
        arrays.append(array)
    return (n, *arrays)


def _solve_voxel(
    comm: MPI.Comm,
    phase: str,
    meta: dict[str, Any],
    points: Any,  # rank 0's node coordinates (None elsewhere)
    cells: Any,  # rank 0's cells (None elsewhere)
    options: dict[str, Any],
) -> tuple[float, float, int, int, int, dict[str, float]]:
    """Voxel assembly: NumPy stiffness of the free nodes, row slabs per rank, fluxes on rank 0.

    Returns:
        ``(flux_energy, flux_gradient, cells, dofs, iterations, timings)``, the same on every rank.
    """
    from mpi4py import MPI
    from petsc4py import PETSc

    t0 = time.perf_counter()
    parts = None
    if comm.rank == 0:
        spacing = tuple(meta["spacing"])
        lz = meta["extent"][0]
        z = points[:, 2]
        n_nodes = z.shape[0]
        n_top = int(np.searchsorted(z, 0.5 * spacing[0]))  # nodes are sorted by grid position, z slowest
        n_bottom = n_nodes - int(np.searchsorted(z, lz - 0.5 * spacing[0]))
        matrix, load = reduced_system(cells, n_nodes, n_top, n_bottom, spacing)
        guess = 1.0 - z[n_top : n_nodes - n_bottom] / lz  # exact for straight channels
        bounds = np.linspace(0, load.size, comm.size + 1).round().astype(np.int64)
        parts = []
        for lo, hi in itertools.pairwise(bounds):
            indptr = matrix.indptr[lo : hi + 1]
            parts.append(
                (
                    load.size,
                    (indptr - indptr[0]).astype(PETSc.IntType, copy=False),
                    matrix.indices[indptr[0] : indptr[-1]].astype(PETSc.IntType, copy=False),
                    matrix.data[indptr[0] : indptr[-1]],
                    load[lo:hi],
                    guess[lo:hi],
                )
            )
        del matrix
    n_free, indptr, indices, data, load_local, guess_local = _scatter_rows(comm, parts)
    del parts
    t_assembly = time.perf_counter() - t0
    iterations, t_setup, t_cg = 0, 0.0, 0.0
    values = np.zeros(0)
    if n_free > 0:
        n_local = load_local.size
        A = PETSc.Mat().createAIJ(size=((n_local, n_free), (n_local, n_free)), csr=(indptr, indices, data), comm=comm)
        A.assemble()
        A.setOption(PETSc.Mat.Option.SPD, True)
        del indptr, indices, data
        b = PETSc.Vec().createMPI((n_local, n_free), comm=comm)
        x = b.duplicate()
        b.array[:] = load_local
        x.array[:] = guess_local
        ksp = ksp_from_options(comm, A, options, "tortuosity")
        try:
            t1 = time.perf_counter()
            ksp.setUp()
            t2 = time.perf_counter()
            ksp.solve(b, x)
            t3 = time.perf_counter()
            t_setup, t_cg = t2 - t1, t3 - t2
            values = x.array.copy()
            ok = bool(np.isfinite(values).all())
            iterations = _check_solution(ksp, phase, values if comm.allreduce(ok, op=MPI.LAND) else np.array([np.nan]))
        finally:
            ksp.destroy()
            A.destroy()
            b.destroy()
            x.destroy()
    t4 = time.perf_counter()
    gathered = comm.gather(values, root=0)
    fluxes = None
    if comm.rank == 0:
        c = np.concatenate([np.ones(n_top), *(gathered or []), np.zeros(n_bottom)])  # rank 0: the list
        ke = element_stiffness(spacing)
        energy = gradient = 0.0
        for chunk in range(0, cells.shape[0], 1 << 16):
            ce = c[cells[chunk : chunk + (1 << 16)]]
            energy += float(np.einsum("ij,jk,ik->", ce, ke, ce))  # Q / D for delta c = 1
            gradient += float(ce[:, 4:].sum() - ce[:, :4].sum())  # 4 x (integral of dc/dz) / (hx hy)
        gradient *= -spacing[1] * spacing[2] / 4.0 / lz
        fluxes = (energy, gradient, cells.shape[0], n_nodes)
    flux_energy, flux_gradient, n_cells, n_nodes_all = comm.bcast(fluxes, root=0)
    timings = {"assembly": t_assembly, "pc_setup": t_setup, "cg": t_cg, "solve": t_setup + t_cg}
    timings["flux"] = time.perf_counter() - t4
    return flux_energy, flux_gradient, n_cells, n_nodes_all, iterations, timings


def _solve_dolfinx(
    comm: MPI.Comm,
    phase: str,
    meta: dict[str, Any],
    points: Any,  # rank 0's node coordinates (None elsewhere)
    cells: Any,  # rank 0's cells (None elsewhere)
    options: dict[str, Any],
) -> tuple[float, float, int, int, int, dict[str, float]]:
    """Reference assembly: dolfinx mesh, P1 space, compiled forms, Dirichlet rows; fluxes by forms.

    Returns:
        ``(flux_energy, flux_gradient, cells, dofs, iterations, timings)``, the same on every rank.
    """
    import basix.ufl
    import dolfinx
    import scifem
    import ufl
    from dolfinx import fem
    from dolfinx.fem import petsc as fem_petsc
    from mpi4py import MPI
    from petsc4py import PETSc

    t0 = time.perf_counter()
    if comm.rank != 0:
        points, cells = np.zeros((0, 3)), np.zeros((0, 8), dtype=np.int64)
    element = basix.ufl.element("Lagrange", "hexahedron", 1, shape=(3,))
    from fem_anode.fem.mesh_io import cell_partitioner

    mesh = dolfinx.mesh.create_mesh(comm, cells, points, ufl.Mesh(element), partitioner=cell_partitioner("none"))
    del points, cells
    t_mesh = time.perf_counter() - t0
    lz = meta["extent"][0]
    tdim = mesh.topology.dim
    half = 0.25 * meta["spacing"][0]
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
    n_cells, n_dofs = mesh.topology.index_map(tdim).size_global, V.dofmap.index_map.size_global
    return flux_energy, flux_gradient, n_cells, n_dofs, iterations, timings
