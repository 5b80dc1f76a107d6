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
the four phases, and the number of slices below 0.6. Usage::

    .venv/bin/python benchmarks/bench_segmentation_robustness.py --seeds 24
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=24, help="slices (seeds 0..N-1; default 24)")
    parser.add_argument("--size", type=int, default=256, help="slice edge in pixels (default 256)")
    parser.add_argument(
        "--methods", default="multistage,no-refine,trainable", help="comma-separated (default all three)"
    )
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
    common.print_table(summary, title="mean IoU over the random slices")
    common.append_results(
        "segmentation_robustness",
        summary + rows,
        " ".join(sys.argv),
        {"load": [load0, common.load()], "size": args.size},
    )


if __name__ == "__main__":
    main()
