r"""Tortuosity factor of a phase of a 3D voxel volume along z: ``tau = eps D / D_eff``.

Steady diffusion through one phase, ``c = 1`` on ``z = 0`` and ``c = 0`` on ``z = end``, no flux
elsewhere; ``eps`` is the volume fraction of the whole phase, ``D_eff = Q L_z / (L_x L_y Delta c)``
from the flux ``Q``. Voxels connect through faces only, and only clusters touching both z ends
carry flux. Three discretisations (``method``):

* ``"fv"`` (default, :mod:`.fv`): cell-centred finite volumes, one unknown per voxel, 7-point
  stencil, Dirichlet values half a voxel outside the first and last voxel centres. This is the
  value TauFactor, PoreSpy and OpenImpala report; distributed by z slabs (no whole-image work
  on any rank).
* ``"fe"`` (:mod:`.fe`): nodal trilinear (Q1) finite elements on one hexahedron per voxel. A
  different space (unknowns at voxel corners, conforming): for the same voxel geometry it
  lies below the FV value (FE underestimates tau, FV overestimates it at coarse resolution);
  both converge to the same limit when every voxel is split into k^3.
  Distributed by z slabs like ``"fv"`` (the voxel operator of the P1 diffusion model,
  :class:`~fem_anode.fem.voxel_p1.VoxelP1Operator`).
* ``"fe-extrapolated"``: the FE value on the voxels split into 1, 8 and 27 sub-voxels,
  Richardson-extrapolated to k -> infinity (an estimate of the voxel-geometry limit; 36x the
  work of ``"fe"``).

Lengths are in metres; tau and D_eff / D are dimensionless.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from fem_anode.errors import UsageError
from fem_anode.fem.tortuosity.fe import (
    element_stiffness,
    fe_tortuosity_factor,
    free_node_system,
    hex_mesh_arrays,
    percolating_mask,
)
from fem_anode.fem.tortuosity.result import METHODS, TortuosityResult
from fem_anode.io.images import VoxelImage

if TYPE_CHECKING:
    from mpi4py import MPI

__all__ = [
    "METHODS",
    "TortuosityResult",
    "element_stiffness",
    "free_node_system",
    "hex_mesh_arrays",
    "percolating_mask",
    "richardson_limit",
    "tortuosity_factor",
    "tortuosity_factors",
]

logger = logging.getLogger(__name__)


def richardson_limit(values: tuple[float, float, float]) -> tuple[float, float]:
    """Extrapolate values at voxel sizes h = 1, 1/2, 1/3 to h -> 0 assuming ``t = t0 + C h^p``.

    Returns:
        ``(t0, p)``, p fitted from the three values and clipped to [0.3, 4]; if the values are
        not monotone, ``(values[2], nan)``.
    """
    from scipy.optimize import brentq

    t1, t2, t3 = values
    if t2 == t3 or (t1 - t2) * (t2 - t3) <= 0:
        return float(t3), float("nan")
    ratio = (t1 - t2) / (t2 - t3)

    def f(p: float) -> float:
        return (1 - 2.0**-p) / (2.0**-p - 3.0**-p) - ratio

    lo, hi = 0.3, 4.0
    p = lo if f(lo) > 0 else hi if f(hi) < 0 else brentq(f, lo, hi)
    c = (t1 - t2) / (1 - 2.0**-p)
    return float(t1 - c), float(p)


def _validate(
    image: VoxelImage, phase: str, method: str, rtol: float, assembly: str
) -> tuple[int, tuple[float, float, float]]:
    if assembly not in ("voxel", "dolfinx"):
        raise UsageError(f"assembly must be one of voxel, dolfinx (FE only), got {assembly!r}")
    if method not in METHODS:
        raise UsageError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if not 0 < rtol < 1:
        raise UsageError(f"rtol must lie in (0, 1), got {rtol}")
    if image.ndim != 3:
        raise UsageError(f"tortuosity factor needs a 3D volume, {image.source} is {image.ndim}D")
    phases = image.require_phases()
    if phase not in phases:
        raise UsageError(f"phase {phase!r} is not in the phase map ({', '.join(phases)})")
    spacing = tuple(float(s) for s in image.require_voxel_size())
    return phases[phase], spacing  # type: ignore[return-value]  # a 3D image (checked above)


def _not_percolating(phase: str) -> str:
    return (
        f"phase {phase!r} does not percolate along z: no face-connected cluster touches both the z = 0 and the "
        "z = end faces, so D_eff = 0 and tau = inf"
    )


def tortuosity_factor(
    image: VoxelImage,
    phase: str,
    comm: MPI.Comm | None = None,
    *,
    method: str = "fv",
    rtol: float = 1e-5,
    max_iterations: int | None = None,
    petsc_options: dict[str, Any] | None = None,
    assembly: str = "voxel",
) -> TortuosityResult:
    """Tortuosity factor of ``phase`` along z (axis 0) of a 3D label image (collective).

    Args:
        image: 3D label image with voxel size (m) and phase map, passed on every rank; each
            reads only its slab of z layers (a ``np.load(..., mmap_mode="r")`` memmap keeps the
            rest on disk), except the FE reference ``assembly="dolfinx"``, which uses rank 0's array.
        phase: name of the phase diffusion goes through (e.g. ``"pore"``).
        comm: MPI communicator (default ``MPI.COMM_WORLD``).
        method: ``"fv"`` (default), ``"fe"`` or ``"fe-extrapolated"`` (see the module docstring).
        rtol: relative (preconditioned) residual tolerance of CG. Both methods report the energy
            flux, whose error is quadratic in the solution error: 1e-5 gives tau to about 1e-8
            with multigrid (FE default, FV with ``{"pc_type": "hypre"}``) and to about 1e-5 with
            the FV default CG + SSOR (measured 1e-7-1e-5).
        max_iterations: CG iteration limit (default 20000: the SSOR iterations grow like N^0.45,
            149 for FV and 101 for FE at 200^3).
        petsc_options: the solver. Default CG + SSOR for both methods (compiled sweeps, no
            set-up); ``{"pc_type": "hypre"}`` for BoomerAMG, ``{"pc_type": "gamg"}`` for PETSc GAMG
            (other PETSc options are then merged over the defaults); FE: ``ssor_omega``.
        assembly: FE only: ``"voxel"`` (the rows built from the voxels on each rank's slab,
            default) or ``"dolfinx"`` (the same FE problem through dolfinx forms with BoomerAMG;
            the reference).

    Returns:
        The result, identical on every rank.

    Raises:
        UsageError: not 3D, unknown phase, bad method, tolerance or assembly.
        InputError: too many unknowns for the PETSc index size.
        SolverError: CG did not converge or the solution is not finite.
    """
    from mpi4py import MPI

    comm = MPI.COMM_WORLD if comm is None else comm
    value, spacing = _validate(image, phase, method, rtol, assembly)
    if max_iterations is None:
        max_iterations = 20000  # SSOR's iterations grow like N^0.45 (FV 176 at 512^3)
    if method == "fe":
        return fe_tortuosity_factor(
            image, phase, comm, rtol=rtol, max_iterations=max_iterations, petsc_options=petsc_options, assembly=assembly
        )
    if method == "fe-extrapolated":
        return _fe_extrapolated(
            image, phase, comm, rtol=rtol, max_iterations=max_iterations, petsc_options=petsc_options, assembly=assembly
        )
    from fem_anode.fem.tortuosity.fv import fv_solve

    start = time.perf_counter()
    out = fv_solve(
        comm,
        image.array,
        value,
        spacing,
        phase=phase,
        rtol=rtol,
        max_iterations=max_iterations,
        petsc_options=petsc_options or {},
    )
    timings = out["timings"]
    timings["total"] = time.perf_counter() - start
    # Every rank measured its own phases: report the slowest (what the caller waited for).
    timings = {k: comm.allreduce(v, op=MPI.MAX) for k, v in sorted(timings.items())}
    relative = out["relative"]
    note = "" if relative > 0 else _not_percolating(phase)
    tau = out["eps"] / relative if relative > 0 else float("inf")
    if note:
        logger.info("%s", note)
    else:
        logger.info(
            "FV tortuosity factor of %s along z: tau = %.6g (eps %.4g, D_eff/D %.4g), %d unknowns, "
            "%d CG iterations, %.2f s",
            phase,
            tau,
            out["eps"],
            relative,
            out["dofs"],
            out["iterations"],
            timings["total"],
        )
    return TortuosityResult(
        phase=phase,
        tau=float(tau),
        relative_diffusivity=float(relative),
        volume_fraction=float(out["eps"]),
        percolating_fraction=float(out["perc"]),
        cells=int(out["dofs"]),
        dofs=int(out["dofs"]),
        iterations=int(out["iterations"]),
        flux_check_rel=float(out["flux_check_rel"]),
        ranks=comm.size,
        timings_s=timings,
        note=note,
        method="fv",
    )


def _fe_extrapolated(image: VoxelImage, phase: str, comm: MPI.Comm, **kwargs: Any) -> TortuosityResult:
    """FE tortuosity factors on the voxels split into k^3 (k = 1, 2, 3), Richardson-extrapolated."""
    start = time.perf_counter()
    results = []
    for k in (1, 2, 3):  # each rank reads its slab of the split voxels, layer by layer
        results.append(fe_tortuosity_factor(image, phase, comm, refine=k, **kwargs))
    base = results[0]
    timings = {
        "total": time.perf_counter() - start,
        **{f"k{k}": r.timings_s["total"] for k, r in zip((1, 2, 3), results)},
    }
    if not np.isfinite(base.tau):
        return TortuosityResult(**{**base.__dict__, "timings_s": timings, "method": "fe-extrapolated"})
    taus = tuple(r.tau for r in results)
    tau, order = richardson_limit(taus)  # type: ignore[arg-type]  # the three levels k = 1, 2, 3
    logger.info(
        "FE tortuosity factor of %s at k = 1, 2, 3: %s -> extrapolated %.6g (order %.2f)",
        phase,
        ", ".join(f"{t:.6g}" for t in taus),
        tau,
        order,
    )
    return TortuosityResult(
        phase=phase,
        tau=tau,
        relative_diffusivity=base.volume_fraction / tau,
        volume_fraction=base.volume_fraction,
        percolating_fraction=base.percolating_fraction,
        cells=results[-1].cells,
        dofs=results[-1].dofs,
        iterations=results[-1].iterations,
        flux_check_rel=max(r.flux_check_rel for r in results),
        ranks=comm.size,
        timings_s=timings,
        method="fe-extrapolated",
        refinement={"tau": list(taus), "order": order},
    )


def tortuosity_factors(
    image: VoxelImage, phases: list[str] | None = None, comm: MPI.Comm | None = None, **kwargs: Any
) -> dict[str, TortuosityResult]:
    """Tortuosity factors along z of several phases (default: every phase with voxels). Collective.

    Keyword arguments go to :func:`tortuosity_factor`.
    """
    from mpi4py import MPI

    from fem_anode.fem.tortuosity.clusters import slab_bounds

    comm = MPI.COMM_WORLD if comm is None else comm
    names = list(image.require_phases()) if phases is None else list(phases)
    if phases is None:
        slab = slab_bounds(comm, image.shape[0])  # each rank looks at its own slab only
        present = set().union(*comm.allgather(set(np.unique(np.asarray(image.array[slab.z0 : slab.z1])).tolist())))
        names = [n for n in names if image.require_phases()[n] in present]
    return {name: tortuosity_factor(image, name, comm, **kwargs) for name in names}
