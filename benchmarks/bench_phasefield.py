"""Benchmark 4 (and 5): phase-field half-cycles vs mesh size and MPI ranks.

The built-in nanowire cross-section (disk, radius 20 nm) with the default model, meshed at the
given element sizes; one lithiation half-cycle (``--half-cycles`` to change). Reported: unknowns,
time steps (and rejected ones), Newton iterations per step, time per Newton iteration and per
half-cycle. The linear solver of each Newton step is a direct factorisation (MUMPS), so there are
no linear iterations to report (one factorisation + solve per Newton iteration).

Usage::

    .venv/bin/python benchmarks/bench_phasefield.py --sizes 2e-9,1e-9
    mpirun -n 2 .venv/bin/python benchmarks/bench_phasefield.py --sizes 1e-9
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from mpi4py import MPI  # noqa: E402


def main() -> None:
    from fem_anode.fem.phasefield.run import run_phasefield
    from fem_anode.fem.phasefield.settings import PhaseFieldSettings

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2e-9,1e-9", help="element sizes (m)")
    parser.add_argument("--half-cycles", type=int, default=1)
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    rows = []
    load_start = common.load()
    for size in map(float, args.sizes.split(",")):
        base = PhaseFieldSettings()
        settings = base.replace(
            mesh=base.mesh.replace(size=size),
            cycling=base.cycling.replace(half_cycles=args.half_cycles),
            output=base.output.replace(fields=False, figures=False),
        )
        t = time.perf_counter()
        result = run_phasefield(settings, None, comm)
        total = time.perf_counter() - t
        for record in result["half_cycles"]:
            its = record["newton_iterations_total"]
            rows.append(
                {
                    "size_m": size,
                    "ranks": comm.size,
                    "cells": result["ncells"],
                    "unknowns": result["unknowns"],
                    "half_cycle": f"{record['index']} {record['kind']}",
                    "steps": record["steps"],
                    "rejected": record["rejected_steps"],
                    "newton_its": its,
                    "newton_per_step": its / max(record["steps"], 1),
                    "half_cycle_s": record["wall_time_s"],
                    "s_per_newton": record["wall_time_s"] / max(its, 1),
                    "run_total_s": total,
                    "load": common.load(),
                }
            )
        if comm.rank == 0:
            common.print_table(rows[-len(result["half_cycles"]) :], title=f"phase-field, element size {size:g} m")
    if comm.rank == 0:
        common.print_table(rows, title="phase-field half-cycles")
        command = ("mpirun -n %d " % comm.size if comm.size > 1 else "") + "python benchmarks/bench_phasefield.py " + " ".join(sys.argv[1:])
        path = common.append_results("phasefield", rows, command, {"load": [load_start, common.load()]})
        print(f"appended to {path}")


if __name__ == "__main__":
    main()
