"""Self-contained reports: ``report.html`` (figures embedded as base64 data URIs, no network,
no script) and ``report.md`` beside it, from one description.

:class:`Report` collects headings, paragraphs, tables, figures and the provenance;
:meth:`Report.write` writes both files atomically. The builders :func:`metrics_report`,
:func:`diffusion_report` and :func:`demo_report` fill it for ``fem-anode metrics``,
``fem-anode diffusion`` and ``fem-anode demo``, with the paper's values (:data:`PAPER`, Vorauer
et al., Commun. Chem. 3, 141 (2020)) side by side where the paper gives them.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "PAPER",
    "BrowserCheck",
    "Report",
    "browser_check",
    "demo_report",
    "diffusion_report",
    "find_chromium",
    "metrics_report",
]

#: The numbers of Vorauer et al. (2020) the reports compare with (SI units in the keys' names).
PAPER: dict[str, Any] = {
    "citation": "Vorauer et al., Commun. Chem. 3, 141 (2020)",
    # Fig. 4e: pore vol% per slice over ~500 FIB-SEM slices of the pristine anode
    "pore_percent_per_slice": {"mean": 37.54, "max": 44.65, "min": 28.36},
    # Results (micro-SCT, Fig. 5): pore volume and intermediate (SEI/CBD) domain vs pristine
    "pore_volume_change_percent": {"3 cycles": -37.2, "100 cycles": -58.8, "300 cycles": -76.5},
    "intermediate_volume_change_percent": {"3 cycles": 21.8, "100 cycles": 33.3, "300 cycles": 38.2},
    # Fig. 6c: the pore surface area drops by about 40 % in the first three cycles
    "pore_surface_change_percent_3_cycles": -40.0,
    # Fig. 7: Si surface to pore distance d_H, pristine -> 300 cycles
    "d_H_mean_m": {"pristine": 3.62e-6, "300 cycles": 5.37e-6},
    "d_H_max_m": {"pristine": 12.73e-6, "300 cycles": 17.53e-6},
    # Fig. 8: regions I-IV of the aged ROI
    "fig8_order": ["I", "II", "III", "IV"],
    "fig8_region_I_t90_below_s": 10.0,
    "fig8_t_end_s": 100.0,
    "fig8_elements": 430_000,
    "fig8_element_degree": 2,
}

_STYLE = """
body{font-family:DejaVu Sans,Arial,sans-serif;max-width:1200px;margin:1.5em auto;padding:0 1em;color:#222;
background:#fff}
h1{font-size:1.6em;border-bottom:2px solid #1f4fd6;padding-bottom:.2em}
h2{font-size:1.25em;margin-top:1.6em;color:#1f3f9a}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}
th,td{border:1px solid #bbb;padding:.25em .6em;text-align:left}
th{background:#eef2fb}td.num{text-align:right;font-variant-numeric:tabular-nums}
figure{margin:1em 0}figure img{max-width:100%;height:auto;border:1px solid #ddd}
figcaption{font-size:.9em;color:#444;margin-top:.3em}
.note{color:#555;font-size:.92em}.missing{color:#a00}pre{background:#f6f6f6;padding:.6em;overflow-x:auto;font-size:.82em}
"""


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}".replace(",", " ")
    if isinstance(value, float):
        return "-" if not math.isfinite(value) else f"{value:.{digits}g}"
    return str(value)


def _extremes(results: Mapping[str, Any]) -> str | None:
    """A diffusion run's lowest and highest c over its steps, with their times (None if not recorded)."""
    low, high = results.get("min_c"), results.get("max_c")
    if not isinstance(low, dict) or not isinstance(high, dict):
        return None
    return (
        f"{_fmt(low.get('c'))} (t = {_fmt(low.get('t_s'), 3)}) / {_fmt(high.get('c'))} (t = {_fmt(high.get('t_s'), 3)})"
    )


def _pct(value: float | None, signed: bool = False) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{100 * value:+.2f} %" if signed else f"{100 * value:.2f} %"


def _scaled(value: float | None, factor: float) -> str:
    return "-" if value is None else _fmt(value * factor)


def _um(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e6:.3g} um"


@dataclass
class Report:
    """A report as a list of blocks; written as HTML (self-contained) and Markdown.

    Args:
        title: the page title.
        directory: the directory the report is written to (figure paths are relative to it).
    """

    title: str
    directory: Path
    blocks: list[tuple[str, Any]] = field(default_factory=list)

    def heading(self, text: str) -> None:
        self.blocks.append(("h2", text))

    def paragraph(self, text: str, *, note: bool = False) -> None:
        self.blocks.append(("note" if note else "p", text))

    def table(self, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        self.blocks.append(("table", (list(header), [list(r) for r in rows])))

    def figure(self, path: str | Path, caption: str) -> bool:
        """Add the PNG at ``path`` (relative to the report's directory); False if it is missing."""
        path = Path(path)
        if not (self.directory / path).is_file():
            return False
        self.blocks.append(("figure", (path, caption)))
        return True

    def figures3d(self, folder: str | Path = ".") -> int:
        """Add the 3D figures listed in ``folder/figures3d.json`` (see :mod:`fem_anode.io.render3d`)."""
        manifest = self.directory / folder / "figures3d.json"
        if not manifest.is_file():
            return 0
        added = 0
        for record in json.loads(manifest.read_text()):
            added += self.figure(Path(folder) / record["file"], f"{record['title']}. {record['caption']}")
        return added

    def provenance(self, record: Mapping[str, Any] | None) -> None:
        """The provenance record of the run (version, command, time, ranks, library versions, seeds)."""
        if not record:
            return
        self.heading("Provenance")
        rows = [
            [key, record.get(key)]
            for key in ("fem_anode_version", "command", "argv", "created_utc", "ranks", "platform", "seeds")
            if record.get(key) not in (None, {}, "")
        ]
        rows += [[f"version {name}", version] for name, version in (record.get("versions") or {}).items()]
        self.table(["item", "value"], rows)
        config = record.get("configuration")
        if config:
            self.blocks.append(("pre", json.dumps(config, indent=1, default=str)[:20000]))

    # ------------------------------------------------------------------ output

    def to_html(self) -> str:
        esc = html.escape
        parts = [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{esc(self.title)}</title><style>{_STYLE}</style></head><body>",
            f"<h1>{esc(self.title)}</h1>",
        ]
        for kind, content in self.blocks:
            if kind == "h2":
                parts.append(f"<h2>{esc(content)}</h2>")
            elif kind in ("p", "note"):
                attribute = ' class="note"' if kind == "note" else ""
                parts.append(f"<p{attribute}>{esc(content)}</p>")
            elif kind == "pre":
                parts.append(f"<pre>{esc(content)}</pre>")
            elif kind == "table":
                header, rows = content
                cells = "".join(f"<th>{esc(str(h))}</th>" for h in header)
                body = "".join("<tr>" + "".join(_td(v) for v in row) + "</tr>" for row in rows)
                parts.append(f"<table><thead><tr>{cells}</tr></thead><tbody>{body}</tbody></table>")
            elif kind == "figure":
                path, caption = content
                data = base64.b64encode((self.directory / path).read_bytes()).decode("ascii")
                parts.append(
                    f'<figure><img src="data:image/png;base64,{data}" alt="{esc(path.name)}">'
                    f"<figcaption><b>{esc(path.as_posix())}</b>: {esc(caption)}</figcaption></figure>"
                )
        parts.append("</body></html>")
        return "\n".join(parts) + "\n"

    def to_markdown(self) -> str:
        lines = [f"# {self.title}", ""]
        for kind, content in self.blocks:
            if kind == "h2":
                lines += [f"## {content}", ""]
            elif kind in ("p", "note"):
                lines += [content if kind == "p" else f"*{content}*", ""]
            elif kind == "pre":
                lines += ["```", content, "```", ""]
            elif kind == "table":
                header, rows = content
                lines.append("| " + " | ".join(str(h) for h in header) + " |")
                lines.append("|" + "---|" * len(header))
                lines += ["| " + " | ".join(_fmt(v).replace("|", "/") for v in row) + " |" for row in rows]
                lines.append("")
            elif kind == "figure":
                path, caption = content
                lines += [f"![{path.name}]({path.as_posix()})", "", f"*{caption}*", ""]
        return "\n".join(lines) + "\n"

    def write(self, name: str = "report") -> tuple[Path, Path]:
        """Write ``name.html`` and ``name.md`` into the report's directory (atomically)."""
        from fem_anode.io.output import write_text_atomic

        html_path = write_text_atomic(self.directory / f"{name}.html", self.to_html())
        md_path = write_text_atomic(self.directory / f"{name}.md", self.to_markdown())
        return Path(html_path), Path(md_path)


def _td(value: Any) -> str:
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    return f'<td class="num">{html.escape(_fmt(value))}</td>' if numeric else f"<td>{html.escape(_fmt(value))}</td>"


# ----------------------------------------------------------------------------- metrics


def _metrics_tables(report: Report, samples: Mapping[str, Mapping[str, Any]], pore_phase: str) -> None:
    """Key numbers of one or more samples, with the paper's values where it gives them."""
    names = list(samples)
    report.heading("Phase fractions")
    phases = sorted({p for m in samples.values() for p in m.get("phase_fractions", {})})
    report.table(["phase", *names], [[p, *(_pct(samples[n]["phase_fractions"].get(p)) for n in names)] for p in phases])
    report.heading(f"Per-slice {pore_phase} fraction (paper Fig. 4e)")
    rows = []
    for stat in ("mean", "max", "min"):
        rows.append(
            [
                stat,
                *(_pct((samples[n].get("per_slice", {}).get(pore_phase) or {}).get(stat)) for n in names),
                f"{PAPER['pore_percent_per_slice'][stat]:.2f} %",
            ]
        )
    report.table(["statistic", *names, "paper (pristine, FIB-SEM, ~500 slices)"], rows)
    report.heading("Pore network and Si")
    rows = [
        ["pore surface area (um^2)", *(_scaled(samples[n].get("pore_surface_area_m2"), 1e12) for n in names), "-"],
        [
            "mean geodesic tortuosity",
            *(_fmt((samples[n].get("tortuosity") or {}).get("mean")) for n in names),
            "rises with depth after cycling (Fig. 6a)",
        ],
        [
            "unreachable pore voxels",
            *(
                _pct(((samples[n].get("tortuosity") or {}).get("unreachable_fraction") or {}).get("overall"))
                for n in names
            ),
            "-",
        ],
        [
            "mean pore channels per slice",
            *(_fmt((samples[n].get("connections_per_depth") or {}).get("mean")) for n in names),
            "> 600 pristine, single digits at 24 um after 300 cycles (Fig. 6b)",
        ],
        [
            "mean Si-surface-to-pore distance d",
            *(_um((samples[n].get("pore_si_distance") or {}).get("mean_m")) for n in names),
            f"{_um(PAPER['d_H_mean_m']['pristine'])} pristine, {_um(PAPER['d_H_mean_m']['300 cycles'])} after 300 "
            "cycles (Fig. 7)",
        ],
        [
            "max Si-surface-to-pore distance",
            *(_um((samples[n].get("pore_si_distance") or {}).get("max_m")) for n in names),
            f"{_um(PAPER['d_H_max_m']['pristine'])} pristine, {_um(PAPER['d_H_max_m']['300 cycles'])} after 300 cycles",
        ],
        ["Si particles", *(_fmt((samples[n].get("si_particles") or {}).get("count")) for n in names), "-"],
        [
            "Si mean equivalent diameter",
            *(_um((samples[n].get("si_particles") or {}).get("mean_equivalent_diameter_m")) for n in names),
            "0.90 um pristine, 0.33 um after 100 cycles (FIB-SEM ROI, Fig. 4)",
        ],
    ]
    taus = [samples[n].get("tortuosity_factor") for n in names]
    if any(taus):
        rows.append(["tortuosity factor tau = eps D / D_eff (z)", *(_fmt(t) if t else "-" for t in taus), "-"])
    report.table(["quantity", *names, "paper"], rows)


def _change_table(
    report: Report, change: Mapping[str, Any], label: str, pore_phase: str, intermediate: str = "sei"
) -> None:
    report.heading(f"Change of {label} relative to the reference (paper Figs. 5-7)")
    volume = change.get("phase_volume") or {}
    pore = ", ".join(f"{k} {v:+.1f} %" for k, v in PAPER["pore_volume_change_percent"].items())
    inter = ", ".join(f"{k} {v:+.1f} %" for k, v in PAPER["intermediate_volume_change_percent"].items())
    rows = [[f"{pore_phase} volume", _pct(volume.get(pore_phase), signed=True), pore]]
    if intermediate in volume:
        rows.append(
            [f"{intermediate} (intermediate domain) volume", _pct(volume.get(intermediate), signed=True), inter]
        )
    rows += [
        [f"{name} volume", _pct(v, signed=True), "-"]
        for name, v in volume.items()
        if name not in (pore_phase, intermediate)
    ]
    if "pore_surface_area" in change:
        rows.append(
            [
                "pore surface area (per volume)",
                _pct(change["pore_surface_area"], signed=True),
                f"about {PAPER['pore_surface_change_percent_3_cycles']:+.0f} % after 3 cycles",
            ]
        )
    paper_d = PAPER["d_H_mean_m"]["300 cycles"] / PAPER["d_H_mean_m"]["pristine"] - 1
    rows.append(
        [
            "mean Si-surface-to-pore distance",
            _pct(change.get("pore_si_distance_mean_m"), signed=True),
            f"{100 * paper_d:+.1f} % (300 cycles)",
        ]
    )
    rows.append(["mean tortuosity", _pct(change.get("tortuosity_mean"), signed=True), "increases"])
    rows.append(
        ["mean pore channels per slice", _pct(change.get("connections_per_depth_mean"), signed=True), "decreases"]
    )
    report.table(["quantity", label, "paper (vs pristine)"], rows)


def metrics_report(
    directory: str | Path,
    metrics: Mapping[str, Any],
    *,
    label: str = "sample",
    reference: Mapping[str, Any] | None = None,
    reference_label: str = "reference",
    pore_phase: str = "pore",
    provenance: Mapping[str, Any] | None = None,
) -> tuple[Path, Path]:
    """``report.html`` and ``report.md`` of ``fem-anode metrics`` in ``directory`` (which holds
    its PNG figures): key numbers next to the paper's, 2D and 3D figures, provenance."""
    directory = Path(directory)
    report = Report(f"fem_anode image metrics: {label}", directory)
    image = metrics.get("image", {})
    report.paragraph(
        f"{label}: {image.get('ndim', '?')}D image of shape {' x '.join(map(str, image.get('shape', [])))} voxels, "
        f"voxel size {', '.join(f'{h * 1e9:.4g} nm' for h in image.get('voxel_size_m', []))}. Paper values: "
        f"{PAPER['citation']}; they describe the paper's samples, and compare with this image only as far as it images "
        "the same kind of electrode."
    )
    samples = {reference_label: reference, label: metrics} if reference is not None else {label: metrics}
    _metrics_tables(report, samples, pore_phase)
    if metrics.get("relative_change"):
        _change_table(report, metrics["relative_change"], label, pore_phase)
    report.heading("Figures")
    for name, caption in (
        ("per_slice.png", "Phase fractions per slice (dashed: mean)."),
        ("tortuosity.png", "Mean geodesic tortuosity vs depth and the unreachable share (cf. Fig. 6a)."),
        ("tortuosity_map.png", "Tortuosity on the central x-z section (white: unreachable; cf. Fig. 5c)."),
        ("connections.png", "Pore channels per slice (cf. Fig. 6b)."),
        ("pore_si_distance.png", "Distribution of the Si-surface-to-pore distance (dashed: mean; cf. Fig. 7)."),
        ("si_size_distribution.png", "Si particle equivalent diameters."),
        ("si_per_slice.png", "Si particle sections per unit area per slice (cf. Fig. 4d)."),
    ):
        report.figure(name, caption)
    if not report.figures3d("."):
        report.paragraph("No 3D figures (2D image, --no-render, or no rendering backend: see the log).", note=True)
    report.provenance(provenance)
    return report.write()


# ----------------------------------------------------------------------------- diffusion


def _fig8_comparison(report: Report, results: Mapping[str, Any]) -> None:
    """Region ordering and timescale against the paper's Fig. 8."""
    t90 = results.get("t90_s") or {}
    regions = results.get("regions") or {}
    times = results.get("times") or []
    names = list(regions)
    reached = {k: v for k, v in t90.items() if v is not None and k in regions}
    order_t90 = sorted(reached, key=lambda k: reached[k]) + [k for k in names if k not in reached]
    first = {k: v[0] for k, v in regions.items() if v}
    order_c = sorted(first, key=lambda k: -first[k])
    paper_order = [r for r in PAPER["fig8_order"] if r in names]
    rows = [
        [
            "regions from fastest to slowest (t90)",
            " > ".join(order_t90) or "-",
            " > ".join(PAPER["fig8_order"]) + " (I fastest, IV slowest)",
        ],
        [
            f"regions by c at the first output time ({_fmt(times[0]) if times else '-'} s)",
            " > ".join(order_c) or "-",
            "-",
        ],
        [
            "same ordering as the paper",
            _fmt(order_t90[: len(paper_order)] == paper_order) if paper_order else "regions not named I-IV",
            "-",
        ],
        [
            "t90 of region I",
            f"{_fmt(t90.get('I'))} s" if "I" in t90 else "-",
            f"< {PAPER['fig8_region_I_t90_below_s']:g} s",
        ],
        [
            "simulated time",
            f"{_fmt(results.get('t_reached_s', times[-1] if times else None))} s",
            f"{PAPER['fig8_t_end_s']:g} s",
        ],
        [
            "elements",
            _fmt(results.get("ncells")) + (f" (P{results['element_degree']})" if results.get("element_degree") else ""),
            f"{PAPER['fig8_elements']:,} (P{PAPER['fig8_element_degree']})".replace(",", " "),
        ],
    ]
    scales = results.get("timescales")
    if scales:
        rows.append(
            [
                "diffusion time eps L^2 / D_eff of the farthest point",
                f"{_fmt(scales['diffusion_time_s'])} s (L = {_um(scales['length_m'])})",
                "-",
            ]
        )
        rows.append(["Biot number k_f L / D_eff", _fmt(scales["biot_number"]), "-"])
    report.table(["Fig. 8", "this run", "paper"], rows)
    if scales and scales["diffusion_time_s"] < 0.1 * PAPER["fig8_region_I_t90_below_s"]:
        report.paragraph(
            "With these parameters the diffusion time of the farthest point is far below the paper's 2-100 s: every "
            "region saturates long before the paper's output times. The region ordering can be compared; the "
            "paper's timescale is not reproduced, and the physics is not tuned to match it.",
            note=True,
        )


def _diffusion_tables(report: Report, results: Mapping[str, Any]) -> None:
    settings = results.get("settings") or {}
    physics = settings.get("physics") or {}
    report.heading("Run")
    rows: list[list[Any]] = [
        ["status", results.get("status")],
        ["cells", results.get("ncells")],
        ["dofs", results.get("ndofs")],
        ["element degree", results.get("element_degree")],
        ["ranks", results.get("ranks")],
        ["time steps", results.get("steps")],
        ["factorisations", results.get("factorisations")],
        ["mass-balance relative error", results.get("mass_balance_rel_error")],
        ["final c min / max (mol/m^3)", f"{_fmt(results.get('final_min_c'))} / {_fmt(results.get('final_max_c'))}"],
        ["c min / max over the run (mol/m^3, at t in s)", _extremes(results)],
        ["wall time (s)", results.get("wall_time_s")],
        *[[f"physics.{k}", v] for k, v in physics.items()],
    ]
    report.table(["quantity", "value"], [row for row in rows if row[1] is not None and row[1] != "- / -"])
    regions = results.get("regions") or {}
    times = results.get("times") or []
    if regions:
        report.heading("Mean c per region (mol/m^3)")
        t90 = results.get("t90_s") or {}
        report.table(
            ["region", "t90 (s)", *(f"t = {t:g} s" for t in times)],
            [
                [name, t90.get(name) if t90.get(name) is not None else "not reached", *values]
                for name, values in regions.items()
            ],
        )


def diffusion_report(
    directory: str | Path, results: Mapping[str, Any], *, provenance: Mapping[str, Any] | None = None
) -> tuple[Path, Path]:
    """``report.html`` and ``report.md`` of a diffusion run in its output directory."""
    directory = Path(directory)
    if provenance is None and (directory / "provenance.json").is_file():
        provenance = json.loads((directory / "provenance.json").read_text())
    report = Report("fem_anode Li diffusion", directory)
    report.paragraph(
        f"Transient Li diffusion in the SEI/C/B domain with pore mass-transfer boundaries ({PAPER['citation']}, Fig. "
        "8)."
    )
    _diffusion_tables(report, results)
    report.heading("Comparison with the paper's Fig. 8")
    _fig8_comparison(report, results)
    report.heading("Figures")
    report.figure("c_fields.png", "c over the image at the output times (middle section of a 3D image); regions boxed.")
    report.figure("c_regions.png", "Mean c(t) / c_bulk per region (cf. Fig. 8b).")
    report.figures3d(".")
    report.provenance(provenance)
    return report.write()


# ----------------------------------------------------------------------------- demo


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _mesh_independence(report: Report, study: Mapping[str, Any]) -> None:
    """The demo's mesh-independence check: one row per level, the chosen level, the paper's count."""
    report.heading("Mesh independence (cf. paper Supplementary Note 4)")
    levels = study.get("levels")
    if not isinstance(levels, list) or not all(isinstance(level, Mapping) for level in levels):
        report.blocks.append(("pre", json.dumps(study, indent=1, default=str)[:8000]))
        return
    report.paragraph(
        f"{study.get('element', 'elements')}; criterion: {study.get('criterion', '?')}, tolerance "
        f"{_pct(study.get('tolerance'))}. Chosen level {study.get('chosen_level')} with "
        f"{_fmt(study.get('chosen_cells'))} cells"
        + (" (mesh independent)" if study.get("mesh_independent") else " (tolerance not reached: the finest level)")
        + f"; the paper used {_fmt(study.get('paper_cells', PAPER['fig8_elements']))} P2 elements."
    )
    report.table(
        ["level", "H (nm)", "cells", "dofs", "largest change to next level", "quantity", "wall time (s)"],
        [
            [
                level.get("level"),
                None if level.get("H_m") is None else level["H_m"] * 1e9,
                level.get("cells"),
                level.get("dofs"),
                _pct(level.get("largest_change_to_next")),
                level.get("quantity_with_largest_change"),
                level.get("wall_time_s"),
            ]
            for level in levels
        ],
    )
    if study.get("why_fewer_than_paper"):
        report.paragraph(str(study["why_fewer_than_paper"]), note=True)


def demo_report(directory: str | Path, summary: Mapping[str, Any], *, name: str = "report") -> tuple[Path, Path]:
    """``NAME.html`` and ``NAME.md`` of ``fem-anode demo`` in its output directory (reads
    ``metrics/*.json`` and the figures there)."""
    directory = Path(directory)
    report = Report("fem_anode demo report", directory)
    provenance = summary.get("provenance") or {}
    report.paragraph(
        f"Created {provenance.get('created_utc', '?')} by fem_anode {provenance.get('fem_anode_version', '?')}. "
        f"Paper values: {PAPER['citation']}. The examples are synthetic (seeded) volumes and a bundled real "
        "electrode volume, not the paper's samples: the comparison shows the quantities side by side, not a fit."
    )
    examples = summary.get("examples") or {}
    metrics = {example: _load(directory / "metrics" / f"{example}.json") for example in examples}
    report.heading("Image metrics")
    report.table(
        ["example", "shape", "phase fractions"],
        [
            [
                example,
                " x ".join(map(str, info.get("shape", []))),
                ", ".join(f"{k} {100 * v:.1f} %" for k, v in (info.get("phase_fractions") or {}).items()),
            ]
            for example, info in examples.items()
        ],
    )
    present = {k: m for k, m in metrics.items() if m is not None}
    if present:
        _metrics_tables(report, present, "pore")
    change = summary.get("ageing_relative_change") or {}
    if change:
        report.heading("Ageing: synthetic aged vs pristine volume (cf. paper Fig. 5)")
        pore = ", ".join(f"{k} {v:+.1f} %" for k, v in PAPER["pore_volume_change_percent"].items())
        inter = ", ".join(f"{k} {v:+.1f} %" for k, v in PAPER["intermediate_volume_change_percent"].items())
        rows = [
            [f"{phase} volume", _pct(v, signed=True), pore if phase == "pore" else inter if phase == "sei" else "-"]
            for phase, v in change.items()
        ]
        pristine, aged = present.get("anode_pristine"), present.get("anode_aged")
        if pristine and aged:
            d0, d1 = ((m.get("pore_si_distance") or {}).get("mean_m") for m in (pristine, aged))
            rows.append(
                [
                    "mean Si-surface-to-pore distance",
                    f"{_um(d0)} -> {_um(d1)}",
                    f"{_um(PAPER['d_H_mean_m']['pristine'])} -> {_um(PAPER['d_H_mean_m']['300 cycles'])} (pristine -> "
                    "300 cycles)",
                ]
            )
        report.table(["quantity", "aged vs pristine", "paper (vs pristine)"], rows)
    mesh = summary.get("mesh")
    if mesh:
        report.heading("Mesh")
        report.table(
            ["item", "value"],
            [[k, v if not isinstance(v, (dict, list)) else json.dumps(v, default=str)[:300]] for k, v in mesh.items()]
            + [
                [
                    "paper",
                    f"{PAPER['fig8_elements']:,} P2 elements (mesh-independence study, Supplementary Note 4)".replace(
                        ",", " "
                    ),
                ]
            ],
        )
    study = summary.get("mesh_independence")
    if study:
        _mesh_independence(report, study)
    diffusion = summary.get("diffusion")
    if diffusion:
        report.heading("Li diffusion in the ROI (paper Fig. 8 set-up)")
        _diffusion_tables(report, diffusion)
        report.heading("Comparison with the paper's Fig. 8")
        _fig8_comparison(report, diffusion)
    report.heading("Figures")
    for example in examples:
        report.figure(
            Path("figures") / f"{example}_per_slice.png", f"{example}: phase fractions per slice (dashed: mean)."
        )
    report.figure(
        Path("diffusion") / "c_fields.png", "c over the ROI at the output times; regions I-IV boxed (cf. Fig. 8a)."
    )
    report.figure(Path("diffusion") / "c_regions.png", "Mean c(t) / c_bulk per region (cf. Fig. 8b).")
    for folder in sorted(p.parent.relative_to(directory) for p in directory.rglob("figures3d.json")):
        report.figures3d(folder)
    report.provenance(provenance)
    return report.write(name)


# ----------------------------------------------------------------------------- browser check

#: Added to a copy of the page: marks every image loaded or not once the page has loaded.
_PROBE = (
    '<script>window.addEventListener("load",function(){var n=0,im=document.images;for(var i=0;i<im.length;i++){'
    'var ok=im[i].complete&&im[i].naturalWidth>0;im[i].setAttribute("data-loaded",ok?"yes":"no");if(ok)n++;}'
    'document.body.setAttribute("data-images",im.length+":"+n);});</script>'
)


@dataclass
class BrowserCheck:
    """What headless Chromium made of a page: image count, images loaded, screenshot (PNG path)."""

    images: int
    loaded: int
    screenshot: Path

    @property
    def broken(self) -> int:
        return self.images - self.loaded


def find_chromium() -> str | None:
    """The Chromium executable (``chromium``, ``chromium-browser`` or ``/usr/bin/chromium``), or ``None``."""
    import shutil

    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None


def browser_check(
    page: str | Path, work: str | Path, *, width: int = 1200, height: int = 2400, timeout_s: float = 120.0
) -> BrowserCheck:
    """Open ``page`` in headless Chromium (no network needed): count the images that loaded
    (``complete && naturalWidth > 0`` after the load event, read back with ``--dump-dom`` from a
    copy of the page with a probe script) and take a screenshot (``work/<page>.png``).

    Raises:
        RuntimeError: no Chromium, or the page did not load.
    """
    import re
    import subprocess

    chromium = find_chromium()
    if chromium is None:
        raise RuntimeError("chromium is not installed (Debian: apt-get install chromium)")
    page, work = Path(page).resolve(), Path(work)
    work.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> str:
        command = [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--no-first-run",
            f"--user-data-dir={work / 'chromium-profile'}",
            *args,
        ]
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False).stdout

    probe = work / f"{page.stem}.probe.html"
    probe.write_text(page.read_text().replace("</body>", _PROBE + "</body>"))
    found = re.search(
        r'data-images="(\d+):(\d+)"', run("--virtual-time-budget=10000", "--dump-dom", probe.resolve().as_uri())
    )
    probe.unlink()
    if not found:
        raise RuntimeError(f"{page}: the page did not finish loading in Chromium")
    shot = work / f"{page.stem}.png"
    run(f"--screenshot={shot}", f"--window-size={width},{height}", page.as_uri())
    return BrowserCheck(int(found.group(1)), int(found.group(2)), shot)
