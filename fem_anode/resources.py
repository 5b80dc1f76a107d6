"""Memory estimates of meshes and finite element solves, checked before the big allocations.

An image that is too large for the machine should be refused in a second with the estimate,
not fail after an hour in the kernel's out-of-memory killer. The estimates are deliberately
simple and calibrated on measured runs of this package (peak resident memory, gmsh 4.13,
dolfinx 0.9, PETSc 3.22 with MUMPS and GAMG on one rank; CHOLMOD, the one-rank default since,
peaked lower than MUMPS on the 1.04M-dof 2D benchmark, 2.77 vs 2.89 GB):

* gmsh voxel/tetrahedral meshes: about 70 MB for gmsh itself plus about 1 kB per mesh entity
  (node, cell, boundary facet); measured 0.26-0.92 kB per entity on 40^3 and 60^3 images;
* distributed voxel meshes (:mod:`fem_anode.fem.voxel_mesh`, dolfinx without gmsh): about
  650 B per cell at the peak of the mesh construction (measured 628 B/cell over the imports on
  the 835k-cell solid phase of the bundled 128^3 electrode, one rank; 270 B/cell remain after it,
  the rest is dolfinx's temporary topology arrays), divided over the ranks;
* gmsh smooth 2D meshes: about 20 kB per image pixel (measured 18 kB/pixel on the 400 x 250
  synthetic FIB-SEM ROI, 13 kB/pixel on 200 x 200 noise), dominated by the pixel-wise
  background size field;
* the FE solve: 1 kB per cell and 200 B per degree of freedom of mesh and vector data, four
  sparse matrices of 12 B per non-zero (plus 50 % for an algebraic multigrid hierarchy), and
  for the direct solver ``cache_size`` Cholesky factorisations of about ``3 n log2 n`` (2D) or
  ``13 n^(4/3)`` (3D) values of 8 B (measured on a 28k-dof P1 and a 62k-dof P2 voxel
  problem);
* the shifted multigrid of the transient diffusion (``solver.preconditioner = "mg"``, or
  ``"auto"`` once SSOR stalls): its one-time smoothed-aggregation set-up adds about 1.1 kB per
  degree of freedom at its peak on one rank (113 MB measured on the 105k-dof 64^3 electrode
  crop) and about 2.8 kB on several (1.4 GB per rank on the 996k-dof 128^3 electrode on two
  ranks: PETSc's parallel triple products); the estimate uses 1.2 and 3 kB;
* the transient diffusion with P1 on a 3D voxel mesh and the compiled SSOR-CG on the grid
  stencil (the default there): the whole run's peak, mesh construction included, is about
  1.34 kB per dof over 150 MB per rank (measured 1346 MB at 996k dofs and 10.16 GB at 7.89M on
  one rank, 779 MB and 5.17 GB per rank on two, the scale benchmark 2026-12-05); the estimate uses
  1.45 kB (1.08-1.15x those peaks). The general FE estimate above (four matrices and an AMG
  hierarchy) was 2.2x them.

The check compares the estimate with the memory the operating system reports as available
(``MemAvailable`` of ``/proc/meminfo``; under MPI summed over the nodes of the communicator)
and raises :class:`~fem_anode.errors.InputError` stating both numbers. Overrides (for users who
know better, and for tests):

* ``--no-memory-check`` (the CLI; :func:`memory_checks` for a block of Python code,
  ``check_memory(..., enabled=False)`` for one check) and ``FEM_ANODE_MEMORY_CHECK=off`` in
  the environment skip the check;
* ``FEM_ANODE_MEMORY_LIMIT=4GB`` caps the memory the check assumes available (e.g. a job's
  share of a shared node).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import math
import os
import re
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np

from fem_anode.errors import InputError, UsageError
from fem_anode.fem.diffusion.settings import resolve_solver_type

if TYPE_CHECKING:
    from mpi4py import MPI

    from fem_anode.fem.diffusion.settings import DiffusionSettings
    from fem_anode.io.images import VoxelImage

__all__ = [
    "MemoryEstimate",
    "available_memory",
    "check_memory",
    "estimate_array_memory",
    "estimate_metrics_memory",
    "estimate_fe_memory",
    "estimate_mesh_memory",
    "estimate_multigrid_setup_memory",
    "estimate_diffusion_memory",
    "estimate_voxel_diffusion_memory",
    "kept_fields_memory",
    "format_bytes",
    "memory_check_enabled",
    "memory_checks",
    "parse_bytes",
    "peak_memory",
]

logger = logging.getLogger(__name__)

#: Environment variable that disables the check when set to ``off``/``0``/``no``/``false``.
CHECK_ENV = "FEM_ANODE_MEMORY_CHECK"
#: Environment variable capping the available memory the check assumes (``4GB``, ``512MiB``, bytes).
LIMIT_ENV = "FEM_ANODE_MEMORY_LIMIT"

# Calibration constants (bytes); see the module docstring for the measurements behind them.
GMSH_BASE = 70e6
GMSH_PER_ENTITY = 1.0e3
VOXEL_MESH_PER_CELL = 650.0
SMOOTH_PER_PIXEL = 20e3
METRICS_PER_VOXEL = 130.0
METRICS_PER_VOXEL_3D = 50.0
FE_BASE_PER_RANK = 150e6
FE_PER_CELL = 1.0e3
FE_PER_DOF = 200.0
BYTES_PER_NONZERO = 12.0
MATRICES = 4
AMG_OVERHEAD = 0.5
MULTIGRID_SETUP_PER_DOF = 1.2e3
MULTIGRID_SETUP_PER_DOF_PARALLEL = 3.0e3
VOXEL_P1_SSOR_PER_DOF = 1450.0

# Average non-zeros per matrix row, by (cell type, degree).
_NNZ_PER_ROW = {
    ("quadrilateral", 1): 9,
    ("hexahedron", 1): 27,
    ("triangle", 1): 7,
    ("tetrahedron", 1): 15,
    ("quadrilateral", 2): 16,
    ("hexahedron", 2): 64,
    ("triangle", 2): 15,
    ("tetrahedron", 2): 50,
}
_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1e3,
    "mb": 1e6,
    "gb": 1e9,
    "tb": 1e12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak memory of an operation.

    Attributes:
        what: the operation, for messages (e.g. ``"voxel mesh of a 400x400x400 image"``).
        bytes: estimated peak resident memory in bytes.
        details: the counts behind the estimate (cells, nodes, dofs, non-zeros, ...) and the
            choices it assumed (e.g. ``solver``).
    """

    what: str
    bytes: float
    details: dict[str, float | str] = dataclasses.field(default_factory=dict)

    def __add__(self, other: MemoryEstimate) -> MemoryEstimate:
        return MemoryEstimate(
            f"{self.what} and {other.what}", self.bytes + other.bytes, {**self.details, **other.details}
        )


def format_bytes(n: float) -> str:
    """``1.2 GB`` style (decimal units)."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def parse_bytes(text: str) -> float:
    """``"4GB"``, ``"512 MiB"``, ``"1e9"`` -> bytes.

    Raises:
        UsageError: not a positive size.
    """
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS or float(match.group(1)) <= 0:
        raise UsageError(f"{LIMIT_ENV}={text!r}: expected a positive size such as 4GB, 512MiB or 1e9 (bytes)")
    return float(match.group(1)) * _UNITS[unit]


_CHECKS: contextvars.ContextVar[bool] = contextvars.ContextVar("fem_anode_memory_checks", default=True)


@contextlib.contextmanager
def memory_checks(enabled: bool) -> Iterator[None]:
    """Turn every memory check on or off for the ``with`` block (this thread/context only).

    The CLI runs a subcommand inside ``memory_checks(not args.no_memory_check)``: the choice
    reaches the checks deep in readers, meshers and solvers without a global switch, and ends
    with the block. Library callers may also pass ``enabled=False`` to :func:`check_memory`.
    """
    token = _CHECKS.set(enabled)
    try:
        yield
    finally:
        _CHECKS.reset(token)


def memory_check_enabled() -> bool:
    """False inside ``memory_checks(False)`` or when ``FEM_ANODE_MEMORY_CHECK`` is ``off``,
    ``0``, ``no`` or ``false`` in the environment."""
    if not _CHECKS.get():
        return False
    return os.environ.get(CHECK_ENV, "on").strip().lower() not in ("off", "0", "no", "false")


def _local_available() -> float:
    """Available memory of this node in bytes (``MemAvailable``, else free physical pages)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024.0
    except OSError:
        pass
    try:
        return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return math.inf


def available_memory(comm: MPI.Comm | None = None) -> float:
    """Memory available to a job in bytes, capped by ``FEM_ANODE_MEMORY_LIMIT``.

    Args:
        comm: MPI communicator; the available memory of each node it spans is counted once
            (collective). ``None``: this node only.
    """
    local = _local_available()
    if comm is not None and comm.size > 1:
        from mpi4py import MPI

        node = comm.Split_type(MPI.COMM_TYPE_SHARED)
        try:
            local = float(comm.allreduce(local if node.rank == 0 else 0.0, op=MPI.SUM))
        finally:
            node.Free()
    limit = os.environ.get(LIMIT_ENV)
    if limit:
        local = min(local, parse_bytes(limit))
    return local


def check_memory(
    estimate: MemoryEstimate, comm: MPI.Comm | None = None, *, hint: str = "", enabled: bool = True
) -> None:
    """Refuse an operation whose estimated memory exceeds what is available.

    Collective when ``comm`` spans several ranks (every rank gets the same decision if the
    estimate is the same on every rank).

    Args:
        estimate: what the operation needs.
        comm: communicator whose nodes' memory counts (``None``: this node).
        hint: what to do instead, for the message.
        enabled: ``False`` skips the check (the CLI's ``--no-memory-check``); so does
            ``FEM_ANODE_MEMORY_CHECK=off`` in the environment.

    Raises:
        InputError: estimate > available memory, stating both.
    """
    if not enabled or not memory_check_enabled():
        return
    available = available_memory(comm)
    logger.debug(
        "memory estimate of %s: %s (available %s)", estimate.what, format_bytes(estimate.bytes), format_bytes(available)
    )
    if estimate.bytes > available:
        raise InputError(
            f"{estimate.what} needs an estimated {format_bytes(estimate.bytes)} of memory but only "
            f"{format_bytes(available)} is available; {hint or 'use a smaller or coarser image'} "
            f"(override: --no-memory-check or {CHECK_ENV}=off)"
        )


def estimate_array_memory(shape: Sequence[int], itemsize: int, what: str) -> MemoryEstimate:
    """Memory of one array of ``shape`` with ``itemsize`` bytes per value."""
    n = float(np.prod(np.asarray(shape, dtype=float)))
    return MemoryEstimate(what, n * itemsize, {"values": n})


def estimate_metrics_memory(shape: Sequence[int], ranks: int = 1) -> MemoryEstimate:
    """Peak memory of :func:`~fem_anode.imaging.metrics.compute_metrics` on an image of ``shape``,
    over all ``ranks`` together (a 3D image is split into slabs: about the same in all).

    3D: measured 49 B per voxel for the whole command on a 256^3 three-phase volume on one rank
    and 57 B on two together (slabs, compiled kernels); 2D images: 130 B per pixel.
    """
    voxels = float(np.prod(np.asarray(shape, dtype=float)))
    per_voxel = METRICS_PER_VOXEL_3D if len(shape) == 3 else METRICS_PER_VOXEL
    return MemoryEstimate(
        f"image metrics of a {_shape_text(shape)} image",
        per_voxel * voxels,
        {"voxels": voxels, "ranks": ranks},
    )


def _shape_text(shape: Sequence[int]) -> str:
    return "x".join(str(int(s)) for s in shape)


def _kept_mask_counts(labels: np.ndarray, kept_values: Sequence[int], chunk: int = 32) -> tuple[int, int]:
    """(cells, boundary facets) of a voxel mesh of the kept labels, in bounded memory.

    Facets are faces between a kept voxel and a different label, or on the image box. The
    image is processed in slabs of ``chunk`` planes along axis 0 (a loop over slabs, not
    voxels), so no temporary is larger than a slab.
    """
    kept = np.asarray(sorted(kept_values))
    cells = facets = 0
    n0 = labels.shape[0]
    for start in range(0, n0, chunk):
        stop = min(start + chunk, n0)
        block = labels[start : min(stop + 1, n0)]  # one plane of overlap with the next slab
        mask = np.isin(block, kept)
        m = len(block) - 1
        facets += int(np.count_nonzero((block[:m] != block[1:]) & (mask[:m] | mask[1:])))
        own, own_mask = block[: stop - start], mask[: stop - start]
        cells += int(np.count_nonzero(own_mask))
        for axis in range(1, labels.ndim):
            lo = (slice(None),) * axis + (slice(None, -1),)
            hi = (slice(None),) * axis + (slice(1, None),)
            facets += int(np.count_nonzero((own[lo] != own[hi]) & (own_mask[lo] | own_mask[hi])))
            facets += int(np.count_nonzero(np.take(own_mask, 0, axis=axis))) + int(
                np.count_nonzero(np.take(own_mask, -1, axis=axis))
            )
    facets += int(np.count_nonzero(np.isin(labels[0], kept))) + int(np.count_nonzero(np.isin(labels[-1], kept)))
    return cells, facets


def estimate_mesh_memory(
    image: VoxelImage,
    method: str = "voxel",
    keep: Sequence[str] | None = None,
    *,
    order: int = 1,
) -> MemoryEstimate:
    """Estimated peak memory of meshing ``image`` with gmsh (:func:`~fem_anode.meshing.build.mesh_image`).

    Args:
        image: label :class:`~fem_anode.io.images.VoxelImage` with a phase map.
        method: ``voxel``, ``tet`` or ``smooth``.
        keep: phases to mesh (default all).
        order: element order (2 adds edge/face nodes).

    Returns:
        The estimate with ``cells``, ``nodes`` and ``facets`` in ``details``.
    """
    phases = image.require_phases()
    names = list(phases) if keep is None else [n for n in keep if n in phases]
    kept = [phases[n] for n in names]
    shape = image.shape
    what = f"{method} mesh of a {_shape_text(shape)} image"
    if method == "smooth":
        pixels = float(np.prod(shape))
        return MemoryEstimate(what, GMSH_BASE + SMOOTH_PER_PIXEL * pixels, {"pixels": pixels})
    cells, facets = _kept_mask_counts(image.array, kept)
    # solid blocks have ~cells nodes, fragmented phases ~cells + facets/2; never more than the grid
    nodes = min(cells + facets / 2.0, float(np.prod(np.asarray(shape, dtype=float) + 1)))
    if method == "tet":
        cells, facets = 6 * cells, 2 * facets
    if order == 2:
        nodes *= 2**image.ndim
    entities = cells + facets + nodes
    return MemoryEstimate(
        what, GMSH_BASE + GMSH_PER_ENTITY * entities, {"cells": cells, "facets": facets, "nodes": nodes}
    )


def estimate_fe_memory(
    *,
    cells: float,
    dofs: float,
    ndim: int,
    cell_type: str,
    degree: int,
    solver: str = "auto",
    cache_size: int = 1,
    ranks: int = 1,
    what: str = "finite element solve",
) -> MemoryEstimate:
    """Estimated peak memory of assembling and solving a scalar linear problem.

    Args:
        cells: number of cells.
        dofs: number of degrees of freedom.
        ndim: topological dimension (2 or 3).
        cell_type: ``quadrilateral``, ``hexahedron``, ``triangle`` or ``tetrahedron``.
        degree: Lagrange degree (1 or 2).
        solver: ``direct`` (MUMPS), ``iterative`` (CG + AMG) or ``auto`` (as the diffusion solver:
            :func:`~fem_anode.fem.diffusion.settings.resolve_solver_type`).
        cache_size: factorisations kept at the same time (direct solver).
        ranks: number of MPI ranks (each loads the libraries once).
    """
    solver = resolve_solver_type(solver, ndim, dofs)
    nnz = dofs * _NNZ_PER_ROW.get((cell_type, degree), 27 if ndim == 3 else 9)
    matrices = MATRICES * nnz * BYTES_PER_NONZERO
    factor = 0.0
    if solver == "direct":
        fill = 3.0 * dofs * math.log2(max(dofs, 2.0)) if ndim == 2 else 13.0 * dofs ** (4.0 / 3.0)
        factor = cache_size * 8.0 * fill
    else:
        matrices *= 1.0 + AMG_OVERHEAD
    total = FE_BASE_PER_RANK * ranks + FE_PER_CELL * cells + FE_PER_DOF * dofs + matrices + factor
    return MemoryEstimate(
        what,
        total,
        {
            "fe_cells": cells,
            "dofs": dofs,
            "nonzeros": nnz,
            "matrix_bytes": matrices,
            "factor_bytes": factor,
            "solver": solver,
        },
    )


def estimate_diffusion_memory(
    image: VoxelImage | None,
    settings: DiffusionSettings,
    *,
    ranks: int = 1,
    cells: float | None = None,
    cell_type: str | None = None,
) -> MemoryEstimate:
    """Estimated peak memory of a diffusion run (meshing the image, then the FE solve).

    Args:
        image: the label image the mesh is made from, or ``None`` for a mesh file (then give
            ``cells`` and ``cell_type``).
        settings: :class:`~fem_anode.fem.diffusion.settings.DiffusionSettings`.
        ranks: number of MPI ranks.
        cells: number of cells of a given mesh (mesh-file geometry).
        cell_type: its cell type.
    """
    degree = settings.mesh.order
    solver = settings.solver.type
    cache = settings.solver.cache_size if solver != "iterative" else 1
    if image is not None:
        method = settings.mesh.method
        mesh = estimate_mesh_memory(image, method, [settings.geometry.transport_phase], order=1)
        ndim = image.ndim
        if method == "smooth":
            h = settings.mesh.size or 4.0 * min(image.require_voxel_size())
            area = float(
                np.count_nonzero(image.array == image.require_phases()[settings.geometry.transport_phase])
            ) * float(np.prod(image.require_voxel_size()))
            n_cells = 2.0 * area / (0.5 * h) ** 2
            nodes = n_cells / 2.0
            cell_type = "triangle"
        else:
            n_cells, nodes = float(mesh.details["cells"]), float(mesh.details["nodes"])
            cell_type = "quadrilateral" if ndim == 2 else "hexahedron"
        dofs = nodes * (2**ndim if degree == 2 else 1)
        fe = estimate_fe_memory(
            cells=n_cells,
            dofs=dofs,
            ndim=ndim,
            cell_type=cell_type,
            degree=degree,
            solver=solver,
            cache_size=cache,
            ranks=ranks,
        )
        what = f"diffusion run on a {_shape_text(image.shape)} image ({int(dofs):,} dofs, P{degree})"
        if method == "voxel":
            return estimate_voxel_diffusion_memory(n_cells, nodes, image.shape, settings, ranks=ranks)
        fields = kept_fields_memory(settings, dofs)
        return MemoryEstimate(
            what, mesh.bytes + fe.bytes + fields, {**mesh.details, **fe.details, "kept_fields_bytes": fields}
        )
    if cells is None or cell_type is None:
        raise UsageError("estimate_diffusion_memory needs an image, or cells and cell_type of a mesh")
    ndim = 3 if cell_type in ("hexahedron", "tetrahedron") else 2
    vertices_per_cell = {"triangle": 0.5, "quadrilateral": 1.0, "tetrahedron": 0.2, "hexahedron": 1.0}[cell_type]
    dofs = cells * vertices_per_cell * (2**ndim if degree == 2 else 1)
    fe = estimate_fe_memory(
        cells=cells,
        dofs=dofs,
        ndim=ndim,
        cell_type=cell_type,
        degree=degree,
        solver=solver,
        cache_size=cache,
        ranks=ranks,
    )
    fields = kept_fields_memory(settings, dofs)
    return dataclasses.replace(
        fe,
        what=f"diffusion run on a mesh of {int(cells):,} cells ({int(dofs):,} dofs, P{degree})",
        bytes=fe.bytes + fields,
        details={**fe.details, "kept_fields_bytes": fields},
    )


def kept_fields_memory(settings: DiffusionSettings, unknowns: float) -> float:
    """Bytes (all ranks) of the fields a run keeps in memory for its result: one vector of 8 B per
    unknown at t = 0 and at every output time, when ``output.fields`` is on (else none)."""
    if not settings.output.fields:
        return 0.0
    times = set(settings.time.outputs()) | {settings.time.t_end}
    return 8.0 * unknowns * (1 + len(times))


def estimate_voxel_diffusion_memory(
    cells: float, nodes: float, shape: Sequence[int], settings: DiffusionSettings, *, ranks: int = 1
) -> MemoryEstimate:
    """Estimated peak memory of a diffusion run on a distributed voxel mesh (no gmsh).

    The mesh's construction peak (``VOXEL_MESH_PER_CELL``) is over before the solver allocates,
    so the estimate is the larger of the two.

    Args:
        cells: voxels of the transporting phase.
        nodes: mesh nodes (about ``1.2 * cells`` for porous media when not counted).
        shape: the image's shape (2D or 3D).
        settings: :class:`~fem_anode.fem.diffusion.settings.DiffusionSettings`.
        ranks: number of MPI ranks.
    """
    ndim = len(shape)
    degree = settings.mesh.order
    solver = settings.solver.type
    cache = settings.solver.cache_size if solver != "iterative" else 1
    dofs = nodes * (2**ndim if degree == 2 else 1)
    fields = kept_fields_memory(settings, dofs)
    if _solves_on_grid_stencil(settings, ndim, dofs):
        return MemoryEstimate(
            f"diffusion run on a {_shape_text(shape)} image ({int(dofs):,} dofs, P1, SSOR-CG on the grid stencil)",
            FE_BASE_PER_RANK * ranks + VOXEL_P1_SSOR_PER_DOF * dofs + fields,
            {
                "cells": cells,
                "nodes": nodes,
                "dofs": dofs,
                "multigrid_setup_bytes": 0.0,
                "kept_fields_bytes": fields,
                "solver": "grid-stencil",
            },
        )
    cell_type = "quadrilateral" if ndim == 2 else "hexahedron"
    fe = estimate_fe_memory(
        cells=cells,
        dofs=dofs,
        ndim=ndim,
        cell_type=cell_type,
        degree=degree,
        solver=solver,
        cache_size=cache,
        ranks=ranks,
    )
    # An explicit 'mg' pays for its set-up for sure; 'auto' moves to it only if it fits then
    # (DiffusionProblem checks the available memory before the set-up and stays on SSOR).
    multigrid = estimate_multigrid_setup_memory(dofs, ranks).bytes if _chooses_multigrid(settings, ndim, dofs) else 0.0
    mesh_peak = VOXEL_MESH_PER_CELL * cells + FE_BASE_PER_RANK * ranks
    return MemoryEstimate(
        f"diffusion run on a {_shape_text(shape)} image ({int(dofs):,} dofs, P{degree})",
        max(mesh_peak, fe.bytes + multigrid + fields),
        {
            "cells": cells,
            "nodes": nodes,
            "mesh_peak_bytes": mesh_peak,
            "multigrid_setup_bytes": multigrid,
            "kept_fields_bytes": fields,
            **fe.details,
        },
    )


def _solves_on_grid_stencil(settings: DiffusionSettings, ndim: int, dofs: float) -> bool:
    """True if a 3D voxel run solves with the compiled SSOR-CG on the grid stencil: P1, an
    iterative solve with SSOR (``"auto"`` starts with it and moves to the multigrid only if that
    fits then), PETSc's KSP and PC untouched, compiled sweeps (``"auto"``: when a C compiler is
    on the ``PATH``)."""
    import shutil

    solver = settings.solver
    compiled = solver.sweep_kernel == "compiled" or (
        solver.sweep_kernel == "auto" and shutil.which(os.environ.get("CC", "cc")) is not None
    )
    return (
        ndim == 3
        and settings.mesh.order == 1
        and _iterates(settings, ndim, dofs)
        and solver.preconditioner in ("auto", "ssor")
        and not solver.petsc_solver_options
        and compiled
    )


def _iterates(settings: DiffusionSettings, ndim: int, dofs: float) -> bool:
    """Whether the diffusion solves iteratively (``solver.type = "auto"``: see :func:`resolve_solver_type`)."""
    return resolve_solver_type(settings.solver.type, ndim, dofs) == "iterative"


def _chooses_multigrid(settings: DiffusionSettings, ndim: int, dofs: float) -> bool:
    """True if the settings ask for the shifted multigrid explicitly (and the solve iterates)."""
    solver = settings.solver
    return _iterates(settings, ndim, dofs) and solver.preconditioner == "mg" and "pc_type" not in solver.petsc_options


def estimate_multigrid_setup_memory(dofs: float, ranks: int = 1) -> MemoryEstimate:
    """Memory the shifted multigrid's one-time set-up adds at its peak (all ranks together).

    Args:
        dofs: degrees of freedom of the whole problem.
        ranks: number of MPI ranks (the parallel set-up costs more per dof).
    """
    per_dof = MULTIGRID_SETUP_PER_DOF if ranks == 1 else MULTIGRID_SETUP_PER_DOF_PARALLEL
    return MemoryEstimate(f"multigrid set-up for {int(dofs):,} dofs on {ranks} rank(s)", per_dof * dofs, {"dofs": dofs})


def release_freed_memory() -> None:
    """Give memory freed by NumPy back to the OS (glibc keeps freed heap pages, which then count in
    the peak of every later phase; ``malloc_trim``, a no-op where there is no glibc). Call it after
    a set-up whose temporaries are gone."""
    import ctypes
    import ctypes.util

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)


def peak_memory() -> float:
    """Peak resident memory of this process in bytes (``VmHWM``; ``ru_maxrss`` where there is no
    ``/proc``: it may include the parent's size at fork)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return float(line.split()[1]) * 1024.0
    except OSError:
        pass
    import resource

    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024.0
