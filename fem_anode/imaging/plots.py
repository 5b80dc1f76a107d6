"""Matplotlib figures of image metrics (Agg backend, PNG files; no display needed)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fem_anode.io.output import atomic_path

__all__ = ["plot_per_slice"]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_per_slice(per_slice: Mapping[str, Mapping[str, Any]], path: str | Path, *, title: str = "") -> Path:
    """Line plot of each phase's fraction versus depth (or slice index) -> PNG at ``path``."""
    plt = _pyplot()
    depth = per_slice.get("depth_m")
    fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
    for name, stats in per_slice.items():
        if name == "depth_m":
            continue
        profile = [100.0 * v for v in stats["profile"]]
        x = [d * 1e6 for d in depth] if depth is not None else list(range(len(profile)))
        line = ax.plot(x, profile, label=f"{name} (mean {100 * stats['mean']:.1f} %)")[0]
        ax.axhline(100 * stats["mean"], color=line.get_color(), ls="--", lw=0.8)
    ax.set_xlabel("depth from electrode surface (um)" if depth is not None else "slice index")
    ax.set_ylabel("phase fraction per slice (%)")
    ax.set_title(title or "Phase fractions per slice")
    ax.legend(fontsize=8)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    return Path(path)
