"""3D figures with pyvista, rendered off-screen in a child process (PNG files).

The commands that produce 3D data write their 3D pictures here: ``fem-anode metrics`` on a 3D
image (segmented volume with a cut-away, geodesic tortuosity, pore surface mesh, pore-Si
distance on the Si surfaces; the paper's Figs. 5a-c, 6c and 7) and ``fem-anode diffusion`` on a
3D mesh (c at every output time, clipped through the middle of the volume).

How the pictures are made:

* The parent process prepares everything with NumPy/scikit-image (voxel faces, marching cubes,
  distances; :func:`voxel_faces`, :func:`metrics_scenes`) and writes a job (JSON + ``.npz``).
* A child process (``python -m fem_anode.io.render3d JOB.json``) builds the pyvista meshes and
  takes the screenshots. VTK needs an X server even off-screen when it is built without
  OSMesa/EGL (Debian's VTK 9.3 is): the child starts its own ``Xvfb`` (a free display number
  from ``-displayfd``, stopped at the end); without ``Xvfb`` it uses ``$DISPLAY`` or tries
  VTK's own off-screen support. A VTK that cannot render aborts the process (it does so
  without an X server): only the child dies, and the parent logs a warning naming the cause.
  Rendering never fails a command.
* Under MPI nothing is gathered for a picture: the metrics are computed on one process
  anyway, and a diffusion run is rendered by rank 0 from the VTX file it wrote (the files are
  the gather), after the solve.

Big volumes are shown at every ``s``-th voxel (``s = ceil(max(shape) / max_voxels)``,
default 128 voxels per axis) so a 512^3 volume renders in seconds; the caption states ``s``.
Rendering is off with ``--no-render`` or the environment variable ``FEM_ANODE_NO_RENDER=1``.
Every PNG has a record in ``figures3d.json`` (file, title, caption) beside it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

__all__ = [
    "DISABLE_ENV",
    "Figure3D",
    "MAX_VOXELS",
    "downsample",
    "metrics_scenes",
    "read_vti_cells",
    "read_vtx",
    "render_diffusion_outputs",
    "render_metrics_figures",
    "render_scenes",
    "rendering_unavailable",
    "voxel_faces",
]

logger = logging.getLogger(__name__)

#: Environment variable that turns 3D rendering off (any value but "", "0", "false", "no").
DISABLE_ENV = "FEM_ANODE_NO_RENDER"
#: Default largest number of voxels per axis shown in a picture.
MAX_VOXELS = 128
#: Colours of the phases (as the 2D segmentation figures).
PHASE_COLOURS = {"pore": "#1f4fd6", "si": "#d62728", "graphite": "#17becf", "sei": "#2ca02c"}
_PALETTE = ["#7f7f7f", "#bcbd22", "#9467bd", "#ff7f0e"]
#: Size of one panel (pixels, width x height).
PANEL_SIZE = (640, 560)
#: Manifest of the 3D figures of a directory.
MANIFEST = "figures3d.json"
_CHILD_TIMEOUT_S = 600.0


@dataclass
class Figure3D:
    """One 3D picture: its PNG file name, title and caption (for the reports)."""

    file: str
    title: str
    caption: str
    panels: list[dict[str, Any]] = field(default_factory=list)

    def record(self) -> dict[str, str]:
        return {"file": self.file, "title": self.title, "caption": self.caption}


# ----------------------------------------------------------------------------- availability


def _disabled_by_env() -> bool:
    return os.environ.get(DISABLE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def rendering_unavailable() -> str | None:
    """Why 3D figures cannot be rendered here (``None``: they can be tried).

    Checks the switch :data:`DISABLE_ENV` and that pyvista and VTK are installed. Whether an
    X server or off-screen support is there shows only when the child process renders.
    """
    if _disabled_by_env():
        return f"turned off by {DISABLE_ENV}"
    for module in ("pyvista", "vtkmodules"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (Debian: python3-pyvista python3-vtk9)"
    return None


def _child_env() -> dict[str, str]:
    """The environment of the render process: no MPI launcher variables (the child is no rank
    and must not join the job if a library initialises MPI)."""
    prefixes = ("OMPI_", "PMIX_", "PMI_", "MPI_LOCAL", "HYDRA_", "I_MPI_")
    return {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}


# ----------------------------------------------------------------------------- geometry (NumPy)


def downsample(array: np.ndarray, max_voxels: int = MAX_VOXELS) -> tuple[np.ndarray, int]:
    """Every ``s``-th voxel along each axis, ``s = ceil(max(shape) / max_voxels)`` (nearest: labels
    stay labels). Returns the view and ``s``."""
    if max_voxels < 2:
        raise ValueError(f"max_voxels must be at least 2, got {max_voxels}")
    stride = max(1, math.ceil(max(array.shape) / max_voxels))
    return (array[(slice(None, None, stride),) * array.ndim] if stride > 1 else array), stride


def _display_points(index_points: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """(z, y, x) voxel-corner indices -> display coordinates in um: x, y and -depth (surface on top)."""
    hz, hy, hx = (float(h) * 1e6 for h in spacing)
    z, y, x = index_points[..., 0], index_points[..., 1], index_points[..., 2]
    return np.stack([x * hx, y * hy, -z * hz], axis=-1).astype(np.float32)


def voxel_faces(mask: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """The exposed faces of the voxels in a 3D mask: faces between a voxel in ``mask`` and one
    outside it (or the image border).

    Args:
        mask: boolean ``(z, y, x)`` array.
        spacing: voxel size ``(h_z, h_y, h_x)`` in metres.

    Returns:
        ``(points, owner)``: ``points`` ``(4 F, 3)`` float32, the corners of each quad in display
        coordinates (um; x, y, -z), four consecutive rows per face; ``owner`` ``(F,)`` the flat
        index of the voxel each face belongs to.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 3:
        raise ValueError(f"voxel_faces needs a 3D mask, got {mask.ndim}D")
    corners, owners = [], []
    for axis in range(3):
        pad = [(0, 0)] * 3
        pad[axis] = (1, 1)
        padded = np.pad(mask, pad)
        lower = np.take(padded, np.arange(padded.shape[axis] - 1), axis=axis)  # voxel k - 1
        upper = np.take(padded, np.arange(1, padded.shape[axis]), axis=axis)  # voxel k
        face = np.argwhere(lower != upper)  # face k lies between voxel k - 1 and k along axis
        if face.size == 0:
            continue
        owner = face.copy()
        owner[:, axis] -= np.where(lower[tuple(face.T)], 1, 0)
        u, v = [a for a in range(3) if a != axis]
        du = np.zeros(3, dtype=np.int64)
        dv = np.zeros(3, dtype=np.int64)
        du[u], dv[v] = 1, 1
        quad = np.stack([face, face + du, face + du + dv, face + dv], axis=1)  # (F, 4, 3)
        corners.append(quad.reshape(-1, 3))
        owners.append(np.ravel_multi_index(tuple(owner.T), mask.shape))
    if not corners:
        return np.zeros((0, 3), dtype=np.float32), np.zeros(0, dtype=np.int64)
    return _display_points(np.concatenate(corners), spacing), np.concatenate(owners)


def _cutaway(shape: Sequence[int]) -> np.ndarray:
    """True outside the cut-away: the octant at the surface (top half of z), front half of y and
    right half of x is removed, so three inner sections show."""
    keep = np.ones(tuple(shape), dtype=bool)
    nz, ny, nx = shape
    keep[: max(nz // 2, 1), : max(ny // 2, 1), nx // 2 :] = False
    return keep


def _phase_colour(name: str, index: int) -> str:
    return PHASE_COLOURS.get(name, _PALETTE[index % len(_PALETTE)])


def _rgb(colour: str) -> tuple[int, int, int]:
    colour = colour.lstrip("#")
    return int(colour[0:2], 16), int(colour[2:4], 16), int(colour[4:6], 16)


def _marching_cubes(
    mask: np.ndarray, spacing: Sequence[float], smoothing: float = 0.7
) -> tuple[np.ndarray, np.ndarray]:
    """Marching-cubes surface of a mask smoothed as :func:`~fem_anode.imaging.metrics.pore_surface_area`
    does (Gaussian of ``smoothing`` voxels, level 0.5); ``(points (display um), triangles)``."""
    from scipy import ndimage
    from skimage import measure

    field_ = ndimage.gaussian_filter(mask.astype(np.float32), smoothing) if smoothing > 0 else mask.astype(np.float32)
    if field_.min() >= 0.5 or field_.max() <= 0.5 or min(field_.shape) < 2:
        return np.zeros((0, 3), dtype=np.float32), np.zeros((0, 3), dtype=np.int64)
    verts, faces, _, _ = measure.marching_cubes(field_, 0.5)  # in voxel index units (z, y, x)
    return _display_points(verts, spacing), faces.astype(np.int64)


@dataclass
class _Job:
    """Scenes and their arrays, as the child process reads them."""

    directory: Path
    scenes: list[dict[str, Any]] = field(default_factory=list)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    figures: list[Figure3D] = field(default_factory=list)

    def array(self, value: np.ndarray) -> str:
        key = f"a{len(self.arrays)}"
        self.arrays[key] = np.ascontiguousarray(value)
        return key

    def add(self, figure: Figure3D, panels: list[dict[str, Any]], *, scalar_bar: dict[str, Any] | None = None) -> None:
        width, height = PANEL_SIZE
        self.scenes.append(
            {"png": figure.file, "window": [width * len(panels), height], "panels": panels, "scalar_bar": scalar_bar}
        )
        self.figures.append(figure)


def metrics_scenes(
    samples: Mapping[str, tuple[Any, Mapping[str, np.ndarray], Mapping[str, Any]]],
    directory: Path,
    *,
    pore_phase: str = "pore",
    si_phase: str = "si",
    max_voxels: int = MAX_VOXELS,
) -> _Job:
    """The four 3D figures of ``fem-anode metrics`` (one panel per sample), ready to render.

    Args:
        samples: label -> ``(image, fields, metrics)``: the 3D label
            :class:`~fem_anode.io.images.VoxelImage`, the ``fields`` of
            :func:`~fem_anode.imaging.metrics.compute_metrics` (``tortuosity``) and its metrics.
        directory: where the PNG files go.
        pore_phase, si_phase: phase names.
        max_voxels: largest number of voxels per axis shown (see :func:`downsample`).
    """
    from scipy import ndimage

    job = _Job(Path(directory))
    volume_panels, pores_si_panels, tau_panels, surface_panels, distance_panels = [], [], [], [], []
    strides, tau_max = {}, 1.01
    for _, fields, _ in samples.values():
        tau = fields.get("tortuosity")
        if tau is not None and np.isfinite(tau).any():
            tau_max = max(tau_max, float(np.percentile(tau[np.isfinite(tau)], 99.5)))
    distance_max = 0.0
    prepared = {}
    for label, (image, _, _) in samples.items():
        labels, stride = downsample(np.asarray(image.array), max_voxels)
        strides[label] = stride
        spacing = tuple(float(h) * stride for h in image.require_voxel_size())
        phases = image.require_phases()
        prepared[label] = (labels, stride, spacing, phases)
        if pore_phase in phases and si_phase in phases:
            pore = labels == phases[pore_phase]
            si = labels == phases[si_phase]
            if pore.any() and si.any():
                to_pore = ndimage.distance_transform_edt(~pore, sampling=spacing) * 1e6
                distance_max = max(distance_max, float(to_pore[si].max()))
    for label, (_, fields, metrics) in samples.items():
        labels, stride, spacing, phases = prepared[label]
        names = list(phases)
        title = f"{label}" + (f" (1 in {stride} voxels per axis shown)" if stride > 1 else "")
        # (a) every phase, cut-away octant
        keep = _cutaway(labels.shape)
        points, owner = voxel_faces(keep, spacing)
        lut = np.zeros((int(labels.max()) + 1, 3), dtype=np.uint8)
        for i, name in enumerate(names):
            if phases[name] <= labels.max():
                lut[phases[name]] = _rgb(_phase_colour(name, i))
        colours = lut[labels.ravel()[owner]]
        legend = [[name, _phase_colour(name, i)] for i, name in enumerate(names)]
        volume_panels.append(
            {
                "title": title,
                "layers": [{"kind": "quads", "points": job.array(points), "rgb": job.array(colours)}],
                "legend": legend,
            }
        )
        # (b) pores and Si as objects (Fig. 5b)
        layers: list[dict[str, Any]] = []
        for name in (pore_phase, si_phase):
            if name in phases and (labels == phases[name]).any():
                points, _ = voxel_faces(labels == phases[name], spacing)
                layers.append(
                    {"kind": "quads", "points": job.array(points), "color": _phase_colour(name, names.index(name))}
                )
        pores_si_panels.append(
            {
                "title": title,
                "layers": layers,
                "legend": [[n, _phase_colour(n, names.index(n))] for n in (pore_phase, si_phase) if n in phases],
            }
        )
        # tortuosity: reachable pore voxels coloured (log), unreachable white (Fig. 5c)
        tau = fields.get("tortuosity")
        if tau is not None:
            tau = downsample(np.asarray(tau), max_voxels)[0]
            region = _cutaway(tau.shape)
            layers = []
            reachable = np.isfinite(tau) & region
            if reachable.any():
                points, owner = voxel_faces(reachable, spacing)
                values = np.clip(tau.ravel()[owner], 1.0, tau_max).astype(np.float32)
                layers.append(
                    {
                        "kind": "quads",
                        "points": job.array(points),
                        "scalars": job.array(values),
                        "cmap": "viridis",
                        "clim": [1.0, tau_max],
                        "log_scale": True,
                    }
                )
            unreachable = np.isinf(tau) & region
            if unreachable.any():
                points, _ = voxel_faces(unreachable, spacing)
                layers.append({"kind": "quads", "points": job.array(points), "color": "#ffffff"})
            tau_panels.append(
                {
                    "title": title,
                    "layers": layers,
                    "background": "#3a3a48",
                    "text_color": "white",
                    "legend": [["unreachable (infinite)", "#ffffff"]] if unreachable.any() else None,
                }
            )
        # pore surface mesh (Fig. 6c)
        if pore_phase in phases:
            points, triangles = _marching_cubes(labels == phases[pore_phase], spacing)
            area = metrics.get("pore_surface_area_m2")
            text = title + (f"\npore surface {area * 1e12:.4g} um^2 (full resolution)" if area else "")
            surface_panels.append(
                {
                    "title": text,
                    "layers": [
                        {
                            "kind": "triangles",
                            "points": job.array(points),
                            "triangles": job.array(triangles),
                            "color": "#3d6fe8",
                            "smooth": True,
                        }
                    ]
                    if len(triangles)
                    else [],
                }
            )
        # pore-Si distance on the Si surfaces (Fig. 7)
        if pore_phase in phases and si_phase in phases and distance_max > 0:
            pore, si = labels == phases[pore_phase], labels == phases[si_phase]
            if pore.any() and si.any():
                to_pore = ndimage.distance_transform_edt(~pore, sampling=spacing) * 1e6
                points, triangles = _marching_cubes(si, spacing)
                hz, hy, hx = (h * 1e6 for h in spacing)
                index = np.stack([-points[:, 2] / hz, points[:, 1] / hy, points[:, 0] / hx])
                values = ndimage.map_coordinates(to_pore, index, order=1, mode="nearest").astype(np.float32)
                mean = (metrics.get("pore_si_distance") or {}).get("mean_m")
                text = title + (f"\nmean Si-surface-to-pore distance {mean * 1e6:.3g} um" if mean else "")
                distance_panels.append(
                    {
                        "title": text,
                        "layers": [
                            {
                                "kind": "triangles",
                                "points": job.array(points),
                                "triangles": job.array(triangles),
                                "scalars": job.array(values),
                                "cmap": "RdYlBu",
                                "clim": [0.0, distance_max],
                                "smooth": True,
                            }
                        ],
                    }
                )
    stride_note = ", ".join(
        f"{k}: 1 in {s} voxels per axis" if s > 1 else f"{k}: every voxel" for k, s in strides.items()
    )
    shown = (
        f"Shown: {stride_note} (metrics computed at full resolution). Depth z points down, the electrode surface is "
        "on top; lengths in um."
    )
    job.add(
        Figure3D(
            "segmented_3d.png",
            "Segmented volume with a cut-away (cf. paper Fig. 5a)",
            f"Every phase, with the octant at the surface cut away to show three inner sections. {shown}",
        ),
        volume_panels,
    )
    job.add(
        Figure3D(
            "pores_si_3d.png",
            "Pores and Si particles (cf. paper Fig. 5b)",
            f"Pore (blue) and Si (red) voxels; the other phases are hidden. {shown}",
        ),
        pores_si_panels,
    )
    if tau_panels:
        job.add(
            Figure3D(
                "tortuosity_3d.png",
                "Geodesic tortuosity from the electrode surface (cf. paper Fig. 5c)",
                "Pore voxels coloured by their geodesic tortuosity (log scale, dark blue = straight path, yellow = "
                f"very tortuous; colour range 1 to the 99.5th percentile {tau_max:.3g}); white: pore voxels not "
                "reachable from the surface through the pores (infinite tortuosity). Octant at the surface cut away. "
                f"{shown}",
            ),
            tau_panels,
            scalar_bar={"title": "tortuosity"},
        )
    if surface_panels:
        job.add(
            Figure3D(
                "pore_surface_3d.png",
                "Pore surface mesh (cf. paper Fig. 6c)",
                "Marching-cubes surface of the pore phase (Gaussian smoothing of 0.7 voxels, level 0.5, as the pore "
                f"surface area metric). {shown}",
            ),
            surface_panels,
        )
    if distance_panels:
        job.add(
            Figure3D(
                "pore_si_distance_3d.png",
                "Distance from the Si surfaces to the nearest pore (cf. paper Fig. 7)",
                "Si surfaces (marching cubes) coloured by the Euclidean distance to the nearest pore voxel: red close, "
                f"blue far (on the shown grid). Paper: mean d_H 3.62 um pristine, 5.37 um after 300 cycles. {shown}",
            ),
            distance_panels,
            scalar_bar={"title": "d (um)"},
        )
    return job


# ----------------------------------------------------------------------------- diffusion (VTX files)

#: VTK cell types of the VTX output: Lagrange (and linear) type -> (linear type, corner count).
_LINEAR_CELLS = {72: (12, 8), 12: (12, 8), 71: (10, 4), 10: (10, 4), 70: (9, 4), 9: (9, 4), 69: (5, 3), 5: (5, 3)}
_VOLUME_CELLS = {12, 10}


def read_vtx(path: str | Path, name: str) -> dict[str, Any]:
    """The mesh and the point values of function ``name`` at every step of a dolfinx VTX (ADIOS2
    BP4) file, all blocks (ranks) joined, cells reduced to their corners (linear).

    Returns:
        ``points`` (N, 3), ``cells`` (M, k) corner indices, ``cell_type`` (VTK linear type),
        ``times`` (steps) and ``values`` list of (N,) arrays.
    """
    # adios4dolfinx first: it selects ADIOS2's MPI bindings. Imported first, plain adios2 takes the
    # serial ones in a one-process run, and a later checkpoint in the same process (adios4dolfinx)
    # then fails to import.
    with contextlib.suppress(ImportError):
        import adios4dolfinx  # noqa: F401
    import adios2

    with adios2.FileReader(str(path)) as reader:
        steps = int(reader.num_steps())
        variables = reader.available_variables()
        if name not in variables:
            raise KeyError(f"{path} has no function {name!r} ({', '.join(sorted(variables))})")
        blocks = len(reader.engine.blocks_info("geometry", 0))
        points: list[np.ndarray] = []
        blocks_cells: list[np.ndarray] = []
        offset = 0
        cell_type = None
        for b in range(blocks):
            x = np.asarray(reader.read("geometry", block_id=b, step_selection=[0, 1]), dtype=np.float64).reshape(-1, 3)
            connectivity = np.asarray(reader.read("connectivity", block_id=b, step_selection=[0, 1]), dtype=np.int64)
            vtk_type = int(np.asarray(reader.read("types", step_selection=[0, 1])).ravel()[0])
            if vtk_type not in _LINEAR_CELLS:
                raise ValueError(f"{path}: VTK cell type {vtk_type} is not supported")
            cell_type, corners = _LINEAR_CELLS[vtk_type]
            connectivity = connectivity.reshape(len(connectivity), -1)
            points.append(x)
            blocks_cells.append(connectivity[:, 1 : 1 + corners] + offset)
            offset += len(x)
        times = [float(np.asarray(reader.read("step", step_selection=[s, 1])).ravel()[0]) for s in range(steps)]
        values = [
            np.concatenate(
                [
                    np.asarray(reader.read(name, block_id=b, step_selection=[s, 1]), dtype=np.float64).ravel()
                    for b in range(blocks)
                ]
            )
            for s in range(steps)
        ]
    x, cells = np.concatenate(points), np.concatenate(blocks_cells)
    # Each rank also writes its ghost cells: keep one copy of each cell (same corner centroid).
    centroid = x[cells].mean(axis=1)
    scale = max(float(np.ptp(x, axis=0).max()), float(np.finfo(np.float64).tiny))
    _, first = np.unique(np.round(centroid / scale, 9), axis=0, return_index=True)
    return {"points": x, "cells": cells[np.sort(first)], "cell_type": cell_type, "times": times, "values": values}


def read_vti_cells(path: str | Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """c on the voxels of a field file of a voxel run
    (:class:`~fem_anode.fem.diffusion.finite_volume.VoxelFieldWriter`): finite volumes' cell data
    ``c``, or for P1 on the voxels the mean of the point data ``c`` over each ``transporting``
    voxel's 8 corners (the trilinear field at the voxel centre where no corner
    is split by face connectivity).

    Returns:
        The ``(z, y, x)`` array (NaN outside the domain) and the spacing ``(h_z, h_y, h_x)`` (m).
    """
    from fem_anode.io.vti import read_vti

    arrays, spacing = read_vti(path)
    if "c" not in arrays:
        raise ValueError(f"{path}: no array 'c'")
    section, values = arrays["c"]
    if section == "CellData":
        return values, spacing
    mask = arrays.get("transporting")
    if mask is None or mask[0] != "CellData":
        raise ValueError(f"{path}: point data 'c' without the cell data 'transporting'")
    corners = [
        values[z : z + values.shape[0] - 1, y : y + values.shape[1] - 1, x : x + values.shape[2] - 1]
        for z in (0, 1)
        for y in (0, 1)
        for x in (0, 1)
    ]
    mean = np.mean(corners, axis=0, dtype=np.float64).astype(np.float32)
    return np.where(mask[1] == 1, mean, np.float32(np.nan)), spacing


def _collection(path: Path) -> list[tuple[float, Path]]:
    """(time, file) of a ParaView ``.pvd`` collection."""
    import xml.etree.ElementTree as ET

    root = ET.parse(path).getroot()
    return [(float(d.get("timestep", "0")), path.parent / str(d.get("file"))) for d in root.iter("DataSet")]


def _voxel_diffusion_scenes(directory: Path, results: Mapping[str, Any], pvd: Path, max_voxels: int) -> _Job | None:
    """c on the voxels of a run without a mesh (``c.pvd`` + ``c_<k>.vti``: finite volumes, P1 on the
    voxels), half x > x_mid removed."""
    entries = [(t, f) for t, f in _collection(pvd) if t > 0]
    if not entries:
        return None
    job = _Job(directory)
    c_bulk = float((results.get("settings") or {}).get("physics", {}).get("c_bulk", 1000.0))
    panels, stride = [], 1
    for t, path in entries:
        values, spacing = read_vti_cells(path)
        values, stride = downsample(values, max_voxels)
        spacing = (spacing[0] * stride, spacing[1] * stride, spacing[2] * stride)
        keep = np.isfinite(values)
        keep[:, :, values.shape[2] // 2 :] = False
        points, owner = voxel_faces(keep, spacing)
        panels.append(
            {
                "title": f"t = {t:g} s",
                "layers": [
                    {
                        "kind": "quads",
                        "points": job.array(points),
                        "scalars": job.array(values.ravel()[owner].astype(np.float32)),
                        "cmap": "coolwarm",
                        "clim": [0.0, c_bulk],
                    }
                ],
            }
        )
    shown = f"1 in {stride} voxels per axis shown" if stride > 1 else "every voxel shown"
    how = "finite volumes" if results.get("discretisation") == "fv" else "P1, the value at each voxel's centre"
    job.add(
        Figure3D(
            "c_3d.png",
            "Li concentration in 3D at the output times",
            f"c (mol/m^3, blue 0, red c_bulk = {c_bulk:g}) on the transporting voxels ({how}, read from "
            f"{pvd.name}; {shown}); the half x > x_mid is cut away to show the inside. Depth z points down, the "
            "electrode surface is on top; lengths in um.",
        ),
        panels,
        scalar_bar={"title": "c (mol/m3)"},
    )
    return job


def diffusion_scenes(
    directory: Path,
    results: Mapping[str, Any],
    *,
    field_file: str = "c.bp",
    function: str = "c",
    max_voxels: int = MAX_VOXELS,
) -> _Job | None:
    """The 3D figure of a diffusion run: c at each output time (t > 0), clipped by the plane
    x = x_mid (the half x > x_mid removed); ``None`` for a 2D mesh or without a field file.

    Reads the VTX file ``c.bp`` of a finite-element run, or ``c.pvd`` and its ``.vti`` files of
    a finite-volume run.
    """
    path = Path(directory) / field_file
    if not path.exists():
        pvd = Path(directory) / "c.pvd"
        return _voxel_diffusion_scenes(Path(directory), results, pvd, max_voxels) if pvd.is_file() else None
    data = read_vtx(path, function)
    if data["cell_type"] not in _VOLUME_CELLS:
        return None
    wanted = [t for t in results.get("times", data["times"]) if t > 0]
    steps = [min(range(len(data["times"])), key=lambda s: abs(data["times"][s] - t)) for t in wanted]
    job = _Job(Path(directory))
    points = data["points"].copy() * 1e6
    points[:, 2] *= -1.0  # depth z down, the electrode surface on top (as the image figures)
    centre = 0.5 * (points.min(axis=0) + points.max(axis=0))
    c_bulk = float(
        (results.get("settings") or {}).get("physics", {}).get("c_bulk", max(float(v.max()) for v in data["values"]))
    )
    grid = {
        "points": job.array(points.astype(np.float32)),
        "cells": job.array(data["cells"]),
        "cell_type": data["cell_type"],
    }
    panels = [
        {
            "title": f"t = {data['times'][s]:g} s",
            "layers": [
                {
                    "kind": "cells",
                    **grid,
                    "scalars": job.array(data["values"][s].astype(np.float32)),
                    "cmap": "coolwarm",
                    "clim": [0.0, c_bulk],
                    "clip": {"normal": [1.0, 0.0, 0.0], "origin": centre.tolist()},
                }
            ],
        }
        for s in steps
    ]
    if not panels:
        return None
    ncells = len(data["cells"])
    degree = results.get("element_degree")
    job.add(
        Figure3D(
            "c_3d.png",
            "Li concentration in 3D at the output times",
            f"c (mol/m^3, blue 0, red c_bulk = {c_bulk:g}) on the transporting phase, read from {field_file} ({ncells} "
            "cells"
            + (f", P{degree}: coloured from the cell corners" if degree and degree > 1 else "")
            + "); the half x > x_mid is clipped away to show the inside. Depth z points down, the pore surface is on "
            "top; lengths in um.",
        ),
        panels,
        scalar_bar={"title": "c (mol/m3)"},
    )
    return job


# ----------------------------------------------------------------------------- running the child


def render_scenes(job: _Job, *, timeout_s: float = _CHILD_TIMEOUT_S) -> list[Figure3D]:
    """Render a job's scenes into PNG files in its directory (in a child process) and add their
    records to ``figures3d.json``. Never raises for a rendering problem: logs a warning and
    returns the figures that were written (possibly none)."""
    if not job.scenes:
        return []
    reason = rendering_unavailable()
    if reason is not None:
        (logger.info if _disabled_by_env() else logger.warning)("3D figures not rendered: %s", reason)
        return []
    directory = job.directory
    directory.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=".render3d-", dir=directory) as tmp:
        arrays = Path(tmp) / "arrays.npz"
        np.savez(arrays, **cast("dict[str, Any]", job.arrays))  # numpy's stub lets **kwds fill allow_pickle
        spec = Path(tmp) / "job.json"
        spec.write_text(
            json.dumps({"arrays": str(arrays), "directory": tmp, "scenes": job.scenes})
        )  # PNGs land in tmp first
        report = Path(tmp) / "result.json"
        command = [sys.executable, "-m", "fem_anode.io.render3d", str(spec), str(report)]
        try:
            proc = subprocess.run(
                command, env=_child_env(), capture_output=True, text=True, timeout=timeout_s, check=False
            )
        except subprocess.TimeoutExpired:
            logger.warning(
                "3D figures not rendered: the renderer took longer than %.0f s (use --no-render to skip)", timeout_s
            )
            return []
        outcome = json.loads(report.read_text()) if report.exists() else {}
        done = {r["png"]: r for r in outcome.get("scenes", [])}
        written = [f for f in job.figures if done.get(f.file, {}).get("ok") and (Path(tmp) / f.file).is_file()]
        for figure in written:  # complete pictures only: a crash leaves its partial files in tmp, removed here
            os.replace(Path(tmp) / figure.file, directory / figure.file)
    if proc.returncode != 0 or len(written) < len(job.figures):
        failed = [f"{name}: {r['error']}" for name, r in done.items() if not r.get("ok")]
        cause = "; ".join(failed) or _explain(proc, outcome)
        logger.warning(
            "3D figures not rendered%s: %s (use --no-render to skip them)",
            f" ({len(job.figures) - len(written)} of {len(job.figures)})",
            cause,
        )
    if written:
        _update_manifest(directory, written)
        logger.info(
            "rendered %d 3D figure(s) in %.1f s (%s)",
            len(written),
            time.perf_counter() - start,
            outcome.get("display", "?"),
        )
    return written


def _explain(proc: subprocess.CompletedProcess, outcome: Mapping[str, Any]) -> str:
    """A readable cause of a failed render process."""
    tail = " ".join((proc.stderr or "").strip().splitlines()[-3:])[-400:]
    display = outcome.get("display") or "none"
    if "X server" in (proc.stderr or "") or "DISPLAY" in (proc.stderr or ""):
        return (
            f"no display could be made (display: {display}; Xvfb "
            f"{'not ' if shutil.which('Xvfb') is None else ''}found) and this VTK cannot render off-screen without an "
            "X server; install xvfb (Debian: apt-get install xvfb xauth) or run under xvfb-run"
        )
    if proc.returncode < 0:
        return f"the renderer died with signal {-proc.returncode} (display: {display}): {tail}"
    return f"the renderer exited with status {proc.returncode} (display: {display}): {tail}"


def _update_manifest(directory: Path, figures: list[Figure3D]) -> None:
    from fem_anode.io.output import write_json

    path = directory / MANIFEST
    records = json.loads(path.read_text()) if path.exists() else []
    names = {f.file for f in figures}
    records = [r for r in records if r.get("file") not in names] + [f.record() for f in figures]
    write_json(path, records)


def render_metrics_figures(
    samples: Mapping[str, tuple[Any, Mapping[str, np.ndarray], Mapping[str, Any]]],
    directory: str | Path,
    *,
    pore_phase: str = "pore",
    si_phase: str = "si",
    max_voxels: int = MAX_VOXELS,
) -> list[Figure3D]:
    """Render the 3D figures of image metrics (see :func:`metrics_scenes`) into ``directory``;
    2D images are skipped. Returns the figures written (a warning, not an error, when none)."""
    samples = {k: v for k, v in samples.items() if v[0].ndim == 3}
    if not samples:
        return []
    if _disabled_by_env():
        logger.info("3D figures not rendered: turned off by %s", DISABLE_ENV)
        return []
    return render_scenes(
        metrics_scenes(samples, Path(directory), pore_phase=pore_phase, si_phase=si_phase, max_voxels=max_voxels)
    )


def render_diffusion_outputs(
    directory: str | Path, results: Mapping[str, Any], *, enabled: bool = True
) -> list[Figure3D]:
    """The 3D figure of a finished diffusion run from the files it wrote (``c.bp``): call on one
    rank only, after the solve. Nothing for 2D meshes or runs without field output."""
    if not enabled:
        return []
    if _disabled_by_env():
        logger.info("3D figures not rendered: turned off by %s", DISABLE_ENV)
        return []
    try:
        job = diffusion_scenes(Path(directory), results)
    except ImportError as err:
        logger.warning("3D figures not rendered: cannot read the VTX field file (%s)", err)
        return []
    return [] if job is None else render_scenes(job)


# ----------------------------------------------------------------------------- child process


@contextlib.contextmanager
def _display() -> Iterator[str]:
    """An X display for VTK: a private Xvfb if installed, else ``$DISPLAY``, else none (VTK's own
    off-screen support, if it has any). Yields a description."""
    xvfb = shutil.which("Xvfb")
    if xvfb is None:
        yield (os.environ.get("DISPLAY") and f"DISPLAY={os.environ['DISPLAY']}") or "none"
        return
    read_fd, write_fd = os.pipe()
    proc = subprocess.Popen(
        [xvfb, "-displayfd", str(write_fd), "-screen", "0", "2560x1600x24", "-nolisten", "tcp"],
        pass_fds=(write_fd,),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.close(write_fd)
    number = b""
    try:
        while not number.endswith(b"\n"):
            chunk = os.read(read_fd, 16)
            if not chunk:
                break
            number += chunk
        os.close(read_fd)
        if not number.strip():
            raise RuntimeError("Xvfb did not start")
        os.environ["DISPLAY"] = f":{number.decode().strip()}"
        yield f"Xvfb {os.environ['DISPLAY']}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _mesh(pv: Any, layer: Mapping[str, Any], arrays: Any) -> Any:
    points = arrays[layer["points"]]
    kind = layer["kind"]
    if kind == "quads":
        n = len(points) // 4
        faces = np.column_stack([np.full(n, 4), np.arange(4 * n).reshape(n, 4)]).ravel()
        mesh = pv.PolyData(points, faces=faces)
    elif kind == "triangles":
        triangles = arrays[layer["triangles"]]
        faces = np.column_stack([np.full(len(triangles), 3), triangles]).ravel()
        mesh = pv.PolyData(points, faces=faces)
    elif kind == "cells":
        cells = arrays[layer["cells"]]
        mesh = pv.UnstructuredGrid(
            np.column_stack([np.full(len(cells), cells.shape[1]), cells]).ravel(),
            np.full(len(cells), layer["cell_type"], dtype=np.uint8),
            points,
        )
    else:
        raise ValueError(f"unknown layer kind {kind!r}")
    if "rgb" in layer:
        mesh.cell_data["rgb"] = arrays[layer["rgb"]]
    if "scalars" in layer:
        values = arrays[layer["scalars"]]
        (mesh.point_data if len(values) == mesh.n_points else mesh.cell_data)["value"] = values
    if "clip" in layer:
        mesh = mesh.clip(normal=layer["clip"]["normal"], origin=layer["clip"]["origin"], invert=True, crinkle=False)
        mesh = mesh.extract_surface()
    return mesh


def _render_scene(pv: Any, scene: Mapping[str, Any], arrays: Any, directory: Path) -> None:
    panels = scene["panels"]
    plotter = pv.Plotter(off_screen=True, shape=(1, len(panels)), window_size=scene["window"], border=False)
    bar = scene.get("scalar_bar")
    try:
        for j, panel in enumerate(panels):
            plotter.subplot(0, j)
            plotter.set_background(panel.get("background", "white"))
            text_colour = panel.get("text_color", "black")
            for layer in panel["layers"]:
                mesh = _mesh(pv, layer, arrays)
                if mesh.n_cells == 0:
                    continue
                options: dict[str, Any] = {
                    "smooth_shading": bool(layer.get("smooth")),
                    "show_scalar_bar": False,
                    "ambient": 0.3,
                    "diffuse": 0.75,
                }
                if "rgb" in layer:
                    options.update(scalars="rgb", rgb=True)
                elif "scalars" in layer:
                    options.update(
                        scalars="value", cmap=layer["cmap"], clim=layer["clim"], log_scale=bool(layer.get("log_scale"))
                    )
                    if bar and j == len(panels) - 1:
                        options.update(
                            show_scalar_bar=True,
                            scalar_bar_args={
                                "title": bar["title"],
                                "color": text_colour,
                                "vertical": True,
                                "position_x": 0.86,
                                "position_y": 0.2,
                                "height": 0.6,
                                "width": 0.07,
                                "title_font_size": 14,
                                "label_font_size": 12,
                                "fmt": "%.3g",
                            },
                        )
                else:
                    options["color"] = layer["color"]
                plotter.add_mesh(mesh, **options)
            plotter.add_text(panel["title"], font_size=8, color=text_colour, position="upper_left")
            if panel.get("legend"):
                plotter.add_legend(
                    [list(item) for item in panel["legend"]],
                    bcolor=None,
                    face="rectangle",
                    size=(0.22, 0.035 * len(panel["legend"])),
                    loc="lower left",
                )
            plotter.view_vector((1.0, -1.0, 0.9), viewup=(0.0, 0.0, 1.0))  # at the cut-away corner (x high, y low, top)
            plotter.reset_camera()
            plotter.camera.zoom(1.1)
        plotter.screenshot(str(directory / scene["png"]))
    finally:
        plotter.close()


def _main(argv: Sequence[str]) -> int:
    """Child process: ``python -m fem_anode.io.render3d JOB.json RESULT.json``."""
    spec_path, result_path = Path(argv[0]), Path(argv[1])
    spec = json.loads(spec_path.read_text())
    outcome: dict[str, Any] = {"scenes": []}
    with _display() as display:
        outcome["display"] = display
        Path(result_path).write_text(json.dumps(outcome))
        import pyvista as pv

        pv.OFF_SCREEN = True
        arrays = np.load(spec["arrays"])
        for scene in spec["scenes"]:
            try:
                _render_scene(pv, scene, arrays, Path(spec["directory"]))
                outcome["scenes"].append({"png": scene["png"], "ok": True})
            except Exception as err:  # one bad scene must not lose the others
                outcome["scenes"].append({"png": scene["png"], "ok": False, "error": f"{type(err).__name__}: {err}"})
            Path(result_path).write_text(json.dumps(outcome))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
