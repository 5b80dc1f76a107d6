"""Trainable segmentation: a random forest on multiscale pixel features (ilastik / Trainable Weka style).

The everyday tool of nano-CT and FIB-SEM microscopists: label a few slices (sparse scribbles
are enough), train a random forest on local features of every labelled voxel, predict the rest.

* Features (:class:`FeatureSettings`, :func:`compute_features`):
  ``skimage.feature.multiscale_basic_features`` at the scales
  :math:`\\sigma_k = \\sigma_{min} 2^{k}` up to :math:`\\sigma_{max}` (voxels): the Gaussian-smoothed
  intensity :math:`G_{\\sigma} * g`, its gradient magnitude (Sobel) and, with ``texture``, the
  eigenvalues of the Hessian of :math:`G_{\\sigma} * g` (blobs, sheets, tubes); 3D features for
  volumes.
* Classifier: ``sklearn.ensemble.RandomForestClassifier(random_state=seed)``
  (:func:`train_classifier`), trained on the labelled voxels of one or more images; voxels with
  the ``unlabelled`` value are ignored.
* Auto-context (``FeatureSettings(auto_context=True)``; Tu & Bai 2010): a second forest on the
  features plus the first forest's class probabilities, raw and smoothed (:data:`CONTEXT_SIGMAS`),
  trained on probabilities cross-fitted between two halves of the labelled layers.
* Gray scale (``FeatureSettings(gray_normalisation="percentiles")``): each image's gray values
  are mapped by :math:`g' = (g - g_{1})/(g_{99} - g_{1})`, with :math:`g_{1}, g_{99}` its 1st
  and 99th percentiles (:func:`gray_percentiles`), before the features, so a model applies to
  images of another gray scale (8/16-bit, another reconstruction or contrast). By default the
  gray values are used as they are and :func:`gray_scale_warning` says when an image's range is
  far from the training images'.
* Prediction (:func:`predict_labels`) in slabs of axis-0 layers (tiled in-plane when whole
  planes do not fit the memory budget) with a halo of ``int(4 sigma_max + 0.5) + 3`` voxels (8 more
  with auto-context), so
  that every voxel's features, hence its label, are exactly those of the whole image (block
  seams are invisible) while only one block's features are in memory; under MPI every rank
  predicts its own slab of layers. A model trained on 2D images segments a volume slice by
  slice (axis 0), each slice as the 2D image it would be on its own (the ilastik workflow of
  labelling exported slices and applying the classifier to the stack).
* Model files (:func:`save_model`, :func:`load_model`): the forest with the feature settings,
  the phase map, the image dimension and the package and scikit-learn versions; loading checks
  them. Model files are pickles (joblib): **load only model files you trust** (a pickle can run
  code).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fem_anode.errors import InputError, UsageError
from fem_anode.settings import Settings, setting

__all__ = [
    "FeatureSettings",
    "TrainedClassifier",
    "compute_features",
    "extended_features",
    "feature_halo",
    "gray_percentiles",
    "gray_scale_warning",
    "load_model",
    "predict_labels",
    "save_model",
    "train_classifier",
    "UNLABELLED",
]

logger = logging.getLogger(__name__)

#: Default value of unlabelled voxels in training label images.
UNLABELLED = 255
#: Format tag of model files.
MODEL_FORMAT = "fem_anode.trainable-segmentation/1"
#: Gray normalisations of :class:`FeatureSettings`.
GRAY_NORMALISATIONS = ("none", "percentiles")
#: Percentiles mapped to 0 and 1 by ``gray_normalisation="percentiles"``.
GRAY_PERCENTILES = (1.0, 99.0)
#: Layers (evenly spaced along axis 0) and values at most sampled by :func:`gray_percentiles`.
_REFERENCE_LAYERS, _REFERENCE_VALUES = 8, 8_000_000

LayerReader = Callable[[int, int], np.ndarray]


@dataclasses.dataclass
class FeatureSettings(Settings):
    """Pixel features of the trainable segmentation (``multiscale_basic_features``).

    Validated like every settings object of the package (:mod:`fem_anode.settings`): a wrong
    name, type or value is a :class:`~fem_anode.errors.UsageError` naming the field.

    Attributes:
        sigma_min, sigma_max: smallest and largest Gaussian scale (voxels).
        num_sigma: number of scales, log-spaced; ``None``: ``sigma_min`` times powers of 2.
        intensity: smoothed gray value per scale.
        edges: gradient magnitude (Sobel of the smoothed image) per scale.
        texture: Hessian eigenvalues per scale (``ndim`` features per scale; the costly part).
        illumination_degree: if set, :func:`~fem_anode.imaging.denoise.flatten_illumination`
            with this polynomial degree first (uneven illumination); part of the model.
        auto_context: a second forest on these features plus the first forest's class
            probabilities, raw and Gaussian-smoothed by :data:`CONTEXT_SIGMAS` voxels
            (auto-context, Tu & Bai 2010), trained on cross-fitted probabilities.
        extended: ilastik's and Trainable Weka's further standard features
            (:func:`extended_features`): structure-tensor eigenvalues at
            :data:`STRUCTURE_SIGMAS`, the Laplacian of Gaussian at :data:`LOG_SIGMAS` and the
            local maximum and minimum of the image smoothed by :data:`RANK_SMOOTHING` over balls
            of :data:`RANK_RADII` voxels (fixed scales; ``2 ndim + 10`` features).
        gray_normalisation: ``"none"`` (gray values as they are: a model applies to images of
            its training images' gray scale) or ``"percentiles"`` (each image mapped so that its
            1st and 99th percentiles, :func:`gray_percentiles`, become 0 and 1).
    """

    sigma_min: float = setting(
        0.5, "smallest Gaussian scale of the features (voxels)", positive=True, bounds=(None, 64.0)
    )
    sigma_max: float = setting(
        4.0, "largest Gaussian scale of the features (voxels)", positive=True, bounds=(None, 64.0)
    )
    num_sigma: int | None = setting(
        None, "number of scales, log-spaced; default: sigma_min times powers of 2", bounds=(1, 32)
    )
    intensity: bool = setting(True, "smoothed gray value per scale")
    edges: bool = setting(True, "gradient magnitude per scale")
    texture: bool = setting(True, "Hessian eigenvalues per scale")
    illumination_degree: int | None = setting(
        None, "degree (1..4) of the in-plane background polynomial removed first; default off", bounds=(1, 4)
    )
    auto_context: bool = setting(False, "a second forest on the features and the first forest's smoothed probabilities")
    extended: bool = setting(True, "structure-tensor, Laplacian-of-Gaussian and local max/min features")
    gray_normalisation: str = setting(
        "none", "gray values as they are, or each image's percentiles", choices=GRAY_NORMALISATIONS
    )

    def validate(self) -> None:
        if self.sigma_max < self.sigma_min:
            raise UsageError(f"sigma_max must be >= sigma_min ({self.sigma_min}), got {self.sigma_max}")
        if not (self.intensity or self.edges or self.texture):
            raise UsageError("at least one of the intensity, edge and texture features is needed")

    @property
    def sigmas(self) -> np.ndarray:
        """The scales used (as ``multiscale_basic_features`` computes them)."""
        n = self.num_sigma if self.num_sigma is not None else int(np.log2(self.sigma_max) - np.log2(self.sigma_min) + 1)
        return np.logspace(np.log2(self.sigma_min), np.log2(self.sigma_max), num=n, base=2, endpoint=True)

    def n_features(self, ndim: int) -> int:
        """Features per voxel of a ``ndim``-dimensional image."""
        per_scale = int(self.intensity) + int(self.edges) + (ndim if self.texture else 0)
        return per_scale * len(self.sigmas) + (n_extended_features(ndim) if self.extended else 0)


#: Outer (integration) scales of the structure-tensor eigenvalues (voxels); the gradient is taken
#: of the image smoothed by half of each (ilastik's inner scale).
STRUCTURE_SIGMAS: tuple[float, ...] = (1.0, 2.0)
#: Scales of the Laplacian of Gaussian (voxels; ilastik's standard scales 0.7-5 plus 2.5).
LOG_SIGMAS: tuple[float, ...] = (0.7, 1.0, 1.6, 2.5, 3.5, 5.0)
#: Gaussian smoothing (voxels) before the local maximum and minimum filters.
RANK_SMOOTHING = 0.7
#: Radii (voxels) of the balls of the local maximum and minimum filters.
RANK_RADII: tuple[int, ...] = (1, 2)


def n_extended_features(ndim: int) -> int:
    """Features per voxel of :func:`extended_features` in ``ndim`` dimensions."""
    return ndim * len(STRUCTURE_SIGMAS) + len(LOG_SIGMAS) + 2 * len(RANK_RADII)


def _extended_halo() -> int:
    """Reach (voxels) of :func:`extended_features` plus one voxel of margin: the largest of the
    Laplacian of Gaussian (``int(4 sigma + 0.5)``), the structure tensor (inner Gaussian, one
    ``np.gradient``, outer Gaussian) and the smoothed local extrema (Gaussian plus ball radius)."""
    log_reach = int(4.0 * max(LOG_SIGMAS) + 0.5)
    st_reach = max(int(4.0 * s / 2 + 0.5) + 1 + int(4.0 * s + 0.5) for s in STRUCTURE_SIGMAS)
    rank_reach = int(4.0 * RANK_SMOOTHING + 0.5) + max(RANK_RADII)
    return max(log_reach, st_reach, rank_reach) + 1


#: Smoothing scales (voxels) of the class probabilities used as auto-context features.
CONTEXT_SIGMAS: tuple[float, ...] = (1.0, 2.0)
#: Reach of the probability smoothing (``scipy.ndimage.gaussian_filter``, truncate 4).
_CONTEXT_HALO = int(4.0 * max(CONTEXT_SIGMAS) + 0.5)


def _image_feature_halo(settings: FeatureSettings) -> int:
    """Voxels beyond a block that determine its image features exactly.

    The Gaussian of scikit-image reaches ``int(4 sigma + 0.5)`` voxels (truncate 4), the Sobel
    filter one more, the Hessian (two ``np.gradient``) two more; one layer of margin. With
    ``extended``, at least the reach of :func:`extended_features` (:func:`_extended_halo`).
    """
    halo = int(4.0 * float(np.max(settings.sigmas)) + 0.5) + 3
    return max(halo, _extended_halo()) if settings.extended else halo


def feature_halo(settings: FeatureSettings) -> int:
    """Layers beyond a slab that determine its features (and labels) exactly: the image
    features' reach plus, with ``auto_context``, that of the probability smoothing."""
    return _image_feature_halo(settings) + (_CONTEXT_HALO if settings.auto_context else 0)


def compute_features(gray: np.ndarray, settings: FeatureSettings) -> np.ndarray:
    """Features of every voxel, shape ``gray.shape + (n_features,)``, float32.

    The gray values are used as they are (float32); :attr:`FeatureSettings.gray_normalisation`
    is applied before, by the layer readers of :func:`train_classifier` and :func:`predict_labels`.
    """
    from skimage.feature import multiscale_basic_features

    a = np.asarray(gray, dtype=np.float64)
    if settings.illumination_degree is not None:
        from fem_anode.imaging.denoise import flatten_illumination

        a = flatten_illumination(a, settings.illumination_degree)
    a = np.ascontiguousarray(a, dtype=np.float32)
    parts = []
    if settings.intensity or settings.edges:
        parts.append(
            np.asarray(
                multiscale_basic_features(
                    a,
                    intensity=settings.intensity,
                    edges=settings.edges,
                    texture=False,
                    sigma_min=settings.sigma_min,
                    sigma_max=settings.sigma_max,
                    num_sigma=settings.num_sigma,
                    num_workers=1,
                    channel_axis=None,
                ),
                dtype=np.float32,
            )
        )
    if settings.texture:
        parts.extend(_texture_features(a, sigma) for sigma in settings.sigmas)
    if settings.extended:
        parts.append(extended_features(a))
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-1)


def extended_features(image: np.ndarray) -> np.ndarray:
    """ilastik's / Trainable Weka's standard features beyond ``multiscale_basic_features``,
    shape ``image.shape + (n_extended_features(ndim),)``, float32:

    * structure-tensor eigenvalues (decreasing) at each outer scale ``s`` of
      :data:`STRUCTURE_SIGMAS`: ``G_s * (grad g_i grad g_j)`` with ``g`` smoothed by ``s / 2``
      (``np.gradient``): oriented edges and corners, the shape of an interface rather than of the
      gray value;
    * the Laplacian of Gaussian at :data:`LOG_SIGMAS` (``scipy.ndimage.gaussian_laplace``):
      blob detectors at the sizes of small particles and shells;
    * the local maximum and minimum of the image smoothed by :data:`RANK_SMOOTHING`, over balls of
      radius :data:`RANK_RADII` (``scipy.ndimage.maximum_filter`` / ``minimum_filter``): whether a
      brighter (darker) phase is within reach.

    Every operator reaches at most :func:`_extended_halo` voxels, so blocks with that halo are exact.
    """
    from scipy import ndimage
    from skimage import filters

    a = np.asarray(image, dtype=np.float32)
    ndim = a.ndim
    parts: list[np.ndarray] = []
    for s in STRUCTURE_SIGMAS:
        smoothed = filters.gaussian(a, sigma=0.5 * s, preserve_range=False).astype(np.float64)
        grad = np.gradient(smoothed)
        del smoothed
        t = {
            (i, j): ndimage.gaussian_filter(grad[i] * grad[j], s, truncate=4.0)
            for i in range(ndim)
            for j in range(i, ndim)
        }
        del grad
        if ndim == 2:
            mean = 0.5 * (t[0, 0] + t[1, 1])
            root = np.sqrt((0.5 * (t[0, 0] - t[1, 1])) ** 2 + t[0, 1] ** 2)
            parts.append(np.stack([mean + root, mean - root], axis=-1).astype(np.float32))
        else:
            parts.append(_symmetric3_eigenvalues(t[0, 0], t[1, 1], t[2, 2], t[0, 1], t[0, 2], t[1, 2]))
    a64 = a.astype(np.float64)
    parts.append(
        np.stack([ndimage.gaussian_laplace(a64, s, truncate=4.0) for s in LOG_SIGMAS], axis=-1).astype(np.float32)
    )
    del a64
    smoothed32 = filters.gaussian(a, sigma=RANK_SMOOTHING, preserve_range=False).astype(np.float32)
    extrema = []
    for r in RANK_RADII:
        grid = np.meshgrid(*([np.arange(-r, r + 1)] * ndim), indexing="ij")
        ball = np.sum(np.stack(grid) ** 2, axis=0) <= r * r
        extrema.append(ndimage.maximum_filter(smoothed32, footprint=ball))
        extrema.append(ndimage.minimum_filter(smoothed32, footprint=ball))
    parts.append(np.stack(extrema, axis=-1))
    return np.concatenate(parts, axis=-1)


def _texture_features(image: np.ndarray, sigma: float) -> np.ndarray:
    """Hessian eigenvalues (decreasing) of the Gaussian-smoothed image, shape ``(..., ndim)``.

    The texture features of ``multiscale_basic_features`` (same smoothing, same ``np.gradient``
    Hessian), with the eigenvalues of the symmetric 2x2/3x3 matrices in closed form instead of
    ``np.linalg.eigvalsh`` per voxel (about 20 times faster in 3D; equal to float32 rounding).
    """
    from itertools import combinations_with_replacement

    from skimage import filters

    smoothed = filters.gaussian(image, sigma=sigma, preserve_range=False)
    gradient = np.gradient(smoothed)
    h = {
        (i, j): np.gradient(gradient[i], axis=j).astype(np.float64)
        for i, j in combinations_with_replacement(range(image.ndim), 2)
    }
    del gradient, smoothed
    if image.ndim == 2:
        mean = 0.5 * (h[0, 0] + h[1, 1])
        root = np.sqrt((0.5 * (h[0, 0] - h[1, 1])) ** 2 + h[0, 1] ** 2)
        return np.stack([mean + root, mean - root], axis=-1).astype(np.float32)
    return _symmetric3_eigenvalues(h[0, 0], h[1, 1], h[2, 2], h[0, 1], h[0, 2], h[1, 2])


def _symmetric3_eigenvalues(
    a: np.ndarray, d: np.ndarray, f: np.ndarray, b: np.ndarray, c: np.ndarray, e: np.ndarray
) -> np.ndarray:
    """Eigenvalues (decreasing, float32) of the symmetric matrices ``[[a, b, c], [b, d, e], [c, e, f]]``.

    Trigonometric solution of the characteristic cubic (Smith, Commun. ACM 4, 168 (1961)):
    ``q = tr/3``, ``p = sqrt(|A - qI|_F^2 / 6)``, ``r = det((A - qI)/p) / 2``, ``phi = arccos(r)/3``;
    ``l1 = q + 2p cos(phi)``, ``l3 = q + 2p cos(phi + 2pi/3)``, ``l2 = 3q - l1 - l3``.
    """
    q = (a + d + f) / 3.0
    off = b * b + c * c + e * e
    a, d, f = a - q, d - q, f - q
    p = np.sqrt((a * a + d * d + f * f + 2.0 * off) / 6.0)
    det = a * (d * f - e * e) - b * (b * f - e * c) + c * (b * e - d * c)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(p > 0, det / (2.0 * p**3), 0.0)
    phi = np.arccos(np.clip(r, -1.0, 1.0)) / 3.0
    l1 = q + 2.0 * p * np.cos(phi)
    l3 = q + 2.0 * p * np.cos(phi + 2.0 * np.pi / 3.0)
    return np.stack([l1, 3.0 * q - l1 - l3, l3], axis=-1).astype(np.float32)


@dataclasses.dataclass
class TrainedClassifier:
    """A trained forest with everything needed to apply it again.

    Attributes:
        forest: the fitted ``RandomForestClassifier`` (classes are label values).
        settings: the feature settings it was trained with.
        phases: phase name -> label value of its output.
        ndim: image dimension it was trained on (2 or 3).
        training: what it was trained on (voxels per phase, images, seed, gray range).
        versions: fem_anode and scikit-learn versions that trained it.
    """

    forest: Any
    settings: FeatureSettings
    phases: dict[str, int]
    ndim: int
    training: dict[str, Any]
    versions: dict[str, str]
    context_forest: Any = None

    def check_image(self, shape: Sequence[int], source: str = "<image>") -> None:
        """UsageError if an image of this shape cannot be segmented with this model: a 3D model
        needs a 3D image; a 2D model takes a 2D image, or a volume slice by slice (axis 0)."""
        if len(shape) != self.ndim and not (self.ndim == 2 and len(shape) == 3):
            raise UsageError(
                f"{source}: the model was trained on {self.ndim}D images, this image is {len(shape)}D {tuple(shape)}"
            )

    def slice_by_slice(self, shape: Sequence[int]) -> bool:
        """Whether an image of this shape is segmented slice by slice (a 2D model on a volume)."""
        return self.ndim == 2 and len(shape) == 3


def _versions() -> dict[str, str]:
    import sklearn

    from fem_anode import __version__

    return {"fem_anode": __version__, "scikit-learn": sklearn.__version__}


#: Peak bytes per voxel of :func:`compute_features` with the default settings (measured 250).
_BYTES_PER_VOXEL_PER_FEATURE = 16.0


@dataclasses.dataclass(frozen=True)
class _Blocks:
    """How an image is cut for feature computation: z-slabs of ``layers``, in-plane tiles of ``tile``."""

    layers: int
    tile: tuple[int, ...]  # in-plane edge per axis (the whole extent when not tiled)
    halo: int


def _blocks(
    shape: Sequence[int], settings: FeatureSettings, memory_bytes: float, n_layers: int | None = None
) -> _Blocks:
    """Slab thickness and in-plane tile size so that one block's features (with the halo) fit
    ``memory_bytes``: whole planes when enough layers fit (at least twice the halo, or all
    ``n_layers`` to be computed, default the whole image), otherwise cubic-ish tiles."""
    halo = feature_halo(settings)
    ndim = len(shape)
    per_voxel = max(settings.n_features(ndim), 1) * _BYTES_PER_VOXEL_PER_FEATURE
    budget = max(memory_bytes / per_voxel, 1.0)  # voxels of one window
    plane = int(np.prod(shape[1:]))
    if settings.illumination_degree is not None:
        # the in-plane background (and the slice mean) needs whole planes; 2D: the whole image
        return _Blocks(int(shape[0]) if ndim == 2 else max(1, int(budget // plane) - 2 * halo), tuple(shape[1:]), halo)
    layers = int(budget // plane) - 2 * halo
    if layers >= min(int(shape[0]) if n_layers is None else int(n_layers), 2 * halo):
        return _Blocks(max(layers, 1), tuple(shape[1:]), halo)
    edge = max(int(budget ** (1.0 / ndim)) - 2 * halo, 8)
    if settings.auto_context and layers >= 1 and (layers + 2 * halo) / layers <= ((edge + 2 * halo) / edge) ** ndim:
        # the larger halo of auto-context: thin slabs recompute fewer voxels than cubic tiles
        return _Blocks(layers, tuple(shape[1:]), halo)
    return _Blocks(edge, tuple(min(edge, n) for n in shape[1:]), halo)


def _block_features(
    window: np.ndarray,
    w0: int,
    a: int,
    b: int,
    box: tuple[slice, ...],
    shape: Sequence[int],
    settings: FeatureSettings,
    halo: int,
) -> np.ndarray:
    """Exact features of layers ``a..b-1`` and the in-plane ``box`` from the gray ``window``
    (layers ``w0 ..``, whole planes, with at least ``halo`` layers around ``a..b`` where the image has them)."""
    lo, hi = max(a - halo, 0), min(b + halo, int(shape[0]))
    plane_lo = [max(sl.start - halo, 0) for sl in box]
    plane_hi = [min(sl.stop + halo, n) for sl, n in zip(box, shape[1:])]
    region = (slice(lo - w0, hi - w0), *(slice(l, h) for l, h in zip(plane_lo, plane_hi)))
    sub = np.asarray(window[region], dtype=np.float32)
    if not np.all(np.isfinite(sub)):
        raise InputError(f"gray image contains NaN or infinite values in layers {lo}..{hi - 1}")
    feats = compute_features(sub, settings)
    crop = (slice(a - lo, b - lo), *(slice(sl.start - l, sl.stop - l) for sl, l in zip(box, plane_lo)))
    return feats[crop]


def _context_features(forest: Any, feats: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Auto-context features of a block: ``forest``'s class probabilities (columns in the order of
    ``classes``; classes it never saw get 0), raw and smoothed by each of :data:`CONTEXT_SIGMAS`
    (``scipy.ndimage.gaussian_filter``, reflecting borders, truncate 4), float32."""
    from scipy import ndimage

    p = forest.predict_proba(feats.reshape(-1, feats.shape[-1]))
    full = np.zeros((p.shape[0], len(classes)), dtype=np.float32)
    full[:, np.searchsorted(classes, forest.classes_)] = p
    full = full.reshape((*feats.shape[:-1], len(classes)))
    parts = [full]
    for sigma in CONTEXT_SIGMAS:
        parts.append(
            np.stack([ndimage.gaussian_filter(full[..., k], sigma, truncate=4.0) for k in range(len(classes))], axis=-1)
        )
    return np.concatenate(parts, axis=-1)


def gray_percentiles(
    read_layers: LayerReader | np.ndarray, shape: Sequence[int], settings: FeatureSettings | None = None
) -> tuple[float, float]:
    """The 1st and 99th gray percentiles of an image (:data:`GRAY_PERCENTILES`), from at most
    :data:`_REFERENCE_LAYERS` evenly spaced layers of a volume (a 2D image whole), each strided to
    at most :data:`_REFERENCE_VALUES` values in all. Deterministic: every MPI rank that reads the
    same image gets the same pair. With ``settings.illumination_degree`` the layers are flattened
    first, as the features see them.

    Raises:
        InputError: the sampled gray values are not finite.
    """
    shape = tuple(int(n) for n in shape)
    read: LayerReader = (
        functools.partial(_layers_of, read_layers) if isinstance(read_layers, np.ndarray) else read_layers
    )
    degree = settings.illumination_degree if settings is not None else None
    if len(shape) == 2:
        samples = [np.asarray(read(0, shape[0]), dtype=np.float64)]
    else:
        layers = sorted({int(z) for z in np.linspace(0, shape[0] - 1, min(shape[0], _REFERENCE_LAYERS))})
        samples = [np.asarray(read(z, z + 1), dtype=np.float64)[0] for z in layers]
    if degree is not None:
        from fem_anode.imaging.denoise import flatten_illumination

        samples = [flatten_illumination(a, degree) for a in samples]
    values = np.concatenate([a.ravel() for a in samples])
    values = values[:: max(1, math.ceil(values.size / _REFERENCE_VALUES))]
    if not np.all(np.isfinite(values)):
        raise InputError("gray image contains NaN or infinite values")
    lo, hi = np.percentile(values, GRAY_PERCENTILES)
    return float(lo), float(hi)


def _gray_reader(
    read: LayerReader, shape: Sequence[int], settings: FeatureSettings, reference: tuple[float, float] | None = None
) -> LayerReader:
    """``read`` with :attr:`FeatureSettings.gray_normalisation` applied (float32 layers), from the
    image's :func:`gray_percentiles` (``reference`` if already known)."""
    if settings.gray_normalisation == "none":
        return read
    lo, hi = reference if reference is not None else gray_percentiles(read, shape, settings)
    if not hi > lo:
        raise InputError(
            f"the gray image is constant between its {GRAY_PERCENTILES[0]:g}th and {GRAY_PERCENTILES[1]:g}th "
            f"percentiles ({lo:.6g}): percentile normalisation needs contrast"
        )
    scale = 1.0 / (hi - lo)

    def normalised(a: int, b: int) -> np.ndarray:
        return ((np.asarray(read(a, b), dtype=np.float64) - lo) * scale).astype(np.float32)

    return normalised


def gray_scale_warning(model: TrainedClassifier, reference: tuple[float, float], source: str = "<image>") -> str | None:
    """A message when an image's gray range ``reference`` (:func:`gray_percentiles`) lies more
    than a quarter of the training range away from the training images' at either end (a model
    with ``gray_normalisation="none"`` learned their gray scale); ``None`` otherwise or when the
    model normalises each image itself."""
    trained = model.training.get("gray_p1_p99")
    if model.settings.gray_normalisation != "none" or not trained:
        return None
    lo, hi = reference
    t_lo, t_hi = min(r[0] for r in trained), max(r[1] for r in trained)
    span = max(t_hi - t_lo, 1e-300)
    if abs(lo - t_lo) <= 0.25 * span and abs(hi - t_hi) <= 0.25 * span:
        return None
    return (
        f"{source}: gray range {lo:.4g}..{hi:.4g} (1st-99th percentile) differs from the model's training images "
        f"({t_lo:.4g}..{t_hi:.4g}): the classifier learned their gray scale, so the labels are likely wrong; "
        "rescale the image, or train with --gray-normalisation percentiles"
    )


def _iterate_blocks(
    read: LayerReader,
    shape: Sequence[int],
    z0: int,
    z1: int,
    settings: FeatureSettings,
    memory_bytes: float,
    forests: Sequence[Any] = (),
    classes: np.ndarray | None = None,
) -> Iterator[tuple[int, int, tuple[slice, ...], np.ndarray]]:
    """Yield ``(a, b, box, features)`` covering layers ``z0..z1-1`` block by block.

    With ``forests`` (and ``settings.auto_context``), each forest's :func:`_context_features`
    are appended (in that order): the image features and probabilities are computed on the block
    grown by the smoothing's reach (clipped at the image ends), so they are those of the whole image.
    """
    import itertools

    plan = _blocks(shape, settings, memory_bytes, n_layers=z1 - z0)
    nz = int(shape[0])
    ch = _CONTEXT_HALO if forests else 0
    if forests and classes is None:
        raise ValueError("context features need the class values")
    for a in range(z0, z1, plan.layers):
        b = min(a + plan.layers, z1)
        w0, w1 = max(a - plan.halo, 0), min(b + plan.halo, nz)
        if settings.illumination_degree is not None and len(shape) == 2:
            w0, w1 = 0, nz  # 2D flattening: the background needs every row
        window = read(w0, w1)
        if settings.illumination_degree is not None and len(shape) == 2:
            feats = compute_features(np.asarray(window, dtype=np.float32), settings)
            parts = [feats] + [_context_features(f, feats, classes) for f in forests]  # type: ignore[arg-type]
            yield a, b, tuple(slice(0, n) for n in shape[1:]), np.concatenate(parts, axis=-1)[a:b]
            continue
        starts = [range(0, n, t) for n, t in zip(shape[1:], plan.tile)]
        for corner in itertools.product(*starts):
            box = tuple(slice(c, min(c + t, n)) for c, t, n in zip(corner, plan.tile, shape[1:]))
            if not forests:
                yield a, b, box, _block_features(window, w0, a, b, box, shape, settings, plan.halo)
                continue
            ea, eb = max(a - ch, 0), min(b + ch, nz)
            grown = tuple(slice(max(sl.start - ch, 0), min(sl.stop + ch, n)) for sl, n in zip(box, shape[1:]))
            feats = _block_features(window, w0, ea, eb, grown, shape, settings, _image_feature_halo(settings))
            crop = (slice(a - ea, b - ea), *(slice(sl.start - g.start, sl.stop - g.start) for sl, g in zip(box, grown)))
            parts = [feats[crop]] + [_context_features(f, feats, classes)[crop] for f in forests]  # type: ignore[arg-type]
            yield a, b, box, np.concatenate(parts, axis=-1)


def train_classifier(
    pairs: Sequence[tuple[np.ndarray, np.ndarray]],
    phases: Mapping[str, int],
    *,
    settings: FeatureSettings | None = None,
    unlabelled: int = UNLABELLED,
    seed: int = 0,
    n_estimators: int = 32,
    max_depth: int | None = 16,
    max_samples: int = 200_000,
    chunk_memory: float = 1024e6,
    sources: Sequence[str] | None = None,
) -> TrainedClassifier:
    """Train a random forest on the labelled voxels of one or more (gray, labels) pairs.

    Args:
        pairs: ``(gray, labels)`` arrays of equal shape, all 2D or all 3D; label values are
            those of ``phases`` or ``unlabelled`` (ignored: sparse scribbles work).
        phases: phase name -> label value; every phase needs labelled voxels.
        settings: feature settings (default :class:`FeatureSettings`).
        unlabelled: label value of voxels without a label.
        seed: seeds the forest (and the subsampling); same inputs and seed, same model.
        n_estimators: trees.
        max_depth: tree depth limit (``None``: unlimited).
        max_samples: at most this many labelled voxels are used (a seeded random subset,
            proportions of the phases kept).
        chunk_memory: bytes of features in memory at once (images are processed in blocks).
        sources: names of the images for messages and the model's record.

    Raises:
        InputError: shapes differ, label values outside the phase map, a phase without labels.
    """
    from sklearn.ensemble import RandomForestClassifier

    settings = settings or FeatureSettings()
    phases = dict(phases)
    if not pairs:
        raise UsageError("trainable segmentation needs at least one training pair GRAY:LABELS")
    if unlabelled in phases.values():
        raise UsageError(f"the unlabelled value {unlabelled} is also a phase label in {phases}")
    if n_estimators < 1:
        raise UsageError(f"the forest needs at least one tree, got {n_estimators}")
    names = list(sources) if sources is not None else [f"training pair {i + 1}" for i in range(len(pairs))]
    ndims = {np.ndim(g) for g, _ in pairs}
    if len(ndims) != 1 or not ndims <= {2, 3}:
        raise InputError(f"training images must all be 2D or all 3D, got dimensions {sorted(ndims)}")
    ndim = ndims.pop()
    xs, ys, where = [], [], []  # where: (pair, flat index) of each labelled voxel
    references = []  # gray_percentiles of each training image
    context = settings.auto_context
    for i_pair, ((gray, labels), name) in enumerate(zip(pairs, names)):
        gray, labels = np.asarray(gray), np.asarray(labels)
        if gray.shape != labels.shape:
            raise InputError(
                f"{name}: the label image has shape {labels.shape} but the gray image {gray.shape}; they must match "
                "voxel for voxel"
            )
        if not np.issubdtype(labels.dtype, np.integer):
            raise InputError(f"{name}: training labels must be integers, got {labels.dtype}")
        values = np.unique(labels)
        unknown = [int(v) for v in values if v != unlabelled and int(v) not in phases.values()]
        if unknown:
            raise InputError(
                f"{name}: label values {unknown[:10]} are neither in the phase map {phases} nor the unlabelled value "
                f"{unlabelled}"
            )
        # features only of the runs of consecutive labelled layers (each block's features are exact
        # for any block, so this equals a pass over the whole image; two labelled slices of a
        # volume cost two thin slabs, not the volume)
        layers = np.flatnonzero([np.any(labels[z] != unlabelled) for z in range(labels.shape[0])])
        runs = np.split(layers, np.flatnonzero(np.diff(layers) > 1) + 1) if len(layers) else []
        references.append(gray_percentiles(gray, gray.shape, settings))
        read = _gray_reader(functools.partial(_layers_of, gray), gray.shape, settings, references[-1])
        for run in runs:
            for a, b, box, feats in _iterate_blocks(
                read, gray.shape, int(run[0]), int(run[-1]) + 1, settings, chunk_memory
            ):
                block_labels = labels[(slice(a, b), *box)]
                mask = block_labels != unlabelled
                if mask.any():
                    xs.append(feats[mask])
                    ys.append(block_labels[mask])
                    where.append(_flat_indices(mask, a, box, gray.shape, i_pair))
    if not xs:
        raise InputError(f"no labelled voxels in the training labels (every voxel is {unlabelled})")
    x, y = np.concatenate(xs), np.concatenate(ys).astype(np.int64)
    counts = {name: int(np.count_nonzero(y == value)) for name, value in phases.items()}
    missing = [name for name, n in counts.items() if n == 0]
    if missing:
        raise InputError(
            f"phase(s) {', '.join(missing)} have no labelled voxels in the training images; label a few of each"
        )
    # a canonical order (pair, raster index): the model does not depend on the block plan (the
    # memory budget), and the context pass meets the voxels in another order
    positions = np.concatenate(where)
    order = np.lexsort((positions[:, 1], positions[:, 0]))
    x, y, positions = x[order], y[order], positions[order]
    rng = np.random.default_rng(seed)
    keep = None
    if x.shape[0] > max_samples:
        keep = np.sort(rng.choice(x.shape[0], size=max_samples, replace=False))
        x, y = x[keep], y[keep]

    def new_forest() -> Any:
        return RandomForestClassifier(
            n_estimators=int(n_estimators),
            max_depth=max_depth,
            min_samples_leaf=2,
            n_jobs=1,
            random_state=int(seed),
        )

    forest = new_forest()
    logger.info(
        "training a random forest of %d trees on %d labelled voxels (%d features)", n_estimators, x.shape[0], x.shape[1]
    )
    forest.fit(x, y)
    context_forest = None
    folds_info: dict[str, Any] = {}
    if context:
        context_forest, folds_info = _train_context_forest(
            pairs, positions, keep, x, y, forest.classes_, settings, chunk_memory, unlabelled, new_forest, references
        )
    training = {
        "images": names,
        "labelled_voxels": counts,
        "samples_used": int(x.shape[0]),
        "seed": int(seed),
        "n_estimators": int(n_estimators),
        "max_depth": max_depth,
        "unlabelled": int(unlabelled),
        "gray_p1_p99": [list(r) for r in references],
        "feature_importances": forest.feature_importances_.tolist(),
        **folds_info,
    }
    return TrainedClassifier(forest, settings, phases, ndim, training, _versions(), context_forest)


def _flat_indices(mask: np.ndarray, a: int, box: tuple[slice, ...], shape: Sequence[int], pair: int) -> np.ndarray:
    """``(pair, raster index in the whole image)`` of the true voxels of a block's ``mask``."""
    local = np.nonzero(mask)
    coords = [local[0] + a] + [idx + sl.start for idx, sl in zip(local[1:], box)]
    flat = np.ravel_multi_index(tuple(coords), tuple(int(n) for n in shape))
    return np.stack([np.full(flat.shape, pair, dtype=np.int64), flat.astype(np.int64)], axis=1)


def _context_folds(
    pairs: Sequence[tuple[np.ndarray, np.ndarray]], positions: np.ndarray, unlabelled: int
) -> np.ndarray:
    """Fold 0 or 1 of each labelled voxel: per image, the first half of its labelled layers (axis 0,
    in order) against the second half, so a voxel's probabilities come from a forest trained on
    other layers (cross-fitting)."""
    fold = np.zeros(len(positions), dtype=np.int8)
    for i, (_, labels) in enumerate(pairs):
        labels = np.asarray(labels)
        layers = np.flatnonzero([np.any(labels[z] != unlabelled) for z in range(labels.shape[0])])
        if len(layers) < 2:
            raise InputError(
                f"training pair {i + 1}: auto-context needs labels in at least two layers (axis 0) of each "
                f"training image, got {len(layers)}"
            )
        second = layers[(len(layers) + 1) // 2 :]
        mine = positions[:, 0] == i
        z = positions[mine, 1] // int(np.prod(labels.shape[1:]))
        fold[mine] = np.isin(z, second).astype(np.int8)
    return fold


def _train_context_forest(
    pairs: Sequence[tuple[np.ndarray, np.ndarray]],
    positions: np.ndarray,
    keep: np.ndarray | None,
    x: np.ndarray,
    y: np.ndarray,
    classes: np.ndarray,
    settings: FeatureSettings,
    chunk_memory: float,
    unlabelled: int,
    new_forest: Callable[[], Any],
    references: Sequence[tuple[float, float]],
) -> tuple[Any, dict[str, Any]]:
    """The second (auto-context) forest: trained on the image features plus cross-fitted context
    features (Tu & Bai 2010): the probabilities at a voxel of fold ``k`` come from a forest
    trained on the other fold only (in-sample probabilities of the training voxels are nearly
    certain and would teach the second forest to copy the first)."""
    fold_all = _context_folds(pairs, positions, unlabelled)
    fold = fold_all if keep is None else fold_all[keep]
    fold_forests = []
    for k in (0, 1):
        other = fold != k
        f = new_forest()
        f.fit(x[other], y[other])
        fold_forests.append(f)
    n_ctx = len(classes) * (1 + len(CONTEXT_SIGMAS))
    ctx = np.zeros((len(positions), n_ctx), dtype=np.float32)
    filled = np.zeros(len(positions), dtype=bool)
    for i, (gray, labels) in enumerate(pairs):
        gray, labels = np.asarray(gray), np.asarray(labels)
        mine = np.flatnonzero(positions[:, 0] == i)
        plane = int(np.prod(labels.shape[1:]))
        layers = np.unique(positions[mine, 1] // plane)
        runs = np.split(layers, np.flatnonzero(np.diff(layers) > 1) + 1)
        read = _gray_reader(functools.partial(_layers_of, gray), gray.shape, settings, references[i])
        for run in runs:
            for a, b, box, feats in _iterate_blocks(
                read,
                gray.shape,
                int(run[0]),
                int(run[-1]) + 1,
                settings,
                chunk_memory,
                forests=fold_forests,
                classes=classes,
            ):
                mask = labels[(slice(a, b), *box)] != unlabelled
                if not mask.any():
                    continue
                flat = _flat_indices(mask, a, box, gray.shape, i)[:, 1]
                rows = mine[np.searchsorted(positions[mine, 1], flat)]
                nf = feats.shape[-1] - 2 * n_ctx
                # forest k was trained without fold k: a voxel of fold k takes forest k's context
                sel = fold_all[rows][:, None]
                from_0 = feats[mask][:, nf : nf + n_ctx]
                from_1 = feats[mask][:, nf + n_ctx :]
                ctx[rows] = np.where(sel == 0, from_0, from_1)
                filled[rows] = True
    if not filled.all():
        raise RuntimeError("auto-context: context features missing for some labelled voxels")
    if keep is not None:
        ctx = ctx[keep]
    second = new_forest()
    logger.info("training the auto-context forest on %d voxels (%d features)", x.shape[0], x.shape[1] + n_ctx)
    second.fit(np.concatenate([x, ctx], axis=1), y)
    info = {
        "auto_context": {
            "context_sigmas": list(CONTEXT_SIGMAS),
            "fold_voxels": [int(np.count_nonzero(fold == 0)), int(np.count_nonzero(fold == 1))],
        }
    }
    return second, info


def save_model(model: TrainedClassifier, path: str | Path) -> Path:
    """Write a model file (joblib pickle, written atomically). Model files are trusted input."""
    import joblib

    from fem_anode.io.output import atomic_path

    path = Path(path)
    payload = {
        "format": MODEL_FORMAT,
        "versions": model.versions,
        "settings": model.settings.to_dict(),
        "phases": model.phases,
        "ndim": model.ndim,
        "training": model.training,
        "forest": model.forest,
        "context_forest": model.context_forest,
    }
    with atomic_path(path) as tmp:
        joblib.dump(payload, tmp, compress=3)
    return path


def load_model(path: str | Path, phases: Mapping[str, int] | None = None) -> TrainedClassifier:
    """Read a model file written by :func:`save_model` and check it.

    **Model files are pickles: load only files you trust** (unpickling can run code).

    Args:
        path: the model file.
        phases: the phase map the caller expects; a different map in the model is an error.

    Raises:
        InputError: not a model file, written by another fem_anode or scikit-learn version, or
            trained with another phase map.
    """
    import joblib

    path = Path(path)
    if not path.is_file():
        raise InputError(f"model file not found: {path}")
    try:
        payload = joblib.load(path)
    except Exception as err:
        raise InputError(f"{path}: not a readable model file ({type(err).__name__}: {err})") from None
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise InputError(f"{path}: not a fem_anode segmentation model (format {MODEL_FORMAT})")
    now = _versions()
    stored = payload.get("versions", {})
    for key in ("fem_anode", "scikit-learn"):
        if stored.get(key) != now[key]:
            raise InputError(
                f"{path}: the model was trained with {key} {stored.get(key)}, this is {key} {now[key]}; "
                "retrain it (--train ... --save-model) with this version"
            )
    model_phases = {str(k): int(v) for k, v in payload["phases"].items()}
    if phases is not None and dict(phases) != model_phases:
        raise InputError(f"{path}: the model segments the phases {model_phases}, but {dict(phases)} were asked for")
    try:
        # models written before the extended features existed were trained without them
        settings = FeatureSettings(**{"extended": False, **payload["settings"]})
    except UsageError as err:
        raise InputError(f"{path}: feature settings not understood: {err}") from None
    context_forest = payload.get("context_forest")
    if settings.auto_context and context_forest is None:
        raise InputError(f"{path}: the model's settings ask for auto-context but it holds no context forest")
    return TrainedClassifier(
        payload["forest"],
        settings,
        model_phases,
        int(payload["ndim"]),
        payload.get("training", {}),
        stored,
        context_forest,
    )


def _layers_of(array: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Layers ``lo..hi-1`` of an in-memory image (a :data:`LayerReader`)."""
    return array[lo:hi]


def _label_dtype(phases: Mapping[str, int]) -> type:
    values = list(phases.values())
    return np.uint8 if min(values) >= 0 and max(values) < 256 else np.int32


def predict_labels(
    read_layers: LayerReader | np.ndarray,
    shape: Sequence[int],
    model: TrainedClassifier,
    *,
    z0: int = 0,
    z1: int | None = None,
    chunk_memory: float = 1024e6,
    progress: bool = True,
) -> np.ndarray:
    """Labels of layers ``z0 .. z1 - 1`` of a gray image, predicted block by block.

    The layers are cut into slabs of whole planes, or, when too few whole planes fit
    ``chunk_memory``, into cubic-ish blocks; each block's features are computed from the block
    plus :func:`feature_halo` voxels on every side (clipped at the image ends), so the labels are
    exactly those of a prediction on the whole image, for any block size and any split of the
    layers between MPI ranks, while only one block's features are in memory.

    Args:
        read_layers: ``(a, b) -> gray layers a..b-1`` (e.g. a memory-mapped reader), or the array.
        shape: shape of the whole image.
        model: the trained classifier.
        z0, z1: the layers to predict (default all).
        chunk_memory: bytes of features of one block (about; measured peak 12-16 bytes per
            feature and voxel).
        progress: log each block at INFO level.

    Returns:
        Integer labels of shape ``(z1 - z0, *shape[1:])`` with the model's phase values.
    """
    shape = tuple(int(s) for s in shape)
    model.check_image(shape)
    if isinstance(read_layers, np.ndarray):
        array = read_layers
        read: LayerReader = lambda a, b: array[a:b]  # noqa: E731
    else:
        read = read_layers
    nz = shape[0]
    z1 = nz if z1 is None else int(z1)
    if not 0 <= z0 <= z1 <= nz:
        raise UsageError(f"layers {z0}..{z1} are outside the image's {nz} layers")
    if model.slice_by_slice(shape):
        return _predict_slices(read, shape, model, z0, z1, chunk_memory, progress)
    read = _gray_reader(read, shape, model.settings)
    out: np.ndarray = np.empty((z1 - z0, *shape[1:]), dtype=_label_dtype(model.phases))
    n_features = model.settings.n_features(len(shape))
    if model.forest.n_features_in_ != n_features:
        raise InputError(
            f"the model's forest expects {model.forest.n_features_in_} features per voxel, its settings give "
            f"{n_features}"
        )
    final: Any = model.forest
    forests: tuple[Any, ...] = ()
    if model.settings.auto_context:
        if model.context_forest is None:
            raise InputError("the model's settings ask for auto-context but it holds no context forest")
        final, forests = model.context_forest, (model.forest,)
        n_features += len(model.forest.classes_) * (1 + len(CONTEXT_SIGMAS))
        if final.n_features_in_ != n_features:
            raise InputError(
                f"the model's context forest expects {final.n_features_in_} features per voxel, its settings give "
                f"{n_features}"
            )
    done = 0
    for a, b, box, feats in _iterate_blocks(
        read, shape, z0, z1, model.settings, chunk_memory, forests=forests, classes=model.forest.classes_
    ):
        block = feats.shape[:-1]
        out[(slice(a - z0, b - z0), *box)] = final.predict(feats.reshape(-1, n_features)).reshape(block)
        done += int(np.prod(block))
        if progress:
            logger.info(
                "trainable segmentation: layers %d..%d%s predicted, %.0f %% of layers %d..%d",
                a,
                b - 1,
                ""
                if all(sl.stop - sl.start == n for sl, n in zip(box, shape[1:]))
                else f" (tile {[(sl.start, sl.stop) for sl in box]})",
                100.0 * done / max(out.size, 1),
                z0,
                z1 - 1,
            )
    return out


def _predict_slices(
    read: LayerReader,
    shape: tuple[int, ...],
    model: TrainedClassifier,
    z0: int,
    z1: int,
    chunk_memory: float,
    progress: bool,
) -> np.ndarray:
    """A 2D model on the z-slices ``z0 .. z1 - 1`` of a volume, each slice an image of its own (its
    features, its gray normalisation), as if the slices had been given one by one."""
    out: np.ndarray = np.empty((z1 - z0, *shape[1:]), dtype=_label_dtype(model.phases))
    for z in range(z0, z1):
        layer = np.asarray(read(z, z + 1))[0]
        out[z - z0] = predict_labels(layer, layer.shape, model, chunk_memory=chunk_memory, progress=False)
        if progress and ((z - z0 + 1) % max(1, (z1 - z0) // 10) == 0 or z == z1 - 1):
            logger.info(
                "trainable segmentation (2D model, slice by slice): slice %d predicted, %.0f %% of slices %d..%d",
                z,
                100.0 * (z - z0 + 1) / max(z1 - z0, 1),
                z0,
                z1 - 1,
            )
    return out
