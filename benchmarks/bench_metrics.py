"""Benchmark 1: image metrics on n^3 synthetic anode volumes vs PoreSpy's equivalents.

For each size the volume (``anode_volume``, aged, seed 0, 20 nm voxels) is saved as ``.npy``;
``fem_anode.imaging.metrics.compute_metrics`` runs in a fresh process (so the peak memory is
that of the metrics alone) and PoreSpy's equivalents run in the peers venv on the same file:
phase fractions (``phase_fraction``), per-slice fractions (``porosity_profile``), pore surface
area by marching cubes (``tools.mesh_region`` + ``mesh_surface_area``) and Si particles
(``ndimage.label`` + ``regionprops_3D``). Geodesic tortuosity, channels per depth and pore-Si
distances have no PoreSpy equivalent.

In the same run, for comparison: the whole-image SciPy/scikit-image path (``scipy`` rows: the
code before the slabs, ``skimage.graph.MCP_Geometric`` and ``ndimage.distance_transform_edt``),
and with ``--ranks 1,2`` the whole ``fem-anode metrics --no-render`` command under ``mpirun -n N``
(time, peak memory of the largest rank, the records compared).

Usage::

    .venv/bin/python benchmarks/bench_metrics.py --sizes 100,200 [--no-peer] [--skip-peer regionprops] [--ranks 1,2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

EQUIVALENT = {
    "phase_fractions": "phase_fractions",
    "per_slice": "per_slice",
    "pore_surface_area_m2": "pore_surface_area_m2",
    "si_particles": "si_particles",
}


def peak_since_exec_mb() -> float:
    """Peak resident memory of this process's own address space (``VmHWM``), MB. Not ``ru_maxrss``:
    Linux keeps that across ``execve``, so a child started by this benchmark would report the
    parent's resident memory at the fork (the volume just generated) when that is larger."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return common.peak_rss_mb()


def single(path: str, scipy: bool = False) -> None:
    """Child process: metrics of one saved volume; prints timings, peak memory and a few values
    (``scipy``: the whole-image SciPy/scikit-image path instead of the slabs and compiled kernels)."""
    from fem_anode.imaging import metrics as module
    from fem_anode.imaging.metrics import compute_metrics
    from fem_anode.io.images import read_image

    if scipy:
        module._voxel_kernels = lambda comm: None  # type: ignore[assignment]  # the path without a compiler
    image = read_image(path, kind="labels")
    t = time.perf_counter()
    metrics = compute_metrics(image)
    total = time.perf_counter() - t
    print(
        json.dumps(
            {
                "timings_s": metrics["timings_s"],
                "total_s": total,
                "peak_rss_mb": peak_since_exec_mb(),
                "pore_surface_area_m2": metrics.get("pore_surface_area_m2"),
                "si_count": (metrics.get("si_particles") or {}).get("count"),
                "pore_fraction": metrics["phase_fractions"]["pore"],
            }
        )
    )


def command_runs(path: Path, n: int, ranks: list[int], tmp: Path) -> list[dict]:
    """``fem-anode metrics --no-render`` under ``mpirun -n N`` for each N: wall time, the peak RSS of
    the largest rank (GNU time of mpirun counts its largest child), and whether each record equals
    the first (timings and provenance aside)."""
    rows, first = [], None
    for size in ranks:
        out = tmp / f"out{n}_{size}"
        command = ["mpirun", "-n", str(size), "--oversubscribe", sys.executable, "-m", "mpi4py", "-m", "fem_anode"]
        command += ["metrics", str(path), "--no-render", "-q", "--out", str(out)]
        start = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-f", "%M", *command], capture_output=True, text=True, check=True)
        wall = time.perf_counter() - start
        peak_mb = int(proc.stderr.strip().splitlines()[-1]) / 1024
        record = json.loads((out / "metrics.json").read_text())
        for key in ("timings_s", "provenance"):
            record.pop(key, None)
        first = record if first is None else first
        rows.append(
            {
                "size": n,
                "metric": f"command, {size} rank(s)",
                "time_s": wall,
                "peak_rss_mb": peak_mb,
                "same_record_as_first": record == first,
                "load": common.load(),
            }
        )
        print(f"size {n}: fem-anode metrics on {size} rank(s): {wall:.1f} s, peak {peak_mb:.0f} MB per rank")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,200")
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--skip-peer", default="", help="PoreSpy metrics to skip, e.g. si_particles")
    parser.add_argument("--ranks", default="", help="also time the metrics command under mpirun -n N, e.g. 1,2")
    parser.add_argument("--single", help=argparse.SUPPRESS)
    parser.add_argument("--scipy", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.single:
        single(args.single, scipy=args.scipy)
        return
    from fem_anode.imaging.synthetic import anode_volume
    from fem_anode.io.images import write_image

    peer_python = None
    if not args.no_peer:
        peer_python, message = common.peers_python()
        if peer_python is None:
            print(f"PoreSpy comparison skipped: {message}")
    rows = []
    load_start = common.load()
    with tempfile.TemporaryDirectory() as tmp:
        for n in map(int, args.sizes.split(",")):
            image = anode_volume((n, n, n), 20e-9, aged=True, seed=0)
            path = Path(tmp) / f"vol{n}.npy"
            write_image(path, image)
            proc = subprocess.run(
                [sys.executable, __file__, "--single", str(path)], capture_output=True, text=True, check=True
            )
            ours = json.loads(proc.stdout.strip().splitlines()[-1])
            proc = subprocess.run(
                [sys.executable, __file__, "--single", str(path), "--scipy"], capture_output=True, text=True, check=True
            )
            before = json.loads(proc.stdout.strip().splitlines()[-1])
            peer = {}
            if peer_python is not None:
                np.save(Path(tmp) / f"raw{n}.npy", image.array)
                extra = ["--skip", args.skip_peer] if args.skip_peer else []
                peer = common.run_peer(
                    peer_python,
                    "peer_metrics.py",
                    [Path(tmp) / f"raw{n}.npy", "--pore", "0", "--si", "1", "--voxel-size", "2e-8", *extra],
                    timeout=7200,
                )
            load = common.load()
            for metric, seconds in ours["timings_s"].items():
                row = {"size": n, "metric": metric, "time_s": seconds, "scipy_s": before["timings_s"].get(metric)}
                row["load"] = load
                equivalent = EQUIVALENT.get(metric)
                if equivalent and equivalent in peer:
                    row["porespy_s"] = peer[equivalent]["time_s"]
                    row["porespy_over_ours"] = peer[equivalent]["time_s"] / max(seconds, 1e-9)
                rows.append(row)
            rows.append(
                {
                    "size": n,
                    "metric": "TOTAL",
                    "time_s": ours["total_s"],
                    "scipy_s": before["total_s"],
                    "peak_rss_mb": ours["peak_rss_mb"],
                    "scipy_peak_rss_mb": before["peak_rss_mb"],
                    "porespy_peak_rss_mb": peer.get("peak_rss_mb"),
                    "load": load,
                }
            )
            checks = {
                "pore_fraction": (ours["pore_fraction"], (peer.get("phase_fractions") or {}).get("value", {}).get("0")),
                "pore_surface_area_m2": (
                    ours["pore_surface_area_m2"],
                    (peer.get("pore_surface_area_m2") or {}).get("value"),
                ),
                "si_count": (ours["si_count"], ((peer.get("si_particles") or {}).get("value") or {}).get("count")),
                "scipy_path": (ours["pore_surface_area_m2"], before["pore_surface_area_m2"], before["si_count"]),
            }
            print(f"size {n}: ours vs PoreSpy values {checks}")
            common.print_table(
                [r for r in rows if r["size"] == n],
                [
                    "size",
                    "metric",
                    "time_s",
                    "scipy_s",
                    "porespy_s",
                    "porespy_over_ours",
                    "peak_rss_mb",
                    "scipy_peak_rss_mb",
                    "porespy_peak_rss_mb",
                    "load",
                ],
                title=f"image metrics {n}^3",
            )
            rows.append({"size": n, "metric": "values_ours_vs_porespy", "values": checks})
            if args.ranks:
                rows.extend(command_runs(path, n, [int(r) for r in args.ranks.split(",")], Path(tmp)))
    path = common.append_results(
        "metrics",
        rows,
        "python benchmarks/bench_metrics.py " + " ".join(sys.argv[1:]),
        {"load": [load_start, common.load()]},
    )
    print(f"appended to {path}")


if __name__ == "__main__":
    main()
