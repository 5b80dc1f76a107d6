"""Particle detachment: measure gaps in images -> fit the Maxwell-material model -> simulate.

The workflow of Müller et al. (2018) (Si/graphite electrodes imaged pristine and after 1, 3 and 10 cycles)
on synthetic data with a known answer:

1. "electrodes": for each imaged cycle, Si particles (default size distribution) whose gaps to
   the carbon-black/binder domain are drawn from the model with the paper's fitted parameters
   (random number of active cycles per particle), rendered as 2D SEM-like sections (planar cuts
   through spheres with gap and CBD shells) and, for the last cycle, a small 3D TXTM-like volume;
   the "measured" Si capacity retention is the model's, with 1 % noise;
2. ``fem-anode detachment measure`` on every image (ray tracing; 2D -> 3D stereology);
3. ``fem-anode detachment fit`` of all gaps and the capacity, with bootstrap ranges;
4. ``fem-anode detachment simulate`` with the fitted parameters (capacity after 10 cycles,
   Fig. 4d scenarios);
5. ``summary.json``: true vs fitted parameters, ranges, capacities, timings. The demo asserts
   that measured gaps grow with cycle, that the well-determined parameters (delta0, zeta0) are
   recovered, and that the fitted model reproduces the capacity after 10 cycles. The mean-gap
   residual per cycle is reported (``goodness_of_fit``): per-particle stereology of 2D sections
   scatters the radii and flattens the gap-radius relation, which biases alpha0/kappa0.

Run: ``python demos/detachment_measure_fit_simulate.py --out detachment_demo [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from fem_anode.cli import main as cli
from fem_anode.detachment import (
    DetachmentSettings,
    ModelParameters,
    gapped_electrode,
    model_capacity_data,
    read_gap_csv,
    sample_gap_data,
    write_capacity_csv,
    write_gap_csv,
)
from fem_anode.detachment.data import GapData
from fem_anode.io.images import write_image
from fem_anode.io.output import write_json

logger = logging.getLogger("fem_anode.demos.detachment")

CYCLES = (0, 1, 3, 10)


def _run(argv: list[str]) -> None:
    code = cli(argv)
    if code != 0:
        raise RuntimeError(f"fem-anode {' '.join(argv)} exited with {code}")


def main(out_dir: str | Path, quick: bool = False, seed: int = 0) -> dict[str, Any]:
    """Run the demo, write everything to ``out_dir``, return (and write) ``summary.json``."""
    out = Path(out_dir)
    data = out / "data"
    start = time.perf_counter()
    truth = ModelParameters()  # the paper's fitted values
    settings = DetachmentSettings()
    pixel = 60e-9 if quick else 30e-9
    per_image = 30 if quick else 45
    images_per_cycle = 1 if quick else 2
    field = (40e-6, 50e-6)  # SEM field of view (y, x)
    n_boot = 100 if quick else 1000
    rng = np.random.default_rng(seed)

    # 1. synthetic electrodes
    measured_csvs = []
    timings: dict[str, float] = {}
    for cycle in CYCLES:
        for k in range(images_per_cycle):
            particles = sample_gap_data(truth, [cycle], per_image, rng, distribution=settings.distribution)
            sei = np.minimum(particles.gap_m, cycle * truth.delta0)
            image, _ = gapped_electrode(
                particles.radius_m,
                particles.gap_m,
                sei=sei,
                shape=tuple(int(round(f / pixel)) for f in field),
                voxel_size=pixel,
                seed=int(rng.integers(2**31)),
            )
            name = f"sem_cycle{cycle:02d}_{k}"
            path = write_image(data / f"{name}.npy", image)
            t0 = time.perf_counter()
            _run(
                ["detachment", "measure", str(path), "--cycle", str(cycle), "--out", str(out / "measure" / name), "-q"]
            )
            timings[f"measure_{name}"] = time.perf_counter() - t0
            measured_csvs.append(out / "measure" / name / "gaps.csv")
    # a small 3D volume of the 10-cycle electrode (TXTM-like): few particles, measured in 3D
    shape3d = (48, 48, 48) if quick else (96, 96, 96)
    particles = sample_gap_data(
        truth, [CYCLES[-1]], 6, rng, distribution=settings.distribution.replace(max_radius=0.8e-6)
    )
    volume, _ = gapped_electrode(
        particles.radius_m,
        particles.gap_m,
        sei=np.minimum(particles.gap_m, 10 * truth.delta0),
        shape=shape3d,
        voxel_size=2 * pixel,
        seed=seed,
        graphite_fraction=0.05,
    )
    path = write_image(data / "txtm_cycle10.npy", volume)
    t0 = time.perf_counter()
    _run(
        [
            "detachment",
            "measure",
            str(path),
            "--cycle",
            str(CYCLES[-1]),
            "--out",
            str(out / "measure" / "txtm_cycle10"),
            "-q",
        ]
    )
    timings["measure_txtm_cycle10"] = time.perf_counter() - t0
    measured_csvs.append(out / "measure" / "txtm_cycle10" / "gaps.csv")

    parts = [read_gap_csv(p) for p in measured_csvs]
    gaps = GapData(
        np.concatenate([p.cycle for p in parts]),
        np.concatenate([p.radius_m for p in parts]),
        np.concatenate([p.gap_m for p in parts]),
    )
    gaps_csv = write_gap_csv(data / "gaps_all.csv", gaps)
    capacity = model_capacity_data(truth, radii=gaps.radius_m[gaps.cycle == 0], noise=0.01, rng=rng)
    capacity_csv = write_capacity_csv(data / "capacity.csv", capacity)

    # 3. fit
    t0 = time.perf_counter()
    _run(
        [
            "detachment",
            "fit",
            str(gaps_csv),
            "--capacity",
            str(capacity_csv),
            "--bootstrap",
            str(n_boot),
            "--seed",
            str(seed),
            "--out",
            str(out / "fit"),
            "-q",
        ]
    )
    timings["fit"] = time.perf_counter() - t0
    fitted = json.loads((out / "fit" / "fit.json").read_text())
    values = {name: fitted["parameters"][name]["value"] for name in ("alpha0", "kappa0", "delta0", "zeta0")}

    # 4. simulate with the fitted parameters (default size distribution) and with the truth
    t0 = time.perf_counter()
    _run(
        [
            "detachment",
            "simulate",
            "--config",
            str(out / "fit" / "settings.toml"),
            "--cycles",
            "10",
            "--out",
            str(out / "simulate"),
            "-q",
        ]
    )
    timings["simulate"] = time.perf_counter() - t0
    sim = json.loads((out / "simulate" / "results.json").read_text())
    _run(["detachment", "simulate", "--out", str(out / "simulate_paper_values"), "-q"])
    paper_sim = json.loads((out / "simulate_paper_values" / "results.json").read_text())

    mean_gap = {int(c): float(np.mean(gaps.gap_m[gaps.cycle == c])) for c in gaps.cycles()}
    summary: dict[str, Any] = {
        "true_parameters": dict(zip(("alpha0", "kappa0", "delta0", "zeta0"), truth.values())),
        "fitted": {name: {"value": values[name], "ci": fitted["parameters"][name]["ci"]} for name in values},
        "goodness_of_fit": fitted["goodness_of_fit"],
        "particles_per_cycle": {int(c): int(np.sum(gaps.cycle == c)) for c in gaps.cycles()},
        "mean_gap_m_per_cycle": mean_gap,
        "capacity_after_10_cycles": {
            "measured": float(capacity.capacity_fraction[10]),
            "fitted_model_measured_population": fitted["goodness_of_fit"]["capacity_model"]["10"],
            "fitted_model_default_distribution": sim["capacity_retention"][10],
            "paper_values_default_distribution": paper_sim["capacity_retention"][10],
            "paper_values_all_three_improved": paper_sim["scenarios"]["all three improved"]["capacity_retention"][10],
        },
        "scenarios_fitted": {k: v["capacity_retention"][10] for k, v in sim["scenarios"].items()},
        "bootstrap_replicates": n_boot,
        "bootstrap_seconds": fitted["timing_s"]["bootstrap"],
        "timings_s": timings,
        "elapsed_s": time.perf_counter() - start,
    }
    write_json(out / "summary.json", summary)

    # What this demo shows (raises if not): detachment grows with cycling; the fit finds the truth.
    gaps_by_cycle = [mean_gap[c] for c in CYCLES]
    if not all(a < b for a, b in zip(gaps_by_cycle, gaps_by_cycle[1:])):
        raise RuntimeError(f"measured mean gaps do not grow with cycle: {gaps_by_cycle}")
    # delta0 (small-particle plateau) and zeta0 (capacity) are well determined; alpha0 and kappa0
    # trade off against each other for a narrow size distribution (see docs/detachment.md), so
    # they are reported with their bootstrap ranges but not asserted.
    for name, tol in (("delta0", 0.25), ("zeta0", 0.15)):
        true = summary["true_parameters"][name]
        if abs(values[name] - true) > tol * true:
            raise RuntimeError(f"fitted {name} = {values[name]:.4g} is not within {tol:.0%} of the true {true:.4g}")
    if (
        abs(
            summary["capacity_after_10_cycles"]["fitted_model_measured_population"]
            - summary["capacity_after_10_cycles"]["measured"]
        )
        > 0.05
    ):
        raise RuntimeError("fitted model does not reproduce the capacity after 10 cycles")
    return summary


def _report(summary: dict[str, Any]) -> str:
    lines = ["parameter   true        fitted      range"]
    units = {"alpha0": (1, ""), "kappa0": (1e6, "um"), "delta0": (1e6, "um"), "zeta0": (1e-6, "1/um")}
    for name, (f, u) in units.items():
        fit = summary["fitted"][name]
        lines.append(
            f"{name:8s} {summary['true_parameters'][name] * f:9.4g} {fit['value'] * f:10.4g}  [{fit['ci'][0] * f:.4g}, {fit['ci'][1] * f:.4g}] {u}"
        )
    cap = summary["capacity_after_10_cycles"]
    lines.append(
        f"mean gap per cycle (um): "
        + ", ".join(f"{c}: {g * 1e6:.3f}" for c, g in summary["mean_gap_m_per_cycle"].items())
    )
    lines.append(
        f"Si capacity after 10 cycles: measured {100 * cap['measured']:.1f} %, fitted model {100 * cap['fitted_model_measured_population']:.1f} %"
    )
    lines.append(
        f"paper values, default distribution: {100 * cap['paper_values_default_distribution']:.1f} %; all three improved: {100 * cap['paper_values_all_three_improved']:.1f} %"
    )
    lines.append(
        f"bootstrap: {summary['bootstrap_replicates']} replicates in {summary['bootstrap_seconds']:.1f} s; total {summary['elapsed_s']:.1f} s"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="detachment_demo", help="output directory (default detachment_demo)")
    parser.add_argument("--quick", action="store_true", help="coarser images, fewer replicates (CI, < 60 s)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(_report(main(args.out, quick=args.quick, seed=args.seed)))
