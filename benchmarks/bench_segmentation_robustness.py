"""Benchmark: segmentation accuracy over randomly drawn slices (robustness, not speed).

The demo's renderings fix one set of phase fractions, gray levels, blur and noise; a method tuned
to them can fail on real data. Here every seed draws a new 2D slice
(:func:`fem_anode.imaging.synthetic.random_anode_slice`: pore 15-50 %, Si 2-15 %, coatings of
1-3 pixels, random gray levels in the assumed order, blur 0.5-1.8 pixels, noise 0.01-0.06), and
each slice is segmented

* as rendered (float) and as an 8-bit export whose range is cut at the 3rd and 97th percentile
  (6 % of the pixels clipped, as a contrast-stretched export saturates them);
* by the multistage method (default, and ``refine=False``) and by the trainable classifier
  (ilastik style: a seeded random 1 % of the slice's own pixels labelled, i.e. sparse
  scribbles; default features, 32 trees).

Reported per method and variant: the median, minimum and mean over the seeds of the mean IoU over
the four phases, and the number of slices below 0.6.

With ``--volumes K`` it also checks stage 5's Si-candidate rule on K random 3D volumes
(``anode_volume`` 32 x 64 x 64 with random graphite and Si fractions, coating thickness and
ageing, rendered with random gray levels, blur and noise): the ratio of the final energies with
and without the candidates, the rule's choice, and the mean IoU with and without them. Usage::

    .venv/bin/python benchmarks/bench_segmentation_robustness.py --seeds 24 --volumes 10
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def eight_bit_export(gray: np.ndarray, cut_percent: float = 3.0) -> np.ndarray:
    """``gray`` stretched so that its ``cut_percent`` and ``100 - cut_percent`` percentiles map to 0
    and 255, clipped and rounded down to uint8."""
    lo, hi = np.percentile(gray, [cut_percent, 100.0 - cut_percent])
    return np.clip((gray - lo) / (hi - lo) * 255.0, 0, 255).astype(np.uint8)


def candidate_check(n_volumes: int) -> list[dict[str, object]]:
    """Stage 5 with and without the Si candidates on random 3D volumes (see the module docstring)."""
    from fem_anode.imaging import segmentation
    from fem_anode.imaging.accuracy import accuracy_report
    from fem_anode.imaging.synthetic import ANODE_PHASES, anode_volume, render_gray

    rows: list[dict[str, object]] = []
    for seed in range(n_volumes):
        rng = np.random.default_rng(500 + seed)
        truth = anode_volume(
            (32, 64, 64),
            seed=seed,
            aged=bool(rng.integers(0, 2)),
            graphite_fraction=rng.uniform(0.2, 0.45),
            si_fraction=rng.uniform(0.03, 0.15),
            binder_thickness=rng.uniform(0.5, 2.0),
        )
        levels = {
            "pore": rng.uniform(0, 0.2),
            "sei": rng.uniform(0.3, 0.5),
            "graphite": rng.uniform(0.5, 0.65),
            "si": rng.uniform(0.75, 1.0),
        }
        gray = render_gray(
            truth, gray_levels=levels, blur_sigma=rng.uniform(0.5, 1.5), noise_sigma=rng.uniform(0.01, 0.06), seed=seed
        )
        chosen = segmentation.multistage_threshold(gray)
        without = segmentation.multistage_threshold(gray, si_seeds=False)
        choice = chosen.info["refine"]["si_candidates"]
        iou_without = accuracy_report(without.labels.array, truth.array, ANODE_PHASES)["mean_iou"]
        if choice["kept"]:
            iou_with = accuracy_report(chosen.labels.array, truth.array, ANODE_PHASES)["mean_iou"]
        else:  # the rule dropped them: the labels with them, for the comparison
            tolerance = segmentation.SI_CANDIDATE_ENERGY_TOLERANCE
            segmentation.SI_CANDIDATE_ENERGY_TOLERANCE = float("inf")
            try:
                forced = segmentation.multistage_threshold(gray)
            finally:
                segmentation.SI_CANDIDATE_ENERGY_TOLERANCE = tolerance
            iou_with = accuracy_report(forced.labels.array, truth.array, ANODE_PHASES)["mean_iou"]
        rows.append(
            {
                "volume_seed": seed,
                "energy_ratio_with_without": round(choice["energy_with"] / choice["energy_without"], 5),
                "candidates_kept": bool(choice["kept"]),
                "mean_iou_with": round(iou_with, 4),
                "mean_iou_without": round(iou_without, 4),
                "rule_chose_the_better": bool((iou_with >= iou_without) == choice["kept"]),
            }
        )
        print(rows[-1], flush=True)
    if rows:
        common.print_table(rows, title="Si candidates on random 3D volumes")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=24, help="slices (seeds 0..N-1; default 24)")
    parser.add_argument("--size", type=int, default=256, help="slice edge in pixels (default 256)")
    parser.add_argument(
        "--methods", default="multistage,no-refine,trainable", help="comma-separated (default all three)"
    )
    parser.add_argument("--volumes", type=int, default=0, help="random 3D volumes for the Si-candidate check")
    args = parser.parse_args()
    from fem_anode.imaging.accuracy import accuracy_report
    from fem_anode.imaging.segmentation import multistage_threshold
    from fem_anode.imaging.synthetic import ANODE_PHASES, random_anode_slice
    from fem_anode.imaging.trainable import UNLABELLED, predict_labels, train_classifier

    methods = args.methods.split(",")
    load0 = common.load()
    rows = []
    for seed in range(args.seeds):
        gray, labels, params = random_anode_slice(seed, args.size)
        truth = labels.array
        scribbles = np.full(truth.shape, UNLABELLED, dtype=np.uint8)
        picked = np.random.default_rng(1000 + seed).random(truth.shape) < 0.01
        scribbles[picked] = truth[picked]
        for variant, image in (("float", gray.array), ("8-bit, 6 % clipped", eight_bit_export(gray.array))):
            row: dict[str, object] = {"seed": seed, "variant": variant, **{k: round(v, 4) for k, v in params.items()}}
            for method in methods:
                start = time.perf_counter()
                if method == "trainable":
                    if len(np.unique(scribbles[scribbles != UNLABELLED])) < len(ANODE_PHASES):
                        row[method] = None  # a phase without scribbles: skipped
                        continue
                    model = train_classifier([(image, scribbles)], ANODE_PHASES, seed=0)
                    result = predict_labels(image, image.shape, model, progress=False)
                else:
                    result = multistage_threshold(image, refine=method != "no-refine").labels.array
                row[method] = round(accuracy_report(result, truth, ANODE_PHASES)["mean_iou"], 4)
                row[f"{method}_s"] = round(time.perf_counter() - start, 2)
            rows.append(row)
            print(seed, variant, {m: row.get(m) for m in methods}, flush=True)
    summary = []
    for variant in ("float", "8-bit, 6 % clipped"):
        for method in methods:
            values = np.array([r[method] for r in rows if r["variant"] == variant and r.get(method) is not None])
            if not values.size:
                continue
            summary.append(
                {
                    "variant": variant,
                    "method": method,
                    "slices": int(values.size),
                    "median_mean_iou": round(float(np.median(values)), 3),
                    "min": round(float(values.min()), 3),
                    "mean": round(float(values.mean()), 3),
                    "below_0.6": int(np.count_nonzero(values < 0.6)),
                }
            )
    if summary:
        common.print_table(summary, title="mean IoU over the random slices")
    summary += candidate_check(args.volumes)
    common.append_results(
        "segmentation_robustness",
        summary + rows,
        " ".join(sys.argv),
        {"load": [load0, common.load()], "size": args.size},
    )


if __name__ == "__main__":
    main()
