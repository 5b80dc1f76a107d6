"""Gap between Si particles and the carbon-black/binder domain (CBD), by ray tracing, 2D and 3D.

For every Si particle (a connected component of the Si phase) this measures

* its effective radius: ``r = (3 V / 4 pi)^(1/3)`` in 3D, ``r = (A / pi)^(1/2)`` in 2D;
* the average distance from its surface to the CBD along rays (Müller et al. 2018, Supplementary
  Note 7/8, reconstructed): one ray per surface voxel, starting at the voxel centre and
  pointing along the outward surface normal (minus the gradient of the Gaussian-smoothed
  particle mask; radial from the centroid where that vanishes). Each ray is sampled every half
  voxel; the gap of a ray is the distance between the point where it leaves the particle and
  the point where it first enters the CBD (each boundary placed half a step before the first
  sample past it). Rays pass through every phase except: the CBD (hit), any Si voxel after
  leaving the particle and the ``blocking`` phases (default graphite) -- a ray stopped by those,
  leaving the image or longer than ``max_distance`` gives no value. The particle's gap is the
  mean over its valid rays; their spread is reported as well.

2D sections are converted to 3D equivalents with :func:`section_to_3d` (stereology of random
planar sections through spheres; see its docstring). Pure NumPy/SciPy.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from fem_anode.errors import InputError, UsageError
from fem_anode.io.images import VoxelImage

__all__ = ["ParticleGaps", "measure_gaps", "section_to_3d", "expected_section_gap"]

logger = logging.getLogger(__name__)

_MAX_SAMPLES = 4_000_000  # ray samples per chunk (memory bound)


@dataclasses.dataclass
class ParticleGaps:
    """Per-particle measurement (SI units); arrays have one entry per particle.

    Attributes:
        ndim: 2 (section) or 3.
        label: particle label in the component image.
        centroid_m: ``(n, ndim)`` centroid positions (m), axis order of the image.
        radius_m: effective radius of the particle (section radius in 2D).
        gap_m: mean gap over the valid rays (NaN if none).
        gap_std_m: standard deviation of the ray gaps.
        gap_median_m: median ray gap.
        n_rays: rays cast (surface voxels).
        n_valid: rays that reached the CBD.
        radius_3d_m, gap_3d_m: 3D equivalents (stereology in 2D, equal to the above in 3D).
    """

    ndim: int
    label: np.ndarray
    centroid_m: np.ndarray
    radius_m: np.ndarray
    gap_m: np.ndarray
    gap_std_m: np.ndarray
    gap_median_m: np.ndarray
    n_rays: np.ndarray
    n_valid: np.ndarray
    radius_3d_m: np.ndarray
    gap_3d_m: np.ndarray

    @property
    def valid(self) -> np.ndarray:
        """Particles with at least one valid ray."""
        return self.n_valid > 0

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def _surface(component: np.ndarray) -> np.ndarray:
    """Voxels of each component with a face neighbour outside it (same label image)."""
    inner = np.ones(component.shape, dtype=bool)
    for axis in range(component.ndim):
        for shift in (1, -1):
            rolled = np.roll(component, shift, axis=axis)
            edge: list[slice | int] = [slice(None)] * component.ndim
            edge[axis] = 0 if shift == 1 else -1
            rolled[tuple(edge)] = 0
            inner &= rolled == component
    return (component > 0) & ~inner


def measure_gaps(
    image: VoxelImage,
    *,
    si: str = "si",
    cbd: str = "cbd",
    blocking: Sequence[str] | None = None,
    max_distance: float = 5e-6,
    min_voxels: int = 8,
    exclude_border: bool = True,
    smoothing: float = 1.0,
    stereology: bool = True,
) -> ParticleGaps:
    """Effective radius and mean Si-to-CBD gap of every Si particle of a 2D/3D label image.

    Args:
        image: label image with voxel size and phase map.
        si: phase name of silicon.
        cbd: phase name of the carbon-black/binder domain.
        blocking: phases that stop a ray without a value; default ``("graphite",)`` if present.
        max_distance: longest gap searched (m).
        min_voxels: smaller Si components are ignored (noise).
        exclude_border: ignore particles touching the image border (cut, partial).
        smoothing: Gaussian sigma (voxels) of the mask whose gradient gives the ray directions.
        stereology: in 2D, convert to 3D equivalents with :func:`section_to_3d` (otherwise the
            3D columns repeat the 2D values).

    Raises:
        UsageError: unknown phase names, bad arguments.
        InputError: no Si particle left to measure.
    """
    phases = image.require_phases()
    voxel = np.asarray(image.require_voxel_size(), dtype=float)
    image.check_labels(require_all_phases=False)
    for name in (si, cbd):
        if name not in phases:
            raise UsageError(
                f"{image.source}: phase {name!r} not in the phase map {phases}; name the Si and CBD phases (--si, "
                "--cbd)"
            )
    if blocking is None:
        blocking = [p for p in ("graphite",) if p in phases]
    unknown = [p for p in blocking if p not in phases]
    if unknown:
        raise UsageError(f"{image.source}: blocking phase(s) {unknown} not in the phase map {phases}")
    if max_distance <= 0 or min_voxels < 1 or smoothing < 0:
        raise UsageError("max_distance must be positive, min_voxels >= 1 and smoothing >= 0")
    labels = image.array
    ndim = labels.ndim
    si_mask = labels == phases[si]
    cbd_mask = labels == phases[cbd]
    block_mask = np.isin(labels, [phases[p] for p in blocking]) if blocking else np.zeros(labels.shape, dtype=bool)
    if not cbd_mask.any():
        raise InputError(f"{image.source}: the image has no {cbd!r} voxels; gaps to the CBD cannot be measured")
    comp, n = ndimage.label(si_mask)
    if n == 0:
        raise InputError(f"{image.source}: the image has no {si!r} voxels")
    ids = np.arange(1, n + 1)
    sizes = ndimage.sum_labels(np.ones_like(comp), comp, ids)
    keep = sizes >= min_voxels
    if exclude_border:
        border = np.zeros(labels.shape, dtype=bool)
        for axis in range(ndim):
            sl: list[slice | int] = [slice(None)] * ndim
            sl[axis] = 0
            border[tuple(sl)] = True
            sl[axis] = -1
            border[tuple(sl)] = True
        touching = np.unique(comp[border & (comp > 0)])
        keep[touching - 1] = False
    kept_ids = ids[keep]
    if kept_ids.size == 0:
        raise InputError(
            f"{image.source}: no Si particle with >= {min_voxels} voxels"
            + (" away from the image border" if exclude_border else "")
        )
    cell = float(np.prod(voxel))
    measure = sizes[keep] * cell
    radius = (3.0 * measure / (4.0 * np.pi)) ** (1.0 / 3.0) if ndim == 3 else np.sqrt(measure / np.pi)
    centroids_idx = np.asarray(ndimage.center_of_mass(np.ones_like(comp), comp, kept_ids), dtype=float).reshape(
        -1, ndim
    )

    # Rays: one per surface voxel of a kept particle.
    surf = _surface(comp) & np.isin(comp, kept_ids)
    start = np.argwhere(surf)
    owner = comp[tuple(start.T)]
    smooth = ndimage.gaussian_filter(si_mask.astype(float), smoothing) if smoothing > 0 else si_mask.astype(float)
    grads = np.stack([g / h for g, h in zip(np.gradient(smooth), voxel)], axis=-1)
    direction = -grads[tuple(start.T)]
    rank = np.searchsorted(kept_ids, owner)
    radial = (start - centroids_idx[rank]) * voxel
    norm = np.linalg.norm(direction, axis=1)
    weak = norm < 1e-6 * np.max(norm, initial=1.0)
    direction[weak] = radial[weak]
    norm = np.linalg.norm(direction, axis=1)
    good = norm > 0
    direction[good] /= norm[good, None]
    step = 0.5 * float(voxel.min())
    n_steps = int(np.ceil(max_distance / step)) + 2
    t = step * (np.arange(n_steps) + 0.75)  # offset: no sample falls on a voxel face (rounding tie)
    ray_gap = np.full(start.shape[0], np.nan)
    chunk = max(1, _MAX_SAMPLES // n_steps)
    shape = np.asarray(labels.shape)
    for a in range(0, start.shape[0], chunk):
        b = min(a + chunk, start.shape[0])
        pos = start[a:b, None, :] + t[None, :, None] * (direction[a:b, None, :] / voxel)  # (m, K, ndim) index units
        idx = np.rint(pos).astype(np.int64)
        inside = np.all((idx >= 0) & (idx < shape), axis=-1)
        idx = np.where(inside[..., None], idx, 0)
        flat = tuple(idx[..., k] for k in range(ndim))
        own = (comp[flat] == owner[a:b, None]) & inside
        left = np.cumsum(~own, axis=1) > 0  # at or after the first sample outside the particle
        first_out = np.argmax(left, axis=1)
        hit = cbd_mask[flat] & inside & left
        stop = (~inside | block_mask[flat] | si_mask[flat]) & left
        k_hit = np.where(hit.any(axis=1), np.argmax(hit, axis=1), n_steps)
        k_stop = np.where(stop.any(axis=1), np.argmax(stop, axis=1), n_steps)
        ok = left.any(axis=1) & (k_hit < k_stop) & (k_hit < n_steps)
        gap = (k_hit - first_out) * step
        ray_gap[a:b] = np.where(ok & (gap <= max_distance), gap, np.nan)
    valid = np.isfinite(ray_gap)
    n_rays = np.bincount(rank, minlength=kept_ids.size)
    n_valid = np.bincount(rank[valid], minlength=kept_ids.size)
    sums = np.bincount(rank[valid], weights=ray_gap[valid], minlength=kept_ids.size)
    sq = np.bincount(rank[valid], weights=ray_gap[valid] ** 2, minlength=kept_ids.size)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n_valid > 0, sums / np.maximum(n_valid, 1), np.nan)
        std = np.where(n_valid > 0, np.sqrt(np.maximum(sq / np.maximum(n_valid, 1) - mean**2, 0.0)), np.nan)
    median = np.full(kept_ids.size, np.nan)
    order = np.lexsort((ray_gap[valid], rank[valid]))
    sorted_rank, sorted_gap = rank[valid][order], ray_gap[valid][order]
    starts = np.searchsorted(sorted_rank, np.arange(kept_ids.size))
    has = n_valid > 0
    lo = starts[has] + (n_valid[has] - 1) // 2
    hi = starts[has] + n_valid[has] // 2
    median[has] = 0.5 * (sorted_gap[lo] + sorted_gap[hi])
    if ndim == 2 and stereology:
        radius_3d, gap_3d = section_to_3d(radius, np.where(has, mean, 0.0))
        gap_3d = np.where(has, gap_3d, np.nan)
    else:
        radius_3d, gap_3d = radius.copy(), mean.copy()
    if (~has).any():
        logger.warning(
            "%s: %d of %d particles have no ray reaching the CBD within %.3g m",
            image.source,
            int((~has).sum()),
            has.size,
            max_distance,
        )
    logger.info("%s: %d particles, %d rays (%d valid)", image.source, kept_ids.size, start.shape[0], int(valid.sum()))
    return ParticleGaps(
        ndim=ndim,
        label=kept_ids,
        centroid_m=(centroids_idx + 0.5) * voxel,
        radius_m=radius,
        gap_m=mean,
        gap_std_m=std,
        gap_median_m=median,
        n_rays=n_rays,
        n_valid=n_valid,
        radius_3d_m=radius_3d,
        gap_3d_m=gap_3d,
    )


def expected_section_gap(radius: np.ndarray | float, gap: np.ndarray | float) -> np.ndarray:
    """Mean gap seen in random planar sections through a sphere of ``radius`` with a gap shell.

    A plane at distance ``z`` (uniform in ``[0, R]``, sections that cut the Si) shows a Si disc
    of radius ``sqrt(R^2 - z^2)`` and a gap ``sqrt((R+g)^2 - z^2) - sqrt(R^2 - z^2)``; averaged::

        E[g2] = ( I(R + g) - pi R^2 / 4 ) / R,   I(a) = R/2 sqrt(a^2 - R^2) + a^2/2 asin(R / a)
    """
    R = np.asarray(radius, dtype=float)
    a = R + np.asarray(gap, dtype=float)
    integral = 0.5 * R * np.sqrt(np.maximum(a**2 - R**2, 0.0)) + 0.5 * a**2 * np.arcsin(np.clip(R / a, -1.0, 1.0))
    return (integral - 0.25 * np.pi * R**2) / R


def section_to_3d(
    section_radius: np.ndarray | Sequence[float], section_gap: np.ndarray | Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """3D-equivalent radius and gap of particles seen in a random planar section (stereology).

    Model: spherical particles with a uniform gap shell, cut by a plane at a uniformly random
    distance ``z`` from the centre (given that the Si is cut). Then ``E[rho] = pi R / 4``, so the
    radius is ``R = 4 rho / pi``, and the gap is the ``g`` for which the *mean* section gap of such
    a sphere equals the measured one, ``expected_section_gap(R, g) = g2`` (solved by bisection;
    ``g <= g2`` because oblique cuts widen the gap). Both relations hold exactly for averages
    over many sections of equal spheres, which is how the 2D data are used (scatter against the
    3D data and fit of the mean gap). Lengths in metres (any unit works).
    """
    rho = np.asarray(section_radius, dtype=float)
    g2 = np.asarray(section_gap, dtype=float)
    if rho.shape != g2.shape:
        raise UsageError("section_to_3d: radii and gaps must have the same shape")
    if np.any(~np.isfinite(rho)) or np.any(rho <= 0) or np.any(~np.isfinite(g2)) or np.any(g2 < 0):
        raise InputError("section_to_3d: section radii must be positive and gaps non-negative, all finite")
    R = 4.0 * rho / np.pi
    lo = np.zeros_like(g2)
    hi = g2.copy()
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        too_small = expected_section_gap(R, mid) < g2
        lo = np.where(too_small, mid, lo)
        hi = np.where(too_small, hi, mid)
    return R, 0.5 * (lo + hi)
