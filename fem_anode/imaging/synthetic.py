"""Seeded synthetic microstructures of Si/graphite anodes with a known ground truth.

Three generators, each returning a :class:`~fem_anode.io.images.VoxelImage` with voxel size
(m) and phase map, deterministic for a given ``seed``:

* :func:`anode_volume` -- a 3D synchrotron-CT-like volume (default voxel 0.65 um, as in the
  paper's micro-SCT) of graphite particles, Si particles attached to them, an intermediate
  SEI/carbon-binder (CBD) domain around the Si and on the graphite, and pores. ``aged=True``
  applies the ageing seen in Vorauer et al. (2020) to the *same* structure: the intermediate
  (SEI) domain grows into the pores, more strongly near the electrode surface (z = 0), and Si
  particles fracture into smaller fragments.
* :func:`fib_sem_roi` -- a 2D FIB-SEM-like region of interest (default 5 x 8 um at 20 nm
  pixels) of pores, Si particles and an SEI/C/B matrix, as used for the Li-diffusion model.
* :func:`render_gray` -- a gray-value rendering of any label image (per-phase gray levels,
  Gaussian blur, Gaussian noise and optionally a FIB-SEM shine-through artefact inside pores)
  so that segmentation can be tested against the known labels.
* :func:`random_anode_slice` -- a 2D gray slice and its labels with the structure *and* the
  imaging drawn at random (phase fractions, coating thickness, gray levels, blur, noise), for
  robustness studies: a method tuned to one rendering meets many here.

Phase maps: :data:`ANODE_PHASES` for volumes, :data:`ROI_PHASES` for the 2D ROI.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage

from fem_anode.errors import UsageError
from fem_anode.io.images import VoxelImage

__all__ = [
    "ANODE_PHASES",
    "ROI_PHASES",
    "DEFAULT_GRAY_LEVELS",
    "anode_volume",
    "fib_sem_roi",
    "render_gray",
    "random_spheres",
    "random_anode_slice",
]

#: Phase map of :func:`anode_volume` (names as in the paper: intermediate domain = ``sei``).
ANODE_PHASES: dict[str, int] = {"pore": 0, "si": 1, "graphite": 2, "sei": 3}
#: Phase map of :func:`fib_sem_roi` (``sei`` = the SEI/carbon/binder compound domain).
ROI_PHASES: dict[str, int] = {"pore": 0, "si": 1, "sei": 3}
#: Gray level of each phase name in :func:`render_gray` (0 = black, 1 = white).
DEFAULT_GRAY_LEVELS: dict[str, float] = {"pore": 0.12, "sei": 0.42, "graphite": 0.58, "si": 0.88}


def _ball_offsets(radius: float, ndim: int) -> np.ndarray:
    r = int(np.ceil(radius))
    grid = np.mgrid[(slice(-r, r + 1),) * ndim].reshape(ndim, -1).T
    return grid[(grid**2).sum(axis=1) <= radius**2]


def random_spheres(
    shape: Sequence[int],
    volume_fraction: float,
    radius_range: tuple[float, float],
    rng: np.random.Generator,
    allowed: np.ndarray | None = None,
    max_spheres: int = 100_000,
) -> np.ndarray:
    """Boolean mask of randomly placed (overlapping) balls reaching ``volume_fraction``.

    Centres are drawn uniformly among the ``allowed`` voxels (all if ``None``); radii uniformly
    in ``radius_range`` (voxels). Works in 2D (discs) and 3D (spheres).
    """
    shape = tuple(int(s) for s in shape)
    mask = np.zeros(shape, dtype=bool)
    candidates = np.flatnonzero(allowed) if allowed is not None else None
    target = volume_fraction * mask.size
    filled = 0
    for _ in range(max_spheres):
        if filled >= target:
            break
        if candidates is not None:
            if candidates.size == 0:
                break
            centre = np.array(np.unravel_index(rng.choice(candidates), shape))
        else:
            centre = np.array([rng.integers(0, s) for s in shape])
        offsets = _ball_offsets(rng.uniform(*radius_range), len(shape))
        points = centre + offsets
        inside = np.all((points >= 0) & (points < shape), axis=1)
        idx = tuple(points[inside].T)
        filled += int(np.count_nonzero(~mask[idx]))
        mask[idx] = True
    return mask


def anode_volume(
    shape: Sequence[int] = (40, 80, 80),
    voxel_size: float | Sequence[float] = 0.65e-6,
    *,
    aged: bool = False,
    seed: int = 0,
    graphite_fraction: float = 0.33,
    si_fraction: float = 0.08,
    binder_thickness: float = 1.0,
    sei_growth: float = 1.5,
    surface_ageing_gradient: float = 1.0,
    fracture_fraction: float = 0.35,
) -> VoxelImage:
    """3D pristine or aged Si/graphite/pore/intermediate-domain volume, axes (z, y, x).

    Args:
        shape: voxels per axis (z = depth from the electrode surface at index 0).
        voxel_size: voxel edge(s) in metres.
        aged: apply SEI growth into the pores and Si fracture to the same pristine structure.
        seed: seeds every random choice; pristine and aged volumes of one seed share geometry.
        graphite_fraction: target volume fraction of graphite spheres (radius 4-8 voxels).
        si_fraction: target volume fraction of Si spheres (radius 1.2-2.8 voxels), placed in the
            pore space within 2 voxels of graphite.
        binder_thickness: thickness (voxels) of the intermediate SEI/CBD domain around Si and
            on graphite, in the pristine state.
        sei_growth: extra intermediate-domain thickness (voxels) grown into pores when aged, at
            the electrode surface.
        surface_ageing_gradient: relative decrease of ``sei_growth`` from z = 0 to the bottom
            (0 = uniform ageing, 1 = no growth at the current collector).
        fracture_fraction: fraction of Si voxels turned into SEI when aged (cracks), which
            splits particles into smaller fragments.

    Returns:
        Labels with :data:`ANODE_PHASES` and the voxel size.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 4:
        raise UsageError(f"anode_volume needs a 3D shape with at least 4 voxels per axis, got {shape}")
    rng = np.random.default_rng(seed)
    graphite = random_spheres(shape, graphite_fraction, (4.0, 8.0), rng)
    dist_to_graphite = ndimage.distance_transform_edt(~graphite)
    near_graphite = (dist_to_graphite > 0) & (dist_to_graphite <= 2.0)
    si = random_spheres(shape, si_fraction, (1.2, 2.8), rng, allowed=near_graphite) & ~graphite
    dist_to_si = ndimage.distance_transform_edt(~si)
    intermediate = (
        ~graphite & ~si & ((dist_to_si <= binder_thickness + 0.5) | (dist_to_graphite <= 0.5 * binder_thickness + 0.5))
    )
    labels = np.full(shape, ANODE_PHASES["pore"], dtype=np.uint8)
    labels[intermediate] = ANODE_PHASES["sei"]
    labels[graphite] = ANODE_PHASES["graphite"]
    labels[si] = ANODE_PHASES["si"]
    # Ageing draws from its own stream so the pristine structure is identical for both.
    ageing_rng = np.random.default_rng([seed, 1])
    if aged:
        solid = labels != ANODE_PHASES["pore"]
        depth = np.linspace(0.0, 1.0, shape[0])[:, None, None]
        growth = sei_growth * (1.0 - surface_ageing_gradient * depth)
        noise = ndimage.gaussian_filter(ageing_rng.standard_normal(shape), 1.5)
        noise *= 0.5 / max(noise.std(), 1e-12)
        dist_to_solid = ndimage.distance_transform_edt(~solid)
        labels[(~solid) & (dist_to_solid <= growth + 0.5 + noise)] = ANODE_PHASES["sei"]
        cracks = ndimage.gaussian_filter(ageing_rng.standard_normal(shape), 0.8)
        si_now = labels == ANODE_PHASES["si"]
        if si_now.any() and fracture_fraction > 0:
            level = np.quantile(cracks[si_now], fracture_fraction)
            labels[si_now & (cracks < level)] = ANODE_PHASES["sei"]
    return VoxelImage(labels, _voxel_size(voxel_size, 3), dict(ANODE_PHASES), f"anode_volume(seed={seed}, aged={aged})")


def fib_sem_roi(
    size: Sequence[float] = (8e-6, 5e-6),
    pixel_size: float = 20e-9,
    *,
    seed: int = 0,
    pore_fraction: float = 0.25,
    si_fraction: float = 0.11,
    si_radius_range: tuple[float, float] = (60e-9, 300e-9),
    pore_correlation_length: float = 350e-9,
) -> VoxelImage:
    """2D FIB-SEM-like ROI of pores, Si particles and the SEI/C/B matrix, axes (y, x).

    Pores are the excursions of a smoothed Gaussian random field (correlation length
    ``pore_correlation_length``), Si particles are discs in the matrix; the matrix
    (SEI/C/B, the transporting phase of the diffusion model) is the rest, so its area
    fraction is about ``1 - pore_fraction - si_fraction`` (the paper's ROI: 0.63985).

    Args:
        size: physical height (y) and width (x) in metres, default 8 x 5 um.
        pixel_size: pixel edge in metres.
        seed: random seed.
        pore_fraction: target area fraction of pores.
        si_fraction: target area fraction of Si.
        si_radius_range: Si disc radii in metres.
        pore_correlation_length: smoothing length of the pore field in metres.

    Returns:
        Labels with :data:`ROI_PHASES` and the pixel size.
    """
    shape = tuple(max(8, round(s / pixel_size)) for s in size)
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.standard_normal(shape), pore_correlation_length / pixel_size, mode="reflect")
    pores = field > np.quantile(field, 1.0 - pore_fraction)
    pores = ndimage.binary_opening(pores, iterations=2)
    labels_pore, n = ndimage.label(pores)
    if n:
        sizes = ndimage.sum_labels(pores, labels_pore, index=np.arange(1, n + 1))
        pores = np.isin(labels_pore, 1 + np.flatnonzero(sizes >= 25))
    dist_to_pore = ndimage.distance_transform_edt(~pores)
    radii = (si_radius_range[0] / pixel_size, si_radius_range[1] / pixel_size)
    allowed = dist_to_pore > radii[0] + 1
    si = random_spheres(shape, si_fraction, radii, rng, allowed=allowed) & (dist_to_pore > 1)
    labels = np.full(shape, ROI_PHASES["sei"], dtype=np.uint8)
    labels[pores] = ROI_PHASES["pore"]
    labels[si] = ROI_PHASES["si"]
    return VoxelImage(labels, (pixel_size, pixel_size), dict(ROI_PHASES), f"fib_sem_roi(seed={seed})")


def render_gray(
    image: VoxelImage,
    *,
    gray_levels: Mapping[str, float] | None = None,
    blur_sigma: float = 1.0,
    noise_sigma: float = 0.04,
    shine_through: float = 0.0,
    seed: int = 0,
) -> VoxelImage:
    """Gray-value image (float64, about 0..1) of a label image, for testing segmentation.

    The gray image is ``blur(level[label] + artefact) + noise``. The shine-through artefact of
    FIB-SEM (material behind a pore seen through it) brightens the pore interior: in a fraction
    ``shine_through`` of the pore components (chosen at random) the gray value rises toward the
    matrix level near the pore wall and decays with distance from it, with a mottled texture,
    so a global gray threshold mislabels those pore pixels while region statistics do not.

    Args:
        image: label image with a phase map.
        gray_levels: gray level per phase name; defaults from :data:`DEFAULT_GRAY_LEVELS`,
            unknown names spread evenly.
        blur_sigma: Gaussian blur in voxels (point-spread function).
        noise_sigma: standard deviation of additive Gaussian noise.
        shine_through: fraction (0..1) of pore components showing the artefact.
        seed: random seed.
    """
    phases = image.require_phases()
    labels = image.array
    rng = np.random.default_rng(seed)
    levels = dict(DEFAULT_GRAY_LEVELS)
    unknown = [name for name in phases if name not in levels and name not in (gray_levels or {})]
    for i, name in enumerate(unknown):
        levels[name] = 0.2 + 0.6 * (i + 1) / (len(unknown) + 1)
    levels.update(gray_levels or {})
    gray = np.zeros(labels.shape, dtype=np.float64)
    for name, value in phases.items():
        gray[labels == value] = levels[name]
    if shine_through > 0 and "pore" in phases:
        pore = labels == phases["pore"]
        components, n = ndimage.label(pore)
        if n:
            chosen = 1 + np.flatnonzero(rng.random(n) < shine_through)
            affected = np.isin(components, chosen)
            depth = ndimage.distance_transform_edt(pore)
            wall_level = levels.get("sei", 0.45)
            texture = ndimage.gaussian_filter(rng.standard_normal(labels.shape), 2.0)
            texture *= 0.06 / max(texture.std(), 1e-12)
            glow = levels["pore"] + (wall_level - levels["pore"]) * np.exp(-(depth - 1.0) / 6.0)
            gray[affected] = np.clip(glow + texture, 0.0, 1.0)[affected]
    if blur_sigma > 0:
        gray = ndimage.gaussian_filter(gray, blur_sigma)
    if noise_sigma > 0:
        gray += rng.normal(0.0, noise_sigma, size=gray.shape)
    return VoxelImage(gray, image.voxel_size, None, f"render_gray({image.source})")


def _voxel_size(value: float | Sequence[float], ndim: int) -> tuple[float, ...]:
    given = np.asarray(value, dtype=float)
    values = (float(given),) * ndim if given.ndim == 0 else tuple(float(v) for v in given.ravel())
    if len(values) != ndim or not all(v > 0 for v in values):
        raise UsageError(f"voxel_size must be positive, one value or {ndim}, got {value}")
    return values


def random_anode_slice(seed: int, size: int = 256) -> tuple[VoxelImage, VoxelImage, dict[str, float]]:
    """A 2D anode slice with random structure and imaging, for robustness studies.

    Drawn from ``numpy.random.default_rng(seed)``, in this order: pore fraction U(0.15, 0.5), Si
    fraction U(0.02, 0.15), coating thickness 1-3 pixels, gray levels (pore U(0, 0.2), sei
    U(0.3, 0.5), graphite U(0.5, 0.65), si U(0.75, 1), i.e. in the order the multistage method
    assumes), blur U(0.5, 1.8) pixels, noise U(0.01, 0.06); then the structure: pores are the
    lowest values of a Gaussian random field smoothed by U(4, 10) pixels, Si blobs the highest of
    a second one (U(1.5, 5) pixels) outside the pores, the rest graphite, and every non-pore pixel
    within the coating thickness of a pore the intermediate (sei) phase. The gray image is
    ``blur(level[label]) + noise``.

    Returns:
        ``(gray, labels, parameters)``: float64 gray and uint8 labels (:data:`ANODE_PHASES`, no
        voxel size), and the drawn parameters.
    """
    rng = np.random.default_rng(seed)
    params = {
        "pore_fraction": rng.uniform(0.15, 0.5),
        "si_fraction": rng.uniform(0.02, 0.15),
        "coating_pixels": float(rng.integers(1, 4)),
    }
    levels = {"pore": rng.uniform(0, 0.2), "sei": rng.uniform(0.3, 0.5)}
    levels["graphite"] = rng.uniform(0.5, 0.65)
    levels["si"] = rng.uniform(0.75, 1.0)
    params["blur_pixels"] = rng.uniform(0.5, 1.8)
    params["noise"] = rng.uniform(0.01, 0.06)
    pore_field = ndimage.gaussian_filter(rng.normal(size=(size, size)), rng.uniform(4, 10))
    si_field = ndimage.gaussian_filter(rng.normal(size=(size, size)), rng.uniform(1.5, 5))
    labels = np.full((size, size), ANODE_PHASES["graphite"], np.uint8)
    labels[pore_field < np.quantile(pore_field, params["pore_fraction"])] = ANODE_PHASES["pore"]
    solid_si = (si_field > np.quantile(si_field, 1 - params["si_fraction"])) & (labels == ANODE_PHASES["graphite"])
    labels[solid_si] = ANODE_PHASES["si"]
    pore = labels == ANODE_PHASES["pore"]
    coating = ndimage.binary_dilation(pore, iterations=int(params["coating_pixels"])) & ~pore
    labels[coating] = ANODE_PHASES["sei"]
    gray = np.zeros((size, size))
    for name, value in levels.items():
        gray[labels == ANODE_PHASES[name]] = value
    gray = ndimage.gaussian_filter(gray, params["blur_pixels"]) + rng.normal(0, params["noise"], gray.shape)
    params.update({f"level_{name}": float(value) for name, value in levels.items()})
    return (
        VoxelImage(gray, None, None, f"random_anode_slice({seed})"),
        VoxelImage(labels, None, dict(ANODE_PHASES), f"random_anode_slice({seed})"),
        {k: float(v) for k, v in params.items()},
    )
