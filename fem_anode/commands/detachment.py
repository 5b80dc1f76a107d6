"""``fem-anode detachment {measure,simulate,fit}``: particle detachment (Müller et al., 2018).

* ``measure IMAGE --cycle N``: per Si particle, effective radius and mean ray-traced gap to the
  carbon-black/binder domain -> ``DIR/gaps.csv`` (``cycle,radius_m,gap_m``; 2D sections are
  converted to 3D equivalents unless ``--no-stereology``), ``DIR/particles.json``, ``DIR/gaps.png``.
* ``simulate``: the Maxwell-material detachment model -> ``DIR/results.json``
  (``capacity_retention``, ``gap`` mean/std per radius and cycle, Fig. 4d scenarios),
  ``DIR/gap_model.png``, ``DIR/capacity.png``, ``DIR/settings.toml``.
* ``fit GAPS.csv [--capacity CAP.csv]``: least-squares fit of alpha0, kappa0, delta0, zeta0 with
  bootstrap ranges -> ``DIR/fit.json``, ``DIR/bootstrap.csv``, figures, ``DIR/settings.toml``.

Lengths accept unit suffixes (``0.02um``, ``120nm``; bare numbers are metres); ``--zeta0``
accepts ``0.163/um`` (bare numbers are 1/m). Results are in SI units.
"""

from __future__ import annotations

import argparse
import logging
import re
import time
from pathlib import Path
from typing import Any

from fem_anode.commands._common import add_image_arguments, add_out_argument, check_int, is_root, provenance, world_comm
from fem_anode.errors import UsageError
from fem_anode.units import LENGTH_UNITS, parse_length

logger = logging.getLogger(__name__)

_INVERSE = re.compile(
    r"^\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*(?:(?:1?/\s*([A-Za-zµμ]+))|(?:([A-Za-zµμ]+)\^-1))?\s*$"
)


def parse_inverse_length(text: str) -> float:
    """``"0.163/um"``, ``"0.163 1/um"``, ``"0.163um^-1"`` or a bare number (1/m) -> value in 1/m."""
    match = _INVERSE.match(str(text))
    if match is None:
        raise UsageError(f"cannot read inverse length {text!r}; use e.g. 0.163/um or 1.63e5 (1/m)")
    value = float(match.group(1))
    unit = match.group(2) or match.group(3)
    if unit is not None and unit not in LENGTH_UNITS:
        raise UsageError(f"unknown length unit {unit!r} in {text!r}; use one of {', '.join(LENGTH_UNITS)}")
    if value < 0:
        raise UsageError(f"{text!r} must be non-negative")
    return value / (LENGTH_UNITS[unit] if unit else 1.0)


def parse_nonnegative_length(text: str) -> float:
    """A length in metres (unit suffixes allowed) that may be zero."""
    try:
        if float(str(text).strip()) == 0.0:
            return 0.0
    except ValueError:
        pass
    zero = re.match(r"^\s*(?:0+\.?0*|\.0+)\s*([A-Za-zµμ]+)\s*$", str(text))
    if zero and zero.group(1) in LENGTH_UNITS:
        return 0.0
    return parse_length(text)


def register(subparsers: argparse._SubParsersAction, name: str) -> None:
    parser = subparsers.add_parser(
        name,
        help="particle detachment: gap measurement, Maxwell-material model, bootstrap fit",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = parser.add_subparsers(dest="action", metavar="{measure,simulate,fit}", required=True)

    measure = actions.add_parser("measure", help="gap between Si particles and CBD from a segmented 2D/3D image")
    add_image_arguments(measure)
    measure.add_argument("--cycle", type=int, required=True, help="cycle number of the imaged electrode (0 = pristine)")
    measure.add_argument("--si", default="si", help="phase name of silicon (default si)")
    measure.add_argument("--cbd", default="cbd", help="phase name of the carbon-black/binder domain (default cbd)")
    measure.add_argument(
        "--blocking", default=None, help="comma-separated phases that stop rays (default graphite, if present)"
    )
    measure.add_argument("--max-distance", default="5um", help="longest gap searched (default 5um)")
    measure.add_argument("--min-voxels", type=int, default=8, help="ignore Si components smaller than this (default 8)")
    measure.add_argument("--keep-border", action="store_true", help="also measure particles cut by the image border")
    measure.add_argument(
        "--no-stereology", action="store_true", help="2D: write section radii/gaps instead of 3D equivalents"
    )
    add_out_argument(measure)
    measure.set_defaults(func=run_measure)

    simulate = actions.add_parser("simulate", help="run the detachment model (gap and capacity vs cycle)")
    _add_model_arguments(simulate)
    simulate.add_argument(
        "--radii",
        type=Path,
        metavar="FILE",
        help="CSV with a radius_m column (default: the settings' size distribution)",
    )
    add_out_argument(simulate)
    simulate.set_defaults(func=run_simulate)

    fit = actions.add_parser(
        "fit", help="fit alpha0, kappa0, delta0, zeta0 to gaps (and capacity) with bootstrap ranges"
    )
    fit.add_argument("gaps", type=Path, metavar="GAPS.csv", help="per-particle gaps, columns cycle,radius_m,gap_m")
    fit.add_argument(
        "--capacity", type=Path, metavar="CAP.csv", help="capacity retention, columns cycle,capacity_fraction"
    )
    fit.add_argument(
        "--radii",
        type=Path,
        metavar="FILE",
        help="population for the capacity (radius_m column); default the measured particles",
    )
    fit.add_argument(
        "--config", type=Path, metavar="TOML", help="detachment settings file ([model], [distribution], [fit])"
    )
    fit.add_argument("--bootstrap", type=int, help="bootstrap replicates (default from settings: 200)")
    fit.add_argument("--confidence", type=float, help="central probability of the ranges (default 0.68)")
    fit.add_argument("--seed", type=int, help="bootstrap seed")
    fit.add_argument("--si-volume-change", type=float, help="relative Si volume increase on lithiation (default 2.8)")
    add_out_argument(fit)
    fit.set_defaults(func=run_fit)
    for sub in (measure, simulate, fit):  # logging options also after the action (as fem_anode.cli does one level up)
        group = sub.add_argument_group("output options")
        group.add_argument(
            "-v", "--verbose", action="count", default=argparse.SUPPRESS, help="more log output (-vv for debug)"
        )
        group.add_argument(
            "-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="only warnings and errors"
        )
        group.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help="show Python tracebacks on errors"
        )


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, metavar="TOML", help="detachment settings file ([model], [distribution], [fit])"
    )
    parser.add_argument("--alpha0", type=float, help="E/eta x half-cycle duration (paper fit 0.83)")
    parser.add_argument("--kappa0", help="adhesion length, e.g. 0.02um (paper fit)")
    parser.add_argument("--delta0", help="SEI growth per lithiation, e.g. 0.12um (paper fit)")
    parser.add_argument("--zeta0", help="disconnection-probability slope, e.g. 0.163/um (paper fit)")
    parser.add_argument("--cycles", type=int, help="number of cycles (default 10)")
    parser.add_argument(
        "--si-volume-change", type=float, help="relative Si volume increase on lithiation (default 2.8)"
    )


def _settings(args: argparse.Namespace) -> Any:
    from fem_anode.detachment.settings import DetachmentSettings

    settings = DetachmentSettings.from_toml(args.config) if getattr(args, "config", None) else DetachmentSettings()
    model: dict[str, Any] = {}
    if getattr(args, "alpha0", None) is not None:
        model["alpha0"] = args.alpha0
    if getattr(args, "kappa0", None) is not None:
        model["kappa0"] = parse_nonnegative_length(args.kappa0)
    if getattr(args, "delta0", None) is not None:
        model["delta0"] = parse_nonnegative_length(args.delta0)
    if getattr(args, "zeta0", None) is not None:
        model["zeta0"] = parse_inverse_length(args.zeta0)
    if getattr(args, "cycles", None) is not None:
        model["cycles"] = args.cycles
    if getattr(args, "si_volume_change", None) is not None:
        model["si_volume_change"] = args.si_volume_change
    if model:
        settings.model = settings.model.replace(**model)
    if getattr(args, "seed", None) is not None:
        check_int(args.seed, "--seed", 0)
    fit: dict[str, Any] = {}
    for key, attr in (("n_bootstrap", "bootstrap"), ("confidence", "confidence"), ("seed", "seed")):
        if getattr(args, attr, None) is not None:
            fit[key] = getattr(args, attr)
    if fit:
        settings.fit = settings.fit.replace(**fit)
    settings.check()
    return settings


def run_measure(args: argparse.Namespace) -> int:
    import numpy as np

    from fem_anode.detachment.data import GapData, write_gap_csv
    from fem_anode.detachment.plots import plot_gap_scatter
    from fem_anode.imaging.gaps import measure_gaps
    from fem_anode.io.images import read_image
    from fem_anode.io.output import output_directory, write_json

    if args.cycle < 0:
        raise UsageError("--cycle must be >= 0")
    check_int(args.cycle, "--cycle", 0, 10_000, " (the model's largest number of cycles)")
    check_int(args.min_voxels, "--min-voxels", 0)
    max_distance = parse_length(args.max_distance)
    # Not load_image(kind="labels"): a pristine image may list an SEI phase without SEI voxels.
    image = read_image(args.image, voxel_size=args.voxel_size, phases=args.phases, kind="any")
    image.check_labels(require_all_phases=False)
    blocking = [p.strip() for p in args.blocking.split(",") if p.strip()] if args.blocking is not None else None
    result = measure_gaps(
        image,
        si=args.si,
        cbd=args.cbd,
        blocking=blocking,
        max_distance=max_distance,
        min_voxels=args.min_voxels,
        exclude_border=not args.keep_border,
        stereology=not args.no_stereology,
    )
    ok = result.valid
    radius = result.radius_3d_m if not args.no_stereology else result.radius_m
    gap = result.gap_3d_m if not args.no_stereology else result.gap_m
    if not ok.any():
        from fem_anode.errors import InputError

        raise InputError(
            f"{args.image}: no particle has a ray reaching the {args.cbd!r} phase; check --cbd and --max-distance"
        )
    data = GapData(np.full(int(ok.sum()), args.cycle), radius[ok], gap[ok], source=str(args.image))
    comm = world_comm()
    with output_directory(args.out, comm) as staging:
        if is_root(comm):
            write_gap_csv(staging / "gaps.csv", data)
            write_json(
                staging / "particles.json",
                {
                    "provenance": provenance("detachment measure", comm=comm, args=args),
                    "image": str(args.image),
                    "ndim": result.ndim,
                    "voxel_size_m": image.voxel_size,
                    "cycle": args.cycle,
                    "stereology": bool(result.ndim == 2 and not args.no_stereology),
                    "n_particles": int(ok.size),
                    "n_particles_with_gap": int(ok.sum()),
                    "mean_gap_m": float(np.mean(gap[ok])),
                    "particles": result.to_dict(),
                },
            )
            plot_gap_scatter(data, staging / "gaps.png", title=f"{args.image.name}: cycle {args.cycle}")
    logger.info(
        "%d particles, mean gap %.3g m; wrote %s", int(ok.sum()), float(np.mean(gap[ok])), args.out / "gaps.csv"
    )
    return 0


def run_simulate(args: argparse.Namespace) -> int:
    from fem_anode.detachment.data import read_radii_csv
    from fem_anode.detachment.model import scenarios, simulate
    from fem_anode.detachment.plots import plot_capacity, plot_gap_model
    from fem_anode.io.output import output_directory, write_json

    settings = _settings(args)
    radii = read_radii_csv(args.radii) if args.radii else None
    start = time.perf_counter()
    result = simulate(settings.model, radii, distribution=settings.distribution)
    runs = {
        name: simulate(p, radii, distribution=settings.distribution) for name, p in scenarios(settings.model).items()
    }
    elapsed = time.perf_counter() - start
    payload = {
        "provenance": provenance("detachment simulate", settings, args=args),
        "population": str(args.radii) if args.radii else {"default_distribution": settings.distribution.to_dict()},
        **result.to_dict(),
        "scenarios": {
            name: {"capacity_retention": r.capacity_retention.tolist(), "parameters": r.parameters.to_dict()}
            for name, r in runs.items()
        },
        "elapsed_s": elapsed,
    }
    comm = world_comm()
    with output_directory(args.out, comm) as staging:
        if is_root(comm):
            write_json(staging / "results.json", payload)
            settings.to_toml(staging / "settings.toml")
            plot_gap_model(result, staging / "gap_model.png")
            plot_capacity({f"model, {k}": r.capacity_retention for k, r in runs.items()}, staging / "capacity.png")
    logger.info(
        "capacity after %d cycles: %.1f %% (all three improved: %.1f %%)",
        settings.model.cycles,
        100 * result.capacity_retention[-1],
        100 * runs["all three improved"].capacity_retention[-1],
    )
    logger.info("wrote %s", args.out / "results.json")
    return 0


def run_fit(args: argparse.Namespace) -> int:
    from fem_anode.detachment.data import read_capacity_csv, read_gap_csv, read_radii_csv
    from fem_anode.detachment.fitting import fit
    from fem_anode.detachment.model import simulate
    from fem_anode.detachment.plots import plot_bootstrap, plot_capacity, plot_gap_model
    from fem_anode.detachment.settings import PARAMETER_NAMES
    from fem_anode.io.output import output_directory, write_json, write_text_atomic

    settings = _settings(args)
    gaps = read_gap_csv(args.gaps)
    capacity = read_capacity_csv(args.capacity) if args.capacity else None
    population = read_radii_csv(args.radii) if args.radii else None
    result = fit(gaps, capacity, settings, population=population)
    n_cycles = int(max(gaps.cycle.max(), capacity.cycle.max() if capacity is not None else 0, 1))
    best = result.parameters().replace(cycles=n_cycles)
    model_run = simulate(best, population if population is not None else gaps.radius_m)
    payload = {
        "provenance": provenance("detachment fit", settings, args=args),
        "gaps": str(args.gaps),
        "capacity": str(args.capacity) if args.capacity else None,
        **result.to_dict(),
    }
    comm = world_comm()
    with output_directory(args.out, comm) as staging:
        if is_root(comm):
            write_json(staging / "fit.json", payload)
            settings.model = best
            settings.to_toml(staging / "settings.toml")
            rows = [",".join(PARAMETER_NAMES)] + [",".join(f"{v:.9e}" for v in row) for row in result.bootstrap]
            write_text_atomic(staging / "bootstrap.csv", "\n".join(rows) + "\n")
            plot_gap_model(
                model_run,
                staging / "fit_gaps.png",
                cycles=[c for c in gaps.cycles() if c > 0],
                data=gaps,
                title="Fit: data and model mean +- std",
            )
            plot_capacity(
                {"model, best fit": model_run.capacity_retention}, staging / "fit_capacity.png", measured=capacity
            )
            plot_bootstrap(result.bootstrap, result.values, result.ci, staging / "bootstrap.png")
    for name in PARAMETER_NAMES:
        low, high = result.ci[name]
        logger.info("%s = %.4g  [%.4g, %.4g] (SI)", name, result.values[name], low, high)
    logger.info(
        "bootstrap of %d replicates in %.2f s; wrote %s",
        result.bootstrap.shape[0],
        result.timing_s["bootstrap"],
        args.out / "fit.json",
    )
    return 0
