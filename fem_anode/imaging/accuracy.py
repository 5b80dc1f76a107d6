"""Accuracy of a segmentation against known labels: IoU, confusion matrix, phase-fraction errors.

For phases :math:`p` with predicted set :math:`A_p` and true set :math:`B_p`:

* intersection over union :math:`\\mathrm{IoU}_p = |A_p \\cap B_p| / |A_p \\cup B_p|`;
* confusion matrix :math:`C_{pq}` = voxels of true phase :math:`p` labelled :math:`q` (rows:
  truth, columns: segmentation), also normalised by row (recall) and column (precision);
* phase-fraction error :math:`|A_p|/N - |B_p|/N` (volume-fraction points) and its relative value.

The confusion matrix is additive over parts of the image, so distributed slabs are scored by
summing their matrices (:func:`confusion_matrix` then :func:`accuracy_from_confusion`) without
gathering the volumes.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fem_anode.errors import InputError

__all__ = [
    "accuracy_from_confusion",
    "accuracy_report",
    "confusion_matrix",
    "plot_confusion",
    "plot_segmentation_report",
]


def confusion_matrix(predicted: np.ndarray, truth: np.ndarray, phases: Mapping[str, int]) -> np.ndarray:
    """Counts ``C[i, j]`` of voxels of true phase ``i`` labelled ``j`` (phase-map order).

    Raises:
        InputError: different shapes, or label values outside the phase map in either image.
    """
    pred, true = np.asarray(predicted), np.asarray(truth)
    if pred.shape != true.shape:
        raise InputError(f"segmentation shape {pred.shape} differs from the reference labels {true.shape}")
    values = np.array([int(v) for v in phases.values()], dtype=np.int64)
    order = np.argsort(values)
    n = values.size
    index = []
    for name, arr in (("segmentation", pred), ("reference labels", true)):
        flat = arr.ravel().astype(np.int64)
        pos = np.minimum(np.searchsorted(values[order], flat), n - 1)
        known = values[order][pos] == flat
        if not known.all():
            bad = np.unique(flat[~known])[:10].tolist()
            raise InputError(f"{name}: label values {bad} are not in the phase map {dict(phases)}")
        index.append(order[pos])
    return np.bincount(index[1] * n + index[0], minlength=n * n).reshape(n, n)


def accuracy_from_confusion(confusion: np.ndarray, phases: Mapping[str, int]) -> dict[str, Any]:
    """Per-phase IoU, precision, recall, phase fractions and their errors from a confusion matrix."""
    c = np.asarray(confusion, dtype=np.float64)
    names = list(phases)
    total = c.sum()
    if total <= 0:
        raise InputError("empty image: nothing to score")
    tp = np.diag(c)
    true_n, pred_n = c.sum(axis=1), c.sum(axis=0)
    union = true_n + pred_n - tp

    def ratio(a: np.ndarray, b: np.ndarray) -> list[float | None]:
        return [float(x / y) if y > 0 else None for x, y in zip(a, b)]

    iou = dict(zip(names, ratio(tp, union)))
    valid = [v for v in iou.values() if v is not None]
    fractions_true = true_n / total
    fractions_pred = pred_n / total
    return {
        "phases": dict(phases),
        "voxels": int(total),
        "iou": iou,
        "mean_iou": float(np.mean(valid)) if valid else None,
        "precision": dict(zip(names, ratio(tp, pred_n))),
        "recall": dict(zip(names, ratio(tp, true_n))),
        "overall_accuracy": float(tp.sum() / total),
        "confusion_matrix": {"rows_truth_columns_segmentation": names, "counts": c.astype(np.int64).tolist()},
        "phase_fraction": {
            "segmentation": dict(zip(names, fractions_pred.tolist())),
            "truth": dict(zip(names, fractions_true.tolist())),
            "error_points": dict(zip(names, (fractions_pred - fractions_true).tolist())),
            "relative_error": dict(zip(names, ratio(fractions_pred - fractions_true, fractions_true))),
        },
    }


def accuracy_report(predicted: np.ndarray, truth: np.ndarray, phases: Mapping[str, int]) -> dict[str, Any]:
    """:func:`accuracy_from_confusion` of :func:`confusion_matrix` (one process, whole images)."""
    return accuracy_from_confusion(confusion_matrix(predicted, truth, phases), phases)


def plot_confusion(report: Mapping[str, Any], path: str | Path, title: str = "Confusion matrix") -> Path:
    """PNG of the row-normalised confusion matrix (recall per true phase) with the counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fem_anode.io.output import atomic_path

    names = report["confusion_matrix"]["rows_truth_columns_segmentation"]
    counts = np.asarray(report["confusion_matrix"]["counts"], dtype=np.float64)
    rows = np.maximum(counts.sum(axis=1, keepdims=True), 1.0)
    share = counts / rows
    fig, ax = plt.subplots(figsize=(1.3 * len(names) + 2.5, 1.1 * len(names) + 2.0), dpi=110)
    im = ax.imshow(share, vmin=0, vmax=1, cmap="Blues")
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(
                j,
                i,
                f"{share[i, j]:.2f}\n({int(counts[i, j])})",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if share[i, j] > 0.6 else "black",
            )
    ax.set_xticks(range(len(names)), names)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("segmentation")
    ax.set_ylabel("truth")
    ax.set_title(title + f"\nmean IoU {report['mean_iou']:.3f}" if report.get("mean_iou") is not None else title)
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of the true phase")
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    return path


def plot_segmentation_report(
    gray: np.ndarray,
    labels: np.ndarray,
    phases: Mapping[str, int],
    path: str | Path,
    *,
    truth: np.ndarray | None = None,
    title: str = "",
) -> Path:
    """Report figure of one 2D slice: gray, segmentation, and (with ``truth``) the truth and the
    disagreement map (voxels where segmentation and truth differ, coloured by the true phase)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    from fem_anode.io.output import atomic_path

    names = list(phases)
    values = np.array([phases[n] for n in names])
    colours = ["#1f3b99", "#d62728", "#17becf", "#bcbd22", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
    cmap = ListedColormap(colours[: len(names)])

    def index_of(lab: np.ndarray) -> np.ndarray:
        out = np.full(lab.shape, -1, dtype=np.int64)
        for k, v in enumerate(values):
            out[lab == v] = k
        return np.ma.masked_less(out, 0)

    panels = [("gray", gray, "gray"), ("segmentation", index_of(labels), cmap)]
    if truth is not None:
        wrong = labels != truth
        panels.append(("truth", index_of(truth), cmap))
        panels.append(
            (
                f"disagreement ({100 * wrong.mean():.1f} % of the slice)",
                np.ma.masked_where(~wrong, index_of(truth)),
                cmap,
            )
        )
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.8), dpi=110)
    for ax, (name, data, cm) in zip(np.atleast_1d(axes), panels):
        if cm == "gray":
            ax.imshow(data, cmap="gray")
        else:
            if name.startswith("disagreement"):
                ax.imshow(np.zeros(gray.shape), cmap="gray", vmin=0, vmax=1)
            ax.imshow(data, cmap=cm, vmin=-0.5, vmax=len(names) - 0.5, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_axis_off()
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[k]) for k in range(len(names))]
    fig.legend(handles, names, loc="lower center", ncol=len(names), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    return path
