"""Image -> distributed dolfinx voxel mesh with tags: the distributed builder vs the gmsh path.

The solid phase of the bundled 128^3 real electrode (835k hexahedra), or the electrode mirror-tiled
(``--tile 2``: 256^3, 6.7M hexahedra; ``--tile 2,1,1``: 256 x 128 x 128, twice the depth, for weak
scaling against one rank on 128^3), meshed into a tagged dolfinx mesh:

* ``distributed``: :func:`fem_anode.fem.voxel_mesh.create_voxel_mesh` (each rank its slab, no
  gmsh, slab partition);
* ``gmsh``: the previous path, a gmsh model of the whole mesh on rank 0 distributed with
  ``gmshio.model_to_mesh`` (:func:`fem_anode.fem.mesh_io.model_to_tagged_mesh`).

Each configuration runs in its own process(es) (``mpirun -n R``), so the peak resident memory
per rank (``getrusage``) is that of the meshing alone, imports included; the import baseline
is reported too.

Usage::

    .venv/bin/python benchmarks/bench_voxel_mesh.py [--tile 1] [--ranks 1,2] [--methods distributed,gmsh]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def electrode(tiles: tuple[int, int, int]):  # type: ignore[no-untyped-def]
    """The bundled electrode mirror-tiled ``tiles`` = (z, y, x) times (copies join without seams)."""
    import numpy as np

    from fem_anode.data import real_electrode
    from fem_anode.io.images import VoxelImage

    image = real_electrode()
    if tiles == (1, 1, 1):
        return image
    array = image.array
    for axis, tile in enumerate(tiles):
        array = np.concatenate([array if k % 2 == 0 else np.flip(array, axis) for k in range(tile)], axis=axis)
    return VoxelImage(np.ascontiguousarray(array), image.voxel_size, image.phases, f"electrode tiled {tiles}")


def parse_tiles(text: str) -> tuple[int, int, int]:
    """``"2"`` -> (2, 2, 2); ``"2,1,1"`` -> (2, 1, 1) (z, y, x)."""
    parts = [int(p) for p in text.split(",")]
    return (parts[0],) * 3 if len(parts) == 1 else (parts[0], parts[1], parts[2])


def worker(method: str, tiles: tuple[int, int, int]) -> None:
    import resource

    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    image = electrode(tiles)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0
    comm.barrier()
    start = time.perf_counter()
    if method == "distributed":
        from fem_anode.fem.voxel_mesh import create_voxel_mesh

        tagged = create_voxel_mesh(image, comm, ["solid"])
    else:
        import gmsh

        from fem_anode.fem.mesh_io import model_to_tagged_mesh
        from fem_anode.meshing.build import build_model

        if comm.rank == 0:
            gmsh.initialize(interruptible=False)
            gmsh.option.setNumber("General.Terminal", 0)
            build_model(image, method="voxel", keep=["solid"])
        tagged = model_to_tagged_mesh(comm, ghost_mode="none")
        if comm.rank == 0:
            gmsh.finalize()
    comm.barrier()
    elapsed = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0
    cells = tagged.mesh.topology.index_map(3).size_global
    peaks = comm.gather(peak, root=0)
    bases = comm.gather(base, root=0)
    if comm.rank == 0:
        print(
            json.dumps(
                {
                    "method": method,
                    "ranks": comm.size,
                    "cells": cells,
                    "time_s": elapsed,
                    "peak_bytes_per_rank": max(peaks),
                    "base_bytes_per_rank": max(bases),
                }
            )
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tile", default="1", help="mirror copies per axis: one number, or z,y,x (e.g. 2,1,1 doubles the depth)"
    )
    parser.add_argument("--ranks", default="1,2")
    parser.add_argument("--methods", default="distributed,gmsh")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, parse_tiles(args.tile))
        return
    env = {
        **os.environ,
        "OMPI_ALLOW_RUN_AS_ROOT": "1",
        "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
        "OMPI_MCA_btl": "self,sm",
    }
    rows = []
    print(
        f"{'method':12s} {'ranks':>5s} {'cells':>10s} {'time s (median)':>16s} {'peak/rank MB':>13s} {'over imports B/cell':>20s}  load"
    )
    for method in args.methods.split(","):
        for ranks in (int(r) for r in args.ranks.split(",")):
            runs = []
            for _ in range(args.repeats):
                cmd = [sys.executable, __file__, "--worker", method, "--tile", str(args.tile)]
                if ranks > 1:
                    cmd = ["mpirun", "-n", str(ranks), *cmd]
                out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
                runs.append(json.loads(out.strip().splitlines()[-1]))
            runs.sort(key=lambda r: r["time_s"])
            median = runs[len(runs) // 2]
            per_cell = (median["peak_bytes_per_rank"] - median["base_bytes_per_rank"]) * ranks / median["cells"]
            row = {
                **median,
                "times_s": [r["time_s"] for r in runs],
                "over_imports_bytes_per_cell": per_cell,
                "load": common.load(),
            }
            rows.append(row)
            print(
                f"{method:12s} {ranks:5d} {median['cells']:10d} {median['time_s']:16.2f} {median['peak_bytes_per_rank'] / 1e6:13.0f} {per_cell:20.0f}  {row['load']}"
            )
    common.append_results("voxel_mesh", rows, " ".join(sys.argv), {"tiles": list(parse_tiles(args.tile))})


if __name__ == "__main__":
    main()
