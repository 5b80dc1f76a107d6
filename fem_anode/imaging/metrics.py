"""Image metrics of segmented electrode volumes (NumPy/SciPy; no dolfinx).

All functions take a label :class:`~fem_anode.io.images.VoxelImage` with a phase map and
return plain dicts of numbers in SI units, ready for ``metrics.json``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fem_anode.io.images import VoxelImage

__all__ = ["compute_metrics", "phase_fractions", "per_slice_fractions"]


def phase_fractions(image: VoxelImage) -> dict[str, float]:
    """Volume (3D) or area (2D) fraction of each named phase; they sum to 1."""
    phases = image.require_phases()
    image.check_labels(require_all_phases=False)
    total = image.array.size
    return {name: float(np.count_nonzero(image.array == value) / total) for name, value in phases.items()}


def per_slice_fractions(image: VoxelImage) -> dict[str, dict[str, Any]]:
    """Fraction of each phase per slice along axis 0 (z for 3D, rows for 2D).

    Returns, per phase, ``mean``, ``min``, ``max`` and the full ``profile`` (one value per
    slice, index 0 at the electrode surface) plus the slice positions ``depth_m`` (slice centres).
    """
    phases = image.require_phases()
    image.check_labels(require_all_phases=False)
    labels = image.array
    n_slices = labels.shape[0]
    per_slice = labels.reshape(n_slices, -1)
    spacing = image.voxel_size[0] if image.voxel_size else None
    result: dict[str, dict[str, Any]] = {}
    for name, value in phases.items():
        profile = np.count_nonzero(per_slice == value, axis=1) / per_slice.shape[1]
        result[name] = {
            "mean": float(profile.mean()),
            "min": float(profile.min()),
            "max": float(profile.max()),
            "profile": profile.tolist(),
        }
    if spacing is not None:
        result["depth_m"] = ((np.arange(n_slices) + 0.5) * spacing).tolist()  # type: ignore[assignment]
    return result


def compute_metrics(image: VoxelImage) -> dict[str, Any]:
    """All metrics of a label image with voxel size and phase map, as a JSON-ready dict (SI)."""
    image.check_labels(require_all_phases=False)
    voxel_size = image.require_voxel_size()
    return {
        "image": {
            "source": image.source,
            "shape": list(image.shape),
            "ndim": image.ndim,
            "voxel_size_m": list(voxel_size),
            "extent_m": list(image.extent),
            "phases": image.require_phases(),
        },
        "phase_fractions": phase_fractions(image),
        "per_slice": per_slice_fractions(image),
    }
