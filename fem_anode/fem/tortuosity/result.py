"""The result of a tortuosity-factor computation (shared by the FV and FE methods)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

__all__ = ["METHODS", "TortuosityResult"]

#: Methods of :func:`fem_anode.fem.tortuosity.tortuosity_factor`: the cell-centred finite-volume
#: value (TauFactor's, PoreSpy's and OpenImpala's convention; default), the nodal Q1 finite-element
#: value, and the FE value extrapolated from the voxels split into 1, 8 and 27.
METHODS = ("fv", "fe", "fe-extrapolated")


@dataclasses.dataclass
class TortuosityResult:
    """Tortuosity factor of one phase along z.

    Attributes:
        phase: phase name.
        tau: tortuosity factor eps D / D_eff (``inf`` if the phase does not percolate along z).
        relative_diffusivity: D_eff / D (0 if not percolating).
        volume_fraction: eps, fraction of all voxels that belong to the phase.
        percolating_fraction: fraction of all voxels in clusters spanning z (the solved domain).
        cells, dofs: cells and unknowns of the solve (0 if none). FV: both are the voxels of the
            spanning clusters; FE: voxel-mesh hexahedra and P1 nodes.
        iterations: CG iterations.
        flux_check_rel: FV: relative difference of the fluxes through the z = 0 and z = end faces;
            FE: relative difference between the energy (reaction) flux and the
            volume-averaged-gradient flux (small when the solve is converged).
        ranks: MPI ranks of the solve.
        timings_s: wall times (s) of the phases: ``percolation`` (cluster labelling), ``mesh``
            (FE hexahedron arrays), ``assembly`` (matrix and load; FE with ``assembly="dolfinx"``
            also ``mesh_dolfinx``), ``pc_setup`` (multigrid), ``cg``, ``solve`` (= pc_setup + cg),
            ``flux`` and ``total``.
        note: why tau is infinite, else empty.
        method: ``"fv"``, ``"fe"`` or ``"fe-extrapolated"`` (see :data:`METHODS`).
        refinement: ``fe-extrapolated`` only: ``{"tau": [k = 1, 2, 3], "order": p}``.
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
    method: str = "fv"
    refinement: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (``tau`` = None when infinite, as elsewhere in metrics.json)."""
        out = dataclasses.asdict(self)
        out["tau"] = self.tau if np.isfinite(self.tau) else None
        if out["refinement"] is None:
            del out["refinement"]
        return out
