"""``fem-anode segment``: gray image -> label image (multistage, region, threshold, trainable).

* ``--method multistage`` (synchrotron CT): denoising, then the histogram-based global
  iterative threshold multistage segmentation into pore, intermediate (SEI/CBD), graphite and
  Si domains, then a small clean-up;
* ``--method region`` (FIB-SEM): Felzenszwalb regions per slice + per-region features on the
  denoised image, robust to shine-through artefacts;
* ``--method threshold``: plain multi-class isodata pixel threshold (baseline);
* ``--method trainable``: a random forest on multiscale features, trained on labelled images
  (``--train GRAY:LABELS``, sparse labels allowed) or loaded (``--model FILE``); predicted in
  slabs (each MPI rank its own).

``--truth LABELS`` scores the result: per-phase IoU, confusion matrix (JSON and PNG) and
phase-fraction errors. See :mod:`fem_anode.imaging.segmentation`,
:mod:`fem_anode.imaging.trainable`, :mod:`fem_anode.imaging.accuracy` and docs/imaging.md.
"""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from fem_anode.commands._common import add_image_arguments, check_int, check_number, is_root, provenance, world_comm
from fem_anode.imaging.settings import DENOISE_METHODS, CleaningSettings, MultistageSettings, RegionSettings

logger = logging.getLogger(__name__)

METHODS = ("multistage", "region", "threshold", "trainable")
#: The defaults of the options that set a :class:`MultistageSettings` field (one source).
_DEFAULTS = MultistageSettings()
_REGION_DEFAULTS = RegionSettings()
#: The settings of the methods that have their own (the others use the cleaning part only).
_SETTINGS_OF_METHOD: dict[str, type[CleaningSettings]] = {"multistage": MultistageSettings, "region": RegionSettings}
#: The fields only the multistage method has.
_MULTISTAGE_FIELDS = frozenset(MultistageSettings.__dataclass_fields__) - frozenset(
    CleaningSettings.__dataclass_fields__
)
#: The options that set a segmentation settings field: field -> (option, its value in the
#: parsed arguments, or None when not given).
_SETTING_OPTIONS: dict[str, tuple[str, Any]] = {
    "median_size": ("--median", lambda args: args.median),
    "denoise": ("--denoise", lambda args: args.denoise),
    "noise_sigma": ("--noise-sigma", lambda args: args.noise_sigma),
    "denoise_strength": ("--denoise-strength", lambda args: args.denoise_strength),
    "illumination_degree": ("--illumination", lambda args: args.illumination),
    "min_object_size": ("--min-object-size", lambda args: args.min_object_size),
    "psf_sigma": ("--psf-sigma", lambda args: args.psf_sigma),
    "potts_beta": ("--potts-beta", lambda args: args.potts_beta),
    "coating_weight": ("--coating-weight", lambda args: args.coating_weight),
    "levels": ("--levels", lambda args: args.levels),
    "cleanup": ("--no-cleanup", lambda args: False if args.no_cleanup else None),
    "refine": ("--no-refine", lambda args: False if args.no_refine else None),
    "graphite_opening": ("--no-graphite-opening", lambda args: False if args.no_graphite_opening else None),
    "si_seeds": ("--no-si-candidates", lambda args: False if args.no_si_candidates else None),
    "scale": ("--scale", lambda args: args.scale),
    "sigma": ("--sigma", lambda args: args.sigma),
    "min_size": ("--min-size", lambda args: args.min_size),
    "dark_fraction": ("--dark-fraction", lambda args: args.dark_fraction),
}


def register(subparsers: argparse._SubParsersAction, name: str) -> None:
    parser = subparsers.add_parser(
        name,
        help="segment a gray image into phase labels (multistage threshold, Felzenszwalb regions, trainable random "
        "forest)",
        description="Segment a 2D/3D gray image into a label image. Writes --out (.npy/.npz/.tif/folder) "
        "with voxel size and phase map, OUT.report.json (method details, accuracy with --truth), OUT.report.png "
        "(gray slice, labels and, with --truth, the disagreement map) and with --truth OUT.confusion.png.",
    )
    add_image_arguments(parser, labels=False)
    parser.add_argument(
        "--method", choices=METHODS, default="multistage", help="segmentation method (default multistage)"
    )
    parser.add_argument(
        "--phases",
        metavar="MAP",
        help="labels to write, name=label,...; multistage needs pore, sei, graphite, si "
        "(default pore=0,si=1,graphite=2,sei=3); region/threshold default pore=0,si=1,sei=3; trainable: the phases "
        "of the training labels (default pore=0,si=1,graphite=2,sei=3; a --model keeps its own)",
    )
    parser.add_argument(
        "--order",
        metavar="NAMES",
        help="region/threshold: phase names from darkest to brightest, e.g. pore,sei,si (default: by the usual gray "
        "levels pore < sei < graphite < si, else the --phases order)",
    )
    parser.add_argument(
        "--settings",
        type=Path,
        metavar="FILE",
        help="multistage settings (the cleaning ones serve region and threshold too) from a TOML file with the keys "
        "listed in docs/imaging.md, or from an earlier run's OUT.report.json, which stores them: reruns it; options "
        "given here override the file",
    )
    clean = parser.add_argument_group("cleaning (multistage, region; --illumination also trainable)")
    clean.add_argument(
        "--denoise",
        choices=DENOISE_METHODS,
        help="edge-preserving denoising first: non-local means (3D patches for volumes), total variation or none "
        f"(default {_DEFAULTS.denoise})",
    )
    clean.add_argument(
        "--noise-sigma",
        type=float,
        metavar="GRAY",
        help="noise standard deviation in gray units (default: estimated from the image)",
    )
    clean.add_argument(
        "--denoise-strength",
        type=float,
        metavar="K",
        help=f"denoising strength relative to the noise sigma (default {_DEFAULTS.denoise_strength:g})",
    )
    clean.add_argument(
        "--illumination",
        type=int,
        metavar="DEGREE",
        help="remove a smooth in-plane background first (every method; stored in a trained model): the per-slice "
        "polynomial surface of this degree (1 = ramp, 2 = ramp + cupping; uneven illumination; default off)",
    )
    clean.add_argument(
        "--median",
        type=int,
        metavar="N",
        help="multistage: median filter of width N voxels first (default off)",
    )
    clean.add_argument(
        "--no-cleanup", action="store_true", help="multistage: skip the clean-up (isolated voxels, small objects)"
    )
    clean.add_argument(
        "--min-object-size",
        type=int,
        metavar="N",
        help="multistage clean-up: objects smaller than N voxels take their surroundings' label "
        f"(default {_DEFAULTS.min_object_size}; 1 keeps all)",
    )
    clean.add_argument(
        "--no-refine",
        action="store_true",
        help="multistage: skip the blur-aware refinement (PSF and levels fitted to the image, then iterated "
        "conditional modes on the blurred-label model with a Potts prior)",
    )
    clean.add_argument(
        "--no-graphite-opening",
        action="store_true",
        help="multistage refinement: allow graphite on structures thinner than 3 voxels (by default such graphite "
        "is relabelled by a second refinement pass: graphite particles are many voxels thick)",
    )
    clean.add_argument(
        "--no-si-candidates",
        action="store_true",
        help="multistage refinement: start from the stage-4 labels only (by default every local maximum of the "
        "denoised image brighter than the graphite peak, with its face neighbours, starts as Si and the refinement "
        "keeps or removes it)",
    )
    clean.add_argument(
        "--coating-weight",
        type=float,
        metavar="W",
        help="multistage refinement: prior weight of a pore-graphite or pore-Si face pair relative to the other "
        f"unlike pairs (default {_DEFAULTS.coating_weight:g}: solids are coated by the intermediate domain; 1 = plain "
        "Potts)",
    )
    clean.add_argument(
        "--levels",
        type=_levels,
        default=None,
        metavar="pore=G,sei=G,graphite=G,si=G",
        help="multistage refinement: the phases' gray levels, held fixed instead of fitted (a calibration from a "
        "scan of the same instrument where every phase is thick: its report's refine.levels; give its "
        "refine.psf_sigma_voxels as --psf-sigma too)",
    )
    clean.add_argument(
        "--psf-sigma",
        type=float,
        default=None,
        metavar="VOXELS",
        help="multistage refinement: Gaussian PSF width in voxels (default: fitted to the image)",
    )
    clean.add_argument(
        "--potts-beta",
        type=float,
        default=None,
        metavar="BETA",
        help="multistage refinement: Potts weight per unlike face pair, in units of residual^2 / (2 noise^2) "
        "(default 1)",
    )
    region = parser.add_argument_group("region method (FIB-SEM)")
    region.add_argument("--scale", type=float, help=f"region: Felzenszwalb scale (default {_REGION_DEFAULTS.scale:g})")
    region.add_argument(
        "--sigma",
        type=float,
        help=f"region: Felzenszwalb Gaussian pre-smoothing in pixels (default {_REGION_DEFAULTS.sigma:g})",
    )
    region.add_argument(
        "--min-size",
        type=int,
        help=f"region: Felzenszwalb minimum region size in pixels (default {_REGION_DEFAULTS.min_size})",
    )
    region.add_argument(
        "--dark-fraction",
        type=float,
        help="region: fraction of pore-dark pixels that makes a region a pore region "
        f"(default {_REGION_DEFAULTS.dark_fraction:g})",
    )
    train = parser.add_argument_group("trainable method (random forest on multiscale features)")
    train.add_argument(
        "--train",
        action="append",
        default=[],
        metavar="GRAY:LABELS",
        help="a training pair: gray image and label image of the same shape (phase map of --phases; "
        "voxels equal to --unlabelled are ignored, so sparse scribbles work); repeat for more images",
    )
    train.add_argument(
        "--unlabelled",
        type=int,
        default=255,
        metavar="V",
        help="label value of unlabelled training voxels (default 255)",
    )
    train.add_argument(
        "--model",
        type=Path,
        metavar="FILE",
        help="use a saved classifier instead of training (model files are pickles: only load files you trust)",
    )
    train.add_argument(
        "--save-model", type=Path, metavar="FILE", help="write the trained classifier (e.g. model.joblib)"
    )
    train.add_argument("--seed", type=int, default=0, help="random forest seed (default 0)")
    train.add_argument("--trees", type=int, default=32, help="number of trees (default 32)")
    train.add_argument("--max-depth", type=int, default=16, help="tree depth limit (default 16; 0 = unlimited)")
    train.add_argument(
        "--feature-sigma-min",
        type=float,
        metavar="VOXELS",
        help="smallest feature scale (default 0.5 voxels)",
    )
    train.add_argument(
        "--feature-sigma-max",
        type=float,
        metavar="VOXELS",
        help="largest feature scale (default 4 voxels)",
    )
    train.add_argument(
        "--no-texture", action="store_true", help="no Hessian-eigenvalue (texture) features (faster, less accurate)"
    )
    train.add_argument(
        "--basic-features",
        action="store_true",
        help="only the multiscale intensity, gradient and Hessian features, without the structure-tensor, "
        "Laplacian-of-Gaussian and local max/min features (faster prediction, less accurate; "
        "the default before 2026-12-04)",
    )
    train.add_argument(
        "--auto-context",
        action="store_true",
        help="a second forest on the features plus the first forest's smoothed class probabilities "
        "(cross-fitted on the labelled layers; needs labels in 2+ layers; about twice the prediction time)",
    )
    train.add_argument(
        "--gray-normalisation",
        choices=("none", "percentiles"),
        help="percentiles: map each image's 1st..99th gray percentile to 0..1 before the features, so a "
        "model applies to images of another gray scale (8/16-bit, other reconstruction or contrast); "
        "stored in the model (default none: gray values as they are)",
    )
    train.add_argument(
        "--chunk-memory",
        type=float,
        default=1024.0,
        metavar="MB",
        help="features held in memory at once per rank, MB (default 1024); the image is predicted in blocks",
    )
    parser.add_argument(
        "--truth",
        metavar="LABELS",
        type=Path,
        help="known label image: report per-phase IoU, confusion matrix (JSON + PNG) and phase-fraction errors",
    )
    parser.add_argument("--out", type=Path, required=True, metavar="FILE", help="label image to write, e.g. labels.npy")
    parser.set_defaults(func=run)


def _levels(text: str) -> dict[str, float]:
    """``pore=0.12,sei=0.42,...`` -> {name: level} (argparse type: a bad value is a usage error)."""
    out: dict[str, float] = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        try:
            level = float(value)
        except ValueError:
            level = math.nan
        if not sep or not name.strip() or not math.isfinite(level):
            raise argparse.ArgumentTypeError(f"expected NAME=GRAY pairs separated by commas, got {item!r}")
        out[name.strip()] = level
    return out


def _order(phases: dict[str, int], order: str | None) -> list[str]:
    from fem_anode.imaging.synthetic import DEFAULT_GRAY_LEVELS

    if order:
        return [n.strip() for n in order.split(",") if n.strip()]
    if all(name in DEFAULT_GRAY_LEVELS for name in phases):
        return sorted(phases, key=lambda n: DEFAULT_GRAY_LEVELS[n])
    return list(phases)


def _settings_file(path: Path, method: str) -> CleaningSettings:
    """``--settings``: a TOML file of the method's settings keys, or the JSON report of an
    earlier run of the same method (its ``"settings"``)."""
    import json

    from fem_anode.errors import InputError, UsageError

    settings_class = _SETTINGS_OF_METHOD[method]
    if path.suffix.lower() != ".json":
        return settings_class.from_toml(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"--settings {path}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"--settings {path}: not a readable JSON file ({err})") from None
    if isinstance(data, dict) and "settings" in data:
        if data.get("method") != method:
            raise UsageError(f"--settings {path}: a report of --method {data.get('method')}, not of {method}")
        data = data["settings"]
    try:
        return settings_class.from_dict(data)
    except UsageError as err:
        raise UsageError(f"--settings {path}: {err}") from None


def _given_options(table: dict[str, tuple[str, Any]], args: argparse.Namespace) -> dict[str, tuple[str, Any]]:
    """The options of ``table`` given on the command line: field -> (option, value)."""
    given: dict[str, tuple[str, Any]] = {}
    for field, (option, value_of) in table.items():
        value = value_of(args)
        if value is not None:
            given[field] = (option, value)
    return given


def _settings_with_options(base: Any, table: dict[str, tuple[str, Any]], given: dict[str, tuple[str, Any]]) -> Any:
    """``base`` (a settings object or class) with the ``given`` options' values; a bad value is a
    UsageError naming the option (``table``'s options replace the field names in the message)."""
    import re

    from fem_anode.errors import UsageError

    values = {field: value for field, (_, value) in given.items()}
    try:
        return base.replace(**values) if not isinstance(base, type) else base(**values)
    except UsageError as err:
        names = "|".join(sorted(map(re.escape, table), key=len, reverse=True))
        message = re.sub(rf"(?<![\w-])({names})(?![\w-])", lambda m: table[m.group(1)][0], str(err))
        raise UsageError(message) from None


def _method_settings(args: argparse.Namespace) -> CleaningSettings:
    """The settings of ``--method``: :class:`MultistageSettings`, :class:`RegionSettings`, or for
    the threshold and trainable methods their cleaning part (of which they use the illumination
    degree). Those of ``--settings FILE`` (default: the defaults) with the options given changed;
    an option of another method, or a bad value, is a UsageError naming the option."""
    import dataclasses

    from fem_anode.errors import UsageError

    settings_class = _SETTINGS_OF_METHOD.get(args.method, CleaningSettings)
    if args.settings is not None and args.method not in _SETTINGS_OF_METHOD:
        raise UsageError(
            f"--settings holds the settings of --method {' or '.join(_SETTINGS_OF_METHOD)}; --method {args.method} "
            "takes its own options"
        )
    given = _given_options(_SETTING_OPTIONS, args)
    fields = {field.name for field in dataclasses.fields(settings_class)}
    foreign = [name for name in given if name not in fields]
    if foreign:
        owner = "multistage" if foreign[0] in _MULTISTAGE_FIELDS else "region"
        options = ", ".join(
            given[name][0] for name in foreign if (name in _MULTISTAGE_FIELDS) == (owner == "multistage")
        )
        raise UsageError(f"{options} belong to --method {owner}, not {args.method}")
    base = settings_class if args.settings is None else _settings_file(args.settings, args.method)
    return _settings_with_options(base, _SETTING_OPTIONS, given)


def _check_options(args: argparse.Namespace) -> CleaningSettings:
    """Option values and combinations, before any work (UsageError naming the option); returns
    the method's settings they give."""
    from fem_anode.errors import UsageError

    if args.out.suffix.lower() == ".png":
        raise UsageError("--out: write labels as .npy, .npz, .tif or a folder (PNG cannot hold 3D volumes)")
    inputs = [("the image", args.image), ("--truth", args.truth), ("--model", args.model)]
    inputs += [("--train", Path(part)) for pair in args.train for part in pair.rpartition(":")[::2] if part]
    for name, path in inputs:
        if path is not None and Path(path).resolve() == args.out.resolve():
            raise UsageError(f"--out {args.out} is {name}: the labels would overwrite an input; choose another name")
    settings = _method_settings(args)
    trainable_only = {
        "--train": bool(args.train),
        "--model": args.model is not None,
        "--save-model": args.save_model is not None,
        "--gray-normalisation": args.gray_normalisation is not None,
    }
    if args.method != "trainable":
        given = [k for k, v in trainable_only.items() if v]
        if given:
            raise UsageError(f"{', '.join(given)} belong to --method trainable, not {args.method}")
        return settings
    if args.train and args.model is not None:
        raise UsageError("give --train pairs to train a classifier or --model to use a saved one, not both")
    if not args.train and args.model is None:
        raise UsageError("--method trainable needs --train GRAY:LABELS (one or more) or --model FILE")
    if args.model is not None and args.save_model is not None:
        raise UsageError("--save-model writes a newly trained classifier; with --model there is nothing new to save")
    check_int(args.unlabelled, "--unlabelled", -(2**31), 2**31 - 1)
    check_int(args.trees, "--trees", 1, 10_000)
    check_int(args.max_depth, "--max-depth", 0, 10_000)
    check_int(args.seed, "--seed", 0, 2**32 - 1)
    _feature_settings(args)  # bad values fail before any work
    check_number(args.chunk_memory, "--chunk-memory", 1.0, 1e7)
    for pair in args.train:
        gray, sep, labels = pair.rpartition(":")
        if not sep or not gray or not labels:
            raise UsageError(f"--train {pair!r}: expected GRAY:LABELS, two image paths separated by ':'")
    return settings


def run(args: argparse.Namespace) -> int:
    settings = _check_options(args)
    if args.method == "trainable":
        return _run_trainable(args)
    if isinstance(settings, MultistageSettings):
        return _run_multistage(args, settings)
    return _run_classic(args, settings)


def _run_multistage(args: argparse.Namespace, settings: MultistageSettings) -> int:
    """The multistage method on slabs: rank ``r`` reads, filters and labels only its layers
    (plus halos from its neighbours); the labels equal one process's voxel for voxel."""
    from fem_anode.errors import InputError, UsageError
    from fem_anode.imaging.partition import Slabs
    from fem_anode.imaging.segmentation import multistage_slabs
    from fem_anode.imaging.synthetic import ANODE_PHASES
    from fem_anode.io.images import VoxelImage, open_image_layers, parse_phase_map

    comm = world_comm()
    size = comm.size if comm is not None else 1
    phases = parse_phase_map(args.phases) if args.phases else dict(ANODE_PHASES)
    image = _on_every_rank(comm, lambda: open_image_layers(args.image, voxel_size=args.voxel_size))
    shape = tuple(image.array.shape) if isinstance(image, VoxelImage) else tuple(image.shape)
    if len(shape) not in (2, 3):
        raise InputError(f"{args.image}: multistage segmentation needs a 2D or 3D gray image, got shape {shape}")
    if settings.median_size > 0:
        check_int(settings.median_size, "--median", 0, max(shape), " (the image's largest dimension in voxels)")
    if settings.denoise == "tv" and size > 1:
        raise UsageError(
            "--denoise tv couples the whole image in its iterations and runs on one process only; "
            "use --denoise nl_means (slab-exact) on several MPI ranks"
        )
    # a 2D image is one slice (the illumination fit needs all of it): rank 0 takes it whole
    slabs = Slabs.even(comm, shape[0]) if len(shape) == 3 else Slabs.on_root(comm, shape[0])

    def read() -> np.ndarray:
        layers = np.asarray(image.read_layers(slabs.z0, slabs.z1), dtype=np.float64)
        if not np.all(np.isfinite(layers)):
            raise InputError(f"{args.image}: gray image contains NaN or infinite values")
        return layers

    gray = _on_every_rank(comm, read)
    labels, info = multistage_slabs(gray, slabs, phases, settings)
    del gray
    report: dict[str, Any] = {
        "provenance": provenance("segment", args=args, comm=comm),
        "input": str(args.image),
        **info,
        "slabs": {"ranks": size, "bounds": list(slabs.bounds)},
    }
    _finish_slabs(args, comm, image, shape, list(slabs.bounds), labels, phases, report)
    logger.info("multistage segmentation: thresholds %s", info.get("thresholds"))
    return 0


def _run_classic(args: argparse.Namespace, settings: CleaningSettings) -> int:
    """Region and threshold methods: every rank segments the whole image, rank 0 writes it."""
    from fem_anode.imaging import segmentation as seg
    from fem_anode.imaging.synthetic import ROI_PHASES
    from fem_anode.io.images import parse_phase_map, read_image, write_image

    gray = read_image(args.image, voxel_size=args.voxel_size, kind="gray")
    phases = parse_phase_map(args.phases) if args.phases else dict(ROI_PHASES)
    order = _order(phases, args.order)
    if isinstance(settings, RegionSettings):
        check_number(settings.sigma, "--sigma", 0.0, float(max(gray.shape)))
        result = seg.region_segmentation(gray, phases, settings, order=order)
    else:
        result = seg.threshold_segmentation(gray, phases, order=order, illumination_degree=settings.illumination_degree)
    report: dict[str, Any] = {"provenance": provenance("segment", args=args), "input": str(args.image), **result.info}
    comm = world_comm()
    truth_array = None
    if args.truth is not None:
        from fem_anode.imaging.accuracy import accuracy_report

        truth = read_image(args.truth, kind="labels")
        if truth.shape != gray.shape:
            from fem_anode.errors import InputError

            raise InputError(f"--truth {args.truth}: shape {truth.shape} differs from the image {gray.shape}")
        truth_array = truth.array
        report["accuracy"] = accuracy_report(result.labels.array, truth_array, phases)
        report["iou"] = report["accuracy"]["iou"]
        _log_accuracy(report["accuracy"], args.truth)
    if is_root(comm):
        write_image(args.out, result.labels)
        _write_reports(args, report, gray.array, result.labels.array, truth_array, phases)
    if comm is not None and comm.size > 1:
        comm.barrier()
    logger.info("%s segmentation: thresholds %s", args.method, result.info.get("thresholds"))
    logger.info("wrote %s", args.out)
    return 0


def _log_accuracy(accuracy: dict[str, Any], truth: Path) -> None:
    lines = [
        f"accuracy vs {truth}: mean IoU {accuracy['mean_iou']:.3f}, overall {accuracy['overall_accuracy']:.3f}",
        f"  {'phase':10s} {'IoU':>6s} {'fraction':>9s} {'truth':>7s} {'error':>7s}",
    ]
    pf = accuracy["phase_fraction"]
    for name, iou in accuracy["iou"].items():
        iou_text = f"{iou:6.3f}" if iou is not None else "   n/a"
        lines.append(
            f"  {name:10s} {iou_text} {100 * pf['segmentation'][name]:8.2f}% {100 * pf['truth'][name]:6.2f}% "
            f"{100 * pf['error_points'][name]:+6.2f}"
        )
    logger.info("\n".join(lines))


def _write_reports(
    args: argparse.Namespace,
    report: dict[str, Any],
    gray_slice: np.ndarray,
    labels_slice: np.ndarray,
    truth_slice: np.ndarray | None,
    phases: dict[str, int],
) -> None:
    """OUT.report.json, OUT.report.png and (with accuracy) OUT.confusion.png; slices of 3D images are taken in the
    middle."""
    from fem_anode.imaging.accuracy import plot_confusion, plot_segmentation_report
    from fem_anode.io.output import write_json

    def middle(a: np.ndarray) -> np.ndarray:
        return a[a.shape[0] // 2] if a.ndim == 3 else a

    base = args.out.with_name(args.out.name)
    figures = {"report": str(base.with_name(base.name + ".report.png"))}
    title = f"{args.method} segmentation of {args.image.name}" + (" (middle slice)" if gray_slice.ndim == 3 else "")
    plot_segmentation_report(
        middle(gray_slice),
        middle(labels_slice),
        phases,
        figures["report"],
        truth=middle(truth_slice) if truth_slice is not None else None,
        title=title,
    )
    if "accuracy" in report:
        figures["confusion"] = str(base.with_name(base.name + ".confusion.png"))
        plot_confusion(report["accuracy"], figures["confusion"], title=f"{args.method} vs {args.truth.name}")
    report["figures"] = figures
    write_json(base.with_name(base.name + ".report.json"), report)


def _slab_bounds(nz: int, size: int) -> list[int]:
    return [nz * r // size for r in range(size + 1)]


def _run_trainable(args: argparse.Namespace) -> int:
    from fem_anode.errors import FemAnodeError, InputError
    from fem_anode.faults import share_error
    from fem_anode.imaging import trainable as tr
    from fem_anode.imaging.synthetic import ANODE_PHASES
    from fem_anode.io.images import VoxelImage, open_image_layers, parse_phase_map, read_image

    comm = world_comm()
    size = comm.size if comm is not None else 1
    rank = comm.rank if comm is not None else 0
    phases = parse_phase_map(args.phases) if args.phases else None
    settings = _feature_settings(args)
    chunk_memory = args.chunk_memory * 1e6
    # The classifier: trained (or loaded) on rank 0 and broadcast, so every rank has the same one.
    model, error = None, None
    if rank == 0:
        try:
            if args.model is not None:
                model = tr.load_model(args.model, phases)
                _check_model_settings(args, model.settings)
            else:
                phases = phases or dict(ANODE_PHASES)
                pairs, names = [], []
                for pair in args.train:
                    gray_path, _, labels_path = pair.rpartition(":")
                    g = read_image(gray_path, voxel_size=args.voxel_size, kind="gray")
                    lab = read_image(labels_path, kind="any")
                    if lab.shape != g.shape:
                        raise InputError(
                            f"--train {pair}: the label image has shape {lab.shape} but the gray image {g.shape}; "
                            "they must match voxel for voxel"
                        )
                    pairs.append((g.array, lab.array))
                    names.append(pair)
                model = tr.train_classifier(
                    pairs,
                    phases,
                    settings=settings,
                    unlabelled=args.unlabelled,
                    seed=args.seed,
                    n_estimators=args.trees,
                    max_depth=args.max_depth or None,
                    chunk_memory=chunk_memory,
                    sources=names,
                )
                if args.save_model is not None:
                    tr.save_model(model, args.save_model)
                    logger.info("wrote the classifier to %s", args.save_model)
        except FemAnodeError as err:
            error = err
    share_error(comm, error)
    if comm is not None and size > 1:
        model = comm.bcast(model, root=0)
    assert model is not None
    phases = model.phases
    image = open_image_layers(args.image, voxel_size=args.voxel_size)
    shape = tuple(image.array.shape) if isinstance(image, VoxelImage) else image.shape
    model.check_image(shape, str(args.image))
    nz = shape[0]
    if rank == 0 and model.settings.gray_normalisation == "none":
        try:
            warning = tr.gray_scale_warning(
                model, tr.gray_percentiles(image.read_layers, shape, model.settings), str(args.image)
            )
        except FemAnodeError:
            warning = None  # bad gray values: the prediction below reports them on every rank
        if warning:
            logger.warning("%s", warning)
    bounds = _slab_bounds(nz, size)
    z0, z1 = bounds[rank], bounds[rank + 1]
    labels = _on_every_rank(
        comm,
        lambda: tr.predict_labels(
            image.read_layers, shape, model, z0=z0, z1=z1, chunk_memory=chunk_memory, progress=True
        ),
    )
    report: dict[str, Any] = {
        "provenance": provenance("segment", args=args, comm=comm),
        "input": str(args.image),
        "method": "trainable",
        "model": {
            "file": str(args.model) if args.model else None,
            "saved_to": str(args.save_model) if args.save_model else None,
            "settings": model.settings.to_dict(),
            "phases": phases,
            "training": model.training,
            "versions": model.versions,
        },
        "slabs": {
            "ranks": size,
            "bounds": bounds,
            "halo_layers": 0 if model.slice_by_slice(shape) else tr.feature_halo(model.settings),
            "slice_by_slice": model.slice_by_slice(shape),
        },
    }
    _finish_slabs(args, comm, image, shape, bounds, labels, phases, report)
    return 0


def _finish_slabs(
    args: argparse.Namespace,
    comm: Any,
    image: Any,
    shape: tuple[int, ...],
    bounds: list[int],
    labels: np.ndarray,
    phases: dict[str, int],
    report: dict[str, Any],
) -> None:
    """Accuracy (each rank scores its own layers, the confusion matrices are summed), the label
    image (written without gathering for .npy) and the report figure of a slab-distributed run."""
    from fem_anode.errors import InputError
    from fem_anode.imaging.accuracy import accuracy_from_confusion, confusion_matrix
    from fem_anode.io.images import VoxelImage, open_image_layers

    size = comm.size if comm is not None else 1
    rank = comm.rank if comm is not None else 0
    nz = shape[0]
    z0, z1 = bounds[rank], bounds[rank + 1]
    truth_layers = None
    if args.truth is not None:
        truth_image = open_image_layers(args.truth)
        truth_shape = tuple(truth_image.array.shape) if isinstance(truth_image, VoxelImage) else truth_image.shape
        if truth_shape != shape:
            raise InputError(f"--truth {args.truth}: shape {truth_shape} differs from the image {shape}")
        truth_layers = np.asarray(truth_image.read_layers(z0, z1))

        def score() -> np.ndarray:
            if not np.issubdtype(truth_layers.dtype, np.integer):
                raise InputError(f"--truth {args.truth}: labels must be integers, got {truth_layers.dtype}")
            return (
                confusion_matrix(labels, truth_layers, phases)
                if z1 > z0
                else np.zeros((len(phases),) * 2, dtype=np.int64)
            )

        local = _on_every_rank(comm, score)
        total = comm.allreduce(local) if comm is not None and size > 1 else local
        report["accuracy"] = accuracy_from_confusion(total, phases)
        report["iou"] = report["accuracy"]["iou"]
        _log_accuracy(report["accuracy"], args.truth)
    voxel_size = image.voxel_size
    _write_distributed(args.out, labels, shape, bounds, comm, voxel_size, phases)
    # The report figure: the middle slice of a volume (from the rank that owns it), a 2D image whole.
    piece = None
    if len(shape) == 3:
        zm = nz // 2
        if z0 <= zm < z1:
            piece = (
                np.asarray(image.read_layers(zm, zm + 1), dtype=np.float64)[0],
                labels[zm - z0],
                truth_layers[zm - z0] if truth_layers is not None else None,
            )
        if comm is not None and size > 1:
            pieces = comm.gather(piece, root=0) or []
            piece = next((p for p in pieces if p is not None), None) if rank == 0 else None
    else:
        full: np.ndarray | None = labels
        full_truth = truth_layers
        if comm is not None and size > 1:
            gathered, truth_all = comm.gather(labels, root=0) or [], comm.gather(truth_layers, root=0) or []
            full = np.concatenate(gathered) if rank == 0 else None
            full_truth = np.concatenate(truth_all) if rank == 0 and truth_layers is not None else None
        if rank == 0:
            piece = (np.asarray(image.read_layers(0, nz), dtype=np.float64), full, full_truth)
    if rank == 0 and piece is not None:
        _write_reports(args, report, piece[0], piece[1], piece[2], phases)
    if comm is not None and size > 1:
        comm.barrier()
    logger.info("wrote %s", args.out)


#: The options that set a :class:`~fem_anode.imaging.trainable.FeatureSettings` field: field ->
#: (option, its value in the parsed arguments or None when not given).
_FEATURE_OPTIONS: dict[str, tuple[str, Any]] = {
    "sigma_min": ("--feature-sigma-min", lambda args: args.feature_sigma_min),
    "sigma_max": ("--feature-sigma-max", lambda args: args.feature_sigma_max),
    "illumination_degree": ("--illumination", lambda args: args.illumination),
    "gray_normalisation": ("--gray-normalisation", lambda args: args.gray_normalisation),
    "texture": ("--no-texture", lambda args: False if args.no_texture else None),
    "auto_context": ("--auto-context", lambda args: True if args.auto_context else None),
    "extended": ("--basic-features", lambda args: False if args.basic_features else None),
}


def _feature_settings(args: argparse.Namespace) -> Any:
    """The trainable method's :class:`~fem_anode.imaging.trainable.FeatureSettings` of the options
    (the defaults for those not given); a bad value is a UsageError naming the option."""

    from fem_anode.imaging.trainable import FeatureSettings

    return _settings_with_options(FeatureSettings, _FEATURE_OPTIONS, _given_options(_FEATURE_OPTIONS, args))


def _check_model_settings(args: argparse.Namespace, settings: Any) -> None:
    """InputError when a feature option given with --model differs from the model's own (the
    model computes the features it was trained with; options not given are the model's)."""
    from fem_anode.errors import InputError

    for field, (option, value) in _given_options(_FEATURE_OPTIONS, args).items():
        stored = getattr(settings, field)
        if value != stored:
            shown = "given" if isinstance(value, bool) else value
            raise InputError(
                f"{option} {shown} differs from the model {args.model}, trained with {stored}; "
                "a model computes the features it was trained with (drop the option or retrain)"
            )


def _on_every_rank(comm: Any, work: Any) -> Any:
    """``work()`` on every rank; if it fails on any rank, every rank raises that error
    (:func:`fem_anode.faults.first_error`), so no rank waits forever in the next collective."""
    from fem_anode.errors import FemAnodeError
    from fem_anode.faults import first_error

    result, error = None, None
    try:
        result = work()
    except FemAnodeError as err:
        error = err
    first_error(comm, error)
    return result


def _write_distributed(
    path: Path,
    labels: np.ndarray,
    shape: tuple[int, ...],
    bounds: list[int],
    comm: Any,
    voxel_size: Any,
    phases: dict[str, int],
) -> None:
    """Write the label image from every rank's layers (:func:`~fem_anode.io.images.write_image_layers`:
    ``.npy``, TIFF and folders of slices without gathering the volume)."""
    from fem_anode.io.images import write_image_layers

    write_image_layers(path, labels, shape, bounds, comm, voxel_size=voxel_size, phases=phases)
