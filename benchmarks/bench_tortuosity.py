"""Tortuosity factor: fem_anode (FE, CG + BoomerAMG) vs TauFactor (CPU) and PoreSpy, time ratio.

Volumes: seeded thresholded Gaussian random fields (``common.blob_volume``, sigma 2.5 voxels,
pore fraction 0.4) of n^3 voxels, transport along axis 0. All three solve the same voxel
geometry; at native resolution the FE value lies below the finite-volume values (they bracket
the voxel-geometry limit, see tests/test_peers_crossvalidation.py), so the table shows the
values side by side and the time ratios. TauFactor runs with conv_crit 1e-3 (its
flux-uniformity criterion), PoreSpy with its default ftol 1e-3, ours with CG rtol 1e-8.

Usage::

    .venv/bin/python benchmarks/bench_tortuosity.py --sizes 50,100 [--no-peer]
    mpirun -n 2 .venv/bin/python benchmarks/bench_tortuosity.py --sizes 100 --no-peer
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from mpi4py import MPI  # noqa: E402

from fem_anode.fem.tortuosity import tortuosity_factor  # noqa: E402
from fem_anode.io.images import VoxelImage  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="50,100")
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--rtol", type=float, default=1e-8)
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    peer_python = None
    if not args.no_peer and comm.rank == 0:
        peer_python, message = common.peers_python()
        if peer_python is None:
            print(f"peer comparison skipped: {message}")
    rows = []
    load_start = common.load()
    for n in map(int, args.sizes.split(",")):
        mask = common.blob_volume((n, n, n), 2.5, 0.4, seed=n)
        image = VoxelImage(mask.astype(np.uint8), (20e-9,) * 3, {"solid": 0, "pore": 1})
        res = tortuosity_factor(image, "pore", comm, rtol=args.rtol)
        row = {
            "size": n,
            "ranks": comm.size,
            "cells": res.cells,
            "dofs": res.dofs,
            "tau": res.tau,
            "cg_its": res.iterations,
            "mesh_s": res.timings_s["mesh"],
            "solve_s": res.timings_s["solve"],
            "total_s": res.timings_s["total"],
            "load": common.load(),
        }
        if peer_python is not None:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / f"blob{n}.npy"
                np.save(path, mask)
                peer = common.run_peer(peer_python, "peer_tortuosity.py", [path, "--conv-crit", "1e-3"])[str(path)]
            tf, ps = peer["taufactor"], peer["porespy"]
            row.update(
                {
                    "taufactor_tau": tf["tau"],
                    "taufactor_s": tf["time_s"],
                    "porespy_tau": ps["tau"] * res.volume_fraction / ps["effective_porosity"] if ps.get("tau") else None,
                    "porespy_s": ps["time_s"],
                    "taufactor_over_ours": tf["time_s"] / res.timings_s["total"],
                    "porespy_over_ours": ps["time_s"] / res.timings_s["total"],
                }
            )
        rows.append(row)
        if comm.rank == 0:
            common.print_table(rows[-1:], title=f"tortuosity factor {n}^3")
    if comm.rank == 0:
        columns = ["size", "ranks", "dofs", "tau", "cg_its", "mesh_s", "solve_s", "total_s", "taufactor_tau", "taufactor_s", "porespy_tau", "porespy_s", "taufactor_over_ours", "porespy_over_ours", "load"]
        common.print_table(rows, columns, title="tortuosity factor (porespy_tau rescaled to the whole pore fraction)")
        command = ("mpirun -n %d " % comm.size if comm.size > 1 else "") + "python benchmarks/bench_tortuosity.py " + " ".join(sys.argv[1:])
        path = common.append_results("tortuosity", rows, command, {"load": [load_start, common.load()]})
        print(f"appended to {path}")


if __name__ == "__main__":
    main()
