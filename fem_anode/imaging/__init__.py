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
