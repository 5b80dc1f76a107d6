"""Settings of the segmentation methods: one validated object per method for the CLI, the API and tests.

:class:`MultistageSettings` holds every parameter of
:func:`~fem_anode.imaging.segmentation.multistage_threshold` (stages 0-5: cleaning, histogram
thresholds, clean-up, blur-aware refinement), :class:`RegionSettings` those of
:func:`~fem_anode.imaging.segmentation.region_segmentation`; both share the cleaning of
:class:`CleaningSettings` (the trainable method's are
:class:`~fem_anode.imaging.trainable.FeatureSettings`). ``fem-anode segment`` builds them from
its options, the Python functions take one or keyword overrides of its fields, and the reports
store them. Gray values are in the image's own units ("gray units"); sizes and widths in voxels.

This module imports no NumPy, so the command line can read the defaults without loading it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fem_anode.errors import UsageError
from fem_anode.settings import Settings, setting

__all__ = [
    "DEFAULT_MIN_OBJECT_SIZE",
    "DENOISE_METHODS",
    "MULTISTAGE_ROLES",
    "CleaningSettings",
    "MultistageSettings",
    "RegionSettings",
]

#: The four domains of the multistage segmentation, by role; the default phase names.
MULTISTAGE_ROLES: tuple[str, ...] = ("pore", "sei", "graphite", "si")
#: Smallest connected object (voxels, face connectivity) the clean-up keeps by default.
DEFAULT_MIN_OBJECT_SIZE: int = 3
#: Edge-preserving denoising methods of :func:`~fem_anode.imaging.denoise.denoise_gray`.
DENOISE_METHODS: tuple[str, ...] = ("nl_means", "tv", "none")

#: Largest value of the dimensionless weights (beyond it the data term no longer counts).
_MAX_WEIGHT = 1e6
_MAX_INT32 = 2**31 - 1


@dataclass
class CleaningSettings(Settings):
    """The cleaning of the gray image that every method but the trainable one starts with
    (:func:`~fem_anode.imaging.denoise.denoise_gray`, :func:`~fem_anode.imaging.denoise.flatten_illumination`)."""

    denoise: str = setting("nl_means", "edge-preserving denoising", choices=DENOISE_METHODS)
    noise_sigma: float | None = setting(
        None, "noise standard deviation (gray units); default estimated from the image", nonnegative=True
    )
    denoise_strength: float = setting(
        0.8, "denoising strength relative to the noise sigma", positive=True, bounds=(None, 100.0)
    )
    illumination_degree: int | None = setting(
        None, "degree of the in-plane background polynomial removed first (1..4); default off", bounds=(1, 4)
    )


@dataclass
class MultistageSettings(CleaningSettings):
    """Parameters of the multistage segmentation (SCT volumes; Vorauer et al. 2020, Methods).

    The stages are those of :func:`~fem_anode.imaging.segmentation.multistage_threshold`;
    docs/imaging.md (section 1.3) has the table with the command-line options. Notes beyond the
    one-line descriptions of the fields:

    * ``median_size`` is kept for comparison: a median filter rounds corners and removes small
      Si, which the denoising (``denoise``, estimated noise) does not.
    * ``potts_beta`` ``None`` means :data:`~fem_anode.imaging.restore.DEFAULT_POTTS_BETA`.
    * ``graphite_opening``: off for graphite flakes thinner than 3 voxels (no 3D cross of
      graphite fits there).
    * ``levels`` (with ``psf_sigma``) is a calibration from a scan where every phase is thick,
      e.g. another sample of the same series and instrument: its report's ``refine.levels`` and
      ``refine.psf_sigma_voxels``.
    """

    # stage 0: cleaning (the fields above) and a median filter
    median_size: int = setting(
        0, "median filter width before the denoising (voxels; 0 or 1 = off)", bounds=(0, _MAX_INT32)
    )
    # stages 1-3: histogram thresholds and mask arithmetic
    bins: int = setting(512, "gray-value histogram bins of the threshold stages", bounds=(16, 1 << 24))
    min_graphite_voxels: int = setting(
        8, "smallest graphite component kept; smaller ones join the intermediate domain (voxels)", bounds=(1, None)
    )
    # stage 4: clean-up
    cleanup: bool = setting(True, "stage 4: isolated voxels and objects below min_object_size relabelled")
    min_object_size: int | dict[str, int] = setting(
        DEFAULT_MIN_OBJECT_SIZE, "smallest object the clean-up keeps (voxels), for all phases or per phase name"
    )
    # stage 5: blur-aware refinement
    refine: bool = setting(True, "stage 5: blur-aware refinement (PSF and levels fitted, then ICM)")
    psf_sigma: float | None = setting(
        None, "Gaussian PSF width of the refinement (voxels); default fitted to the image", bounds=(0.05, 100.0)
    )
    potts_beta: float | None = setting(
        None, "Potts weight per unlike face pair, residual^2 / (2 noise^2) units; default 1", bounds=(0.0, _MAX_WEIGHT)
    )
    max_sweeps: int = setting(8, "sweep limit of the refinement", bounds=(1, 10_000))
    graphite_opening: bool = setting(True, "refine again with graphite excluded from structures thinner than 3 voxels")
    coating_weight: float = setting(
        3.0, "prior weight of a pore-graphite or pore-Si face pair (1 = Potts)", bounds=(0.0, _MAX_WEIGHT)
    )
    si_seeds: bool = setting(True, "start the refinement with the Si candidates (bright local maxima) added")
    levels: dict[str, float] | None = setting(
        None, "gray level of each phase (pore, sei, graphite, si), held fixed; default fitted"
    )

    def validate(self) -> None:
        sizes = self.min_object_size if isinstance(self.min_object_size, dict) else {"": self.min_object_size}
        for name, size in sizes.items():
            if not 1 <= size <= _MAX_INT32:
                where = f"min_object_size.{name}" if name else "min_object_size"
                raise UsageError(f"{where} must lie in [1, {_MAX_INT32}] voxels, got {size!r}")
        if self.levels is not None:
            missing = [r for r in MULTISTAGE_ROLES if r not in self.levels]
            unknown = [k for k in self.levels if k not in MULTISTAGE_ROLES]
            if missing or unknown:
                raise UsageError(
                    f"levels need exactly the phases {', '.join(MULTISTAGE_ROLES)}; "
                    f"missing {missing or 'none'}, unknown {unknown or 'none'}"
                )
            if not all(math.isfinite(v) for v in self.levels.values()):
                raise UsageError(f"levels must be finite gray values, got {dict(self.levels)}")


@dataclass
class RegionSettings(CleaningSettings):
    """Parameters of the region method (FIB-SEM slices; Vorauer et al. 2020, Fig. 4b-c):
    Felzenszwalb regions per slice and a decision per region
    (:func:`~fem_anode.imaging.segmentation.region_segmentation`)."""

    scale: float = setting(30.0, "Felzenszwalb scale (larger: larger regions)", positive=True)
    sigma: float = setting(0.8, "Felzenszwalb Gaussian pre-smoothing (pixels)", nonnegative=True)
    min_size: int = setting(20, "Felzenszwalb minimum region size (pixels)", bounds=(1, _MAX_INT32))
    dark_fraction: float = setting(
        0.1, "fraction of pore-dark pixels that makes a region a pore region", positive=True, bounds=(None, 1.0)
    )
    bright_fraction: float = setting(
        0.5, "fraction of bright pixels that makes a region the brightest phase", positive=True, bounds=(None, 1.0)
    )
