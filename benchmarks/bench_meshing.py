"""Benchmark 2: meshing speed (elements per second) vs plain gmsh on equivalent geometries.

* 2D: the synthetic FIB-SEM ROI (20 nm pixels) at three sizes, SEI/C/B domain kept, methods
  ``smooth`` (sub-pixel interfaces, gmsh frontal-Delaunay) and ``voxel``; versus plain gmsh
  meshing a rectangle with as many circular holes as the ROI has pores at the same target
  element size (the meshing work, without the image analysis);
* 3D: n^3 volumes (pore/Si/SEI), SEI kept, methods ``voxel`` (hexahedra) and ``tet`` (6 tets
  per voxel), plus the NumPy-only face-connected hex arrays of the tortuosity solver; versus
  gmsh's own structured (transfinite, recombined) hexahedral mesh of a box with the same
  number of cells.

Times cover building the gmsh model (``fem_anode.meshing.build.build_model``), not writing files.

Usage::

    .venv/bin/python benchmarks/bench_meshing.py [--roi-sizes 2,4,8] [--volumes 50,100]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def count_elements(dim: int) -> int:
    import gmsh

    _, tags, _ = gmsh.model.mesh.getElements(dim)
    return int(sum(len(t) for t in tags))


def ours(image, method: str, keep: list[str]) -> tuple[float, int, str]:  # type: ignore[no-untyped-def]
    import gmsh

    from fem_anode.meshing.build import build_model

    gmsh.initialize(interruptible=False)
    gmsh.option.setNumber("General.Terminal", 0)
    try:
        t = time.perf_counter()
        built = build_model(image, method=method, keep=keep)
        elapsed = time.perf_counter() - t
        return elapsed, count_elements(built.gdim), ""
    except Exception as err:  # report and go on: a benchmark, not a test
        return float("nan"), 0, f"{type(err).__name__}: {err}"
    finally:
        gmsh.finalize()


def gmsh_holes(width: float, height: float, holes: int, size: float, seed: int = 0) -> tuple[float, int]:
    """Plain gmsh: rectangle (um) minus ``holes`` random non-overlapping discs, target size."""
    import gmsh

    rng = np.random.default_rng(seed)
    gmsh.initialize(interruptible=False)
    gmsh.option.setNumber("General.Terminal", 0)
    try:
        t = time.perf_counter()
        rect = gmsh.model.occ.addRectangle(0, 0, 0, width, height)
        radius = 0.35 * np.sqrt(width * height / max(holes, 1) / np.pi)
        centres = []
        tries = 0
        while len(centres) < holes and tries < 100 * holes:
            tries += 1
            c = rng.uniform([radius * 1.2, radius * 1.2], [width - radius * 1.2, height - radius * 1.2])
            if all(np.hypot(*(c - d)) > 2.3 * radius for d in centres):
                centres.append(c)
        discs = [(2, gmsh.model.occ.addDisk(c[0], c[1], 0, radius, radius)) for c in centres]
        gmsh.model.occ.cut([(2, rect)], discs)
        gmsh.model.occ.synchronize()
        gmsh.option.setNumber("Mesh.MeshSizeMax", size)
        gmsh.option.setNumber("Mesh.MeshSizeMin", size)
        gmsh.model.mesh.generate(2)
        return time.perf_counter() - t, count_elements(2)
    finally:
        gmsh.finalize()


def gmsh_structured_box(n_cells: int) -> tuple[float, int]:
    """Plain gmsh: transfinite recombined hexahedral mesh of a cube with about ``n_cells`` cells."""
    import gmsh

    m = max(1, round(n_cells ** (1 / 3)))
    gmsh.initialize(interruptible=False)
    gmsh.option.setNumber("General.Terminal", 0)
    try:
        t = time.perf_counter()
        gmsh.model.occ.addBox(0, 0, 0, 1, 1, 1)
        gmsh.model.occ.synchronize()
        for _, tag in gmsh.model.getEntities(1):
            gmsh.model.mesh.setTransfiniteCurve(tag, m + 1)
        for _, tag in gmsh.model.getEntities(2):
            gmsh.model.mesh.setTransfiniteSurface(tag)
            gmsh.model.mesh.setRecombine(2, tag)
        for _, tag in gmsh.model.getEntities(3):
            gmsh.model.mesh.setTransfiniteVolume(tag)
        gmsh.option.setNumber("Mesh.Recombine3DAll", 1)
        gmsh.model.mesh.generate(3)
        return time.perf_counter() - t, count_elements(3)
    finally:
        gmsh.finalize()


def volume(n: int):  # type: ignore[no-untyped-def]
    from fem_anode.io.images import VoxelImage

    pore = common.blob_volume((n, n, n), 2.5, 0.25, seed=1)
    si = common.blob_volume((n, n, n), 1.5, 0.12, seed=2) & ~pore
    labels = np.full((n, n, n), 3, np.uint8)
    labels[pore] = 0
    labels[si] = 1
    return VoxelImage(labels, (20e-9,) * 3, {"pore": 0, "si": 1, "sei": 3})


def main() -> None:
    from scipy import ndimage

    from fem_anode.fem.tortuosity import hex_mesh_arrays
    from fem_anode.imaging.synthetic import fib_sem_roi

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--roi-sizes", default="2,4,8", help="ROI heights in um (width = 5/8 of it)")
    parser.add_argument("--volumes", default="50,100", help="edge lengths n of n^3 volumes")
    args = parser.parse_args()
    rows = []
    load_start = common.load()
    for height in map(float, args.roi_sizes.split(",")):
        roi = fib_sem_roi(size=(height * 1e-6, height * 0.625e-6), seed=0)
        pores = int(ndimage.label(roi.array == roi.phases["pore"])[1])
        for method in ("smooth", "voxel"):
            seconds, elements, error = ours(roi, method, ["sei"])
            rows.append(
                {
                    "case": f"roi {height:g}x{height * 0.625:g} um",
                    "pixels": roi.array.size,
                    "method": method,
                    "elements": elements,
                    "time_s": seconds,
                    "elements_per_s": elements / seconds if elements else None,
                    "error": error or None,
                    "load": common.load(),
                }
            )
        # plain gmsh at the smooth mesh's mean element size
        smooth = rows[-2]
        area_um2 = height * height * 0.625 * float(np.mean(roi.array == roi.phases["sei"]))
        size = np.sqrt(2 * area_um2 / smooth["elements"]) * 1.1 if smooth["elements"] else 0.05
        seconds, elements = gmsh_holes(height * 0.625, height, pores, size)
        rows.append(
            {
                "case": rows[-1]["case"],
                "pixels": roi.array.size,
                "method": f"plain gmsh: rectangle - {pores} discs",
                "elements": elements,
                "time_s": seconds,
                "elements_per_s": elements / seconds,
                "load": common.load(),
            }
        )
        common.print_table(
            rows[-3:], ["case", "pixels", "method", "elements", "time_s", "elements_per_s", "error", "load"]
        )
    for n in map(int, args.volumes.split(",")):
        image = volume(n)
        for method in ("voxel", "tet"):
            seconds, elements, error = ours(image, method, ["sei"])
            rows.append(
                {
                    "case": f"volume {n}^3",
                    "pixels": image.array.size,
                    "method": method,
                    "elements": elements,
                    "time_s": seconds,
                    "elements_per_s": elements / seconds if elements else None,
                    "error": error or None,
                    "load": common.load(),
                }
            )
        t = time.perf_counter()
        _, cells = hex_mesh_arrays(image.array == 3, (1.0, 1.0, 1.0))
        seconds = time.perf_counter() - t
        rows.append(
            {
                "case": f"volume {n}^3",
                "pixels": image.array.size,
                "method": "tortuosity hex arrays (NumPy)",
                "elements": len(cells),
                "time_s": seconds,
                "elements_per_s": len(cells) / seconds,
                "load": common.load(),
            }
        )
        seconds, elements = gmsh_structured_box(len(cells))
        rows.append(
            {
                "case": f"volume {n}^3",
                "pixels": image.array.size,
                "method": "plain gmsh: transfinite hex box",
                "elements": elements,
                "time_s": seconds,
                "elements_per_s": elements / seconds,
                "load": common.load(),
            }
        )
        common.print_table(
            rows[-4:], ["case", "pixels", "method", "elements", "time_s", "elements_per_s", "error", "load"]
        )
    common.print_table(rows, ["case", "method", "elements", "time_s", "elements_per_s", "load"], title="meshing")
    path = common.append_results(
        "meshing",
        rows,
        "python benchmarks/bench_meshing.py " + " ".join(sys.argv[1:]),
        {"load": [load_start, common.load()]},
    )
    print(f"appended to {path}")


if __name__ == "__main__":
    main()
