r"""Transient Li diffusion in the SEI/carbon/binder domain with mass-transfer boundaries.

The model of Vorauer et al. (2020), "Modeling the Li-diffusion in the microstructure":

.. math::

    \varepsilon \frac{\partial c}{\partial t} = \nabla\cdot(D_\mathrm{eff}\nabla c)
    \quad\text{in the SEI/C/B domain},\qquad D_\mathrm{eff} = \varepsilon^{b} D,

    -D_\mathrm{eff}\nabla c\cdot n = -k_f (c_\mathrm{bulk} - c)\ \text{on pore interfaces (inflow)},\quad
    -D_\mathrm{eff}\nabla c\cdot n = k_\mathrm{si}\, c\ \text{on Si interfaces},

no flux on the image box, ``c = 0`` at ``t = 0``. SI units: c in mol/m^3, D in m^2/s, k in
m/s, t in s, lengths in m.

The subpackage:

* :mod:`.settings`: the validated settings of a run (SI units), the TOML schema of
  ``fem-anode diffusion``;
* :mod:`.transient`: solvers and the BDF time loop over any discretisation (no dolfinx);
* :mod:`.finite_element`: P1/P2 Lagrange elements on a tagged dolfinx mesh
  (:class:`DiffusionProblem`);
* :mod:`.finite_volume`: cell-centred finite volumes on the voxels of an image
  (:class:`VoxelFVProblem`, PETSc and NumPy only, so a finite-volume run never imports dolfinx);
* :mod:`.geometry`: the domain of a solve (image by layers, voxel or smooth mesh, mesh file);
* :mod:`.run`: a whole run in memory (:func:`simulate_diffusion` -> :class:`DiffusionRun`) and
  its files (:func:`run_diffusion`); :mod:`.particles`, :mod:`.plots`: reports and figures;
* :mod:`.time_stepping`, :mod:`.multigrid`, :mod:`.results`: step plans, the shifted multigrid,
  the records of a run.

Importing this package loads neither dolfinx nor PETSc; the names below are imported on first use.
"""

from importlib import import_module
from typing import Any

from fem_anode.fem.diffusion.results import DiffusionResult
from fem_anode.fem.diffusion.settings import (
    DiffusionSettings,
    GeometrySettings,
    MeshSettings,
    OutputSettings,
    PhysicsSettings,
    Region,
    SolverSettings,
    TimeSettings,
)

_LAZY = {
    "DiffusionProblem": "finite_element",
    "VoxelFVProblem": "finite_volume",
    "TransientDiffusion": "transient",
    "DiffusionRun": "run",
    "simulate_diffusion": "run",
    "run_diffusion": "run",
    "GeometrySource": "geometry",
    "load_geometry": "geometry",
}

__all__ = [
    "DiffusionProblem",
    "DiffusionResult",
    "DiffusionRun",
    "DiffusionSettings",
    "GeometrySettings",
    "GeometrySource",
    "MeshSettings",
    "OutputSettings",
    "PhysicsSettings",
    "Region",
    "SolverSettings",
    "TimeSettings",
    "TransientDiffusion",
    "VoxelFVProblem",
    "load_geometry",
    "run_diffusion",
    "simulate_diffusion",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
