"""One lithiation/delithiation cycle of a 20 nm Si nanowire (chemo-mechanical phase field).

Two runs of the model of He et al. (2021) (Methods, eqs. 1-6, Supplementary Table 1):

* ``table1``: the paper's parameters. With M_Li = 10 the Li diffusion time of the wire,
  R^2 / (M f'') ~ 0.03, is far shorter than a half-cycle: the wire (de)lithiates almost
  uniformly, swells by (1 + beta) = 1.5874 in radius and length (volume x 4) and returns; the
  stresses stay below yield.
* ``slow_kinetics`` (full mode only): M_Li = 0.1, a sharp Li-rich shell moves in (core-shell,
  cf. Fig. 5a), the shell flows plastically and plastic strain accumulates over the cycle.

Checks what it produced (records, figures) and raises if something is off. Run:

    python demos/phasefield_nanowire.py --out phasefield_demo [--quick]
    mpirun -n 2 python -m mpi4py demos/phasefield_nanowire.py --out phasefield_demo
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

from mpi4py import MPI

from fem_anode.fem.phasefield.run import run_phasefield
from fem_anode.fem.phasefield.settings import (
    CyclingSettings,
    MaterialSettings,
    MeshSettings,
    OutputSettings,
    PhaseFieldSettings,
    VacancySettings,
)
from fem_anode.io import output_directory

BETA = 0.5874


def table1_settings(quick: bool = False) -> PhaseFieldSettings:
    """The paper's parameters, one cycle; quick: 4 nm mesh and short half-cycles.

    Chemo-mechanics alone (no vacancies): demos/phasefield_voids_sei.py runs the full model."""
    return PhaseFieldSettings(
        mesh=MeshSettings(size=4e-9 if quick else 1e-9),
        cycling=CyclingSettings(half_cycles=2, half_cycle_time=1.0 if quick else 50.0),
        vacancy=VacancySettings(enabled=False),
        output=OutputSettings(times=[0.002, 0.01]),
    )


def slow_kinetics_settings() -> PhaseFieldSettings:
    """M_Li = 0.1: core-shell lithiation with plastic flow in the shell."""
    base = table1_settings()
    return dataclasses.replace(
        base,
        mesh=MeshSettings(size=2e-9),
        material=MaterialSettings(mobility_li=0.1),
        cycling=CyclingSettings(half_cycles=2, half_cycle_time=3.0),
        output=OutputSettings(times=[0.2, 1.0]),
    )


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise RuntimeError(message)


def main(out_dir: Path, quick: bool = False, comm: MPI.Comm = MPI.COMM_WORLD) -> dict:
    """Run into ``out_dir`` (sub-folders per run); return {run name: results}."""
    runs = {"table1": table1_settings(quick)}
    if not quick:
        runs["slow_kinetics"] = slow_kinetics_settings()
    results = {}
    with output_directory(out_dir, comm) as staging:
        for name, settings in runs.items():
            if comm.rank == 0:
                (staging / name).mkdir(exist_ok=True)
            comm.barrier()
            results[name] = run_phasefield(settings, staging / name, comm)
            if comm.rank == 0:
                settings.to_toml(staging / name / "config.toml")
        lith, delith = results["table1"]["half_cycles"]
        _check(
            abs(lith["mean_c_li"] - 0.86) < 1e-3 and abs(delith["mean_c_li"] - 0.14) < 1e-3,
            "table1: the wire did not (de)lithiate fully",
        )
        ratio = lith["outer_radius_m"] / delith["outer_radius_m"]
        _check(
            abs(ratio / (1 + BETA) - 1) < 5e-3 and abs(lith["axial_stretch"] / (1 + BETA) - 1) < 5e-3,
            f"table1: swelling {ratio:.4f} is not 1 + beta",
        )
        _check(abs(delith["axial_stretch"] - 1) < 1e-6, "table1: the wire did not return to its length")
        _check(
            0.05 < lith["peak_von_mises"] < 1.64,
            f"table1: peak von Mises {lith['peak_von_mises']:.3f} outside (0.05, sigma_Y)",
        )
        if "slow_kinetics" in results:
            first, second = results["slow_kinetics"]["half_cycles"]
            _check(0.16 < first["mean_c_li"] < 0.8, "slow_kinetics: expected a partially lithiated (core-shell) wire")
            _check(first["max_eq_plastic_strain"] > 0.05, "slow_kinetics: expected plastic flow in the shell")
            _check(
                second["max_eq_plastic_strain"] >= first["max_eq_plastic_strain"],
                "slow_kinetics: plastic strain decreased",
            )
        if comm.rank == 0:
            for name, res in results.items():
                _check(
                    len(res["snapshots"]) == 6
                    and all((staging / name / s).stat().st_size > 10_000 for s in res["snapshots"]),
                    f"{name}: snapshots missing",
                )
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("phasefield_demo"))
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO if MPI.COMM_WORLD.rank == 0 else logging.WARNING, format="%(message)s")
    all_results = main(args.out, args.quick)
    if MPI.COMM_WORLD.rank == 0:
        for run, res in all_results.items():
            for r in res["half_cycles"]:
                print(
                    f"{run:14s} {r['index']} {r['kind']:12s} mean c {r['mean_c_li']:.4f} radius {r['outer_radius_m'] * 1e9:.3f} nm "
                    f"stretch {r['axial_stretch']:.4f} peak vM {r['peak_von_mises']:.3f} max eps_p {r['max_eq_plastic_strain']:.4f} "
                    f"({r['steps']} steps, {r['newton_iterations_total']} Newton its, {r['wall_time_s']:.1f} s)"
                )
