"""Benchmark: segmentation of n^3 synthetic SCT volumes (accuracy, time, peak memory).

For each size an aged anode volume (``anode_volume``, seed 0, the demo's ageing) is rendered
(``render_gray``: 1-voxel blur, noise 0.04) and saved as ``.npy``; then, each in a fresh process
timed by ``/usr/bin/time -v`` (wall time and peak resident memory of the whole process):

* ``fem-anode segment --method multistage`` (non-local means denoising, stages, clean-up,
  blur-aware refinement), also with ``--no-refine`` and under ``mpirun -n 2``;
* ``fem-anode segment --method trainable --train GRAY:LABELS --save-model`` with labels on two
  z-slices (training + prediction);
* ``--method trainable --model`` (prediction only) on 1 rank and under ``mpirun -n 2`` (each
  rank predicts its own slab), with the labels compared voxel for voxel to the 1-rank result.

Every run also scores itself against the truth (``--truth``). Usage::

    .venv/bin/python benchmarks/bench_segmentation.py --sizes 200
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

FEM_ANODE = [str(Path(sys.executable).with_name("fem-anode"))]
MPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "OMPI_MCA_btl": "self,sm"}


def timed(command: list[str], cwd: Path) -> dict[str, float]:
    """Wall seconds and peak RSS (MB, the largest process) of one run via /usr/bin/time -v."""
    env = {**os.environ, **MPI_ENV}
    done = subprocess.run(["/usr/bin/time", "-v", *command], cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)", done.stderr)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    h, m, s = (float(wall.group(1) or 0), float(wall.group(2)), float(wall.group(3))) if wall else (0, 0, float("nan"))
    user = re.search(r"User time \(seconds\): ([\d.]+)", done.stderr)
    return {
        "wall_s": 3600 * h + 60 * m + s,
        "user_s": float(user.group(1)) if user else float("nan"),
        "peak_rss_mb": int(rss.group(1)) / 1024 if rss else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="200", help="cube edges, comma-separated (default 200)")
    parser.add_argument("--keep", type=Path, help="keep the work folder here")
    parser.add_argument(
        "--methods", default="multistage,trainable", help="which methods to run, comma-separated (default both)"
    )
    parser.add_argument(
        "--auto-context", action="store_true", help="train the trainable method with --auto-context (second forest)"
    )
    args = parser.parse_args()
    from fem_anode.imaging.synthetic import anode_volume, render_gray
    from fem_anode.imaging.trainable import UNLABELLED
    from fem_anode.io.images import VoxelImage, write_image

    rows = []
    load0 = common.load()
    for n in [int(v) for v in args.sizes.split(",")]:
        work = Path(tempfile.mkdtemp(prefix=f"bench_seg_{n}_"))
        truth = anode_volume((n, n, n), seed=0, aged=True, sei_growth=2.5, surface_ageing_gradient=0.5)
        gray = render_gray(truth, seed=1)
        write_image(work / "gray.npy", gray)
        write_image(work / "truth.npy", truth)
        scribbles = np.full(truth.shape, UNLABELLED, dtype=np.uint8)
        slices = [n // 4, 3 * n // 4]
        scribbles[slices] = truth.array[slices]
        write_image(work / "scribbles.npy", VoxelImage(scribbles, truth.voxel_size))
        multistage = ["segment", "gray.npy", "--method", "multistage", "--truth", "truth.npy"]
        runs = {
            "multistage (denoised, no refinement)": [*FEM_ANODE, *multistage, "--no-refine", "--out", "ms0.npy"],
            "multistage (denoised, refined)": [*FEM_ANODE, *multistage, "--out", "ms.npy"],
            "multistage, mpirun -n 2": ["mpirun", "-n", "2", *FEM_ANODE, *multistage, "--out", "ms2.npy"],
            "trainable: train + predict": FEM_ANODE
            + [
                "segment",
                "gray.npy",
                "--method",
                "trainable",
                "--train",
                "gray.npy:scribbles.npy",
                *(["--auto-context"] if args.auto_context else []),
                "--save-model",
                "model.joblib",
                "--truth",
                "truth.npy",
                "--out",
                "tr.npy",
            ],
            "trainable: predict (--model)": FEM_ANODE
            + [
                "segment",
                "gray.npy",
                "--method",
                "trainable",
                "--model",
                "model.joblib",
                "--truth",
                "truth.npy",
                "--out",
                "tr1.npy",
            ],
            "trainable: predict, mpirun -n 2": [
                "mpirun",
                "-n",
                "2",
                *FEM_ANODE,
                "segment",
                "gray.npy",
                "--method",
                "trainable",
                "--model",
                "model.joblib",
                "--truth",
                "truth.npy",
                "--out",
                "tr2.npy",
            ],
        }
        chosen = args.methods.split(",")
        runs = {k: v for k, v in runs.items() if any(k.startswith(m) for m in chosen)}
        for name, command in runs.items():
            t = timed(command, work)
            out = command[command.index("--out") + 1]
            report = json.loads((work / f"{out}.report.json").read_text())
            acc = report["accuracy"]
            row = {
                "n": n,
                "run": name,
                **{k: round(v, 2) for k, v in t.items()},
                **{f"iou_{k}": round(v, 3) for k, v in acc["iou"].items()},
                "mean_iou": round(acc["mean_iou"], 3),
            }
            if report.get("refine"):
                row["psf_sigma_voxels"] = round(report["refine"]["psf_sigma_voxels"], 3)
                row["refine_sweeps"] = report["refine"]["sweeps"]
            rows.append(row)
            common.print_table([row], title="")
        if "multistage" in chosen:
            same_ms = bool(np.array_equal(np.load(work / "ms.npy"), np.load(work / "ms2.npy")))
            rows.append({"n": n, "run": "multistage labels: 2 ranks == 1 rank", "identical": same_ms})
            print(f"n={n}: multistage 2-rank labels identical to 1-rank: {same_ms}")
        if "trainable" in chosen:
            same = bool(np.array_equal(np.load(work / "tr1.npy"), np.load(work / "tr2.npy")))
            same_train = bool(np.array_equal(np.load(work / "tr.npy"), np.load(work / "tr1.npy")))
            rows.append(
                {
                    "n": n,
                    "run": "labels: 2 ranks == 1 rank",
                    "identical": same,
                    "model round trip identical": same_train,
                }
            )
            print(
                f"n={n}: 2-rank labels identical to 1-rank: {same}; "
                f"--model labels identical to the trained run: {same_train}"
            )
        if args.keep:
            shutil.copytree(work, args.keep / f"n{n}", dirs_exist_ok=True)
        shutil.rmtree(work, ignore_errors=True)
    common.print_table(rows, title="segmentation")
    common.append_results("segmentation", rows, " ".join(sys.argv), {"load": [load0, common.load()]})


if __name__ == "__main__":
    main()
