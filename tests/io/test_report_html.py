"""Self-contained HTML reports (fem_anode.io.report_html), checked in a real browser.

Headless Chromium opens each report (:func:`fem_anode.io.report_html.browser_check`): every <img>
must load (complete and naturalWidth > 0, read back through --dump-dom with a load-event script
added to a copy of the page) and the page screenshot must not be blank. A page with a broken
image must fail the same check.
"""

from __future__ import annotations

import base64
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from fem_anode.io import VoxelImage, write_image
from fem_anode.io.report_html import PAPER, Report, browser_check, diffusion_report, find_chromium, metrics_report

needs_chromium = pytest.mark.skipif(
    find_chromium() is None, reason="chromium not installed (scripts/setup.sh installs it)"
)


def _packed(rgb: np.ndarray) -> np.ndarray:
    """One integer per pixel (0xRRGGBB): np.unique on it is fast, unlike np.unique(axis=0)."""
    rgb = rgb.astype(np.uint32)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def _rank0_only() -> None:
    rank = int(os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("PMI_RANK", "0")))
    if rank != 0:
        pytest.skip("the browser check runs on rank 0 only")


def check_page(page: Path, work: Path, **size: int) -> tuple[int, int, np.ndarray]:
    """``(images, images loaded, screenshot RGB)`` of ``page`` in headless Chromium."""
    from PIL import Image

    result = browser_check(page, work, **size)
    with Image.open(result.screenshot) as im:
        return result.images, result.loaded, np.asarray(im.convert("RGB"))


def _png(path: Path, colour: tuple[int, int, int]) -> Path:
    from PIL import Image

    data = np.zeros((40, 60, 3), dtype=np.uint8)
    data[:, :30] = colour
    Image.fromarray(data).save(path)
    return path


# ----------------------------------------------------------------------------- the page itself


def test_report_is_self_contained_and_escaped(tmp_path):
    _png(tmp_path / "a.png", (200, 30, 30))
    report = Report("T <1>", tmp_path)
    report.heading("numbers & <tags>")
    report.paragraph("x < y and <script>alert(1)</script>")
    report.table(["k", "v"], [["pi", 3.14159265], ["n", 1234567], ["none", None]])
    assert report.figure("a.png", "a red half")
    assert not report.figure("missing.png", "never there")
    html_path, md_path = report.write()
    page = html_path.read_text()
    assert "<script>" not in page and "&lt;script&gt;" in page and "<h2>numbers &amp; &lt;tags&gt;</h2>" in page
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == 1 and sources[0].startswith("data:image/png;base64,")
    assert base64.b64decode(sources[0].split(",", 1)[1]) == (tmp_path / "a.png").read_bytes()
    assert not re.search(r'(href|src)="(https?:|//)', page) and "<link" not in page  # nothing from the network
    assert ">3.142<" in page and ">1 234 567<" in page
    markdown = md_path.read_text()
    assert "![a.png](a.png)" in markdown and "| pi | 3.142 |" in markdown and "missing.png" not in markdown


def _small_volume() -> VoxelImage:
    from fem_anode.imaging.synthetic import anode_volume

    return anode_volume(shape=(12, 20, 20), seed=2)


def test_metrics_report_has_the_papers_values(tmp_path):
    from fem_anode.imaging.metrics import compute_metrics

    pristine = compute_metrics(_small_volume())
    aged = compute_metrics(_small_volume(), reference=pristine)
    html_path, md_path = metrics_report(tmp_path, aged, label="aged", reference=pristine, reference_label="pristine")
    text = md_path.read_text()
    for value in (
        "37.54 %",
        "44.65 %",
        "28.36 %",
        "3.62 um",
        "5.37 um",
        "-37.2 %",
        "-58.8 %",
        "-76.5 %",
        "+21.8 %",
        "12.7 um",
        "17.5 um",
    ):
        assert value in text, value
    pore = 100 * aged["per_slice"]["pore"]["mean"]
    assert f"| mean | {pore:.2f} % | {pore:.2f} % | 37.54 % |" in text  # same image twice: same numbers side by side
    assert "| pore volume | +0.00 % |" in text
    assert "<img" not in html_path.read_text()  # no figures in this directory


def test_fig8_comparison_reads_the_region_ordering(tmp_path):
    results = {
        "times": [2.0, 10.0, 100.0],
        "t_reached_s": 100.0,
        "ncells": 1000,
        "element_degree": 2,
        "regions": {"I": [900, 990, 1000], "II": [800, 950, 1000], "III": [600, 900, 1000], "IV": [300, 700, 990]},
        "t90_s": {"I": 1.5, "II": 4.0, "III": 10.0, "IV": 60.0, "domain": 8.0},
    }
    text = diffusion_report(tmp_path, results)[1].read_text()
    assert "| regions from fastest to slowest (t90) | I > II > III > IV |" in text
    assert "| same ordering as the paper | yes |" in text and "| t90 of region I | 1.5 s | < 10 s |" in text
    assert f"| elements | 1 000 (P2) | {PAPER['fig8_elements']:,} (P2) |".replace(",", " ") in text
    results["t90_s"] = {"I": 60.0, "II": 4.0, "III": None, "IV": 1.0}
    text = diffusion_report(tmp_path, results)[1].read_text()
    assert (
        "| regions from fastest to slowest (t90) | IV > II > I > III |" in text
        and "| same ordering as the paper | no |" in text
    )


# ----------------------------------------------------------------------------- in the browser


@needs_chromium
def test_browser_fails_a_broken_image(tmp_path):
    """The check can fail: a page whose image data is corrupt has a broken image."""
    _rank0_only()
    report = Report("fine", tmp_path)
    _png(tmp_path / "ok.png", (20, 200, 20))
    report.figure("ok.png", "fine")
    page = report.write()[0]
    good = re.search(r'<img src="[^"]*"[^>]*>', page.read_text()).group(0)
    broken = '<img src="data:image/png;base64,AAAA" alt="not a PNG">'
    (tmp_path / "broken.html").write_text(f"<!DOCTYPE html><html><body><h1>x</h1>{good}{broken}</body></html>")
    images, loaded, _ = check_page(tmp_path / "broken.html", tmp_path)
    assert images == 2 and loaded == 1
    images, loaded, _ = check_page(page, tmp_path)
    assert images == loaded == 1


@needs_chromium
def test_demo_report_opens_in_chromium(tmp_path):
    """The demo report from a demo's outputs (summary, metrics and figures made here, small).
    A report with 3D figures in Chromium: tests/io/test_render3d.py (metrics)."""
    _rank0_only()
    from fem_anode.commands.demo import write_report
    from fem_anode.imaging.metrics import compute_metrics
    from fem_anode.imaging.plots import plot_per_slice

    summary = {
        "provenance": {"created_utc": "2026-12-03T00:00:00+00:00", "fem_anode_version": "test", "command": "demo"},
        "examples": {},
    }
    for name, aged in (("anode_pristine", False), ("anode_aged", True)):
        from fem_anode.imaging.synthetic import anode_volume

        image = anode_volume(shape=(10, 16, 16), seed=3, aged=aged)
        metrics = compute_metrics(image)
        write_image(tmp_path / "data" / f"{name}.npy", image)
        (tmp_path / "metrics").mkdir(exist_ok=True)
        (tmp_path / "metrics" / f"{name}.json").write_text(json.dumps(metrics, default=lambda v: None))
        plot_per_slice(metrics["per_slice"], tmp_path / "figures" / f"{name}_per_slice.png", title=name)
        summary["examples"][name] = {"shape": list(image.shape), "phase_fractions": metrics["phase_fractions"]}
    p, a = (summary["examples"][k]["phase_fractions"] for k in ("anode_pristine", "anode_aged"))
    summary["ageing_relative_change"] = {k: a[k] / p[k] - 1 for k in p}
    summary["diffusion"] = {
        "times": [0.01, 2.0],
        "regions": {"I": [990.0, 1000.0], "IV": [900.0, 1000.0]},
        "t90_s": {"I": 0.001, "IV": 0.008},
        "ncells": 100,
        "ndofs": 121,
        "steps": 10,
        "factorisations": 2,
        "mass_balance_rel_error": 1e-9,
        "wall_time_s": 1.0,
        "timescales": {"length_m": 1e-6, "diffusion_time_s": 0.002, "biot_number": 5.0},
    }
    summary["mesh_independence"] = {
        "element": "P2 triangles",
        "tolerance": 0.01,
        "criterion": "largest change",
        "chosen_level": 1,
        "mesh_independent": True,
        "chosen_cells": 2000,
        "paper_cells": 430_000,
        "levels": [
            {
                "level": 0,
                "H_m": 8e-8,
                "cells": 1000,
                "dofs": 2100,
                "largest_change_to_next": 0.02,
                "quantity_with_largest_change": "t90 IV",
            },
            {"level": 1, "H_m": 4e-8, "cells": 2000, "dofs": 4100, "largest_change_to_next": None},
        ],
    }
    write_report(tmp_path / "report.md", summary, render=False)  # 3D figures in a report: see the metrics test
    page = tmp_path / "report.html"
    text = page.read_text()
    assert "## Li diffusion" in (tmp_path / "report.md").read_text() and "37.54" in text and "5.37 um" in text
    markdown = (tmp_path / "report.md").read_text()
    assert "| regions from fastest to slowest (t90) | I > IV |" in markdown
    assert (
        "| 0 | 80 | 1 000 | 2 100 | 2.00 % | t90 IV |" in markdown
        and "Chosen level 1 with 2 000 cells (mesh independent)" in markdown
    )
    images, loaded, shot = check_page(page, tmp_path, height=4000)
    assert images == 2 and loaded == images
    assert len(np.unique(_packed(shot))) > 100
