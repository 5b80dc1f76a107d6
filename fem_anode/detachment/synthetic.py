"""Synthetic detachment data with a known answer: sampled gaps and images of gapped electrodes.

* :func:`sample_gap_data` draws particles from the model itself (random number of active
  cycles, optional measurement noise), for parameter-recovery tests and demos;
* :func:`gapped_electrode` renders a label image of Si particles each surrounded by a gap
  (SEI next to the Si, then pore/epoxy) and a carbon-black/binder (CBD) shell, embedded in a
  pore/graphite background; in 2D it is an exact planar section through such a 3D electrode
  (each sphere cut at a random height), so the 2D->3D stereological conversion can be checked.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from fem_anode.detachment.data import CapacityData, GapData
from fem_anode.detachment.model import capacity_retention, default_radii, gap_statistics, gap_trajectories
from fem_anode.detachment.settings import ModelParameters, SizeDistribution
from fem_anode.errors import UsageError
from fem_anode.io.images import VoxelImage

__all__ = ["DETACHMENT_PHASES", "sample_gap_data", "model_capacity_data", "sample_radii", "gapped_electrode"]

logger = logging.getLogger(__name__)

#: Phase map of :func:`gapped_electrode`.
DETACHMENT_PHASES: dict[str, int] = {"pore": 0, "si": 1, "graphite": 2, "cbd": 3, "sei": 4}


def sample_radii(n: int, distribution: SizeDistribution, rng: np.random.Generator) -> np.ndarray:
    """``n`` random radii (m) from the truncated log-normal ``distribution``."""
    sigma = np.log(distribution.geometric_std)
    out = np.empty(0)
    while out.size < n:
        draw = distribution.median_radius * np.exp(sigma * rng.standard_normal(2 * n + 8))
        draw = draw[(draw >= distribution.min_radius) & (draw <= distribution.max_radius)]
        out = np.concatenate([out, draw])
    return out[:n]


def sample_gap_data(
    parameters: ModelParameters,
    cycles: Sequence[int],
    n_per_cycle: int | Sequence[int],
    rng: np.random.Generator,
    *,
    distribution: SizeDistribution | None = None,
    noise: float = 0.0,
) -> GapData:
    """Particles observed after the given cycles, with gaps drawn from the model.

    Each particle gets a radius from ``distribution``, a number of active cycles ``K`` drawn from
    the model's disconnection process and the gap ``d_K(r)``, plus Gaussian measurement noise of
    standard deviation ``noise`` (m), clipped at zero.
    """
    dist = distribution or SizeDistribution()
    per_cycle = np.asarray(n_per_cycle)
    counts = [int(per_cycle)] * len(cycles) if per_cycle.ndim == 0 else [int(n) for n in per_cycle]
    if len(counts) != len(cycles):
        raise UsageError("n_per_cycle must be one number or one per cycle")
    n_max = max(int(c) for c in cycles) if len(cycles) else 0
    cyc, rad, gap = [], [], []
    for c, n in zip(cycles, counts):
        r = sample_radii(n, dist, rng)
        d = gap_trajectories(
            r, parameters.alpha0, parameters.kappa0, parameters.delta0, max(n_max, 1), parameters.linear_expansion
        )
        p = np.clip(parameters.zeta0 * d, 0.0, 1.0)
        # Active cycles: first k with a disconnection after cycle k (k < c), else c.
        k = np.full(n, int(c))
        alive = np.ones(n, dtype=bool)
        for step in range(1, int(c)):
            drop = alive & (rng.random(n) < p[step])
            k[drop] = step
            alive &= ~drop
        g = d[k, np.arange(n)] + (noise * rng.standard_normal(n) if noise > 0 else 0.0)
        cyc.append(np.full(n, int(c)))
        rad.append(r)
        gap.append(np.maximum(g, 0.0))
    return GapData(np.concatenate(cyc), np.concatenate(rad), np.concatenate(gap), source="sample_gap_data")


def model_capacity_data(
    parameters: ModelParameters,
    *,
    radii: np.ndarray | None = None,
    distribution: SizeDistribution | None = None,
    noise: float = 0.0,
    rng: np.random.Generator | None = None,
) -> CapacityData:
    """Capacity retention after cycles ``0..N`` of the model, with optional Gaussian noise."""
    r = default_radii(distribution) if radii is None else np.asarray(radii, dtype=float)
    d = gap_trajectories(
        r, parameters.alpha0, parameters.kappa0, parameters.delta0, parameters.cycles, parameters.linear_expansion
    )
    survival, _, _ = gap_statistics(d, parameters.zeta0)
    cap = capacity_retention(survival, r)
    if noise > 0:
        cap = np.clip(cap + noise * (rng or np.random.default_rng()).standard_normal(cap.size), 0.0, 1.5)
        cap[0] = 1.0
    return CapacityData(np.arange(cap.size), cap, source="model_capacity_data")


def gapped_electrode(
    radii: Sequence[float],
    gaps: Sequence[float],
    *,
    shape: Sequence[int],
    voxel_size: float,
    sei: Sequence[float] | float = 0.0,
    cbd_thickness: float = 0.3e-6,
    graphite_fraction: float = 0.1,
    seed: int = 0,
    max_tries: int = 2000,
) -> tuple[VoxelImage, dict[str, np.ndarray]]:
    """Label image of Si spheres with gap shells and CBD shells; 2D = random planar section.

    Particles are placed without overlap (rejection sampling; those that do not fit are left
    out). In 3D each sphere is fully rendered. In 2D the image is the plane ``z = 0`` through
    spheres whose centres sit at a uniformly random height in ``(-R, R)``, so the section shows
    a Si disc of radius ``sqrt(R^2 - z^2)`` and an inflated gap ``sqrt((R+g)^2 - z^2) - sqrt(R^2 - z^2)``.
    The space not taken by particle shells is pore, with graphite discs/spheres (no CBD).

    Args:
        radii: Si sphere radii (m).
        gaps: gap from the Si surface to the CBD (m), one per particle.
        shape: image shape ``(y, x)`` or ``(z, y, x)``.
        voxel_size: isotropic voxel edge (m).
        sei: SEI thickness (m) next to the Si, inside the gap (clipped to the gap).
        cbd_thickness: thickness of the CBD shell around each gap (m).
        graphite_fraction: target area/volume fraction of graphite in the background.
        seed: random seed.
        max_tries: placement attempts per particle.

    Returns:
        ``(image, truth)`` with :data:`DETACHMENT_PHASES` labels and per placed particle the
        true ``radius_m``, ``gap_m``, ``section_radius_m`` and ``section_gap_m`` (2D only) and
        ``centre_m``.
    """
    shape = tuple(int(s) for s in shape)
    ndim = len(shape)
    if ndim not in (2, 3):
        raise UsageError(f"gapped_electrode: shape must be 2D or 3D, got {shape}")
    radii_a = np.asarray(radii, dtype=float)
    gaps_a = np.asarray(gaps, dtype=float)
    sei_a = np.broadcast_to(np.asarray(sei, dtype=float), radii_a.shape)
    if radii_a.shape != gaps_a.shape:
        raise UsageError("gapped_electrode: radii and gaps must have the same length")
    rng = np.random.default_rng(seed)
    h = float(voxel_size)
    extent = np.asarray(shape) * h
    order = np.argsort(-radii_a)  # big first: easier packing
    placed: list[tuple[np.ndarray, float, float, float, float, float]] = []  # centre, R_si, gap, sei, z, outer
    centres = np.zeros((0, ndim))
    outers: np.ndarray = np.zeros(0)
    for i in order:
        R, g, s = radii_a[i], gaps_a[i], min(sei_a[i], gaps_a[i])
        z = rng.uniform(-R, R) if ndim == 2 else 0.0
        outer = np.sqrt(max((R + g + cbd_thickness) ** 2 - z**2, 0.0))
        margin = outer + h
        if np.any(extent < 2 * margin):
            continue
        for _ in range(max_tries):
            c = rng.uniform(margin, extent - margin)
            if centres.shape[0] == 0 or np.all(np.linalg.norm(centres - c, axis=1) > outers + outer + 2 * h):
                placed.append((c, R, g, s, z, outer))
                centres = np.vstack([centres, c])
                outers = np.append(outers, outer)
                break
    if not placed:
        raise UsageError("gapped_electrode: no particle fits in the image; use a larger shape or smaller radii")
    labels = np.full(shape, DETACHMENT_PHASES["pore"], dtype=np.uint8)
    # Graphite background: random balls away from the particle shells.
    coords = np.stack(np.meshgrid(*[(np.arange(n) + 0.5) * h for n in shape], indexing="ij"), axis=-1)
    shells = np.zeros(shape, dtype=bool)
    for c, R, g, s, z, outer in placed:
        lo = np.maximum(np.floor((c - outer) / h).astype(int) - 1, 0)
        hi = np.minimum(np.ceil((c + outer) / h).astype(int) + 2, shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        dist = np.linalg.norm(coords[box] - c, axis=-1)
        dist3 = np.sqrt(dist**2 + z**2)  # distance to the 3D sphere centre (z = 0 in 3D)
        sub = labels[box]
        sub[dist3 <= R + g + cbd_thickness] = DETACHMENT_PHASES["cbd"]
        sub[dist3 <= R + g] = DETACHMENT_PHASES["pore"]
        sub[dist3 <= R + s] = DETACHMENT_PHASES["sei"]
        sub[dist3 <= R] = DETACHMENT_PHASES["si"]
        shells[box] |= dist3 <= R + g + cbd_thickness + 2 * h
    if graphite_fraction > 0:
        target = graphite_fraction * labels.size
        g_radius = 0.05 * float(extent.min())
        filled = 0
        for _ in range(200):
            if filled >= target:
                break
            c = rng.uniform(0, extent)
            rad = g_radius * rng.uniform(0.6, 1.4)
            lo = np.maximum(np.floor((c - rad) / h).astype(int), 0)
            hi = np.minimum(np.ceil((c + rad) / h).astype(int) + 1, shape)
            box = tuple(slice(a, b) for a, b in zip(lo, hi))
            ball = (np.linalg.norm(coords[box] - c, axis=-1) <= rad) & ~shells[box]
            sub = labels[box]
            filled += int(np.count_nonzero(ball & (sub == DETACHMENT_PHASES["pore"])))
            sub[ball] = DETACHMENT_PHASES["graphite"]
    R_all = np.array([p[1] for p in placed])
    g_all = np.array([p[2] for p in placed])
    z_all = np.array([p[4] for p in placed])
    truth = {
        "radius_m": R_all,
        "gap_m": g_all,
        "centre_m": np.array([p[0] for p in placed]),
    }
    if ndim == 2:
        truth["section_radius_m"] = np.sqrt(R_all**2 - z_all**2)
        truth["section_gap_m"] = np.sqrt((R_all + g_all) ** 2 - z_all**2) - truth["section_radius_m"]
    logger.debug("gapped_electrode: placed %d of %d particles", len(placed), radii_a.size)
    return VoxelImage(labels, (h,) * ndim, dict(DETACHMENT_PHASES), f"gapped_electrode(seed={seed}, {ndim}D)"), truth
