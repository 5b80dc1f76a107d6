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
* Prediction (:func:`predict_labels`) in slabs of axis-0 layers with a halo of
  ``ceil(4 sigma_max) + 3`` layers, so that every voxel's features, hence its label, are exactly
  those of the whole image (chunk seams are invisible) while only one slab's features are in
  memory; under MPI every rank predicts its own slab.
* Model files (:func:`save_model`, :func:`load_model`): the forest with the feature settings,
  the phase map, the image dimension and the package and scikit-learn versions; loading checks
  them. Model files are pickles (joblib): **load only model files you trust** (a pickle can run
  code).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fem_anode.errors import InputError, UsageError

__all__ = [
    "FeatureSettings",
    "TrainedClassifier",
    "compute_features",
    "feature_halo",
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

LayerReader = Callable[[int, int], np.ndarray]


@dataclasses.dataclass(frozen=True)
class FeatureSettings:
    """Pixel features of the trainable segmentation (``multiscale_basic_features``).

    Attributes:
        sigma_min, sigma_max: smallest and largest Gaussian scale (voxels).
        num_sigma: number of scales, log-spaced; ``None``: ``sigma_min`` times powers of 2.
        intensity: smoothed gray value per scale.
        edges: gradient magnitude (Sobel of the smoothed image) per scale.
        texture: Hessian eigenvalues per scale (``ndim`` features per scale; the costly part).
        illumination_scale: if set, :func:`~fem_anode.imaging.denoise.flatten_illumination`
            with this in-plane width (voxels) first (uneven illumination); part of the model.
    """

    sigma_min: float = 0.5
    sigma_max: float = 4.0
    num_sigma: int | None = None
    intensity: bool = True
    edges: bool = True
    texture: bool = True
    illumination_scale: float | None = None

    def __post_init__(self) -> None:
        if self.illumination_scale is not None and not (math.isfinite(self.illumination_scale) and self.illumination_scale > 0):
            raise UsageError(f"illumination scale must be a positive number of voxels, got {self.illumination_scale}")
        if not (math.isfinite(self.sigma_min) and self.sigma_min > 0):
            raise UsageError(f"feature sigma_min must be a positive number of voxels, got {self.sigma_min}")
        if not (math.isfinite(self.sigma_max) and self.sigma_max >= self.sigma_min):
            raise UsageError(f"feature sigma_max must be >= sigma_min ({self.sigma_min}), got {self.sigma_max}")
        if self.sigma_max > 64:
            raise UsageError(f"feature sigma_max must be at most 64 voxels, got {self.sigma_max}")
        if self.num_sigma is not None and not 1 <= self.num_sigma <= 32:
            raise UsageError(f"number of feature scales must be in 1..32, got {self.num_sigma}")
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
        return per_scale * len(self.sigmas)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def feature_halo(settings: FeatureSettings) -> int:
    """Layers beyond a slab that determine its features exactly.

    The Gaussian of scikit-image reaches ``int(4 sigma + 0.5)`` voxels (truncate 4), the Sobel
    filter one more, the Hessian (two ``np.gradient``) two more; one layer of margin.
    """
    return int(4.0 * float(np.max(settings.sigmas)) + 0.5) + 3


def compute_features(gray: np.ndarray, settings: FeatureSettings) -> np.ndarray:
    """Features of every voxel, shape ``gray.shape + (n_features,)``, float32.

    The gray values are used as they are (float32, no rescaling), so a model applies to images
    of the same gray scale as its training images.
    """
    from skimage.feature import multiscale_basic_features

    a = np.asarray(gray, dtype=np.float64)
    if settings.illumination_scale is not None:
        from fem_anode.imaging.denoise import flatten_illumination

        a = flatten_illumination(a, settings.illumination_scale)
    a = np.ascontiguousarray(a, dtype=np.float32)
    features = multiscale_basic_features(
        a, intensity=settings.intensity, edges=settings.edges, texture=settings.texture,
        sigma_min=settings.sigma_min, sigma_max=settings.sigma_max, num_sigma=settings.num_sigma,
        num_workers=1, channel_axis=None,
    )
    return np.asarray(features, dtype=np.float32)


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

    def check_image(self, shape: Sequence[int], source: str = "<image>") -> None:
        """UsageError if an image of this shape cannot be segmented with this model."""
        if len(shape) != self.ndim:
            raise UsageError(f"{source}: the model was trained on {self.ndim}D images, this image is {len(shape)}D {tuple(shape)}")


def _versions() -> dict[str, str]:
    import sklearn

    from fem_anode import __version__

    return {"fem_anode": __version__, "scikit-learn": sklearn.__version__}


def _chunk_layers(shape: Sequence[int], settings: FeatureSettings, memory_bytes: float) -> int:
    if len(shape) == 2 and settings.illumination_scale is not None:
        return int(shape[0])  # the in-plane background of a 2D image needs the whole image
    per_layer = float(np.prod(shape[1:])) * (settings.n_features(len(shape)) * 4 * 3 + 64)
    return max(1, int(memory_bytes // max(per_layer, 1.0)))


def _features_of_layers(read: LayerReader, nz: int, a: int, b: int, settings: FeatureSettings, halo: int) -> np.ndarray:
    """Exact features of layers ``a..b-1`` from a window with ``halo`` extra layers each side."""
    lo, hi = max(a - halo, 0), min(b + halo, nz)
    if settings.illumination_scale is not None and np.ndim(read(0, 1)) == 2:
        lo, hi = 0, nz  # 2D: the in-plane background needs every row
    window = np.asarray(read(lo, hi), dtype=np.float32)
    if not np.all(np.isfinite(window)):
        raise InputError(f"gray image contains NaN or infinite values in layers {lo}..{hi - 1}")
    return compute_features(window, settings)[a - lo : b - lo]


def train_classifier(
    pairs: Sequence[tuple[np.ndarray, np.ndarray]],
    phases: Mapping[str, int],
    *,
    settings: FeatureSettings | None = None,
    unlabelled: int = UNLABELLED,
    seed: int = 0,
    n_estimators: int = 50,
    max_depth: int | None = 20,
    max_samples: int = 200_000,
    chunk_memory: float = 512e6,
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
        chunk_memory: bytes of features in memory at once (images are processed in slabs).
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
    halo = feature_halo(settings)
    xs, ys = [], []
    allowed = np.array(sorted(phases.values()))
    for (gray, labels), name in zip(pairs, names):
        gray, labels = np.asarray(gray), np.asarray(labels)
        if gray.shape != labels.shape:
            raise InputError(f"{name}: the label image has shape {labels.shape} but the gray image {gray.shape}; they must match voxel for voxel")
        if not np.issubdtype(labels.dtype, np.integer):
            raise InputError(f"{name}: training labels must be integers, got {labels.dtype}")
        values = np.unique(labels)
        unknown = [int(v) for v in values if v != unlabelled and int(v) not in phases.values()]
        if unknown:
            raise InputError(f"{name}: label values {unknown[:10]} are neither in the phase map {phases} nor the unlabelled value {unlabelled}")
        step = _chunk_layers(gray.shape, settings, chunk_memory)
        nz = gray.shape[0]
        for a in range(0, nz, step):
            b = min(a + step, nz)
            mask = labels[a:b] != unlabelled
            if not mask.any():
                continue
            feats = _features_of_layers(lambda lo, hi: gray[lo:hi], nz, a, b, settings, halo)
            xs.append(feats[mask])
            ys.append(labels[a:b][mask])
    if not xs:
        raise InputError(f"no labelled voxels in the training labels (every voxel is {unlabelled})")
    x, y = np.concatenate(xs), np.concatenate(ys).astype(np.int64)
    counts = {name: int(np.count_nonzero(y == value)) for name, value in phases.items()}
    missing = [name for name, n in counts.items() if n == 0]
    if missing:
        raise InputError(f"phase(s) {', '.join(missing)} have no labelled voxels in the training images; label a few of each")
    rng = np.random.default_rng(seed)
    if x.shape[0] > max_samples:
        keep = np.sort(rng.choice(x.shape[0], size=max_samples, replace=False))
        x, y = x[keep], y[keep]
    forest = RandomForestClassifier(
        n_estimators=int(n_estimators), max_depth=max_depth, min_samples_leaf=2, n_jobs=1, random_state=int(seed),
    )
    logger.info("training a random forest of %d trees on %d labelled voxels (%d features)", n_estimators, x.shape[0], x.shape[1])
    forest.fit(x, y)
    gray_ranges = [[float(np.percentile(np.asarray(g), 1)), float(np.percentile(np.asarray(g), 99))] for g, _ in pairs]
    training = {
        "images": names,
        "labelled_voxels": counts,
        "samples_used": int(x.shape[0]),
        "seed": int(seed),
        "n_estimators": int(n_estimators),
        "max_depth": max_depth,
        "unlabelled": int(unlabelled),
        "gray_p1_p99": gray_ranges,
        "feature_importances": forest.feature_importances_.tolist(),
    }
    return TrainedClassifier(forest, settings, phases, ndim, training, _versions())


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
        settings = FeatureSettings(**payload["settings"])
    except TypeError as err:
        raise InputError(f"{path}: feature settings not understood: {err}") from None
    return TrainedClassifier(payload["forest"], settings, model_phases, int(payload["ndim"]), payload.get("training", {}), stored)


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
    chunk_memory: float = 512e6,
    progress: bool = True,
) -> np.ndarray:
    """Labels of layers ``z0 .. z1 - 1`` of a gray image, predicted slab by slab.

    Each slab of at most ``chunk_memory`` bytes of features is computed from the layers it
    covers plus :func:`feature_halo` layers each side (clipped at the image ends), so the labels
    are exactly those of a prediction on the whole image, for any slab size and any split of
    the layers between MPI ranks.

    Args:
        read_layers: ``(a, b) -> gray layers a..b-1`` (e.g. a memory-mapped reader), or the array.
        shape: shape of the whole image.
        model: the trained classifier.
        z0, z1: the layers to predict (default all).
        chunk_memory: bytes of features per slab (about).
        progress: log each slab at INFO level.

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
    halo = feature_halo(model.settings)
    step = _chunk_layers(shape, model.settings, chunk_memory)
    out = np.empty((z1 - z0, *shape[1:]), dtype=_label_dtype(model.phases))
    n_features = model.settings.n_features(len(shape))
    for a in range(z0, z1, step):
        b = min(a + step, z1)
        feats = _features_of_layers(read, nz, a, b, model.settings, halo)
        if feats.shape[-1] != n_features or model.forest.n_features_in_ != n_features:
            raise InputError(f"the model expects {model.forest.n_features_in_} features per voxel, the image gives {feats.shape[-1]}")
        out[a - z0 : b - z0] = model.forest.predict(feats.reshape(-1, n_features)).reshape(b - a, *shape[1:])
        if progress:
            logger.info("trainable segmentation: layers %d..%d of %d predicted (%.0f %%)", a, b - 1, nz, 100.0 * (b - z0) / max(z1 - z0, 1))
    return out
