r"""Cell-centred finite-volume tortuosity factor on the voxel grid (TauFactor's discretisation).

One unknown per voxel of the phase, the 7-point two-point-flux stencil: between two face
neighbours of the phase the conductance is ``D A_f / h`` (``A_f`` the face area, ``h`` the centre
distance; the harmonic mean of two equal diffusivities is ``D``; a face to a voxel of another phase
has conductance 0, so no flux crosses it, and voxels touching only along an edge or at a corner
are not coupled). The outer ``z`` faces carry ``c = 1`` (``z = 0``) and ``c = 0`` (``z = end``) at
the face itself, half a voxel from the first and last voxel centres (conductance ``2 D A_z / h_z``),
which is what TauFactor does by padding the volume with a layer of weight 2 and value ``2 c_bc``;
the other outer faces have no flux. Only face-connected clusters that touch both z ends carry flux
(:mod:`.clusters`); the others count in ``eps`` only. Then

.. math::

    D_\mathrm{eff} = \frac{Q\,L_z}{L_x L_y\,\Delta c}, \qquad \tau = \frac{\varepsilon D}{D_\mathrm{eff}}.

``Q`` is the energy flux ``sum_faces g (c_i - c_j)^2`` (equal to the flux through either end for
the exact discrete solution; its error is quadratic in the solver error and always positive);
the fluxes through the ``z = 0`` and ``z = end`` faces are reported as a check.

Distribution: every rank owns a slab of consecutive z layers (unknowns numbered z slowest, so a
slab is a contiguous block of matrix rows), reads only that slab of the image (which may be a
NumPy memmap), labels it, assembles its rows straight from NumPy into a PETSc matrix in chunks
of layers (the upper triangle as SBAIJ for the default SSOR; AIJ without a copy for AMG) and
needs from its neighbours only the global indices of one layer on each side.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from fem_anode.errors import InputError, SolverError
from fem_anode.fem.petsc_ksp import ksp_from_options
from fem_anode.fem.tortuosity.clusters import Slab, exchange_layers, slab_bounds, spanning_clusters
from fem_anode.imaging.slabs import balanced_slab
from fem_anode.resources import release_freed_memory

__all__ = ["BYTES_PER_UNKNOWN", "FVSolution", "estimate_memory", "fv_solve", "solver_options"]

logger = logging.getLogger(__name__)

# Layers per assembly chunk are chosen so that a chunk has about this many voxels (bounds the
# NumPy temporaries, about 100 B per voxel of a chunk).
_CHUNK_VOXELS = 1 << 19


#: Peak memory per phase voxel of the default solve (CG + SSOR on the upper triangle), measured
#: on blob volumes (140-170 B, docs/benchmarks.md) and rounded up; BoomerAMG needs about 3x that.
#: The per-rank libraries come on top.
BYTES_PER_UNKNOWN = 250.0


def estimate_memory(image: Any, phase: str, comm: Any = None) -> Any:
    """Estimated peak memory (:class:`~fem_anode.resources.MemoryEstimate`) of the FV solve, all ranks.

    Counts the phase's voxels slab by slab (each rank reads only its own layers; collective).
    """
    from fem_anode.resources import FE_BASE_PER_RANK, MemoryEstimate

    ranks = comm.size if comm is not None else 1
    if comm is not None:
        slab = slab_bounds(comm, image.shape[0])
        local = int(np.count_nonzero(np.asarray(image.array[slab.z0 : slab.z1]) == image.require_phases()[phase]))
        voxels = comm.allreduce(local)
    else:
        voxels = int(np.count_nonzero(np.asarray(image.array) == image.require_phases()[phase]))
    total = FE_BASE_PER_RANK * ranks + BYTES_PER_UNKNOWN * voxels
    return MemoryEstimate(f"tortuosity factor of {phase!r}", total, {"unknowns": voxels})


def solver_options(rtol: float, max_it: int, petsc_options: dict[str, Any], comm_size: int = 1) -> dict[str, Any]:
    """CG + SSOR (omega 1.6, local symmetric sweeps) by default: no set-up, no memory beyond the matrix.

    With SSOR the matrix is stored as its upper triangle (SBAIJ, 4 instead of 7 entries per row).
    ``{"pc_type": "hypre"}`` selects BoomerAMG (PMIS, one level of aggressive coarsening,
    ext+i interpolation with at most 4 entries per row, strong threshold 0.5, l1-scaled hybrid
    Gauss-Seidel; AIJ matrix converted to hypre's format in place first), ``{"pc_type":
    "gamg"}`` PETSc GAMG, ``{"pc_type": "eisenstat"}`` SSOR with Eisenstat's trick (one rank).
    The AMG hierarchies cost about 3x the memory for 1.5x the speed on a 200^3 volume, so the
    lean SSOR is the default (measurements: docs/benchmarks.md, "Tortuosity factor"). On several
    ranks the SSOR sweeps run in the separator order (:mod:`fem_anode.fem.slab_sweeps`). The
    default SSOR runs on the compiled stencil kernel, which replaces the SBAIJ matrix once its
    diagonal is taken (:mod:`fem_anode.fem.voxel_sweeps`), and CG with it is
    :class:`~fem_anode.fem.slab_sweeps.EisenstatCG` (Eisenstat's trick, fused passes, CG's natural
    norm) unless other PETSc options are given; an explicit ``{"pc_type": "sor"}``
    keeps PETSc's sweeps on the SBAIJ matrix (add ``pc_sor_omega`` and ``pc_sor_local_symmetric``
    for the same preconditioner).
    """
    options: dict[str, Any] = {"ksp_type": "cg", "ksp_rtol": rtol, "ksp_atol": 0.0, "ksp_max_it": max_it}
    pc = petsc_options.get("pc_type", "ssor")
    if pc == "ssor":  # symmetric (local) SOR sweeps on the upper-triangle SBAIJ matrix
        options.update({"pc_type": "sor", "pc_sor_omega": 1.6, "pc_sor_local_symmetric": True})
    elif pc == "hypre":
        options.update(
            {
                "pc_type": "hypre",
                "pc_hypre_type": "boomeramg",
                "pc_hypre_boomeramg_coarsen_type": "PMIS",
                "pc_hypre_boomeramg_interp_type": "ext+i",
                "pc_hypre_boomeramg_P_max": 4,
                "pc_hypre_boomeramg_strong_threshold": 0.5,
                "pc_hypre_boomeramg_agg_nl": 1,
                "pc_hypre_boomeramg_agg_num_paths": 1,
                "pc_hypre_boomeramg_relax_type_all": "l1scaled-SOR/Jacobi",
                "pc_hypre_boomeramg_no_CF": True,
            }
        )
    elif pc == "gamg":
        options.update(
            {
                "pc_type": "gamg",
                "pc_gamg_type": "agg",
                "pc_gamg_agg_nsmooths": 1,
                "pc_gamg_threshold": 0.0,
                "pc_gamg_square_graph": 1,
                "mg_levels_ksp_type": "chebyshev",
                "mg_levels_pc_type": "jacobi",
            }
        )
    return {**options, **{k: v for k, v in petsc_options.items() if (k, v) != ("pc_type", "ssor")}}


class FVSolution(dict):
    """Scalars of one finite-volume solve (plain dict: ``eps``, ``perc``, ``relative``, ``dofs``, ...)."""


def _neighbour_layers(
    gidx: np.ndarray, a: int, b: int, below: np.ndarray | None, above: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Global indices of the layers just below (z - 1) and above (z + 1) layers ``a..b-1``."""
    none = np.full(gidx.shape[1:], -1, dtype=gidx.dtype)
    lower = gidx[a - 1] if a > 0 else (below if below is not None else none)
    upper = gidx[b] if b < gidx.shape[0] else (above if above is not None else none)
    zm = np.concatenate([lower[None], gidx[a : b - 1]])
    zp = np.concatenate([gidx[a + 1 : b], upper[None]])
    return zm, zp


def shifted_labels(block: np.ndarray, axis: int, step: int) -> np.ndarray:
    """``out[..., i, ...] = block[..., i - step, ...]`` along ``axis`` (1 or 2), -1 outside."""
    out = np.full_like(block, -1)
    n = block.shape[axis]
    src = [slice(None)] * 3
    dst = [slice(None)] * 3
    if step > 0:
        src[axis], dst[axis] = slice(0, n - step), slice(step, n)
    else:
        src[axis], dst[axis] = slice(-step, n), slice(0, n + step)
    out[tuple(dst)] = block[tuple(src)]
    return out


def layer_chunks(slab: Slab, ny: int, nx: int) -> list[tuple[int, int]]:
    """Ranges ``(a, b)`` of the slab's layers (local indices) of about ``_CHUNK_VOXELS`` voxels each:
    assembly works chunk by chunk, so its temporaries stay small whatever the image size."""
    step = max(1, _CHUNK_VOXELS // max(1, ny * nx))
    return [(a, min(a + step, slab.layers)) for a in range(0, slab.layers, step)]


def assemble_face_conductances(
    comm: Any,
    slab: Slab,
    solved: np.ndarray,
    conductance: tuple[float, float, float],
    symmetric: bool,
    *,
    ends: bool = True,
    extra_diagonal: np.ndarray | None = None,
) -> tuple[Any, np.ndarray, np.ndarray, int, int]:
    """PETSc matrix of this rank's rows, the load and the rows' layer indices.

    ``ends``: the ``c = 1`` / ``c = 0`` faces at the z ends (else no flux there);
    ``extra_diagonal``: added to the diagonal of this rank's rows (in row order; AIJ only),
    e.g. the Robin conductances of the transient model (:mod:`fem_anode.fem.diffusion.finite_volume`).

    ``symmetric``: an SBAIJ matrix of the upper triangle only (diagonal and the x+1, y+1, z+1
    neighbours: 4 instead of 7 entries per row; PETSc copies the CSR arrays); else an AIJ
    matrix that uses the NumPy arrays without a copy (diagonal and off-process blocks).

    Returns:
        ``(A, load, layer_of_row, n_top, n_bottom)``: ``n_top``/``n_bottom`` are this rank's
        unknowns in the global ``z = 0``/``z = end`` layers (first/last rows of the slab).
    """
    from petsc4py import PETSc

    gz, gy, gx = conductance
    g_end = 2.0 * gz
    index = np.dtype(PETSc.IntType)
    per_layer = np.count_nonzero(solved.reshape(slab.layers, -1), axis=1) if slab.layers else np.zeros(0, np.int64)
    n_local = int(per_layer.sum())
    n_global = comm.allreduce(n_local)
    if n_global + 7 * n_global >= np.iinfo(index).max:
        raise InputError(
            f"the tortuosity solve has {n_global} unknowns: too many for this PETSc build's {index.itemsize * 8}-bit "
            "indices; use a PETSc built with --with-64-bit-indices or crop/bin the volume"
        )
    offset = int(comm.exscan(n_local) or 0) if comm.size > 1 else 0
    gidx = np.full(solved.shape, -1, dtype=index)
    gidx[solved] = np.arange(offset, offset + n_local, dtype=index)
    ny, nx = solved.shape[1:]
    empty = np.full((ny, nx), -1, dtype=index)
    below, above = exchange_layers(comm, slab, gidx[0] if slab.layers else empty, gidx[-1] if slab.layers else empty)
    chunks = layer_chunks(slab, ny, nx)
    if symmetric:
        if not ends or extra_diagonal is not None:
            raise ValueError("the SBAIJ path assembles the tortuosity problem only")
        return _assemble_upper(comm, slab, gidx, below, above, per_layer, n_local, n_global, conductance)
    # Pass 1: entries per row in the diagonal block (own columns) and the off-process block.
    indptr = np.zeros(n_local + 1, dtype=index)  # diagonal block
    indptr_off = np.zeros(n_local + 1, dtype=index)  # columns of the neighbouring ranks' halo layers
    row = 0
    for a, b in chunks:
        block = gidx[a:b]
        zm, zp = _neighbour_layers(gidx, a, b, below, above)
        inside = block >= 0
        count = np.ones(int(np.count_nonzero(inside)), dtype=index)
        off = np.zeros_like(count)
        for other in (
            zm,
            zp,
            shifted_labels(block, 1, 1),
            shifted_labels(block, 1, -1),
            shifted_labels(block, 2, 1),
            shifted_labels(block, 2, -1),
        ):
            column = other[inside]
            count += (column >= offset) & (column < offset + n_local)
            off += (column >= 0) & ((column < offset) | (column >= offset + n_local))
        np.cumsum(count, out=indptr[row + 1 : row + 1 + count.size])
        indptr[row + 1 : row + 1 + count.size] += indptr[row]
        np.cumsum(off, out=indptr_off[row + 1 : row + 1 + off.size])
        indptr_off[row + 1 : row + 1 + off.size] += indptr_off[row]
        row += count.size
    indices = np.empty(int(indptr[-1]), dtype=index)
    data = np.empty(int(indptr[-1]), dtype=np.float64)
    indices_off = np.empty(int(indptr_off[-1]), dtype=index)
    data_off = np.empty(int(indptr_off[-1]), dtype=np.float64)
    load = np.zeros(n_local)
    layer_of_row = np.repeat(np.arange(slab.z0, slab.z1, dtype=np.int32), per_layer)
    # Pass 2: columns in increasing order (z-1, y-1, x-1, self, x+1, y+1, z+1) and values.
    row = 0
    for a, b in chunks:
        block = gidx[a:b]
        zm, zp = _neighbour_layers(gidx, a, b, below, above)
        inside = block >= 0
        cols = np.stack(
            [
                zm[inside],
                shifted_labels(block, 1, 1)[inside],
                shifted_labels(block, 2, 1)[inside],
                block[inside],
                shifted_labels(block, 2, -1)[inside],
                shifted_labels(block, 1, -1)[inside],
                zp[inside],
            ],
            axis=1,
        )
        del zm, zp
        values = np.where(cols >= 0, -np.array([gz, gy, gx, 0.0, gx, gy, gz]), 0.0)
        diag = -values.sum(axis=1)
        rows_here = cols.shape[0]
        layer = layer_of_row[row : row + rows_here]
        if ends:
            diag += np.where(layer == 0, g_end, 0.0) + np.where(layer == slab.nz - 1, g_end, 0.0)
            load[row : row + rows_here] = np.where(layer == 0, g_end, 0.0)  # c = 1 at z = 0
        if extra_diagonal is not None:
            diag += extra_diagonal[row : row + rows_here]
        values[:, 3] = diag
        own = (cols >= offset) & (cols < offset + n_local)
        lo, hi = indptr[row], indptr[row + rows_here]
        indices[lo:hi] = cols[own] - offset
        data[lo:hi] = values[own]
        other = (cols >= 0) & ~own
        lo, hi = indptr_off[row], indptr_off[row + rows_here]
        indices_off[lo:hi] = cols[other]
        data_off[lo:hi] = values[other]
        row += rows_here
        del cols, values, own, other
    del gidx
    release_freed_memory()
    # PETSc uses these arrays as they are (no copy): one matrix in memory, not two.
    sizes = ((n_local, n_global), (n_local, n_global))
    if comm.size == 1:
        A = PETSc.Mat().createAIJWithArrays(sizes, csr=(indptr, indices, data), comm=comm)
    else:
        A = PETSc.Mat().createAIJWithArrays(
            sizes, csr=((indptr, indices, data), (indptr_off, indices_off, data_off)), comm=comm
        )
    A.assemble()
    A.setOption(PETSc.Mat.Option.SPD, True)
    n_top = int(per_layer[0]) if slab.z0 == 0 and slab.layers else 0
    n_bottom = int(per_layer[-1]) if slab.z1 == slab.nz and slab.layers else 0
    return A, load, layer_of_row, n_top, n_bottom


def _kernel_system(
    comm: Any, slab: Slab, solved: np.ndarray, conductance: tuple[float, float, float], kernel: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """What :func:`assemble_face_conductances` returns besides the matrix, for a compiled
    kernel that is the matrix: the diagonal (the faces to rows of the phase, here and on the
    neighbouring ranks, plus ``2 g_z`` at the z ends), the load, the rows' layers, ``n_top`` and
    ``n_bottom``."""
    from fem_anode.fem.voxel_sweeps import face_diagonal

    g_end = 2.0 * conductance[0]
    diagonal, _ = face_diagonal(comm, slab, solved, kernel)
    per_layer = np.count_nonzero(solved.reshape(slab.layers, -1), axis=1) if slab.layers else np.zeros(0, np.int64)
    n = kernel.n
    load = np.zeros(n)
    n_top = int(per_layer[0]) if slab.z0 == 0 and slab.layers else 0
    n_bottom = int(per_layer[-1]) if slab.z1 == slab.nz and slab.layers else 0
    diagonal[:n_top] += g_end  # c = 1 half a voxel below z = 0
    load[:n_top] = g_end
    diagonal[n - n_bottom :] += g_end  # c = 0 half a voxel above z = end
    layer_of_row = np.repeat(np.arange(slab.z0, slab.z1, dtype=np.int32), per_layer)
    return diagonal, load, layer_of_row, n_top, n_bottom


def _assemble_upper(
    comm: Any,
    slab: Slab,
    gidx: np.ndarray,
    below: np.ndarray | None,
    above: np.ndarray | None,
    per_layer: np.ndarray,
    n_local: int,
    n_global: int,
    conductance: tuple[float, float, float],
) -> tuple[Any, np.ndarray, np.ndarray, int, int]:
    """Upper triangle (SBAIJ) of the matrix; the arguments are those of :func:`assemble_face_conductances`."""
    from petsc4py import PETSc

    gz, gy, gx = conductance
    g_end = 2.0 * gz
    index = gidx.dtype
    ny, nx = gidx.shape[1:]
    chunks = layer_chunks(slab, ny, nx)
    indptr = np.zeros(n_local + 1, dtype=index)
    row = 0
    for a, b in chunks:  # pass 1: 1 + upper neighbours per row
        block = gidx[a:b]
        _, zp = _neighbour_layers(gidx, a, b, below, above)
        inside = block >= 0
        count = (
            1
            + (zp[inside] >= 0).astype(index)
            + (shifted_labels(block, 1, -1)[inside] >= 0)
            + (shifted_labels(block, 2, -1)[inside] >= 0)
        )
        np.cumsum(count, out=indptr[row + 1 : row + 1 + count.size])
        indptr[row + 1 : row + 1 + count.size] += indptr[row]
        row += count.size
    indices = np.empty(int(indptr[-1]), dtype=index)
    data = np.empty(int(indptr[-1]), dtype=np.float64)
    load = np.zeros(n_local)
    layer_of_row = np.repeat(np.arange(slab.z0, slab.z1, dtype=np.int32), per_layer)
    row = 0
    for a, b in chunks:  # pass 2: columns self < x+1 < y+1 < z+1 and values
        block = gidx[a:b]
        zm, zp = _neighbour_layers(gidx, a, b, below, above)
        inside = block >= 0
        lower = (
            (zm[inside] >= 0) * gz
            + (shifted_labels(block, 1, 1)[inside] >= 0) * gy
            + (shifted_labels(block, 2, 1)[inside] >= 0) * gx
        )
        cols = np.stack(
            [block[inside], shifted_labels(block, 2, -1)[inside], shifted_labels(block, 1, -1)[inside], zp[inside]],
            axis=1,
        )
        del zm, zp
        values = np.where(cols >= 0, -np.array([0.0, gx, gy, gz]), 0.0)
        rows_here = cols.shape[0]
        layer = layer_of_row[row : row + rows_here]
        values[:, 0] = (
            lower - values.sum(axis=1) + np.where(layer == 0, g_end, 0.0) + np.where(layer == slab.nz - 1, g_end, 0.0)
        )
        load[row : row + rows_here] = np.where(layer == 0, g_end, 0.0)  # c = 1 at z = 0
        keep = cols >= 0
        lo, hi = indptr[row], indptr[row + rows_here]
        indices[lo:hi] = cols[keep]
        data[lo:hi] = values[keep]
        row += rows_here
        del cols, values, keep, lower
    del gidx
    A = PETSc.Mat().createSBAIJ(((n_local, n_global), (n_local, n_global)), 1, csr=(indptr, indices, data), comm=comm)
    del indptr, indices, data
    release_freed_memory()
    A.assemble()
    A.setOption(PETSc.Mat.Option.SPD, True)
    n_top = int(per_layer[0]) if slab.z0 == 0 and slab.layers else 0
    n_bottom = int(per_layer[-1]) if slab.z1 == slab.nz and slab.layers else 0
    return A, load, layer_of_row, n_top, n_bottom


def fv_solve(
    comm: Any,
    array: np.ndarray,
    value: int,
    spacing: tuple[float, float, float],
    *,
    phase: str,
    rtol: float,
    max_iterations: int,
    petsc_options: dict[str, Any],
) -> FVSolution:
    """Finite-volume tortuosity solve of the voxels ``array == value`` (collective).

    Args:
        comm: MPI communicator; every rank reads only its slab of ``array`` (z layers; slabs of
            about equal numbers of the phase's voxels, after one counting pass shared by the ranks).
        array: (z, y, x) label array (may be a memmap; the same on every rank).
        value: label of the phase.
        spacing: voxel edge lengths (z, y, x), m.
        phase: phase name (for messages).
        rtol: CG relative tolerance.
        max_iterations: CG iteration limit.
        petsc_options: PETSc options merged over :func:`solver_options`.

    Returns:
        Dict with ``eps`` (phase volume fraction), ``perc`` (fraction in spanning clusters),
        ``relative`` (D_eff / D, 0 if not spanning), ``dofs``, ``iterations``, ``flux_check_rel``
        (relative difference of the z = 0 and z = end fluxes) and ``timings`` (s).
    """
    from mpi4py import MPI
    from petsc4py import PETSc

    from fem_anode.fem.slab_sweeps import (
        EisenstatCG,
        SeparatorMatrix,
        SeparatorSSOR,
        SeparatorSweeps,
        separator_order_possible,
    )
    from fem_anode.fem.voxel_sweeps import SweepKernelUnavailable, VoxelSweepKernel, load_sweep_library

    start = time.perf_counter()
    nz, ny, nx = array.shape
    slab = balanced_slab(comm, array, value)  # about equal numbers of the phase's voxels per rank
    mask = np.asarray(array[slab.z0 : slab.z1]) == value
    n_phase = comm.allreduce(int(np.count_nonzero(mask)))
    solved = spanning_clusters(comm, slab, mask)
    del mask
    n_solved = comm.allreduce(int(np.count_nonzero(solved)))
    total = nz * ny * nx
    out = FVSolution(
        eps=n_phase / total, perc=n_solved / total, relative=0.0, dofs=n_solved, iterations=0, flux_check_rel=0.0
    )
    timings = {"percolation": time.perf_counter() - start}
    out["timings"] = timings
    if n_solved == 0:
        return out
    h0 = min(spacing)
    hz, hy, hx = (s / h0 for s in spacing)
    conductance = (hx * hy / hz, hx * hz / hy, hy * hz / hx)
    t0 = time.perf_counter()
    options = solver_options(rtol, max_iterations, petsc_options, comm.size)
    symmetric = options["pc_type"] == "sor"  # SSOR runs on the upper triangle; AMG needs the whole matrix
    # Several ranks: SSOR in the separator order (one global SSOR, sweeps still parallel) instead of
    # PETSc's block-Jacobi local sweeps, which need about 30 % more CG iterations.
    separators = symmetric and comm.size > 1 and separator_order_possible(comm, slab)
    first_layer = solved[0].ravel().copy() if slab.layers else np.zeros(ny * nx, bool)
    last_layer = solved[-1].ravel().copy() if slab.layers else np.zeros(ny * nx, bool)
    omega = float(options.get("pc_sor_omega", 1.6))
    # The default SSOR by the compiled kernel, which is then the matrix as well (33 B per row
    # instead of the SBAIJ's 52, and sweeps twice as fast as PETSc's; see fem_anode.fem.voxel_sweeps).
    library = None
    if symmetric and petsc_options.get("pc_type", "ssor") == "ssor" and (comm.size == 1 or separators):
        try:
            library = load_sweep_library(comm)
        except SweepKernelUnavailable as exc:
            logger.warning("compiled SSOR sweeps unavailable (%s); using PETSc's SOR", exc)
    sweeps = None
    if library is None:
        A, load, layer_of_row, n_top, n_bottom = assemble_face_conductances(comm, slab, solved, conductance, symmetric)
    else:  # no assembled matrix: the kernel's stencil and a diagonal
        kernel = VoxelSweepKernel(solved, conductance, omega, library, with_matrix=True)
        diagonal, load, layer_of_row, n_top, n_bottom = _kernel_system(comm, slab, solved, conductance, kernel)
        kernel.set_diagonal(diagonal)
        del diagonal
        sweeps = SeparatorSweeps(comm, slab, None, first_layer, last_layer, conductance[0], omega, kernel=kernel)
        A = SeparatorMatrix(sweeps).as_petsc()
    del solved
    timings["assembly"] = time.perf_counter() - t0
    b = A.createVecLeft()
    x = A.createVecRight()
    b.array[:] = load
    del load
    x.array[:] = 1.0 - (layer_of_row + 0.5) / nz  # exact for straight channels
    del layer_of_row
    if options["pc_type"] == "hypre":
        A.convert("hypre")  # in place: hypre's ParCSR matrix replaces the AIJ (one fine matrix, not two)
    out["sweeps"] = "compiled" if library is not None else "petsc"
    # The default (compiled kernel, no other PETSc options): CG with Eisenstat's SSOR in fused passes
    # (the same preconditioner as PCSOR's SSOR, CG's natural norm; fem_anode.fem.slab_sweeps.EisenstatCG).
    fused = sweeps is not None and sweeps.kernel is not None and set(petsc_options) <= {"pc_type"}
    t1 = time.perf_counter()
    if fused:
        assert sweeps is not None and sweeps.kernel is not None and sweeps.kernel.d is not None
        del first_layer, last_layer
        d = PETSc.Vec().createWithArray(sweeps.kernel.d, size=(sweeps.kernel.n, PETSc.DECIDE), comm=comm)
        cg = EisenstatCG(sweeps, d, rtol, max_iterations)
        try:
            t2 = time.perf_counter()
            cg.solve(b, x)
            t3 = time.perf_counter()
            reason, iterations = cg.reason, cg.iterations
        finally:
            cg.destroy()
            d.destroy()
    else:
        ksp = ksp_from_options(comm, A, options, "tortuosity_fv")
        if separators and sweeps is None:
            sweeps = SeparatorSweeps(comm, slab, A, first_layer, last_layer, conductance[0], omega)
        if sweeps is not None:
            pc = ksp.getPC()
            pc.setType("python")
            pc.setPythonContext(SeparatorSSOR(sweeps))
        del first_layer, last_layer
        try:
            ksp.setUp()
            t2 = time.perf_counter()
            ksp.solve(b, x)
            t3 = time.perf_counter()
            reason, iterations = ksp.getConvergedReason(), ksp.getIterationNumber()
        finally:
            ksp.destroy()
    timings.update({"pc_setup": t2 - t1, "cg": t3 - t2, "solve": t3 - t1})
    if reason < 0:
        A.destroy(), b.destroy(), x.destroy()
        raise SolverError(
            f"tortuosity solve for {phase!r} did not converge (PETSc reason {reason}, {iterations} iterations)"
        )
    # Energy flux sum_faces g (c_i - c_j)^2 = c.Ac - 2 b.c + sum_top g_end (Delta c = 1).
    g_end = 2.0 * conductance[0]
    c = x.array
    local = np.array(
        [
            g_end * (n_top - c[:n_top].sum()),  # flux through z = 0
            g_end * c[c.size - n_bottom :].sum() if n_bottom else 0.0,  # flux through z = end
            g_end * n_top,
            float(np.isfinite(c).all()) - 1.0,
        ]
    )
    bx = b.dot(x)
    A.mult(x, b)
    xax = b.dot(x)
    A.destroy(), b.destroy(), x.destroy()
    q_top, q_bottom, constant, bad = comm.allreduce(local, op=MPI.SUM)
    if bad < 0:
        raise SolverError(f"tortuosity solve for {phase!r} gave a non-finite concentration")
    energy = xax - 2.0 * bx + constant
    lengths = (nz * hz, ny * hy, nx * hx)
    out["relative"] = energy * lengths[0] / (lengths[1] * lengths[2])
    out["flux_check_rel"] = abs(q_top - q_bottom) / energy if energy > 0 else 0.0
    out["iterations"] = int(iterations)
    timings["flux"] = time.perf_counter() - t3
    return out
