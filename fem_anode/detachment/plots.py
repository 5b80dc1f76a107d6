"""Figures of the detachment study (matplotlib Agg, PNG): Fig. 2b/4a/4d-style plots."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fem_anode.detachment.data import CapacityData, GapData
from fem_anode.detachment.model import SimulationResult
from fem_anode.io.figures import pyplot as _pyplot
from fem_anode.io.figures import save_figure as _save

__all__ = ["plot_gap_scatter", "plot_gap_model", "plot_capacity", "plot_bootstrap"]

_CYCLE_STYLE = {0: ("black", "s"), 1: ("tab:purple", "D"), 3: ("m", "o"), 10: ("tab:orange", "^")}


def _style(cycle: int, i: int) -> tuple[str, str]:
    if cycle in _CYCLE_STYLE:
        return _CYCLE_STYLE[cycle]
    colors = ["tab:blue", "tab:green", "tab:red", "tab:brown", "tab:cyan"]
    return colors[i % len(colors)], "v"


def _scatter(ax: Any, gaps: GapData) -> None:
    for i, c in enumerate(gaps.cycles()):
        sel = gaps.cycle == c
        color, marker = _style(c, i)
        ax.scatter(
            gaps.radius_m[sel] * 1e6,
            gaps.gap_m[sel] * 1e6,
            s=14,
            color=color,
            marker=marker,
            alpha=0.75,
            label=f"cycle {c} (n={int(sel.sum())})",
        )


def plot_gap_scatter(gaps: GapData, path: str | Path, *, title: str = "") -> Path:
    """Average gap per particle versus effective radius, one colour per cycle (Fig. 2b)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2), constrained_layout=True)
    _scatter(ax, gaps)
    ax.set_xlabel("effective particle radius (um)")
    ax.set_ylabel("average gap Si surface - CBD (um)")
    ax.set_title(title or "Gap between Si particles and carbon-black/binder")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_gap_model(
    result: SimulationResult,
    path: str | Path,
    *,
    cycles: Sequence[int] | None = None,
    data: GapData | None = None,
    title: str = "",
) -> Path:
    """Expected gap and +-1 std band versus radius for some cycles, over the data (Fig. 4a)."""
    plt = _pyplot()
    n = result.capacity_retention.size - 1
    shown = [c for c in (cycles or [1, 3, 10]) if 0 <= c <= n] or [n]
    fig, ax = plt.subplots(figsize=(6, 4.2), constrained_layout=True)
    if data is not None:
        _scatter(ax, data)
    r = result.radii * 1e6
    for i, c in enumerate(shown):
        color, _ = _style(c, i)
        mean, std = result.gap_mean[c] * 1e6, result.gap_std[c] * 1e6
        ax.plot(r, mean, color=color, lw=1.8, label=f"model, cycle {c}")
        ax.fill_between(r, np.maximum(mean - std, 0), mean + std, color=color, alpha=0.18, lw=0)
    ax.set_xlabel("effective particle radius (um)")
    ax.set_ylabel("gap (um)")
    ax.set_title(title or "Detachment gap: model mean +- std")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_capacity(
    curves: Mapping[str, np.ndarray], path: str | Path, *, measured: CapacityData | None = None, title: str = ""
) -> Path:
    """Si capacity retention versus cycle for several scenarios (Fig. 4d / inset of 4a)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2), constrained_layout=True)
    for label, cap in curves.items():
        cap = np.asarray(cap)
        ax.plot(
            np.arange(cap.size),
            100 * cap,
            lw=1.8,
            ls="--" if label.startswith("model") else "-",
            label=f"{label} ({100 * cap[-1]:.1f} % after {cap.size - 1})",
        )
    if measured is not None:
        ax.plot(measured.cycle, 100 * measured.capacity_fraction, "k-o", ms=3, label="measured")
    ax.set_xlabel("cycle")
    ax.set_ylabel("Si capacity retention (%)")
    ax.set_ylim(0, 105)
    ax.set_title(title or "Available Si capacity")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_bootstrap(
    samples: np.ndarray, values: Mapping[str, float], ci: Mapping[str, Sequence[float]], path: str | Path
) -> Path:
    """Histograms of the bootstrap replicates of each parameter (paper units) with value and range."""
    plt = _pyplot()
    names = list(values)
    factor = {"alpha0": (1.0, ""), "kappa0": (1e6, " (um)"), "delta0": (1e6, " (um)"), "zeta0": (1e-6, " (1/um)")}
    fig, axes = plt.subplots(1, len(names), figsize=(3 * len(names), 3), constrained_layout=True)
    for ax, (i, name) in zip(np.atleast_1d(axes), enumerate(names)):
        f, unit = factor.get(name, (1.0, ""))
        ax.hist(samples[:, i] * f, bins=30, color="0.7")
        ax.axvline(values[name] * f, color="k")
        for v in ci[name]:
            ax.axvline(v * f, color="tab:red", ls="--")
        ax.set_xlabel(name + unit)
    return _save(fig, path)
