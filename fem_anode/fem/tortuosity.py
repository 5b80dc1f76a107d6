r"""Tortuosity factor of a phase from a steady diffusion solve on its voxel mesh.

The phase of a 3D label image (axes ``(z, y, x)``) is meshed with one trilinear hexahedron per
voxel and the steady diffusion problem

.. math::

    \nabla\cdot(D\nabla c) = 0 \ \text{in the phase},\qquad c = 1 \ \text{on } z = 0
    \ (\text{mesh group ``top``}),\qquad c = 0 \ \text{on } z = L_z\ (\text{``bottom``}),

with no flux on every other boundary (the phase's interfaces and the box sides) is solved with
CG + algebraic multigrid (PETSc GAMG; hypre BoomerAMG on request). From the total
flux ``Q`` through the phase,

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
volume-averaged-gradient flux is reported as a check.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import numpy as np
from scipy import ndimage

from fem_anode.errors import InputError, SolverError, UsageError
from fem_anode.io.images import VoxelImage

__all__ = ["TortuosityResult", "percolating_mask", "hex_mesh_arrays", "tortuosity_factor", "tortuosity_factors"]

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


@dataclasses.dataclass
class TortuosityResult:
    """Tortuosity factor of one phase along z.

    Attributes:
        phase: phase name.
        tau: tortuosity factor eps D / D_eff (``inf`` if the phase does not percolate along z).
        relative_diffusivity: D_eff / D (0 if not percolating).
        volume_fraction: eps, fraction of all voxels that belong to the phase.
        percolating_fraction: fraction of all voxels in clusters spanning z (the solved domain).
        cells, dofs: voxel-mesh cells and P1 unknowns of the solve (0 if none).
        iterations: CG iterations.
        flux_check_rel: relative difference between the energy (reaction) flux and the
            volume-averaged-gradient flux (small when the solve is converged).
        ranks: MPI ranks of the solve.
        timings_s: ``mesh``, ``solve`` (setup + CG) and ``total`` wall times.
        note: why tau is infinite, else empty.
    """

    phase: str
    tau: float
    relative_diffusivity: float
    volume_fraction: float
    percolating_fraction: float
    cells: int
    dofs: int
    iterations: int
    flux_check_rel: float
    ranks: int
    timings_s: dict[str, float]
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (``tau`` = None when infinite, as elsewhere in metrics.json)."""
        out = dataclasses.asdict(self)
        out["tau"] = self.tau if np.isfinite(self.tau) else None
        return out


def percolating_mask(mask: np.ndarray) -> np.ndarray:
    """Voxels of face-connected clusters of ``mask`` (z, y, x) touching both z = 0 and z = end."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 3:
        raise UsageError(f"tortuosity factor needs a 3D volume, got {mask.ndim}D")
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
                config |= padded[dz : dz + nz + 1, dy : dy + ny + 1, dx : dx + nx + 1] << (dz * 4 + dy * 2 + dx)
    voxels = np.argwhere(mask)
    node_shape = (nz + 1, ny + 1, nx + 1)
    keys = np.empty((voxels.shape[0], 8), dtype=np.int64)
    for corner, (a, b, c) in enumerate(_DOLFINX_HEX):
        node = (voxels[:, 0] + a, voxels[:, 1] + b, voxels[:, 2] + c)
        flat = np.ravel_multi_index(node, node_shape)
        position = (1 - a) * 4 + (1 - b) * 2 + (1 - c)  # this voxel's place in the node's block
        component = _BLOCK_COMPONENTS[config[node], position]
        keys[:, corner] = flat * 8 + component
    unique, inverse = np.unique(keys, return_inverse=True)
    cells = inverse.reshape(keys.shape).astype(np.int64)
    grid = np.stack(np.unravel_index(unique // 8, node_shape), axis=1).astype(np.float64)
    points = (grid * np.asarray(spacing, dtype=np.float64))[:, ::-1].copy()  # (x, y, z)
    return points, cells


def _solver_options(rtol: float, max_it: int, petsc_options: dict[str, Any]) -> dict[str, Any]:
    """CG + PETSc GAMG; ``pc_type = "hypre"`` in ``petsc_options`` selects tuned BoomerAMG.

    Measured on a 100^3 random volume (547k dofs, benchmarks/bench_tortuosity.py): GAMG solves in
    3.7 s (11 iterations), BoomerAMG with HMIS/ext+i/P_max 4/threshold 0.5 in 7.9 s (10), and
    BoomerAMG with hypre's defaults is another 6x slower.
    """
    options: dict[str, Any] = {"ksp_type": "cg", "pc_type": "gamg", "ksp_rtol": rtol, "ksp_atol": 0.0, "ksp_max_it": max_it}
    if petsc_options.get("pc_type") == "hypre":
        options.update(
            {
                "pc_hypre_type": "boomeramg",
                "pc_hypre_boomeramg_coarsen_type": "HMIS",
                "pc_hypre_boomeramg_interp_type": "ext+i",
                "pc_hypre_boomeramg_P_max": 4,
                "pc_hypre_boomeramg_strong_threshold": 0.5,
            }
        )
    return {**options, **petsc_options}


def tortuosity_factor(
    image: VoxelImage,
    phase: str,
    comm: Any = None,
    *,
    rtol: float = 1e-10,
    max_iterations: int = 1000,
    petsc_options: dict[str, Any] | None = None,
) -> TortuosityResult:
    """Tortuosity factor of ``phase`` along z (axis 0) of a 3D label image (collective).

    Args:
        image: 3D label image with voxel size (m) and phase map; read on rank 0 (other ranks may
            pass the same image; only rank 0's array is used).
        phase: name of the phase diffusion goes through (e.g. ``"pore"``).
        comm: MPI communicator (default ``MPI.COMM_WORLD``).
        rtol: relative residual tolerance of CG.
        max_iterations: CG iteration limit.
        petsc_options: extra PETSc options merged over the defaults (CG + GAMG; ``{"pc_type":
            "hypre"}`` for BoomerAMG with 3D settings).

    Returns:
        The result, identical on every rank.

    Raises:
        UsageError: not 3D, unknown phase, or a bad tolerance.
        SolverError: CG did not converge or the solution is not finite.
    """
    from mpi4py import MPI

    comm = MPI.COMM_WORLD if comm is None else comm
    start = time.perf_counter()
    if not 0 < rtol < 1:
        raise UsageError(f"rtol must lie in (0, 1), got {rtol}")
    meta: dict[str, Any] | str
    points = cells = None
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
            if meta["perc"] > 0:
                points, cells = hex_mesh_arrays(solved, tuple(meta["spacing"]))
        except (UsageError, InputError) as err:
            meta = f"{type(err).__name__}:{err}"
    else:
        meta = {}
    meta = comm.bcast(meta, root=0)
    if isinstance(meta, str):
        kind, message = meta.split(":", 1)
        raise {"UsageError": UsageError, "InputError": InputError}[kind](message)
    if meta["perc"] == 0:
        note = (
            f"phase {phase!r} does not percolate along z: no face-connected cluster touches both the z = 0 and the "
            "z = end faces, so D_eff = 0 and tau = inf"
        )
        logger.info("%s", note)
        return TortuosityResult(
            phase, float("inf"), 0.0, meta["eps"], 0.0, 0, 0, 0, 0.0, comm.size,
            {"mesh": 0.0, "solve": 0.0, "total": time.perf_counter() - start}, note,
        )
    return _solve(comm, phase, meta, points, cells, rtol, max_iterations, petsc_options or {}, start)


def _solve(comm, phase, meta, points, cells, rtol, max_iterations, petsc_options, start) -> TortuosityResult:  # type: ignore[no-untyped-def]
    import basix.ufl
    import dolfinx
    import ufl
    from dolfinx import fem
    from dolfinx.fem import petsc as fem_petsc
    from mpi4py import MPI
    from petsc4py import PETSc

    if comm.rank != 0:
        points, cells = np.zeros((0, 3)), np.zeros((0, 8), dtype=np.int64)
    element = basix.ufl.element("Lagrange", "hexahedron", 1, shape=(3,))
    mesh = dolfinx.mesh.create_mesh(comm, cells, points, ufl.Mesh(element))
    del points, cells
    t_mesh = time.perf_counter() - start
    lz, ly, lx = meta["extent"]
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
    # Initial guess linear in z (exact for straight channels): fewer iterations elsewhere.
    c.interpolate(lambda x: 1.0 - x[2] / lz)
    ksp = PETSc.KSP().create(comm)
    prefix = f"fem_anode_tortuosity_{id(ksp)}_"
    ksp.setOptionsPrefix(prefix)
    options = _solver_options(rtol, max_iterations, petsc_options)
    opts = PETSc.Options()
    for name, value in options.items():
        opts[f"{prefix}{name}"] = value
    ksp.setOperators(A)
    ksp.setFromOptions()
    ksp.setInitialGuessNonzero(True)
    for name in options:
        del opts[f"{prefix}{name}"]
    t0 = time.perf_counter()
    try:
        ksp.solve(b, c.x.petsc_vec)
        reason, iterations = ksp.getConvergedReason(), ksp.getIterationNumber()
    finally:
        ksp.destroy()
        A.destroy()
        b.destroy()
    t_solve = time.perf_counter() - t0
    if reason < 0:
        raise SolverError(f"tortuosity solve for {phase!r} did not converge (PETSc reason {reason}, {iterations} iterations)")
    c.x.scatter_forward()
    if not np.isfinite(c.x.array).all():
        raise SolverError(f"tortuosity solve for {phase!r} gave a non-finite concentration")

    def integral(form: ufl.Form) -> float:
        return comm.allreduce(fem.assemble_scalar(fem.form(form)), op=MPI.SUM)

    flux_energy = integral(ufl.inner(ufl.grad(c), ufl.grad(c)) * ufl.dx)  # Q / D for delta c = 1
    flux_gradient = -integral(c.dx(2) * ufl.dx) / lz
    area = lx * ly
    relative = flux_energy * lz / area  # D_eff / D
    tau = meta["eps"] / relative if relative > 0 else float("inf")
    cells_global = mesh.topology.index_map(tdim).size_global
    dofs = V.dofmap.index_map.size_global
    check = abs(flux_energy - flux_gradient) / flux_energy if flux_energy > 0 else 0.0
    total = time.perf_counter() - start
    logger.info(
        "tortuosity factor of %s along z: tau = %.6g (eps %.4g, D_eff/D %.4g), %d cells, %d dofs, %d CG iterations, %.2f s",
        phase, tau, meta["eps"], relative, cells_global, dofs, iterations, total,
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
        timings_s={"mesh": t_mesh, "solve": t_solve, "total": total},
    )


def tortuosity_factors(image: VoxelImage, phases: list[str] | None = None, comm: Any = None, **kwargs: Any) -> dict[str, TortuosityResult]:
    """Tortuosity factors along z of several phases (default: every phase with voxels). Collective."""
    names = list(image.require_phases()) if phases is None else list(phases)
    if phases is None:
        present = set(np.unique(image.array).tolist())
        names = [n for n in names if image.require_phases()[n] in present]
    return {name: tortuosity_factor(image, name, comm, **kwargs) for name in names}
