"""Voids, electrolyte percolation and SEI growth into a 20 nm Si nanowire over cycles (Fig. 5 of He et al. (2021)).

The full model (Methods, eqs. 1-6; Supplementary Table 1 with its accelerated vacancy
kinetics): Li and vacancy Cahn-Hilliard fields, finite-strain J2 chemo-mechanics, random void
nucleation at the delithiation front, electrolyte percolation into surface-connected voids
after every delithiation. The run reproduces the paper's sequence and checks it on the records
(raises if it is not there):

* the first lithiation swells the wire, no voids (Fig. 5b);
* voids nucleate on the first delithiation (Fig. 5c); those connected to the outer surface
  fill with electrolyte (a subset of the voids, starting at the surface);
* on the next lithiation the inaccessible voids close, the electrolyte-filled ones stay (Fig. 5d);
* later delithiations nucleate new voids next to the preserved ones: the SEI penetration
  depth never decreases and grows over the run (Fig. 5e-f, core-shell -> plum pudding).

Writes ``results.json`` (one record per half-cycle with the void metrics), PNG cross-sections
per half-cycle in the colours of Fig. 5 and ``morphology_montage.png``. Run:

    python demos/phasefield_voids_sei.py --out voids_demo [--quick]
    mpirun -n 2 python -m mpi4py demos/phasefield_voids_sei.py --out voids_demo
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from mpi4py import MPI

from fem_anode.fem.phasefield.run import run_phasefield
from fem_anode.fem.phasefield.settings import CyclingSettings, MeshSettings, OutputSettings, PhaseFieldSettings
from fem_anode.io import output_directory


def voids_settings(quick: bool = False) -> PhaseFieldSettings:
    """Table 1 parameters, 5 cycles on a 1 nm mesh; quick: 3 cycles, 4 nm mesh, short half-cycles."""
    if quick:
        return PhaseFieldSettings(
            mesh=MeshSettings(size=4e-9),
            cycling=CyclingSettings(half_cycles=6, half_cycle_time=2.0),
            output=OutputSettings(fields=False, times=[]),
        )
    return PhaseFieldSettings(cycling=CyclingSettings(half_cycles=10), output=OutputSettings(times=[]))


def check_sequence(records: list[dict[str, Any]]) -> None:
    """Raise ``RuntimeError`` unless the records show the mechanism of Fig. 5."""

    def require(condition: bool, message: str) -> None:
        if not condition:
            raise RuntimeError(message)

    require(len(records) >= 6, "need at least 3 full cycles")
    first_lith, first_delith = records[0], records[1]
    require(first_lith["void_fraction"] == 0 and first_lith["n_voids"] == 0, "voids before the first delithiation")
    require(first_delith["void_fraction"] > 0.01 and first_delith["n_voids"] > 0, "no voids on the first delithiation")
    for r in records:
        require(
            r["accessible_void_fraction"] <= r["void_fraction"] + 1e-15,
            f"half-cycle {r['index']}: accessible voids are not a subset of the voids",
        )
        require(
            r["n_accessible_voids"] == r["n_accessible_voids_at_surface"],
            f"half-cycle {r['index']}: an electrolyte-filled void does not reach the surface",
        )
    for before, after in zip(records, records[1:]):
        require(
            after["sei_penetration_depth_m"] >= before["sei_penetration_depth_m"],
            f"half-cycle {after['index']}: the SEI retreated",
        )
        if after["kind"] == "lithiation":
            require(
                after["inaccessible_void_fraction"] < before["inaccessible_void_fraction"]
                or before["inaccessible_void_fraction"] == 0,
                f"half-cycle {after['index']}: inaccessible voids did not shrink on lithiation",
            )
    delithiations = [r for r in records if r["kind"] == "delithiation"]
    require(
        delithiations[-1]["sei_penetration_depth_m"] > delithiations[0]["sei_penetration_depth_m"],
        "the SEI did not grow into the wire over the run",
    )


def main(out_dir: Path, quick: bool = False, comm: MPI.Comm = MPI.COMM_WORLD) -> dict:
    """Run into ``out_dir`` and check the sequence; return the results."""
    settings = voids_settings(quick)
    with output_directory(out_dir, comm) as staging:
        results = run_phasefield(settings, staging, comm)
        if comm.rank == 0:
            settings.to_toml(staging / "config.toml")
        check_sequence(results["half_cycles"])
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("voids_demo"))
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO if MPI.COMM_WORLD.rank == 0 else logging.WARNING, format="%(message)s")
    res = main(args.out, args.quick)
    if MPI.COMM_WORLD.rank == 0:
        print(
            f"{'#':>2} {'half-cycle':12s} {'mean c':>7} {'voids %':>8} {'electrolyte %':>13} {'SEI depth nm':>12} {'n voids':>7} {'core':>6} {'time s':>7}"
        )
        for r in res["half_cycles"]:
            print(
                f"{r['index']:2d} {r['kind']:12s} {r['mean_c_li']:7.4f} {100 * r['void_fraction']:8.2f} {100 * r['accessible_void_fraction']:13.2f} "
                f"{r['sei_penetration_depth_m'] * 1e9:12.2f} {r['n_voids']:7d} {r['core_connectivity']:6.3f} {r['wall_time_s']:7.1f}"
            )
        print(f"total {res['wall_time_s']:.1f} s; figures in {args.out}")
