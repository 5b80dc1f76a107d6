"""Image analysis of segmented electrodes: synthetic microstructures, segmentation, metrics.

Pure NumPy/SciPy/scikit-image: importing this package never imports dolfinx or gmsh.
"""

from fem_anode.imaging.metrics import per_slice_fractions, phase_fractions
from fem_anode.imaging.synthetic import ANODE_PHASES, ROI_PHASES, anode_volume, fib_sem_roi, render_gray

__all__ = [
    "ANODE_PHASES",
    "ROI_PHASES",
    "anode_volume",
    "fib_sem_roi",
    "per_slice_fractions",
    "phase_fractions",
    "render_gray",
]

# Segmentation and the anode metrics of Vorauer et al. (2020).
from fem_anode.imaging.metrics import (
    compute_metrics,
    connections_per_depth,
    geodesic_tortuosity,
    pore_perimeter,
    pore_si_distance,
    pore_surface_area,
    relative_change,
    si_particles,
    tortuosity_field,
)
from fem_anode.imaging.segmentation import (
    SegmentationResult,
    iou_per_phase,
    isodata_threshold,
    multiclass_isodata,
    multistage_threshold,
    region_segmentation,
    threshold_segmentation,
)

__all__ += [
    "SegmentationResult",
    "compute_metrics",
    "connections_per_depth",
    "geodesic_tortuosity",
    "iou_per_phase",
    "isodata_threshold",
    "multiclass_isodata",
    "multistage_threshold",
    "pore_perimeter",
    "pore_si_distance",
    "pore_surface_area",
    "region_segmentation",
    "relative_change",
    "si_particles",
    "threshold_segmentation",
    "tortuosity_field",
]
