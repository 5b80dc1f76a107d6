"""Particle detachment from the carbon-black/binder domain (NumPy/SciPy; no dolfinx).

Gap measurement from images (:mod:`fem_anode.imaging.gaps`), the Maxwell-material detachment
model reconstructed from Müller et al. (2018) (:mod:`~fem_anode.detachment.model`), its least-squares fit
with a vectorised bootstrap (:mod:`~fem_anode.detachment.fitting`), CSV I/O, synthetic data and
figures. Importing this package never imports dolfinx, gmsh or mpi4py. SI units in the API.
"""

from fem_anode.detachment.data import (
    CapacityData,
    GapData,
    read_capacity_csv,
    read_gap_csv,
    read_radii_csv,
    write_capacity_csv,
    write_gap_csv,
)
from fem_anode.detachment.fitting import FitProblem, FitResult, fit, levenberg_marquardt
from fem_anode.detachment.maxwell import ramp_compression, time_to_tension
from fem_anode.detachment.model import (
    SimulationResult,
    capacity_retention,
    default_radii,
    gap_statistics,
    gap_trajectories,
    scenarios,
    simulate,
)
from fem_anode.detachment.settings import (
    PAPER_PARAMETERS,
    PARAMETER_NAMES,
    DetachmentSettings,
    FitSettings,
    ModelParameters,
    SizeDistribution,
)
from fem_anode.detachment.synthetic import DETACHMENT_PHASES, gapped_electrode, model_capacity_data, sample_gap_data

__all__ = [
    "CapacityData",
    "DETACHMENT_PHASES",
    "DetachmentSettings",
    "FitProblem",
    "FitResult",
    "FitSettings",
    "GapData",
    "ModelParameters",
    "PAPER_PARAMETERS",
    "PARAMETER_NAMES",
    "SimulationResult",
    "SizeDistribution",
    "capacity_retention",
    "default_radii",
    "fit",
    "gap_statistics",
    "gap_trajectories",
    "gapped_electrode",
    "levenberg_marquardt",
    "model_capacity_data",
    "ramp_compression",
    "read_capacity_csv",
    "read_gap_csv",
    "read_radii_csv",
    "sample_gap_data",
    "scenarios",
    "simulate",
    "time_to_tension",
    "write_capacity_csv",
    "write_gap_csv",
]
