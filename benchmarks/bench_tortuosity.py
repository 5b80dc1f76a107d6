"""Tortuosity factor: fem_anode (FE, CG + BoomerAMG) vs TauFactor (CPU) and PoreSpy, time ratio.

Volumes: seeded thresholded Gaussian random fields (``common.blob_volume``, sigma 2.5 voxels,
pore fraction 0.4) of n^3 voxels, transport along axis 0. All three solve the same voxel
geometry; at native resolution the FE value lies below the finite-volume values (they bracket
the voxel-geometry limit, see tests/test_peers_crossvalidation.py), so the table shows the
values side by side and the time ratios. TauFactor runs with conv_crit 1e-3 (its
flux-uniformity criterion), PoreSpy with its default ftol 1e-3, ours with the default CG rtol
(1e-5: tau to better than 1e-8 relative).

Per size, in one process and back to back: the default path (``assembly="voxel"``: NumPy
stiffness, CG + BoomerAMG), with ``--reference`` also the previous configuration (dolfinx mesh
and forms, CG + GAMG, rtol 1e-8) on the same volume, then the peers in a subprocess. The time
of every phase is recorded (``*_s`` columns; ``pc_setup`` is the multigrid setup).

Usage::

    .venv/bin/python benchmarks/bench_tortuosity.py --sizes 50,100 --reference
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

PHASES = ("percolation", "mesh", "assembly", "pc_setup", "cg", "flux", "total")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="50,100")
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--rtol", type=float, default=None, help="CG tolerance (default: the function's)")
    parser.add_argument("--reference", action="store_true", help="also run the previous dolfinx + GAMG configuration")
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    peer_python = None
    if not args.no_peer and comm.rank == 0:
        peer_python, message = common.peers_python()
        if peer_python is None:
            print(f"peer comparison skipped: {message}")
    rows = []
    load_start = common.load()
    kwargs = {} if args.rtol is None else {"rtol": args.rtol}
    for n in map(int, args.sizes.split(",")):
        mask = common.blob_volume((n, n, n), 2.5, 0.4, seed=n)
        image = VoxelImage(mask.astype(np.uint8), (20e-9,) * 3, {"solid": 0, "pore": 1})
        res = tortuosity_factor(image, "pore", comm, **kwargs)
        row = {"size": n, "ranks": comm.size, "cells": res.cells, "dofs": res.dofs, "tau": res.tau, "cg_its": res.iterations}
        row.update({f"{phase}_s": res.timings_s[phase] for phase in PHASES})
        row["load"] = common.load()
        if args.reference:
            ref = tortuosity_factor(image, "pore", comm, rtol=1e-8, petsc_options={"pc_type": "gamg"}, assembly="dolfinx")
            row.update(
                {
                    "ref_tau_rel_diff": abs(ref.tau / res.tau - 1.0),
                    "ref_cg_its": ref.iterations,
                    "ref_mesh_s": ref.timings_s["mesh"] + ref.timings_s["mesh_dolfinx"],
                    "ref_assembly_s": ref.timings_s["assembly"],
                    "ref_pc_setup_s": ref.timings_s["pc_setup"],
                    "ref_cg_s": ref.timings_s["cg"],
                    "ref_flux_s": ref.timings_s["flux"],
                    "ref_total_s": ref.timings_s["total"],
                    "speedup_vs_ref": ref.timings_s["total"] / res.timings_s["total"],
                }
            )
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
        row["load_end"] = common.load()
        rows.append(row)
        if comm.rank == 0:
            common.print_table(rows[-1:], title=f"tortuosity factor {n}^3")
    if comm.rank == 0:
        columns = [
            "size", "ranks", "dofs", "tau", "cg_its", *(f"{p}_s" for p in PHASES), "ref_total_s", "speedup_vs_ref",
            "taufactor_tau", "taufactor_s", "porespy_tau", "porespy_s", "taufactor_over_ours", "porespy_over_ours", "load",
        ]
        common.print_table(rows, [c for c in columns if any(c in r for r in rows)], title="tortuosity factor (porespy_tau rescaled to the whole pore fraction)")
        command = ("mpirun -n %d " % comm.size if comm.size > 1 else "") + "python benchmarks/bench_tortuosity.py " + " ".join(sys.argv[1:])
        path = common.append_results("tortuosity", rows, command, {"load": [load_start, common.load()]})
        print(f"appended to {path}")


if __name__ == "__main__":
    main()
