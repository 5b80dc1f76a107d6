"""Matplotlib figures of image metrics (Agg backend, PNG files; no display needed).

Single-sample figures (:func:`plot_metrics`) and sample comparisons in the style of the paper's
Figs. 4-7 (:func:`plot_comparison`): phase-fraction profiles over depth, mean tortuosity versus
depth (log scale), surface-connected pore channels versus depth, pore-Si distance histograms and
Si particle size distributions. Lengths are plotted in micrometres.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fem_anode.io.figures import pyplot as _pyplot
from fem_anode.io.figures import save_figure as _save

__all__ = ["plot_per_slice", "plot_metrics", "plot_comparison", "plot_segmentation_slices", "plot_tortuosity_sections"]


def plot_per_slice(per_slice: Mapping[str, Any], path: str | Path, *, title: str = "") -> Path:
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
    return _save(fig, path)


def _um(values: Any) -> np.ndarray:
    return np.asarray([np.nan if v is None else v for v in values], dtype=np.float64) * 1e6


def _values(values: Any) -> np.ndarray:
    return np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)


def _depth_axis(metrics: Mapping[str, Any]) -> str:
    return "depth z from electrode surface (um)" if metrics["image"]["ndim"] == 3 else "distance from top row (um)"


def _tortuosity_figure(samples: Mapping[str, Mapping[str, Any]], path: Path) -> Path | None:
    plt = _pyplot()
    present = {k: m for k, m in samples.items() if m.get("tortuosity")}
    if not present:
        return None
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(6, 6), sharex=True, constrained_layout=True)
    for label, m in present.items():
        t = m["tortuosity"]
        depth = _um(t["depth_m"])
        name = f"{label} (mean {t['mean']:.3g})" if t["mean"] is not None else label
        ax.semilogy(depth, _values(t["per_depth_mean"]), label=name)
        ax2.plot(depth, 100 * _values(t["unreachable_fraction"]["per_depth"]), label=label)
    ax.set_ylabel("mean geodesic tortuosity")
    ax.set_title("Tortuosity of the pore network vs depth (cf. paper Fig. 6a)")
    ax.legend(fontsize=8)
    ax2.set_ylabel("unreachable pore voxels (%)\n(infinite tortuosity)")
    ax2.set_xlabel(_depth_axis(next(iter(present.values()))))
    return _save(fig, path)


def _connections_figure(samples: Mapping[str, Mapping[str, Any]], path: Path) -> Path | None:
    plt = _pyplot()
    present = {k: m for k, m in samples.items() if m.get("connections_per_depth")}
    if not present:
        return None
    fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
    for label, m in present.items():
        c = m["connections_per_depth"]
        line = ax.plot(_um(c["depth_m"]), c["profile"], label=f"{label}: connected to surface")[0]
        ax.plot(_um(c["depth_m"]), c["total_profile"], ls=":", color=line.get_color(), label=f"{label}: all channels")
    ax.set_xlabel(_depth_axis(next(iter(present.values()))))
    ax.set_ylabel("pore channels per slice")
    ax.set_title("Pore connections per depth (cf. paper Fig. 6b)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def _histogram_figure(
    samples: Mapping[str, Mapping[str, Any]], path: Path, key: str, sub: str, xlabel: str, title: str
) -> Path | None:
    plt = _pyplot()
    present = {k: m[key][sub] for k, m in samples.items() if m.get(key) and m[key].get(sub) and m[key][sub]["counts"]}
    if not present:
        return None
    fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
    for label, hist in present.items():
        edges = _um(hist["bin_edges_m"])
        counts = np.asarray(hist["counts"], dtype=np.float64)
        density = counts / max(counts.sum(), 1.0)
        line = ax.stairs(density, edges, label=label)
        mean_key = "mean_m" if key == "pore_si_distance" else "mean_equivalent_diameter_m"
        mean = samples[label][key].get(mean_key)
        if mean is not None:
            ax.axvline(mean * 1e6, ls="--", lw=0.8, color=line.get_edgecolor())
    ax.set_xlabel(xlabel)
    ax.set_ylabel("normalised frequency")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _si_per_slice_figure(samples: Mapping[str, Mapping[str, Any]], path: Path) -> Path | None:
    plt = _pyplot()
    present = {
        k: m["si_particles"]["per_slice"]
        for k, m in samples.items()
        if m.get("si_particles") and "per_slice" in m["si_particles"]
    }
    if not present:
        return None
    fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
    for label, p in present.items():
        ax.plot(_um(p["depth_m"]), np.asarray(p["count_per_area_m2"]["profile"]) * 1e-12, label=label)
    ax.set_xlabel("depth z from electrode surface (um)")
    ax.set_ylabel("Si particle sections per um^2")
    ax.set_title("Si particles per unit area per slice (cf. paper Fig. 4d)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def _phase_profiles_figure(samples: Mapping[str, Mapping[str, Any]], path: Path) -> Path:
    plt = _pyplot()
    names = [n for n in next(iter(samples.values()))["per_slice"] if n != "depth_m"]
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.6), constrained_layout=True, squeeze=False)
    for ax, name in zip(axes[0], names):
        for label, m in samples.items():
            stats = m["per_slice"].get(name)
            if stats is None:
                continue
            depth = m["per_slice"].get("depth_m")
            x = _um(depth) if depth is not None else np.arange(len(stats["profile"]))
            line = ax.plot(x, 100 * np.asarray(stats["profile"]), label=f"{label} ({100 * stats['mean']:.1f} %)")[0]
            ax.axhline(100 * stats["mean"], ls="--", lw=0.8, color=line.get_color())
        ax.set_title(name)
        ax.set_xlabel("depth (um)")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("fraction per slice (%)")
    fig.suptitle("Phase fractions per slice (cf. paper Figs. 4e, 5)")
    return _save(fig, path)


def plot_comparison(samples: Mapping[str, Mapping[str, Any]], out_dir: str | Path, *, prefix: str = "") -> list[Path]:
    """Figures comparing several samples' metrics (e.g. pristine vs aged), one PNG per quantity.

    Args:
        samples: label -> metrics dict of :func:`~fem_anode.imaging.metrics.compute_metrics`.
        out_dir: directory for the PNG files.
        prefix: file name prefix.

    Returns:
        Paths written: ``per_slice``, ``tortuosity``, ``connections``, ``pore_si_distance``,
        ``si_size_distribution``, ``si_per_slice`` (those that apply).
    """
    out = Path(out_dir)
    written = [_phase_profiles_figure(samples, out / f"{prefix}per_slice.png")]
    for figure in (
        _tortuosity_figure(samples, out / f"{prefix}tortuosity.png"),
        _connections_figure(samples, out / f"{prefix}connections.png"),
        _histogram_figure(
            samples,
            out / f"{prefix}pore_si_distance.png",
            "pore_si_distance",
            "histogram",
            "distance from Si surface to nearest pore (um)",
            "Pore-Si distance distribution (cf. paper Fig. 7)",
        ),
        _histogram_figure(
            samples,
            out / f"{prefix}si_size_distribution.png",
            "si_particles",
            "size_distribution",
            "Si particle equivalent diameter (um)",
            "Si particle size distribution",
        ),
        _si_per_slice_figure(samples, out / f"{prefix}si_per_slice.png"),
    ):
        if figure is not None:
            written.append(figure)
    return written


def plot_metrics(
    metrics: Mapping[str, Any], out_dir: str | Path, *, label: str = "sample", prefix: str = ""
) -> list[Path]:
    """All figures of one sample's metrics (see :func:`plot_comparison`)."""
    return plot_comparison({label: metrics}, out_dir, prefix=prefix)


def plot_segmentation_slices(
    panels: Mapping[str, tuple[Any, Any]],
    path: str | Path,
    *,
    phases: Mapping[str, int],
    title: str = "",
) -> Path:
    """Gray slice above its segmentation for each sample (cf. paper Fig. 4b-c), one column each.

    Args:
        panels: column title -> ``(gray_2d, labels_2d)`` arrays.
        path: PNG file.
        phases: phase name -> label (legend of the colours).
        title: figure title.
    """
    plt = _pyplot()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    colours = {"pore": "#1f4fd6", "si": "#d62728", "graphite": "#17becf", "sei": "#2ca02c"}
    palette = ["#7f7f7f", "#bcbd22", "#9467bd", "#ff7f0e"]
    names = list(phases)
    colour_of = {n: colours.get(n, palette[i % len(palette)]) for i, n in enumerate(names)}
    cols = len(panels)
    fig, axes = plt.subplots(2, cols, figsize=(3.4 * cols, 6.4), constrained_layout=True, squeeze=False)
    for j, (label, (gray, labels)) in enumerate(panels.items()):
        axes[0][j].imshow(gray, cmap="gray", interpolation="nearest")
        axes[0][j].set_title(label, fontsize=9)
        index = np.zeros(np.asarray(labels).shape, dtype=np.int64)
        for k, n in enumerate(names):
            index[np.asarray(labels) == phases[n]] = k
        cmap = ListedColormap([colour_of[n] for n in names])
        axes[1][j].imshow(index, cmap=cmap, vmin=-0.5, vmax=len(names) - 0.5, interpolation="nearest")
        for ax in (axes[0][j], axes[1][j]):
            ax.set_xticks([])
            ax.set_yticks([])
    handles = [Patch(color=colour_of[n], label=n) for n in names]
    fig.legend(handles=handles, loc="lower center", ncol=len(names), fontsize=8)
    fig.suptitle(title or "Gray images and segmentation")
    fig.get_layout_engine().set(rect=(0, 0.05, 1, 0.95))
    return _save(fig, path)


def plot_tortuosity_sections(
    samples: Mapping[str, tuple[np.ndarray, tuple[float, ...]]],
    path: str | Path,
    *,
    title: str = "",
) -> Path:
    """Map of the geodesic tortuosity on the central x-z section (cf. paper Fig. 5c).

    Colour: tortuosity (log scale) of reachable pore voxels; white: unreachable pore voxels
    (infinite tortuosity); gray: solid. z (depth) runs downwards from the electrode surface.

    Args:
        samples: label -> ``(tortuosity, voxel_size)`` with the 3D (or 2D) field of
            :func:`~fem_anode.imaging.metrics.tortuosity_field` and the voxel size in metres.
        path: PNG file.
        title: figure title.
    """
    plt = _pyplot()
    from matplotlib.colors import LogNorm

    sections = {}
    for label, (tau, voxel_size) in samples.items():
        tau = np.asarray(tau)
        section = tau[:, tau.shape[1] // 2, :] if tau.ndim == 3 else tau
        h_z, h_x = voxel_size[0], voxel_size[-1]
        sections[label] = (section, (0, section.shape[1] * h_x * 1e6, section.shape[0] * h_z * 1e6, 0))
    finite = np.concatenate([s[np.isfinite(s)] for s, _ in sections.values()] + [np.ones(1)])
    vmax = max(float(np.percentile(finite, 99.5)), 1.01)
    cols = len(sections)
    fig, axes = plt.subplots(1, cols, figsize=(3.2 * cols + 2.2, 4.2), constrained_layout=True, squeeze=False)
    image = None
    for ax, (label, (section, extent)) in zip(axes[0], sections.items()):
        background = np.ones((*section.shape, 3))
        background[np.isnan(section)] = 0.55
        ax.imshow(background, extent=extent, interpolation="nearest", aspect="auto")
        cmap = plt.get_cmap("viridis").copy()
        cmap.set_bad(alpha=0.0)
        shown = np.ma.masked_invalid(section)
        image = ax.imshow(
            shown, extent=extent, cmap=cmap, norm=LogNorm(1.0, vmax), interpolation="nearest", aspect="auto"
        )
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("x (um)")
    axes[0][0].set_ylabel("depth z (um)")
    if image is not None:
        fig.colorbar(image, ax=axes[0].tolist(), label="tortuosity (white: unreachable, gray: solid)")
    fig.suptitle(title or "Tortuosity, central x-z section (cf. Fig. 5c)", fontsize=10)
    return _save(fig, path)
