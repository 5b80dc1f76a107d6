"""Pristine vs aged anode: segmentation and image metrics as in the paper's Figs. 4-7.

Vorauer et al., Commun. Chem. 3, 141 (2020) compare pristine and cycled Si/FeSi2/graphite
anodes by micro-SCT (0.65 um voxels) and FIB-SEM (40 x 20 x 20 nm voxels). This demo does the
same workflow on seeded synthetic data with a known ground truth:

1. pristine and aged 3D anode volumes of the *same* structure (:func:`anode_volume`; ageing
   grows the intermediate SEI domain into the pores, more near the surface, and fractures Si);
2. gray renderings (blur, noise) segmented with the histogram-based iterative multistage
   threshold on the denoised image followed by the blur-aware refinement (PSF width, phase
   levels and noise estimated from the gray image; iterated conditional modes on the blurred
   label model with a prior that penalises interfaces, pore-solid contacts more; Si candidates
   at the bright local maxima), and with the trainable random forest (multiscale intensity,
   edge and Hessian features plus the extended structure-tensor, Laplacian-of-Gaussian and
   local-extremum features) trained on two
   labelled slices of each volume (with auto-context: a second forest on the first one's
   cross-fitted, smoothed class probabilities); per-phase IoU of both against the truth, and the ageing
   (relative change of every phase fraction) each reports next to the true one;
3. all metrics of the segmented volumes, the aged one relative to the pristine one;
4. a 2D FIB-SEM-like ROI with shine-through artefacts segmented by the region-based method and
   by a plain pixel threshold (IoU of both);
5. figures: gray/segmented slices (Fig. 4b-c), phase profiles (Figs. 4e, 5), tortuosity versus
   depth (Fig. 6a), connections versus depth (Fig. 6b), pore-Si distance histograms (Fig. 7),
   Si size distribution and particles per area (Fig. 4d), tortuosity maps with unreachable
   (infinite) pore voxels in white (Fig. 5c); ``summary.json``.

Run: ``python demos/imaging_pristine_vs_aged.py --out imaging_demo [--quick]``.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from fem_anode.imaging.metrics import compute_metrics
from fem_anode.imaging.plots import plot_comparison, plot_segmentation_slices, plot_tortuosity_sections
from fem_anode.imaging.segmentation import (
    iou_per_phase,
    multistage_threshold,
    region_segmentation,
    threshold_segmentation,
)
from fem_anode.imaging.synthetic import ANODE_PHASES, ROI_PHASES, anode_volume, fib_sem_roi, render_gray
from fem_anode.imaging.trainable import UNLABELLED, FeatureSettings, predict_labels, train_classifier
from fem_anode.io.output import write_json

logger = logging.getLogger("fem_anode.demos.imaging")


def main(out_dir: str | Path, quick: bool = False, seed: int = 0) -> dict[str, Any]:
    """Run the demo, write figures and ``summary.json`` to ``out_dir``, return the summary."""
    out = Path(out_dir)
    start = time.perf_counter()
    shape = (24, 64, 64) if quick else (48, 128, 128)
    truth = {
        "pristine": anode_volume(shape, seed=seed),
        "aged": anode_volume(shape, seed=seed, aged=True, sei_growth=2.5, surface_ageing_gradient=0.5),
    }
    summary: dict[str, Any] = {
        "shape": list(shape),
        "voxel_size_m": list(truth["pristine"].voxel_size or ()),
        "samples": {},
    }
    metrics: dict[str, dict[str, Any]] = {}
    panels = {}
    tortuosity_maps: dict[str, Any] = {}
    fractions: dict[str, dict[str, dict[str, float]]] = {"truth": {}, "multistage": {}, "trainable": {}}
    grays: dict[str, Any] = {}
    for name, labels in truth.items():
        gray = render_gray(labels, seed=seed + 1)
        grays[name] = gray
        result = multistage_threshold(gray)
        iou = iou_per_phase(result.labels, labels)
        # trainable: a random forest trained on two labelled slices of this volume
        scribbles = np.full(shape, UNLABELLED, dtype=np.uint8)
        training_slices = [shape[0] // 4, (3 * shape[0]) // 4]
        scribbles[training_slices] = labels.array[training_slices]
        model = train_classifier(
            [(gray.array, scribbles)], ANODE_PHASES, seed=seed, settings=FeatureSettings(auto_context=True)
        )
        trained = predict_labels(gray.array, shape, model, progress=False)
        iou_trainable = iou_per_phase(trained, labels)
        for method, array in (("truth", labels.array), ("multistage", result.labels.array), ("trainable", trained)):
            fractions[method][name] = {
                p: float(np.count_nonzero(array == v) / array.size) for p, v in ANODE_PHASES.items()
            }
        reference = metrics.get("pristine")
        fields: dict[str, Any] = {}
        metrics[name] = compute_metrics(result.labels, reference=reference, fields=fields)
        tortuosity_maps[name] = (fields["tortuosity"], labels.require_voxel_size())
        true_metrics = compute_metrics(labels)
        z = shape[0] // 2
        panels[f"{name}: gray"] = (gray.array[z], labels.array[z])
        panels[f"{name}: segmented"] = (gray.array[z], result.labels.array[z])
        summary["samples"][name] = {
            "thresholds": result.info["thresholds"],
            "refine": {
                k: result.info["refine"][k]
                for k in ("psf_sigma_voxels", "noise_sigma", "levels", "sweeps", "changed_per_sweep")
            },
            "iou": iou,
            "iou_trainable": iou_trainable,
            "trainable_training_slices": training_slices,
            "trainable_settings": model.settings.to_dict(),
            "phase_fractions_segmented": metrics[name]["phase_fractions"],
            "phase_fractions_truth": true_metrics["phase_fractions"],
            "tortuosity_mean": metrics[name]["tortuosity"]["mean"],
            "unreachable_fraction": metrics[name]["tortuosity"]["unreachable_fraction"]["overall"],
            "connections_per_depth_mean": metrics[name]["connections_per_depth"]["mean"],
            "pore_surface_area_m2": metrics[name]["pore_surface_area_m2"],
            "pore_si_distance_mean_m": metrics[name]["pore_si_distance"]["mean_m"],
            "pore_si_distance_max_m": metrics[name]["pore_si_distance"]["max_m"],
            "si_particle_count": metrics[name]["si_particles"]["count"],
            "timings_s": metrics[name]["timings_s"],
        }
        write_json(out / "metrics" / f"{name}.json", metrics[name])
    summary["relative_change_aged_vs_pristine"] = metrics["aged"]["relative_change"]
    # The same instrument imaged both samples: the aged volume, where every phase is thick, calibrates
    # the gray levels and PSF that the pristine one's thin intermediate shells cannot determine.
    aged_refine = summary["samples"]["aged"]["refine"]
    calibrated = multistage_threshold(
        grays["pristine"], levels=aged_refine["levels"], psf_sigma=aged_refine["psf_sigma_voxels"]
    ).labels.array
    summary["samples"]["pristine"]["iou_calibrated_on_aged"] = iou_per_phase(calibrated, truth["pristine"])
    fractions["multistage, pristine calibrated on aged"] = {
        "pristine": {p: float(np.count_nonzero(calibrated == v) / calibrated.size) for p, v in ANODE_PHASES.items()},
        "aged": fractions["multistage"]["aged"],
    }
    summary["phase_fraction_change_pct"] = {
        method: {
            p: 100.0 * (f["aged"][p] / f["pristine"][p] - 1.0) if f["pristine"][p] > 0 else None for p in ANODE_PHASES
        }
        for method, f in fractions.items()
    }

    # FIB-SEM-like 2D ROI with shine-through: region-based vs pixel threshold
    roi = fib_sem_roi(size=(4e-6, 3e-6) if quick else (8e-6, 5e-6), seed=seed)
    roi_gray = render_gray(roi, shine_through=1.0, seed=seed + 2)
    order = ["pore", "sei", "si"]
    region = region_segmentation(roi_gray, ROI_PHASES, order=order)
    pixel = threshold_segmentation(roi_gray, ROI_PHASES, order=order)
    summary["fib_sem_roi"] = {
        "iou_region": iou_per_phase(region.labels, roi),
        "iou_pixel_threshold": iou_per_phase(pixel.labels, roi),
        "regions_per_slice": region.info["regions_per_slice"],
    }
    figures = plot_comparison({"pristine": metrics["pristine"], "aged": metrics["aged"]}, out / "figures")
    figures.append(
        plot_segmentation_slices(
            panels,
            out / "figures" / "sct_slices.png",
            phases=truth["pristine"].require_phases(),
            title="Synthetic SCT: truth (top row: gray) and multistage segmentation",
        )
    )
    figures.append(
        plot_segmentation_slices(
            {
                "truth": (roi_gray.array, roi.array),
                "pixel threshold": (roi_gray.array, pixel.labels.array),
                "region-based": (roi_gray.array, region.labels.array),
            },
            out / "figures" / "fib_sem_shine_through.png",
            phases=ROI_PHASES,
            title="FIB-SEM ROI with shine-through: pixel threshold vs region-based",
        )
    )
    figures.append(plot_tortuosity_sections(tortuosity_maps, out / "figures" / "tortuosity_map.png"))
    summary["figures"] = [str(p.relative_to(out)) for p in figures]
    summary["elapsed_s"] = time.perf_counter() - start
    write_json(out / "summary.json", summary)

    # What the demo must show (the paper's trends, on data where they are built in):
    p, a = summary["samples"]["pristine"], summary["samples"]["aged"]
    change = summary["relative_change_aged_vs_pristine"]
    if not (change["phase_volume"]["pore"] < -0.2 and change["phase_volume"]["sei"] > 0.2):
        raise RuntimeError(f"ageing should shrink pores and grow the intermediate domain: {change['phase_volume']}")
    if not (
        a["tortuosity_mean"] > p["tortuosity_mean"] and a["pore_si_distance_mean_m"] > p["pore_si_distance_mean_m"]
    ):
        raise RuntimeError("ageing should raise the tortuosity and the pore-Si distance")
    if not min(p["iou"]["pore"], a["iou"]["pore"]) > 0.75:
        raise RuntimeError(f"multistage pore IoU too low: {p['iou']['pore']:.3f}, {a['iou']['pore']:.3f}")
    # The trainable goal (mean IoU 0.05 above the multistage method, every phase at least as
    # good) is reported, not enforced: since the multistage refinement seeds Si candidates and
    # weights coatings, it holds on the pristine volume but not on the aged one (docs/imaging.md,
    # where a spatial prior on the forest's output and richer features were measured too);
    # enforced: not below the multistage method in mean IoU.
    for s in (p, a):
        margin = float(np.mean(list(s["iou_trainable"].values())) - np.mean(list(s["iou"].values())))
        s["trainable_goal"] = {
            "mean_iou_margin": margin,
            "met": bool(margin >= 0.05 and all(s["iou_trainable"][k] >= v for k, v in s["iou"].items())),
        }
        if margin < 0.0:
            raise RuntimeError(
                f"the trainable segmentation fell below the multistage one: {s['iou_trainable']} vs {s['iou']}"
            )
    write_json(out / "summary.json", summary)
    roi_summary = summary["fib_sem_roi"]
    if not roi_summary["iou_region"]["pore"] > roi_summary["iou_pixel_threshold"]["pore"]:
        raise RuntimeError("the region-based method should beat the pixel threshold on shine-through pores")
    return summary


def _report(summary: dict[str, Any]) -> str:
    lines = [f"synthetic anode {'x'.join(map(str, summary['shape']))} voxels"]
    for name, s in summary["samples"].items():
        lines.append(
            f"{name:9s} pore {100 * s['phase_fractions_segmented']['pore']:5.1f} %  "
            f"tortuosity {s['tortuosity_mean']:.3f}  connections/depth {s['connections_per_depth_mean']:.1f}  "
            f"pore-Si distance {1e6 * s['pore_si_distance_mean_m']:.2f} um "
            f"(max {1e6 * s['pore_si_distance_max_m']:.2f})"
        )
        lines.append(
            f"{'':9s} IoU multistage (denoised, refined; PSF {s['refine']['psf_sigma_voxels']:.2f} voxels): "
            + ", ".join(f"{k} {v:.2f}" for k, v in s["iou"].items())
            + "; trainable (2 slices, auto-context): "
            + ", ".join(f"{k} {v:.2f}" for k, v in s["iou_trainable"].items())
            + f" (margin {s['trainable_goal']['mean_iou_margin']:+.3f}, "
            + f"goal {'met' if s['trainable_goal']['met'] else 'missed'})"
        )
        if "iou_calibrated_on_aged" in s:
            lines.append(
                f"{'':9s} IoU multistage with the aged volume's levels and PSF: "
                + ", ".join(f"{k} {v:.2f}" for k, v in s["iou_calibrated_on_aged"].items())
            )
    for method, change in summary["phase_fraction_change_pct"].items():
        lines.append(
            f"phase fractions aged vs pristine ({method}): "
            + ", ".join(f"{k} {v:+.1f} %" for k, v in change.items() if v is not None)
        )
    change = summary["relative_change_aged_vs_pristine"]
    lines.append(
        "aged vs pristine: "
        + ", ".join(f"{k} {100 * v:+.1f} %" for k, v in change["phase_volume"].items() if v is not None)
        + f", pore surface {100 * change['pore_surface_area']:+.1f} %"
    )
    roi = summary["fib_sem_roi"]
    lines.append(
        f"FIB-SEM shine-through pore IoU: region {roi['iou_region']['pore']:.3f} "
        f"vs pixel threshold {roi['iou_pixel_threshold']['pore']:.3f}"
    )
    lines.append(f"done in {summary['elapsed_s']:.1f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="imaging_demo", help="output directory (default imaging_demo)")
    parser.add_argument("--quick", action="store_true", help="small volumes (CI)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(_report(main(args.out, quick=args.quick, seed=args.seed)))
