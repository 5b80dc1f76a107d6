"""Image analysis of segmented electrodes: synthetic microstructures, segmentation, metrics.

Pure NumPy/SciPy/scikit-image: importing this package never imports dolfinx or gmsh. The names
below load their module on first use (SPEC 1 lazy loading), so a solver that only needs
:mod:`fem_anode.imaging.slabs` does not pay for SciPy and scikit-image (about 30 MB per process).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fem_anode._lazy import attach

#: Public name -> the module of this package that defines it.
_EXPORTS = {
    # synthetic microstructures
    "ANODE_PHASES": "synthetic",
    "ROI_PHASES": "synthetic",
    "anode_volume": "synthetic",
    "fib_sem_roi": "synthetic",
    "render_gray": "synthetic",
    # the anode metrics of Vorauer et al. (2020)
    "per_slice_fractions": "metrics",
    "phase_fractions": "metrics",
    "compute_metrics": "metrics",
    "connections_per_depth": "metrics",
    "geodesic_tortuosity": "metrics",
    "pore_perimeter": "metrics",
    "pore_si_distance": "metrics",
    "pore_surface_area": "metrics",
    "relative_change": "metrics",
    "si_particles": "metrics",
    "tortuosity_field": "metrics",
    # segmentation
    "MultistageSettings": "settings",
    "RegionSettings": "settings",
    "SegmentationResult": "segmentation",
    "iou_per_phase": "segmentation",
    "isodata_threshold": "segmentation",
    "multiclass_isodata": "segmentation",
    "multistage_threshold": "segmentation",
    "region_segmentation": "segmentation",
    "threshold_segmentation": "segmentation",
}

__all__ = [
    "ANODE_PHASES",
    "MultistageSettings",
    "ROI_PHASES",
    "RegionSettings",
    "SegmentationResult",
    "anode_volume",
    "compute_metrics",
    "connections_per_depth",
    "fib_sem_roi",
    "geodesic_tortuosity",
    "iou_per_phase",
    "isodata_threshold",
    "multiclass_isodata",
    "multistage_threshold",
    "per_slice_fractions",
    "phase_fractions",
    "pore_perimeter",
    "pore_si_distance",
    "pore_surface_area",
    "region_segmentation",
    "relative_change",
    "render_gray",
    "si_particles",
    "threshold_segmentation",
    "tortuosity_field",
]

if TYPE_CHECKING:
    from fem_anode.imaging.metrics import (
        compute_metrics,
        connections_per_depth,
        geodesic_tortuosity,
        per_slice_fractions,
        phase_fractions,
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
    from fem_anode.imaging.settings import MultistageSettings, RegionSettings
    from fem_anode.imaging.synthetic import ANODE_PHASES, ROI_PHASES, anode_volume, fib_sem_roi, render_gray


__getattr__, __dir__ = attach(__name__, _EXPORTS)
