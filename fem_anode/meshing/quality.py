"""Mesh-quality report of the current gmsh model: counts, angles, radius ratios, phase measures.

Measures (area in 2D, volume in 3D, facet lengths/areas) are integrated exactly from the
element Jacobians, so they are right for curved quadratic elements too. The per-phase measure
is compared with the image (pixel count times pixel area/volume), both for the original image
and for the cleaned labels that were meshed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["group_measures", "mesh_quality"]

logger = logging.getLogger(__name__)

# gmsh element type -> (dimension, number of corner vertices)
_CORNERS = {1: 2, 8: 2, 2: 3, 9: 3, 3: 4, 10: 4, 16: 4, 4: 4, 11: 4, 5: 8, 12: 8, 17: 8}


def _entity_measure(dim: int, tag: int) -> float:
    import gmsh

    total = 0.0
    types, _, _ = gmsh.model.mesh.getElements(dim, tag)
    for etype in types:
        order = gmsh.model.mesh.getElementProperties(int(etype))[2]
        # det J has degree <= 3 for the element types written here (P1/P2 simplices, Q1 hexes).
        local, weights = gmsh.model.mesh.getIntegrationPoints(int(etype), "Gauss2" if order == 1 else "Gauss3")
        _, det, _ = gmsh.model.mesh.getJacobians(int(etype), local, tag=tag)
        total += float((np.abs(det.reshape(-1, len(weights))) @ weights).sum())
    return total


def group_measures(groups: Mapping[str, tuple[int, int]]) -> dict[str, float]:
    """Length/area/volume (model units, metres for fem_anode meshes) of each physical group."""
    import gmsh

    out = {}
    for name, (dim, tag) in groups.items():
        out[name] = sum(_entity_measure(dim, int(e)) for e in gmsh.model.getEntitiesForPhysicalGroup(dim, tag))
    return out


def _angles_deg(points: np.ndarray) -> np.ndarray:
    """Interior angles (degrees) of triangles (m, 3, gdim)."""
    angles = []
    for i in range(3):
        a = points[:, (i + 1) % 3] - points[:, i]
        b = points[:, (i + 2) % 3] - points[:, i]
        cos = np.einsum("ij,ij->i", a, b) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        angles.append(np.degrees(np.arccos(np.clip(cos, -1, 1))))
    return np.stack(angles, axis=1)


def _dihedral_deg(points: np.ndarray) -> np.ndarray:
    """Six dihedral angles (degrees) of tetrahedra (m, 4, 3)."""
    faces = [(1, 2, 3), (0, 2, 3), (0, 1, 3), (0, 1, 2)]  # face opposite vertex i
    normals = []
    for i, (a, b, c) in enumerate(faces):
        n = np.cross(points[:, b] - points[:, a], points[:, c] - points[:, a])
        inward = np.einsum("ij,ij->i", n, points[:, i] - points[:, a]) > 0
        n[inward] *= -1
        normals.append(n / np.linalg.norm(n, axis=1, keepdims=True))
    out = []
    for i in range(4):
        for j in range(i + 1, 4):
            out.append(180.0 - np.degrees(np.arccos(np.clip(np.einsum("ij,ij->i", normals[i], normals[j]), -1, 1))))
    return np.stack(out, axis=1)


def mesh_quality(
    groups: Mapping[str, tuple[int, int]],
    *,
    phases: Mapping[str, int] | None = None,
    image_labels: np.ndarray | None = None,
    meshed_labels: np.ndarray | None = None,
    voxel_size: tuple[float, ...] | None = None,
) -> dict[str, Any]:
    """Quality report of the current gmsh model (SI units).

    Args:
        groups: physical group name -> (dim, tag) of the model.
        phases: phase name -> label, to compare phase measures with the image.
        image_labels: the original label image.
        meshed_labels: the labels actually meshed (after island/pinch cleaning).
        voxel_size: pixel/voxel edge lengths in metres.

    Returns:
        A JSON-ready dict: node and element counts, minimum/mean angle (triangles; dihedral
        for tetrahedra), gmsh's radius ratio ``gamma`` and scaled Jacobian ``minSICN``, and
        per group its measure; per phase the mesh vs image measure and relative difference.
    """
    import gmsh

    dim = max(d for d, _ in groups.values())
    node_tags, coords, _ = gmsh.model.mesh.getNodes()
    xyz = coords.reshape(-1, 3)
    index = np.zeros(int(node_tags.max()) + 1 if node_tags.size else 1, dtype=np.int64)
    index[node_tags.astype(np.int64)] = np.arange(node_tags.size)
    report: dict[str, Any] = {"dimension": dim, "nodes": int(node_tags.size), "elements": {}}
    gammas, sicn, angles = [], [], []
    for cell_dim, tag in {v for v in groups.values() if v[0] == dim}:
        for entity in gmsh.model.getEntitiesForPhysicalGroup(cell_dim, tag):
            types, etags, enodes = gmsh.model.mesh.getElements(cell_dim, int(entity))
            for etype, et, en in zip(types, etags, enodes):
                name = gmsh.model.mesh.getElementProperties(int(etype))[0]
                report["elements"][name] = report["elements"].get(name, 0) + len(et)
                gammas.append(gmsh.model.mesh.getElementQualities(et, "gamma"))
                sicn.append(gmsh.model.mesh.getElementQualities(et, "minSICN"))
                ncorner = _CORNERS.get(int(etype))
                nper = len(en) // len(et)
                corners = en.reshape(-1, nper)[:, :ncorner].astype(np.int64)
                pts = xyz[index[corners]]
                if ncorner == 3 and dim == 2:
                    angles.append(_angles_deg(pts).min(axis=1))
                elif ncorner == 4 and dim == 3:
                    angles.append(_dihedral_deg(pts).min(axis=1))
    report["cells"] = int(sum(report["elements"].values()))
    if gammas:
        g, s = np.concatenate(gammas), np.concatenate(sicn)
        report["radius_ratio_gamma"] = {"min": float(g.min()), "mean": float(g.mean())}
        report["scaled_jacobian_minSICN"] = {
            "min": float(s.min()),
            "mean": float(s.mean()),
            "negative": int((s <= 0).sum()),
        }
    if angles:
        a = np.concatenate(angles)
        key = "min_angle_deg" if dim == 2 else "min_dihedral_angle_deg"
        report[key] = {"min": float(a.min()), "mean": float(a.mean()), "below_20deg": int((a < 20).sum())}
    measures = group_measures(groups)
    report["groups"] = {
        name: {"dim": d, "tag": t, "measure": measures[name]}
        for name, (d, t) in sorted(groups.items(), key=lambda x: x[1])
    }
    if phases is not None and voxel_size is not None and image_labels is not None:
        cell = float(np.prod(voxel_size))
        per = {}
        for name, value in phases.items():
            if name not in groups or groups[name][0] != dim:
                continue
            image_m = float(np.count_nonzero(image_labels == value)) * cell
            entry = {
                "mesh": measures[name],
                "image": image_m,
                "relative_difference": (measures[name] - image_m) / image_m if image_m else None,
            }
            if meshed_labels is not None:
                cleaned = float(np.count_nonzero(meshed_labels == value)) * cell
                entry["meshed_labels"] = cleaned
                entry["relative_difference_meshed_labels"] = (measures[name] - cleaned) / cleaned if cleaned else None
            per[name] = entry
        report["phase_measure"] = per
        report["box_measure"] = float(np.prod(np.array(image_labels.shape) * np.array(voxel_size)))
        report["measure_unit"] = "m^2" if dim == 2 else "m^3"
    logger.info(
        "mesh quality: %d cells, %d nodes%s",
        report["cells"],
        report["nodes"],
        f", min angle {report['min_angle_deg']['min']:.1f} deg" if "min_angle_deg" in report else "",
    )
    return report
