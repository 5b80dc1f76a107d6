"""Tortuosity factor: fem_anode (FV default, CG + SSOR) vs TauFactor (CPU) and PoreSpy: time and peak memory.

Volumes: seeded thresholded Gaussian random fields (``common.blob_volume``, sigma 2.5 voxels,
pore fraction 0.4) of n^3 voxels, transport along axis 0, saved as ``.npy`` (uint8) and read by
every run from the file (ours memory-mapped, each rank only its slab). Every run is a separate
process, so its peak memory is the operating system's peak RSS of that process (``wait4``; under
``mpirun`` the largest rank); ours also reports its RSS right after the imports, so the memory
of the computation itself is ``peak - after_imports`` (``B_per_voxel`` columns divide that by the
pore voxels). TauFactor runs with ``conv_crit`` 1e-3 (its flux-uniformity criterion; at 1e-4 it
agrees with ours to 2e-6), PoreSpy (``--porespy-max``) with its default ftol, ours with the
default rtol 1e-5. Runs alternate ours / TauFactor per size and repeat ``--repeat`` times; the
table shows every run, the summary the medians.

Usage::

    .venv/bin/python benchmarks/bench_tortuosity.py --sizes 100,200,300 --repeat 3
    .venv/bin/python benchmarks/bench_tortuosity.py --sizes 512 --no-peer            # the 512^3 run
    .venv/bin/python benchmarks/bench_tortuosity.py --sizes 200 --ranks 2 --no-peer
    .venv/bin/python benchmarks/bench_tortuosity.py --sizes 200 --method fe --no-peer
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

PHASES = ("percolation", "assembly", "pc_setup", "cg", "flux", "total")


def _rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return float(line.split()[1]) / 1024
    return float("nan")


def child(path: str, method: str, pc: str | None) -> None:
    """One of our runs in this process: print a JSON line (rank 0)."""
    from mpi4py import MPI

    from fem_anode.fem.tortuosity import tortuosity_factor
    from fem_anode.io.images import VoxelImage

    after_imports = MPI.COMM_WORLD.allreduce(_rss_mb(), op=MPI.MAX)
    array = np.load(path, mmap_mode="r")
    image = VoxelImage(array, (20e-9,) * 3, {"solid": 0, "pore": 1})
    options = {"pc_type": pc} if pc else None
    res = tortuosity_factor(image, "pore", MPI.COMM_WORLD, method=method, petsc_options=options)
    if MPI.COMM_WORLD.rank == 0:
        print(
            json.dumps(
                {
                    "tau": res.tau,
                    "its": res.iterations,
                    "dofs": res.dofs,
                    "eps": res.volume_fraction,
                    "timings": res.timings_s,
                    "after_imports_mb": after_imports,
                }
            )
        )


def run(command: list[str], env: dict[str, str] | None = None) -> tuple[dict | None, float, float]:
    """Run ``command`` and reap it with ``os.wait4``: (last JSON line, wall s, peak RSS MB)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(command, stdout=out, stderr=err, text=True, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        text = out.read()
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(command[:4])} failed ({proc.returncode}): {err.read().strip()[-1500:]}")
    lines = [line for line in text.strip().splitlines() if line.startswith("{")]
    return (json.loads(lines[-1]) if lines else None), wall, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,200,300")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--ranks", type=int, default=1, help="our runs under mpirun -n RANKS")
    parser.add_argument("--method", default="fv", help="fv (default), fe or fe-extrapolated")
    parser.add_argument("--pc", default=None, help="our preconditioner (ssor default, hypre, gamg)")
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--porespy-max", type=int, default=100, help="PoreSpy only up to this size")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.method, args.pc)
        return
    peer_python = None
    if not args.no_peer:
        peer_python, message = common.peers_python()
        if peer_python is None:
            print(f"peer comparison skipped: {message}")
    ours_cmd = [sys.executable, __file__, "--method", args.method, *(["--pc", args.pc] if args.pc else [])]
    if args.ranks > 1:
        # more ranks than cores (memory per rank at many ranks; times then mean nothing)
        extra = ["--oversubscribe"] if args.ranks > (os.cpu_count() or 1) else []
        ours_cmd = ["mpirun", "-n", str(args.ranks), *extra, sys.executable, "-m", "mpi4py", *ours_cmd[1:]]
    peer_env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMIX_", "PMI_"))}
    peer_env.setdefault("OMP_NUM_THREADS", "1")
    rows = []
    load_start = common.load()
    with tempfile.TemporaryDirectory() as tmp:
        for n in map(int, args.sizes.split(",")):
            path = Path(tmp) / f"blob{n}.npy"
            np.save(path, common.blob_volume((n, n, n), 2.5, 0.4, seed=n).astype(np.uint8))
            for repeat in range(args.repeat):
                ours, wall, peak = run([*ours_cmd, "--child", str(path)])
                pore = ours["eps"] * n**3
                row = {
                    "size": n,
                    "run": repeat + 1,
                    "ranks": args.ranks,
                    "method": args.method,
                    "pc": args.pc or "default",
                    "dofs": ours["dofs"],
                    "tau": ours["tau"],
                    "its": ours["its"],
                    "wall_s": wall,
                    **{f"{p}_s": ours["timings"].get(p) for p in PHASES},
                    "peak_mb": peak,
                    "after_imports_mb": ours["after_imports_mb"],
                    "B_per_voxel": (peak - ours["after_imports_mb"]) * 2**20 / pore,
                    "B_per_voxel_raw": peak * 2**20 / pore,
                }
                if peer_python is not None:
                    peer_args = [
                        str(peer_python),
                        str(common.HERE / "peer_tortuosity.py"),
                        str(path),
                        "--conv-crit",
                        "1e-3",
                    ]
                    tf, tf_wall, tf_peak = run([*peer_args, "--no-porespy"], env=peer_env)
                    tf = tf[str(path)]["taufactor"]
                    row.update(
                        {
                            "tf_tau": tf["tau"],
                            "tf_rel_diff": tf["tau"] / ours["tau"] - 1.0,
                            "tf_iters": tf["iterations"],
                            "tf_solve_s": tf["time_s"],
                            "tf_wall_s": tf_wall,
                            "tf_peak_mb": tf_peak,
                            "tf_over_ours_wall": tf_wall / wall,
                            "tf_over_ours_peak": tf_peak / peak,
                        }
                    )
                    if n <= args.porespy_max:
                        ps, ps_wall, ps_peak = run([*peer_args, "--no-taufactor"], env=peer_env)
                        ps = ps[str(path)]["porespy"]
                        row.update(
                            {
                                "ps_tau": ps["tau"] * ours["eps"] / ps["effective_porosity"],
                                "ps_wall_s": ps_wall,
                                "ps_peak_mb": ps_peak,
                            }
                        )
                row["load"] = common.load()
                rows.append(row)
                common.print_table([row], title=f"tortuosity factor {n}^3, run {repeat + 1}")
    columns = [
        "size",
        "run",
        "ranks",
        "dofs",
        "tau",
        "its",
        "wall_s",
        "total_s",
        "cg_s",
        "peak_mb",
        "after_imports_mb",
        "B_per_voxel",
        "B_per_voxel_raw",
        "tf_tau",
        "tf_rel_diff",
        "tf_wall_s",
        "tf_peak_mb",
        "tf_over_ours_wall",
        "tf_over_ours_peak",
        "ps_tau",
        "ps_wall_s",
        "ps_peak_mb",
        "load",
    ]
    common.print_table(rows, [c for c in columns if any(c in r for r in rows)], title="tortuosity factor, every run")
    medians = []
    for n in sorted({r["size"] for r in rows}):
        runs = [r for r in rows if r["size"] == n]
        medians.append(
            {
                "size": n,
                "runs": len(runs),
                **{
                    c: statistics.median(r[c] for r in runs)
                    for c in columns[4:]
                    if all(isinstance(r.get(c), (int, float)) for r in runs)
                },
            }
        )
    common.print_table(medians, title="tortuosity factor, medians")
    command = "python benchmarks/bench_tortuosity.py " + " ".join(sys.argv[1:])
    path = common.append_results("tortuosity", rows, command, {"load": [load_start, common.load()], "medians": medians})
    print(f"appended to {path}")


if __name__ == "__main__":
    main()
