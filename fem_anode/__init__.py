"""fem_anode: image-based FEniCSx modelling of aged silicon-based Li-ion battery anodes.

The public API (:mod:`fem_anode.api`, see ``docs/api.md``)::

    import fem_anode as fa

    img = fa.read_image("roi.npy", voxel_size="20nm", phases="pore=0,si=1,sei=3")
    m = fa.compute_metrics(img)
    res = fa.solve_diffusion(img, fa.DiffusionSettings(time={"t_end": 1.0, "output_times": [0.1, 1.0]}))
    res.save("out/")
    pf = fa.solve_phasefield(fa.PhaseFieldSettings(cycling={"half_cycles": 2}))
    tau = fa.tortuosity_factor(img, "pore")

Subpackages:

* :mod:`fem_anode.io` -- images with voxel size and phase map; atomic result files.
* :mod:`fem_anode.imaging` -- synthetic microstructures, segmentation, image metrics (NumPy/SciPy).
* :mod:`fem_anode.meshing` -- segmented images to tagged gmsh meshes.
* :mod:`fem_anode.fem` -- dolfinx solvers (needs FEniCSx).
* :mod:`fem_anode.detachment` -- particle-detachment model and fit (NumPy/SciPy).

Units: SI throughout the public API (lengths in metres) unless a docstring says otherwise.
Importing this package imports neither dolfinx nor gmsh nor MPI; the API's names are loaded on
first use.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "DiffusionRun",
    "DiffusionSettings",
    "FemAnodeError",
    "InputError",
    "Interrupted",
    "Metrics",
    "PhaseFieldRun",
    "PhaseFieldSettings",
    "SolverError",
    "TortuosityResult",
    "UsageError",
    "VoxelImage",
    "compute_metrics",
    "read_image",
    "solve_diffusion",
    "solve_phasefield",
    "tortuosity_factor",
]

if TYPE_CHECKING:
    from fem_anode.api import (
        DiffusionRun,
        DiffusionSettings,
        FemAnodeError,
        InputError,
        Interrupted,
        Metrics,
        PhaseFieldRun,
        PhaseFieldSettings,
        SolverError,
        TortuosityResult,
        UsageError,
        VoxelImage,
        compute_metrics,
        read_image,
        solve_diffusion,
        solve_phasefield,
        tortuosity_factor,
    )


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(import_module("fem_anode.api"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
