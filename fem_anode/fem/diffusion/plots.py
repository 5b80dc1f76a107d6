"""Figures of a diffusion run: c over the image at the output times, c(t) per region (PNG)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fem_anode.io.figures import pyplot as _pyplot
from fem_anode.io.figures import save_figure
from fem_anode.io.images import VoxelImage

__all__ = ["plot_concentration_fields", "plot_region_history", "render_and_report"]


def plot_region_history(results: dict[str, Any], path: Path, *, c_bulk: float) -> Path:
    """Mean c(t) of each region (and the domain) on a log time axis, like Fig. 8b."""
    plt = _pyplot()
    history = results["history"]
    t = np.asarray(history["times"][1:])
    fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
    for name, values in history["regions"].items():
        ax.semilogx(t, np.asarray(values[1:]) / c_bulk, label=f"region {name}")
    ax.semilogx(t, np.asarray(history["domain_mean"][1:]) / c_bulk, "k--", label="whole domain")
    ax.axhline(0.9, color="gray", lw=0.8, ls=":")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("mean c / c_bulk")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    ax.set_title("Li concentration per region")
    return save_figure(fig, path)


def plot_concentration_fields(image: VoxelImage, snapshots: dict[float, np.ndarray], settings: Any, path: Path) -> Path:
    """c over the image at each output time (blue low, red high), pores and Si shaded, regions boxed."""
    plt = _pyplot()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Rectangle

    geometry = settings.geometry
    phases = image.require_phases()
    labels = image.array if image.ndim == 2 else image.array[image.shape[0] // 2]
    spacing = image.require_voxel_size()[-2:]
    extent_um = [0, labels.shape[1] * spacing[1] * 1e6, labels.shape[0] * spacing[0] * 1e6, 0]
    times = sorted(snapshots)
    fig, axes = plt.subplots(
        1, len(times), figsize=(2.6 * len(times) + 1.2, 4.2), constrained_layout=True, squeeze=False
    )
    shade = np.full(labels.shape, np.nan)
    if geometry.pore_phase in phases:
        shade[labels == phases[geometry.pore_phase]] = 0
    if geometry.si_phase in phases:
        shade[labels == phases[geometry.si_phase]] = 1
    for ax, t in zip(axes[0], times):
        im = ax.imshow(
            snapshots[t],
            cmap="coolwarm",
            vmin=0,
            vmax=settings.physics.c_bulk,
            extent=extent_um,
            interpolation="nearest",
        )
        ax.imshow(
            shade,
            cmap=ListedColormap(["#d9ecf7", "#555555"]),
            vmin=0,
            vmax=1,
            extent=extent_um,
            interpolation="nearest",
        )
        for region in settings.regions:
            x0, y0, x1, y1 = (
                v * 1e6
                for v in (
                    region.box[0],
                    region.box[1],
                    region.box[-3 if len(region.box) == 6 else 2],
                    region.box[-2 if len(region.box) == 6 else 3],
                )
            )
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="k", lw=1))
            ax.text(x0, y0, region.name, va="bottom", fontsize=8)
        ax.set_title(f"t = {t:g} s")
        ax.set_xlabel("x (um)")
    axes[0][0].set_ylabel("y (um)")
    fig.colorbar(im, ax=axes[0].tolist(), label="c (mol/m^3)", shrink=0.8)
    return save_figure(fig, path, dpi=110)


def render_and_report(directory: Path, results: dict[str, Any], *, render: bool = True) -> None:
    """After a run, on one rank: the 3D figure of c from the written ``c.bp`` (3D meshes; see
    :func:`fem_anode.io.render3d.render_diffusion_outputs`) and ``report.html`` / ``report.md``.

    Renders from the files the run wrote, so nothing is gathered in memory under MPI. Neither
    step fails the run: a rendering problem is a warning, and so is a report that cannot be made.
    """
    import logging

    from fem_anode.io.render3d import render_diffusion_outputs
    from fem_anode.io.report_html import diffusion_report

    log = logging.getLogger(__name__)
    render_diffusion_outputs(directory, results, enabled=render)
    try:
        diffusion_report(directory, results)
    except (OSError, KeyError, TypeError, ValueError) as err:  # a report must never lose the run's results
        log.warning("report.html not written: %s", err)
