"""Markdown tables of the latest benchmark results (benchmarks/results/*.json).

Usage::

    .venv/bin/python benchmarks/report.py            # all benchmarks
    .venv/bin/python benchmarks/report.py diffusion  # one

For each benchmark the most recent row per case (and rank count) is shown, with the command of
the run it came from and the machine load (1/5/15-minute averages) when it was measured.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"

COLUMNS = {
    "diffusion": [
        "case",
        "geometric_levels",
        "ranks",
        "ndofs",
        "solver",
        "factorisations",
        "setup_s",
        "step_s",
        "cg_its",
        "cg_its_mean",
        "dofs_per_s",
        "step_over_bw",
        "skfem_solver",
        "skfem_step_s",
        "speedup_step",
        "speedup_total",
        "max_mean_diff",
        "load",
    ],
    "tortuosity": [
        "size",
        "ranks",
        "dofs",
        "tau",
        "cg_its",
        "total_s",
        "taufactor_tau",
        "taufactor_s",
        "porespy_tau",
        "porespy_s",
        "taufactor_over_ours",
        "porespy_over_ours",
        "load",
    ],
    "metrics": [
        "size",
        "metric",
        "time_s",
        "porespy_s",
        "porespy_over_ours",
        "peak_rss_mb",
        "porespy_peak_rss_mb",
        "load",
    ],
    "meshing": ["case", "method", "elements", "time_s", "elements_per_s", "load"],
    "phasefield": [
        "size_m",
        "ranks",
        "unknowns",
        "half_cycle",
        "steps",
        "newton_its",
        "newton_per_step",
        "s_per_newton",
        "half_cycle_s",
        "load",
    ],
}
KEYS = {
    "diffusion": ("case", "ranks"),
    "tortuosity": ("size", "ranks"),
    "metrics": ("size", "metric"),
    "meshing": ("case", "method"),
    "phasefield": ("size_m", "ranks", "half_cycle"),
}


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, list):
        return "/".join(fmt(v) for v in value)
    return str(value)


def table(name: str) -> str:
    path = RESULTS / f"{name}.json"
    if not path.exists():
        return f"(no results for {name})\n"
    latest: dict[tuple, tuple[dict, str]] = {}
    for run in json.loads(path.read_text()):
        for row in run["rows"]:
            if "values" in row:
                continue
            key = tuple(row.get(k) for k in KEYS[name])
            if name == "diffusion":  # with and without scikit-fem, extra PETSc options, step ramp: all shown
                key += ("skfem_step_s" in row, row["solver"].endswith("+opts"), row.get("geometric_levels", 0))
            latest[key] = (row, run["command"])
    columns = COLUMNS[name]
    lines = ["| " + " | ".join(columns) + " | command |", "|" + "---|" * (len(columns) + 1)]
    for row, command in latest.values():
        lines.append("| " + " | ".join(fmt(row.get(c)) for c in columns) + f" | `{command}` |")
    return "\n".join(lines) + "\n"


def main() -> None:
    names = sys.argv[1:] or list(COLUMNS)
    for name in names:
        print(f"### {name}\n")
        print(table(name))


if __name__ == "__main__":
    main()
