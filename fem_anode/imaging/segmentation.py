"""Segmentation of gray-value images into phase labels (NumPy/SciPy/scikit-image).

Three methods, following Vorauer et al., Commun. Chem. 3, 141 (2020) (the paper of this package):

* :func:`multistage_threshold` -- the *histogram-based global iterative threshold multistage*
  approach used there for the micro-synchrotron CT (SCT) volumes (Methods, "mu-Synchrotron data
  processing"; Results, Fig. 5a). Stage 1 finds the pore and the Si/FeSi2 thresholds objectively
  from the gray-value histogram with the iterative intermeans (isodata / Ridler-Calvard)
  rule; stage 2 derives the intermediate (CBD/SEI) domain and stage 3 the graphite domain by
  arithmetic (subtraction and addition) on the stage-1 masks.
* :func:`region_segmentation` -- the region-based method used for the FIB-SEM slices
  (Results, Fig. 4b-c): Felzenszwalb-Huttenlocher graph segmentation of every slice into
  hundreds of regions, per-region features (mean gray, gray standard deviation, counts of pixels
  below/above the thresholds) and a per-region decision, which is robust to the shine-through
  artefact of FIB-SEM where a pixel threshold fails.
* :func:`threshold_segmentation` -- a plain global pixel threshold (multi-class isodata), the
  baseline both methods are compared to.

:func:`iou_per_phase` scores a segmentation against known labels (intersection over union).
Gray images are float arrays (any scale); label images use the phase map of the caller.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from fem_anode.errors import InputError, UsageError
from fem_anode.imaging.partition import Slabs
from fem_anode.imaging.settings import (
    DEFAULT_MIN_OBJECT_SIZE,
    MULTISTAGE_ROLES,
    MultistageSettings,
    RegionSettings,
)
from fem_anode.io.images import VoxelImage

__all__ = [
    "SegmentationResult",
    "isodata_threshold",
    "multiclass_isodata",
    "threshold_segmentation",
    "multistage_threshold",
    "multistage_slabs",
    "MultistageSettings",
    "RegionSettings",
    "region_segmentation",
    "region_features",
    "iou_per_phase",
    "clean_labels",
    "MULTISTAGE_ROLES",
    "DEFAULT_MIN_OBJECT_SIZE",
]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SegmentationResult:
    """A label image plus what the method found (thresholds, region counts, ...).

    Attributes:
        labels: the segmented :class:`VoxelImage` (integer labels, phase map, voxel size).
        info: JSON-ready details: ``method``, ``thresholds`` (gray values), per-stage notes.
    """

    labels: VoxelImage
    info: dict[str, Any]


def _histogram(values: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0:
        raise InputError("cannot threshold an empty set of gray values")
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        raise InputError(f"gray image is constant ({lo}); nothing to threshold")
    hist, edges = np.histogram(values, bins=bins, range=(lo, hi))
    centres = 0.5 * (edges[1:] + edges[:-1])
    return hist.astype(np.float64), centres, edges


def multiclass_isodata(
    values: np.ndarray, n_classes: int, *, bins: int = 512, tol: float = 1e-6, max_iter: int = 1000
) -> tuple[np.ndarray, np.ndarray]:
    """Iterative intermeans thresholds of a histogram into ``n_classes`` gray classes.

    The Ridler-Calvard (isodata) rule generalised to several classes: starting from the
    ``k/n`` quantiles, every threshold is moved to the midpoint of the mean gray values of the
    two classes it separates, ``t_k <- (m_k + m_{k+1}) / 2``, until no threshold moves by more
    than ``tol`` times the gray range. For ``n_classes = 2`` this is exactly the isodata
    algorithm (Ridler & Calvard, IEEE Trans. SMC 8, 630 (1978)); for more classes it is Lloyd's
    1D k-means on the histogram.

    Args:
        values: gray values (any shape; flattened).
        n_classes: number of classes (>= 2).
        bins: histogram bins.
        tol: convergence tolerance relative to the gray range.
        max_iter: iteration limit.

    Returns:
        ``(thresholds, class_means)``: ``n_classes - 1`` increasing thresholds and the means.
    """
    if n_classes < 2:
        raise UsageError(f"need at least 2 gray classes, got {n_classes}")
    return _isodata_of_histogram(*_histogram(values, bins), n_classes, tol=tol, max_iter=max_iter)


def _isodata_of_histogram(
    hist: np.ndarray, centres: np.ndarray, edges: np.ndarray, n_classes: int, *, tol: float = 1e-6, max_iter: int = 1000
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`multiclass_isodata` of a histogram (counts, bin centres, bin edges)."""
    cdf = np.cumsum(hist) / hist.sum()
    thresholds = np.interp(np.arange(1, n_classes) / n_classes, cdf, edges[1:])
    means: np.ndarray = np.zeros(n_classes)
    span = edges[-1] - edges[0]
    for _ in range(max_iter):
        cls = np.searchsorted(thresholds, centres)
        weight = np.bincount(cls, hist, n_classes)
        total = np.bincount(cls, hist * centres, n_classes)
        empty = weight <= 0
        means = np.where(empty, 0.0, total / np.where(empty, 1.0, weight))
        if empty.any():  # an empty class keeps its threshold interval's middle as mean
            bounds = np.concatenate(([edges[0]], thresholds, [edges[-1]]))
            means[empty] = 0.5 * (bounds[:-1] + bounds[1:])[empty]
        new = 0.5 * (means[1:] + means[:-1])
        if np.max(np.abs(new - thresholds)) <= tol * span:
            thresholds = new
            break
        thresholds = new
    return np.sort(thresholds), means


def isodata_threshold(values: np.ndarray, *, bins: int = 512, tol: float = 1e-6) -> float:
    """The two-class iterative intermeans (isodata, Ridler-Calvard) threshold of ``values``."""
    return float(multiclass_isodata(values, 2, bins=bins, tol=tol)[0][0])


def _gray_array(gray: VoxelImage | np.ndarray) -> tuple[np.ndarray, VoxelImage]:
    image = gray if isinstance(gray, VoxelImage) else VoxelImage(np.asarray(gray))
    array = np.asarray(image.array, dtype=np.float64)
    if not np.all(np.isfinite(array)):
        raise InputError(f"{image.source}: gray image contains NaN or infinite values")
    return array, image


def _ordered_phases(
    phases: Mapping[str, int] | None, order: Sequence[str] | None, default: Sequence[str]
) -> tuple[dict[str, int], list[str]]:
    if phases is None:
        from fem_anode.imaging.synthetic import ANODE_PHASES

        phases = {name: ANODE_PHASES.get(name, i) for i, name in enumerate(order or default)}
    phases = dict(phases)
    names = list(order) if order is not None else list(phases)
    unknown = [n for n in names if n not in phases]
    if unknown:
        raise UsageError(f"gray order names {unknown} are not in the phase map {phases}")
    if len(set(names)) != len(names) or len(names) < 2:
        raise UsageError(f"gray order needs at least two distinct phase names, got {names}")
    return phases, names


def threshold_segmentation(
    gray: VoxelImage | np.ndarray,
    phases: Mapping[str, int] | None = None,
    *,
    order: Sequence[str] | None = None,
    thresholds: Sequence[float] | None = None,
    illumination_degree: int | None = None,
) -> SegmentationResult:
    """Plain global pixel threshold: each voxel gets the class of its own gray value.

    Args:
        gray: gray image.
        phases: phase name -> label; default ``pore, sei, si`` with the anode labels.
        order: phase names from darkest to brightest (default: the phase map's order).
        thresholds: the ``n - 1`` increasing gray thresholds; default
            :func:`multiclass_isodata` of the whole image.
        illumination_degree: if set, remove a smooth in-plane background first
            (:func:`~fem_anode.imaging.denoise.flatten_illumination` of this polynomial degree).
    """
    array, image = _gray_array(gray)
    array = _flatten(array, illumination_degree)  # validates the degree
    phases, names = _ordered_phases(phases, order, ("pore", "sei", "si"))
    if thresholds is None:
        t = multiclass_isodata(array, len(names))[0]
    else:
        t = np.sort(np.asarray(thresholds, dtype=np.float64))
        if t.size != len(names) - 1:
            raise UsageError(f"{len(names)} phases need {len(names) - 1} thresholds, got {t.size}")
    classes = np.searchsorted(t, array, side="right")
    lut = np.array([phases[n] for n in names])
    labels: np.ndarray = lut[classes].astype(_label_dtype(phases))
    info = {"method": "threshold", "order": names, "thresholds": t.tolist(), "illumination_degree": illumination_degree}
    return SegmentationResult(VoxelImage(labels, image.voxel_size, phases, f"threshold({image.source})"), info)


def _flatten(array: np.ndarray, degree: int | None) -> np.ndarray:
    if degree is None:
        return array
    from fem_anode.imaging.denoise import flatten_illumination

    return flatten_illumination(array, degree)


def _label_dtype(phases: Mapping[str, int]) -> type:
    values = list(phases.values())
    return np.uint8 if min(values) >= 0 and max(values) < 256 else np.int32


def multistage_threshold(
    gray: VoxelImage | np.ndarray,
    phases: Mapping[str, int] | None = None,
    settings: MultistageSettings | None = None,
    **overrides: Any,
) -> SegmentationResult:
    """Histogram-based global iterative threshold multistage segmentation (SCT, 4 domains).

    Gray order assumed (X-ray attenuation): pore < intermediate (CBD/SEI) < graphite < Si/FeSi2.

    Stage 0 (cleaned input): edge-preserving denoising, :func:`~fem_anode.imaging.denoise.denoise_gray`
    (non-local means with 3D patches by default, strength ``denoise_strength`` times the noise
    sigma estimated from the data), so that the histogram stages see the phases' gray levels
    instead of the noise.

    Stage 1 (objective thresholds from the histogram ``H``, each by the iterative intermeans
    rule ``T`` = :func:`isodata_threshold` on a part of the histogram):

    * ``t_0 = T(H)``: first split into dark (pore) and bright (solid) voxels;
    * ``t_mid = T(H | g >= t_0)``: splits the solid into the darker intermediate domain and the
      brighter graphite/Si; if that split lies at or above ``g_mode`` (below), it separated Si
      from the rest (a scarce intermediate domain close to graphite), and
      ``t_mid = T(H | t_0 <= g < g_mode)`` instead;
    * ``t_pore = T(H | g < t_mid)``: the pore threshold, refined between the pore and the
      intermediate class (thin intermediate layers are not counted as pore);
    * ``t_si = T(H | g >= g_mode)`` with ``g_mode`` the mode of the solid histogram (the
      graphite peak; without the voxels at the image's maximum when at least
      :data:`CLIPPED_FRACTION` of them are: a clipped range): separates Si/FeSi2 from the
      bright flank of graphite. (Thresholding above
      ``t_mid`` instead would split the graphite peak when Si is scarce, as in aged samples.)

    Masks: ``P = g < t_pore``, ``S = g > t_si``.

    Stage 2 (intermediate domain by arithmetic on the masks): ``M = 1 - P - S`` (everything
    that is neither pore nor Si), ``I = M * (g < t_mid) + M * D(S)`` where ``D`` is a one-voxel
    dilation: the dark part of ``M`` *plus* the partial-volume rim around Si, because the
    intermediate domain is the continuous phase that surrounds the Si particles and holds
    particles below the resolution.

    Stage 3 (graphite): ``G = M - I``; graphite components smaller than
    ``min_graphite_voxels`` are returned to ``I``.

    Stage 4 (optional, ``cleanup``): :func:`clean_labels` -- isolated voxels take their
    neighbours' label, objects smaller than ``min_object_size`` voxels their surroundings'.

    Stage 5 (optional, ``refine``, default on): blur-aware refinement
    (:func:`~fem_anode.imaging.restore.blur_aware_icm`): the Gaussian PSF width and the four
    phase levels are fitted by least squares to the (undenoised) gray image as the blurred
    stage-4 labels (:func:`~fem_anode.imaging.restore.estimate_psf`), the noise is estimated
    from the image, and iterated conditional modes lower
    ``|g - K * mu[L]|^2 / (2 sigma_n^2) + beta * Potts(L)``, which recovers small particles and
    thin shells that partial volume hides from every per-voxel threshold. It starts from the
    stage-4 labels plus Si candidates (``si_seeds``: every local maximum of the denoised image
    brighter than the graphite peak, with its face neighbours; the refinement can remove a
    wrong particle voxel by voxel but cannot create one), and its prior weights pore-graphite and
    pore-Si contacts by ``coating_weight`` (solids coated by the intermediate domain). It also
    runs from the stage-4 labels alone and keeps that result when the candidates end more than
    :data:`SI_CANDIDATE_ENERGY_TOLERANCE` (0.5 %) higher in energy (candidates in a textured,
    coarse graphite phase rather than sub-resolution Si).

    Args:
        gray: 3D (or 2D) gray image.
        phases: labels of the roles ``pore``, ``sei`` (intermediate), ``graphite``, ``si``;
            default :data:`~fem_anode.imaging.synthetic.ANODE_PHASES`.
        settings: the parameters of every stage (:class:`~fem_anode.imaging.settings.MultistageSettings`,
            documented there); default ``MultistageSettings()``.
        **overrides: single fields of ``settings`` to change, validated alike
            (``multistage_threshold(gray, refine=False)``).

    Returns:
        Labels and ``info`` with the three thresholds, the denoising and clean-up done, the
        refinement (PSF width, levels, sweeps, energy), each domain's fraction and the
        settings used (``info["settings"]``).
    """
    array, image = _gray_array(gray)
    phases = _multistage_phases(phases)
    labels, info = multistage_slabs(array, Slabs.whole(array.shape[0]), phases, settings, **overrides)
    return SegmentationResult(VoxelImage(labels, image.voxel_size, dict(phases), f"multistage({image.source})"), info)


def _multistage_phases(phases: Mapping[str, int] | None) -> dict[str, int]:
    if phases is None:
        from fem_anode.imaging.synthetic import ANODE_PHASES

        phases = dict(ANODE_PHASES)
    missing = [r for r in MULTISTAGE_ROLES if r not in phases]
    if missing:
        raise UsageError(
            f"multistage segmentation needs the phases {', '.join(MULTISTAGE_ROLES)}; missing {', '.join(missing)} "
            "(for other phase sets use --method threshold with --order, darkest first, or --method trainable)"
        )
    return dict(phases)


def _small_components(mask: np.ndarray, min_size: int, slabs: Slabs) -> np.ndarray:
    """Voxels of the connected components (faces) of the distributed ``mask`` with fewer than
    ``min_size`` voxels (this rank's layers). A component touching the slab with fewer than
    ``min_size`` voxels lies within ``min_size - 1`` layers of it, and a larger one keeps at
    least ``min_size`` voxels in a window of that halo, so the window decides exactly."""
    window, lo = slabs.window(mask, min_size)
    if not window.any():
        return np.zeros(mask.shape, dtype=bool)
    comp, n = ndimage.label(window, ndimage.generate_binary_structure(window.ndim, 1))
    sizes = np.bincount(comp.ravel(), minlength=n + 1)
    small = sizes < min_size
    small[0] = False
    return slabs.owned_part(small[comp], lo)


def multistage_slabs(
    gray: np.ndarray,
    slabs: Slabs,
    phases: Mapping[str, int] | None = None,
    settings: MultistageSettings | None = None,
    **overrides: Any,
) -> tuple[np.ndarray, dict[str, Any]]:
    """:func:`multistage_threshold` on an image distributed in slabs of axis-0 layers (collective).

    Every rank passes its own layers (``gray``, ``slabs.layers`` of them) and gets their labels;
    no rank holds more than its layers plus a halo. Each filter gets its halo from the
    neighbouring ranks (median ``size // 2``, non-local means ``patch_size // 2 +
    patch_distance``, dilation 1, small objects ``2 min_size + 1`` layers, refinement
    ``2 int(4 s + 0.5)``), the histograms, noise estimate and level fits are reduced over the
    ranks reproducibly (:class:`~fem_anode.imaging.partition.Slabs`), so the labels equal those
    of one process voxel for voxel. ``slabs = Slabs.whole(n)`` is the one-process case.

    Returns:
        ``(labels of this rank's layers, info)``; ``info`` is the same on every rank.
    """
    settings = MultistageSettings.with_overrides(settings, **overrides)  # bad values fail before any work
    phases = _multistage_phases(phases)
    array = np.asarray(gray, dtype=np.float64)
    if slabs.any(not bool(np.all(np.isfinite(array)))):
        raise InputError("gray image contains NaN or infinite values")
    given_levels = _role_levels(settings.levels)
    median_size, illumination_degree = settings.median_size, settings.illumination_degree
    clipped, n_clipped_top, n_clipped_bottom, n_total = _clipped_ends(array, slabs)
    clipped_share = (n_clipped_top + n_clipped_bottom) / n_total
    if illumination_degree is not None and array.size:
        array = _flatten(array, illumination_degree)
    raw = array
    if median_size > 1:
        window, lo = slabs.window(array, int(median_size) // 2)
        array = slabs.owned_part(ndimage.median_filter(window, size=int(median_size)), lo) if window.size else array
    from fem_anode.imaging.denoise import denoise_gray

    array, denoise_info = denoise_gray(
        array,
        settings.denoise,  # type: ignore[arg-type]  # one of DENOISE_METHODS: the settings check it
        noise_sigma=settings.noise_sigma,
        strength=settings.denoise_strength,
        slabs=slabs,
    )
    denoise_info["illumination_degree"] = illumination_degree

    def threshold(values: np.ndarray) -> float:
        return float(_isodata_of_histogram(*slabs.histogram(values, settings.bins), 2)[0][0])

    t_0 = threshold(array)
    solid_values = array[array >= t_0]
    # the graphite peak; voxels clipped at the top of the gray range (a saturated export) would
    # make a spike there that outweighs the graphite peak
    unclipped_solid = solid_values if clipped is None else array[(array >= t_0) & ~clipped]
    hist, centres, _ = slabs.histogram(unclipped_solid, settings.bins)
    del unclipped_solid
    mode = float(centres[np.argmax(ndimage.gaussian_filter1d(hist, 2.0))])
    del clipped
    t_mid = threshold(solid_values)
    t_mid_rule = "solid"
    if t_mid >= mode:
        # the solid's main split is above the graphite peak (Si off graphite: a scarce intermediate
        # domain close to graphite); the intermediate/graphite split lies below the peak
        below_mode = solid_values[solid_values < mode]
        if slabs.sum_int(int(below_mode.size)) > 1 and slabs.min(
            float(below_mode.min()) if below_mode.size else np.inf
        ) < slabs.max(float(below_mode.max()) if below_mode.size else -np.inf):
            t_mid, t_mid_rule = threshold(below_mode), "below_solid_mode"
    t_pore = threshold(array[array < t_mid])
    logger.info(
        "multistage stage 1: pore / solid split %.4g, graphite peak %.4g, intermediate/graphite %.4g (%s)",
        t_0,
        mode,
        t_mid,
        t_mid_rule,
    )
    bright = solid_values[solid_values >= mode]
    n_bright = int(slabs.sum_int(int(bright.size)))
    top = slabs.max(float(bright.max()) if bright.size else -np.inf)
    bottom = slabs.min(float(bright.min()) if bright.size else np.inf)
    spread = top - bottom if n_bright else 0.0
    t_si = (
        threshold(bright)
        if n_bright > 1 and spread > 0
        else slabs.max(float(solid_values.max()) if solid_values.size else -np.inf)
    )
    pore = array < t_pore
    si = array > t_si
    rest = ~pore & ~si
    structure = ndimage.generate_binary_structure(array.ndim, 1)
    si_window, lo = slabs.window(si, 1)
    grown = slabs.owned_part(ndimage.binary_dilation(si_window, structure), lo) if si_window.size else si
    intermediate = rest & ((array < t_mid) | grown)
    graphite = rest & ~intermediate
    if settings.min_graphite_voxels > 1 and slabs.any(bool(graphite.any())):
        moved = _small_components(graphite, settings.min_graphite_voxels, slabs)
        graphite &= ~moved
        intermediate |= moved
    refine_info: dict[str, Any] | None = None
    refine, si_seeds = settings.refine, settings.si_seeds
    if refine and clipped_share >= CLIPPED_REFINE_LIMIT:
        refine = False
        refine_info = {
            "skipped": f"{100 * clipped_share:.1f} % of the voxels are clipped at the ends of the gray range "
            "(saturated); the blurred-label model cannot explain cut-off values"
        }
        logger.warning("multistage: stage 5 (refinement) skipped: %s", refine_info["skipped"])
    seeds = _si_candidates(array, mode, pore, slabs) if refine and si_seeds else None
    labels: np.ndarray = np.empty(array.shape, dtype=_label_dtype(phases))
    labels[pore] = phases["pore"]
    labels[si] = phases["si"]
    labels[intermediate] = phases["sei"]
    labels[graphite] = phases["graphite"]
    del array, solid_values, bright, pore, si, rest, intermediate, graphite
    cleanup_info: dict[str, Any] | None = None
    if settings.cleanup:
        roles = {role: phases[role] for role in MULTISTAGE_ROLES}
        labels, cleanup_info = clean_labels(labels, roles, min_size=settings.min_object_size, slabs=slabs)
    n_seeded = 0
    if refine:
        refine_settings: dict[str, Any] = {
            "psf_sigma": settings.psf_sigma,
            "noise_sigma": settings.noise_sigma,
            "beta": settings.potts_beta,
            "max_sweeps": settings.max_sweeps,
            "graphite_opening": settings.graphite_opening,
            "coating_weight": settings.coating_weight,
            "levels": given_levels,
        }
        stage4 = labels
        if seeds is not None:
            n_seeded = int(slabs.sum_int(int(np.count_nonzero(seeds & (labels != phases["si"])))))
            labels = labels.copy()
            labels[seeds] = phases["si"]
        del seeds
        logger.info("multistage stage 5: blur-aware refinement from the stage-4 labels with %d Si candidates", n_seeded)
        labels, refine_info = _refine_blur_aware(raw, labels, phases, slabs, **refine_settings)
        if n_seeded and "energy_per_sweep" in refine_info:
            logger.info("multistage stage 5: the same without the Si candidates, to compare the energies")
            # the candidates are for blurred sub-resolution Si; where they make the fitted model
            # explain the image clearly worse than the stage-4 labels alone, the latter are kept
            plain, plain_info = _refine_blur_aware(raw, stage4, phases, slabs, **refine_settings)
            with_candidates, without = _final_energy(refine_info), _final_energy(plain_info)
            kept = with_candidates <= (1.0 + SI_CANDIDATE_ENERGY_TOLERANCE) * without
            choice = {"energy_with": with_candidates, "energy_without": without, "kept": kept}
            if not kept:
                labels, refine_info = plain, plain_info
            refine_info["si_candidates"] = choice
            logger.info(
                "multistage stage 5: Si candidates %s (final energy %.6g with them, %.6g without)",
                "kept" if kept else "dropped",
                with_candidates,
                without,
            )
        del stage4
    total = max(int(slabs.sum_int(int(labels.size))), 1)
    info = {
        "method": "multistage",
        "thresholds": {"pore": t_pore, "intermediate_graphite": t_mid, "si": t_si},
        "stage1": {
            "first_pore_solid_split": t_0,
            "solid_mode": mode,
            "intermediate_graphite_rule": t_mid_rule,
            "clipped_voxels": {"top": n_clipped_top, "bottom": n_clipped_bottom},
        },
        "median_size": median_size,
        "denoise": denoise_info,
        "cleanup": cleanup_info,
        "si_candidates_added": n_seeded if refine and si_seeds else None,
        "refine": refine_info,
        "fractions": {
            role: float(slabs.sum_int(int(np.count_nonzero(labels == phases[role])))) / total
            for role in MULTISTAGE_ROLES
        },
        "settings": settings.to_dict(),
    }
    logger.debug("multistage thresholds: pore %.4g, intermediate/graphite %.4g, si %.4g", t_pore, t_mid, t_si)
    return labels, info


#: Share of the voxels at exactly the image's maximum (minimum) gray value from which the image
#: counts as clipped (saturated) at that end of its range (:func:`multistage_threshold`).
CLIPPED_FRACTION = 1e-3
#: Share of clipped voxels (both ends) from which stage 5 is skipped: its blurred-label model
#: cannot explain values cut off at the range's ends.
CLIPPED_REFINE_LIMIT = 1e-2


def _clipped_ends(array: np.ndarray, slabs: Slabs) -> tuple[np.ndarray | None, int, int, int]:
    """``(mask of the voxels clipped at the top or None, voxels clipped at the top, at the bottom,
    voxels in all)``.

    An end counts as clipped when at least :data:`CLIPPED_FRACTION` of the voxels sit at exactly
    the image's maximum (minimum) gray value: a gray image with noise reaches its extremes at a
    handful of voxels unless its range was cut off (a saturated 8-bit export). Collective."""
    total = max(int(slabs.sum_int(int(array.size))), 1)
    counts, top_mask = [], None
    for end in ("top", "bottom"):
        value = (
            slabs.max(float(array.max()) if array.size else -np.inf)
            if end == "top"
            else slabs.min(float(array.min()) if array.size else np.inf)
        )
        mask = array == value
        n = int(slabs.sum_int(int(np.count_nonzero(mask))))
        clipped = n >= CLIPPED_FRACTION * total
        counts.append(n if clipped else 0)
        if end == "top" and clipped:
            top_mask = mask
    return top_mask, counts[0], counts[1], total


#: Relative excess of the refinement's final energy with the Si candidates over the one without
#: them up to which the candidates are kept (:func:`multistage_threshold`, stage 5).
SI_CANDIDATE_ENERGY_TOLERANCE = 0.005


def _final_energy(info: Mapping[str, Any]) -> float:
    """The refinement's energy at its end (after the graphite-opening pass if there was one)."""
    opening = info.get("graphite_opening", {})
    sweeps = opening.get("energy_per_sweep") or info["energy_per_sweep"]
    return float(sweeps[-1])


def _si_candidates(denoised: np.ndarray, mode: float, pore: np.ndarray, slabs: Slabs) -> np.ndarray:
    """Si candidates for the refinement: every local maximum (the ``3^n`` window, plateaus
    included) of the denoised image brighter than the graphite peak ``mode``, outside the pore
    mask, with its face neighbours (this rank's layers). A blurred Si particle of a few voxels
    peaks below the Si threshold, and iterated conditional modes can remove a wrong particle
    voxel by voxel but never create one, so the candidates are generous and the refinement's
    energy decides."""
    window, lo = slabs.window(denoised, 2)
    if not window.size:
        return np.zeros(denoised.shape, dtype=bool)
    peaks = (window >= ndimage.maximum_filter(window, size=3, mode="reflect")) & (window > mode)
    grown = ndimage.binary_dilation(peaks, ndimage.generate_binary_structure(window.ndim, 1))
    return slabs.owned_part(grown, lo) & ~pore


def _role_levels(levels: Mapping[str, float] | None) -> np.ndarray | None:
    """Given phase levels (gray units, one per role of :data:`MULTISTAGE_ROLES`, checked by
    :class:`~fem_anode.imaging.settings.MultistageSettings`) as an array in that order."""
    return None if levels is None else np.array([float(levels[r]) for r in MULTISTAGE_ROLES])


def coating_pair_weights(coating_weight: float) -> np.ndarray:
    """Interface weights of the refinement's prior in the order of :data:`MULTISTAGE_ROLES`:
    1 for every unlike face pair, ``coating_weight`` for pore-graphite and pore-Si pairs (solids
    coated by the intermediate domain)."""
    if not (np.isfinite(coating_weight) and coating_weight >= 0):
        raise UsageError(f"coating weight must be >= 0 and finite, got {coating_weight}")
    n = len(MULTISTAGE_ROLES)
    w = 1.0 - np.eye(n)
    pore = MULTISTAGE_ROLES.index("pore")
    for solid in ("graphite", "si"):
        k = MULTISTAGE_ROLES.index(solid)
        w[pore, k] = w[k, pore] = float(coating_weight)
    return w


def _refine_blur_aware(
    raw: np.ndarray,
    labels: np.ndarray,
    phases: Mapping[str, int],
    slabs: Slabs,
    *,
    psf_sigma: float | None,
    noise_sigma: float | None,
    beta: float | None,
    max_sweeps: int,
    graphite_opening: bool = True,
    coating_weight: float = 3.0,
    levels: np.ndarray | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Stage 5 of :func:`multistage_threshold` (see :mod:`fem_anode.imaging.restore`).

    With ``graphite_opening``, graphite voxels that no 3D cross of graphite voxels covers (removed
    by a morphological opening with the 7-voxel cross: structures thinner than 3 voxels) are set
    to the intermediate domain and the refinement runs again (``max_sweeps // 2`` sweeps) with
    graphite excluded there: graphite particles are many voxels thick, and a blurred fine Si/SEI
    mixture that the first pass explained as thin graphite gets the data's other explanation."""
    from fem_anode.imaging import restore
    from fem_anode.imaging.denoise import estimate_noise_sigma

    values = [int(phases[role]) for role in MULTISTAGE_ROLES]
    lut = np.zeros(int(max(values)) + 1, dtype=np.int8)
    lut[values] = np.arange(len(values), dtype=np.int8)
    classes = lut[labels]
    sigma_n = float(noise_sigma) if noise_sigma is not None else estimate_noise_sigma(raw, slabs)
    if sigma_n <= 0:
        return labels, {"skipped": "the image has no noise to weigh the data by (noise sigma 0)"}
    fixed = levels is not None
    if psf_sigma is None:
        psf = restore.estimate_psf(raw, classes, len(values), slabs=slabs)
        s, estimated = psf["psf_sigma_voxels"], True
        if not fixed:
            levels = psf["levels"]
    else:
        s = float(psf_sigma)
        if not fixed:
            levels, _ = restore.fit_levels(raw, classes, len(values), s, slabs=slabs)
        estimated = False
    assert levels is not None  # fitted above unless given
    beta = restore.DEFAULT_POTTS_BETA if beta is None else float(beta)
    weights = coating_pair_weights(coating_weight)
    refined, info = restore.blur_aware_icm(
        raw,
        classes,
        levels,
        psf_sigma=s,
        noise_sigma=sigma_n,
        beta=beta,
        max_sweeps=max_sweeps,
        slabs=slabs,
        pair_weights=weights,
        refit_levels=not fixed,
    )
    if graphite_opening:
        graphite, sei = MULTISTAGE_ROLES.index("graphite"), MULTISTAGE_ROLES.index("sei")
        mask = refined == graphite
        window, lo = slabs.window(mask, 2)  # erosion then dilation by one voxel
        cross = ndimage.generate_binary_structure(mask.ndim, 1)
        opened = slabs.owned_part(ndimage.binary_opening(window, cross), lo) if window.size else mask
        thin = mask & ~opened
        n_thin = int(slabs.sum_int(int(np.count_nonzero(thin))))
        thin_info: dict[str, Any] = {"thin_graphite_voxels": n_thin}
        if n_thin:
            start = refined.copy()
            start[thin] = sei
            refined, second = restore.blur_aware_icm(
                raw,
                start,
                np.asarray(info["levels"]),
                psf_sigma=s,
                noise_sigma=sigma_n,
                beta=beta,
                max_sweeps=max(1, max_sweeps // 2),
                slabs=slabs,
                excluded={graphite: thin},
                pair_weights=weights,
                refit_levels=not fixed,
            )
            thin_info.update({k: second[k] for k in ("sweeps", "changed_per_sweep", "energy_per_sweep")})
            info["levels"] = second["levels"]
        info["graphite_opening"] = thin_info
    out = np.asarray(values, dtype=labels.dtype)[refined]
    info.update(
        {
            "psf_sigma_estimated": estimated,
            "levels_given": fixed,
            "noise_sigma_estimated": noise_sigma is None,
            "levels": dict(zip(MULTISTAGE_ROLES, info["levels"])),
            "voxels_changed": int(slabs.sum_int(int(np.count_nonzero(out != labels)))),
        }
    )
    return out, info


def region_features(
    gray: np.ndarray, regions: np.ndarray, thresholds: Sequence[float] | np.ndarray
) -> dict[str, np.ndarray]:
    """Per-region features of a gray image (vectorised with ``np.bincount``).

    Args:
        gray: gray image.
        regions: integer region labels ``0..n-1`` of the same shape.
        thresholds: increasing gray thresholds between the classes.

    Returns:
        ``count`` (pixels), ``mean``, ``std`` (gray), and ``fraction_class`` of shape
        ``(n_classes, n_regions)``: the fraction of each region's pixels in each threshold class
        (class 0 = below the first threshold = "counts below", last = "counts above").
    """
    r = regions.ravel()
    g = gray.ravel()
    n = int(r.max()) + 1
    count = np.bincount(r, minlength=n).astype(np.float64)
    safe = np.maximum(count, 1.0)
    mean = np.bincount(r, g, n) / safe
    var = np.maximum(np.bincount(r, g * g, n) / safe - mean**2, 0.0)
    classes = np.searchsorted(np.asarray(thresholds), g, side="right")
    n_classes = len(thresholds) + 1
    fraction = np.bincount(classes * n + r, minlength=n_classes * n).reshape(n_classes, n) / safe
    return {"count": count, "mean": mean, "std": np.sqrt(var), "fraction_class": fraction}


def region_segmentation(
    gray: VoxelImage | np.ndarray,
    phases: Mapping[str, int] | None = None,
    settings: RegionSettings | None = None,
    *,
    order: Sequence[str] | None = None,
    **overrides: Any,
) -> SegmentationResult:
    """Region-based segmentation of FIB-SEM images, robust to shine-through artefacts.

    The input is first cleaned as in :func:`multistage_threshold` (``denoise``, default
    non-local means with the strength tied to the estimated noise). Then per slice (2D images:
    the image; 3D: every z-slice, as FIB-SEM slices are imaged one by one):

    1. Felzenszwalb-Huttenlocher graph segmentation (``skimage.segmentation.felzenszwalb``,
       parameters ``scale``, ``sigma``, ``min_size``) into regions -- hundreds per slice for the
       defaults on a 400 x 250 pixel slice (the paper: about 700 per slice).
    2. Global gray thresholds between the ``order``-ed phases by :func:`multiclass_isodata`.
    3. Features per region (:func:`region_features`): mean, std, fraction of pixels below the
       darkest threshold ("counts below") and above the brightest ("counts above").
    4. Decision: a region with at least ``dark_fraction`` of pore-dark pixels is a pore region
       and all its pixels are pore -- shine-through (material behind the pore seen through it)
       brightens the pore interior near its walls, but leaves a dark core inside the same region;
       a region with at least ``bright_fraction`` pixels above the brightest threshold is
       entirely of the brightest phase; pixels of other regions keep their pixel class, so that
       boundaries stay sharp.

    Args:
        gray: 2D or 3D gray image.
        phases: phase name -> label; default ``pore, sei, si`` with the anode labels.
        settings: the Felzenszwalb parameters (``scale``, ``sigma``, ``min_size``; larger
            ``scale`` = larger regions), the decision's ``dark_fraction`` and
            ``bright_fraction``, and the cleaning, as in :func:`multistage_threshold`
            (:class:`~fem_anode.imaging.settings.RegionSettings`); default ``RegionSettings()``.
        order: phase names from darkest to brightest (default: the phase map's order); the
            first is the pore phase.
        **overrides: single fields of ``settings`` to change, validated alike.
    """
    from skimage.segmentation import felzenszwalb

    settings = RegionSettings.with_overrides(settings, **overrides)  # bad values fail before any work
    array, image = _gray_array(gray)
    phases, names = _ordered_phases(phases, order, ("pore", "sei", "si"))
    from fem_anode.imaging.denoise import denoise_gray

    array = _flatten(array, settings.illumination_degree)
    array, denoise_info = denoise_gray(
        array,
        settings.denoise,  # type: ignore[arg-type]  # one of DENOISE_METHODS: the settings check it
        noise_sigma=settings.noise_sigma,
        strength=settings.denoise_strength,
    )
    denoise_info["illumination_degree"] = settings.illumination_degree
    thresholds = multiclass_isodata(array, len(names))[0]
    pixel_class = np.searchsorted(thresholds, array, side="right")
    slices = array if array.ndim == 3 else array[None]
    classes = pixel_class if array.ndim == 3 else pixel_class[None]
    out = classes.copy()
    n_regions = []
    n_pore_regions = 0
    for k in range(slices.shape[0]):
        regions = felzenszwalb(slices[k], scale=settings.scale, sigma=settings.sigma, min_size=settings.min_size)
        feats = region_features(slices[k], regions, thresholds)
        dark = feats["fraction_class"][0] >= settings.dark_fraction
        bright = (feats["fraction_class"][-1] >= settings.bright_fraction) & ~dark
        out[k][dark[regions]] = 0
        out[k][bright[regions]] = len(names) - 1
        n_regions.append(int(regions.max()) + 1)
        n_pore_regions += int(dark.sum())
    out = out if array.ndim == 3 else out[0]
    lut = np.array([phases[n] for n in names])
    labels: np.ndarray = lut[out].astype(_label_dtype(phases))
    info = {
        "method": "region",
        "order": names,
        "thresholds": thresholds.tolist(),
        "regions_per_slice": {
            "mean": float(np.mean(n_regions)),
            "min": int(min(n_regions)),
            "max": int(max(n_regions)),
        },
        "pore_regions": n_pore_regions,
        "felzenszwalb": {"scale": settings.scale, "sigma": settings.sigma, "min_size": settings.min_size},
        "denoise": denoise_info,
        "settings": settings.to_dict(),
    }
    return SegmentationResult(VoxelImage(labels, image.voxel_size, phases, f"region({image.source})"), info)


def iou_per_phase(
    predicted: VoxelImage | np.ndarray, truth: VoxelImage, phases: Mapping[str, int] | None = None
) -> dict[str, float]:
    """Intersection over union of every phase of ``truth`` (NaN when absent from both)."""
    phases = dict(phases) if phases is not None else truth.require_phases()
    pred = predicted.array if isinstance(predicted, VoxelImage) else np.asarray(predicted)
    if pred.shape != truth.array.shape:
        raise InputError(f"segmentation shape {pred.shape} differs from the reference labels {truth.array.shape}")
    result = {}
    for name, value in phases.items():
        a = pred == value
        b = truth.array == value
        union = np.count_nonzero(a | b)
        result[name] = float(np.count_nonzero(a & b) / union) if union else float("nan")
    return result


def _face_structure(ndim: int) -> np.ndarray:
    return ndimage.generate_binary_structure(ndim, 1)


def _neighbour_counts(labels: np.ndarray, values: Sequence[int]) -> np.ndarray:
    """``counts[k]`` = number of face neighbours of every voxel with label ``values[k]``."""
    kernel = _face_structure(labels.ndim).astype(np.uint8)
    kernel[(1,) * labels.ndim] = 0
    return np.stack([ndimage.convolve((labels == v).astype(np.uint8), kernel, mode="constant", cval=0) for v in values])


def clean_labels(
    labels: np.ndarray,
    phases: Mapping[str, int],
    *,
    min_size: int | Mapping[str, int] = DEFAULT_MIN_OBJECT_SIZE,
    fill_isolated: bool = True,
    slabs: Slabs | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Small spatial clean-up of a label image (optional last stage of the segmentations).

    1. Isolated voxels (``fill_isolated``): a voxel whose label none of its face neighbours
       (6 in 3D, 4 in 2D) shares takes the most frequent label among them (salt-and-pepper).
    2. Minimum object size: a connected object (face connectivity) of a phase with fewer than
       ``min_size`` voxels (per phase name, or one value for all) takes the most frequent label
       among the voxels touching it (a voxel touching two small objects votes for the later one
       in raster order). Objects touching nothing else (a phase filling the image) are kept.

    Args:
        labels: integer label image (with ``slabs``: this rank's layers of it).
        phases: phase name -> label value (only these labels are cleaned).
        min_size: smallest object kept, voxels (1 = keep all), per phase name or for all.
        fill_isolated: apply step 1.
        slabs: the layers each MPI rank holds (collective). Step 1 needs one halo layer; step 2,
            per phase, ``2 min_size + 1``: a small object touching the slab, the voxels around it
            and any small object they touch then lie in the window, and a large object keeps at
            least ``min_size`` voxels in it, so the result equals the whole image's.

    Returns:
        ``(cleaned labels, info)`` with the number of voxels changed by each step.
    """
    part = slabs if slabs is not None else Slabs.whole(np.shape(labels)[0])
    names = list(phases)
    sizes = (
        {n: int(min_size) for n in names}
        if not isinstance(min_size, Mapping)
        else {n: int(min_size.get(n, 1)) for n in names}
    )
    unknown = [n for n in (min_size if isinstance(min_size, Mapping) else {}) if n not in phases]
    if unknown:
        raise UsageError(f"minimum object size given for {unknown}, which are not in the phase map {dict(phases)}")
    if any(v < 1 for v in sizes.values()):
        raise UsageError(f"minimum object sizes must be >= 1 voxel, got {sizes}")
    out = np.array(labels, copy=True)
    values = [int(phases[n]) for n in names]
    lut = np.asarray(values, dtype=out.dtype)
    info: dict[str, Any] = {
        "fill_isolated": bool(fill_isolated),
        "min_size": sizes,
        "isolated_filled": 0,
        "small_objects_removed": {},
    }
    if fill_isolated:
        window, lo = part.window(out, 1)
        filled = 0
        if out.size:
            counts = np.stack([part.owned_part(c, lo) for c in _neighbour_counts(window, values)])
            known = np.isin(out, values)
            own = np.zeros(out.shape, dtype=np.uint8)
            for k, v in enumerate(values):
                own[out == v] = counts[k][out == v]
            isolated = known & (own == 0) & (counts.sum(axis=0) > 0)
            out[isolated] = lut[np.argmax(counts[:, isolated], axis=0)]
            filled = int(np.count_nonzero(isolated))
        info["isolated_filled"] = int(part.sum_int(filled))
    structure = _face_structure(out.ndim)
    for name, value in zip(names, values):
        if sizes[name] <= 1:
            continue
        window, lo = part.window(out, 2 * sizes[name] + 1)
        removed = 0
        comp, n = ndimage.label(window == value, structure) if window.size else (np.zeros(window.shape, np.int32), 0)
        if n:
            size = np.bincount(comp.ravel(), minlength=n + 1)
            small = size < sizes[name]
            small[0] = False
            if small[1:].any():
                ids = np.where(small[comp], comp, 0)
                # voxels next to a small object (not in it): the object's id and their own label
                ring_id = ndimage.grey_dilation(ids, footprint=structure, mode="constant", cval=0)
                ring = (ring_id > 0) & (window != value)
                pair_id, pair_label = ring_id[ring], window[ring]
                order = np.argsort(lut)
                where = np.minimum(np.searchsorted(lut[order], pair_label), len(values) - 1)
                label_index = order[where]
                inside = lut[label_index] == pair_label
                votes = np.zeros((n + 1, len(values)), dtype=np.int64)
                np.add.at(votes, (pair_id[inside], label_index[inside]), 1)
                has_neighbour = votes.sum(axis=1) > 0
                replace = small & has_neighbour
                new_value = lut[np.argmax(votes, axis=1)]
                mine = part.owned_part(comp, lo)
                moved = replace[mine]
                out[moved] = new_value[mine[moved]]
                # each object counted by the rank that owns its first layer
                first = np.array([sl[0].start + lo if sl is not None else -1 for sl in ndimage.find_objects(comp)])
                removed = int(np.count_nonzero(replace[1:] & (first >= part.z0) & (first < part.z1)))
        info["small_objects_removed"][name] = int(part.sum_int(removed))
    return out, info
