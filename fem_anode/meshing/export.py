"""Mesh export to the formats other tools read, through meshio; the format follows the suffix.

========  ==========================================  ============================================
suffix    format                                      where the tags go
========  ==========================================  ============================================
``.msh``  gmsh 4.1 (written by gmsh itself)           physical groups with their names
``.vtu``  VTK XML unstructured grid (ParaView)        cell data ``tag`` on cells and facets
``.xdmf`` XDMF 3 + HDF5: cells in ``NAME.xdmf``,      cell data ``tag`` on cells and facets
          facets in ``NAME_facets.xdmf`` (``.h5`` each)
``.inp``  Abaqus input                                 element set per phase (``*ELSET``), node set
                                                      per interface and box side (``*NSET``)
``.med``  MED (Salome, code_aster)                    one element family per group, named after it
========  ==========================================  ============================================

Tag numbers and names follow :mod:`fem_anode.meshing.tags` (phase ``100 + label``, interface
``a|b``, box sides 1-6), so a ``tag`` read from any format names its group. Abaqus names allow
letters, digits and underscores only: ``pore|sei`` becomes ``pore_sei``. Abaqus gets the cells
only (a facet element would need a section of its own); its interfaces are node sets.
Coordinates are in metres. Files appear complete or not at all (written under a temporary name
and renamed; XDMF's ``.h5`` first).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from fem_anode.errors import InputError, UsageError

__all__ = ["FORMATS", "abaqus_name", "check_format", "current_model_to_meshio", "export_meshio", "facets_path"]

logger = logging.getLogger(__name__)

#: Output suffix -> description.
FORMATS: dict[str, str] = {
    ".msh": "gmsh 4.1",
    ".vtu": "VTK XML unstructured grid",
    ".xdmf": "XDMF + HDF5",
    ".inp": "Abaqus input",
    ".med": "MED (Salome, code_aster)",
}
_MESHIO_FORMAT = {".vtu": "vtu", ".xdmf": "xdmf", ".inp": "abaqus", ".med": "med"}


def check_format(path: str | Path) -> str:
    """The suffix of ``path`` if it is a supported mesh format, else UsageError listing them."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        listing = ", ".join(f"{k} ({v})" for k, v in FORMATS.items())
        raise UsageError(f"mesh output {path}: unknown format {suffix or '(no suffix)'!r}; use one of {listing}")
    return suffix


def abaqus_name(name: str) -> str:
    """A group name as an Abaqus set label (letters, digits, underscores; starts with a letter)."""
    label = re.sub(r"[^A-Za-z0-9_]", "_", name)
    return label if label[:1].isalpha() else f"g_{label}"


def current_model_to_meshio() -> tuple[Any, dict[str, tuple[int, int]]]:
    """The mesh of the current gmsh model as a :class:`meshio.Mesh` (elements of physical
    groups only, cell data ``gmsh:physical``) and its groups name -> (dimension, tag)."""
    import gmsh
    import meshio

    groups = {gmsh.model.getPhysicalName(d, t) or str(t): (d, t) for d, t in gmsh.model.getPhysicalGroups()}
    with tempfile.TemporaryDirectory(prefix="fem_anode_export_") as folder:
        tmp = Path(folder) / "model.msh"
        binary = gmsh.option.getNumber("Mesh.Binary")
        version = gmsh.option.getNumber("Mesh.MshFileVersion")
        try:
            gmsh.option.setNumber("Mesh.Binary", 1)
            gmsh.option.setNumber("Mesh.MshFileVersion", 4.1)
            gmsh.write(str(tmp))
        finally:
            gmsh.option.setNumber("Mesh.Binary", binary)
            gmsh.option.setNumber("Mesh.MshFileVersion", version)
        mesh = meshio.read(tmp)
    return mesh, groups


def _merged_blocks(mesh: Any) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(cell type, connectivity, tag per cell), one block per cell type (MED needs that)."""
    tags = mesh.cell_data.get("gmsh:physical")
    if tags is None:
        raise InputError("the mesh has no physical groups to export")
    merged: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for block, tag in zip(mesh.cells, tags):
        merged.setdefault(block.type, []).append((np.asarray(block.data), np.asarray(tag)))
    return [
        (kind, np.concatenate([b for b, _ in parts]), np.concatenate([t for _, t in parts]).astype(np.int32))
        for kind, parts in merged.items()
    ]


def _topological_dim(cell_type: str) -> int:
    import meshio

    return int(meshio._mesh.topological_dimension[cell_type])


def export_meshio(mesh: Any, groups: dict[str, tuple[int, int]], path: str | Path, gdim: int) -> Path:
    """Write a tagged mesh (from :func:`current_model_to_meshio`) as ``path`` (``.vtu``,
    ``.xdmf``, ``.inp`` or ``.med``), atomically.

    Args:
        mesh: meshio mesh with cell data ``gmsh:physical``.
        groups: name -> (dimension, tag).
        path: output file; its suffix picks the format.
        gdim: geometric dimension (2: the z coordinate is dropped where the format allows).

    Raises:
        UsageError: unknown suffix (``.msh`` is written by gmsh, not here).
    """
    import meshio

    path = Path(path)
    suffix = check_format(path)
    if suffix == ".msh":
        raise UsageError("write .msh files with gmsh (fem_anode.meshing.build.mesh_image)")
    blocks = _merged_blocks(mesh)
    tdim = max(_topological_dim(kind) for kind, _, _ in blocks)
    points = np.asarray(mesh.points, dtype=np.float64)
    points3 = np.column_stack([points, np.zeros((len(points), 3 - points.shape[1]))]) if points.shape[1] < 3 else points
    pointsd = points3[:, :gdim]
    name_of = {(d, t): name for name, (d, t) in groups.items()}
    if suffix == ".vtu":
        out = meshio.Mesh(points3, [(k, c) for k, c, _ in blocks], cell_data={"tag": [t for _, _, t in blocks]})
    elif suffix == ".xdmf":
        # One topology per file (the cells; the facets beside them), as dolfinx keeps meshes and
        # facet tags: a mixed XDMF topology with quadratic edges cannot be read back by meshio.
        cells = [(k, c, t) for k, c, t in blocks if _topological_dim(k) == tdim]
        facets = [(k, c, t) for k, c, t in blocks if _topological_dim(k) == tdim - 1]
        out = meshio.Mesh(pointsd, [(k, c) for k, c, _ in cells], cell_data={"tag": [t for _, _, t in cells]})
        extra = (
            {
                facets_path(path): meshio.Mesh(
                    pointsd, [(k, c) for k, c, _ in facets], cell_data={"tag": [t for _, _, t in facets]}
                )
            }
            if facets
            else {}
        )
        _write_atomic({**extra, path: out}, "xdmf")
        logger.info(
            "wrote %s and %s (%s): %d points, %s",
            path,
            facets_path(path).name,
            FORMATS[suffix],
            len(points),
            ", ".join(f"{len(c)} {k}" for k, c, _ in blocks),
        )
        return path
    elif suffix == ".med":
        out = meshio.Mesh(pointsd, [(k, c) for k, c, _ in blocks], cell_data={"cell_tags": [-t for _, _, t in blocks]})
        # MED element families carry negative numbers; one family per group, named after it.
        out.cell_tags = {
            -t: [name_of.get((_topological_dim(k), int(t)), str(t))] for k, _, tags in blocks for t in np.unique(tags)
        }
    else:  # Abaqus: the cells, an element set per phase, a node set per facet group
        cells = [(k, c, t) for k, c, t in blocks if _topological_dim(k) == tdim]
        cell_sets = {}
        for name, (d, tag) in groups.items():
            if d == tdim:
                cell_sets[abaqus_name(name)] = [np.flatnonzero(t == tag) for _, _, t in cells]
        point_sets = {}
        for name, (d, tag) in groups.items():
            if d == tdim - 1:
                nodes = np.unique(
                    np.concatenate(
                        [c[t == tag].ravel() for k, c, t in blocks if _topological_dim(k) == d] or [np.zeros(0, int)]
                    )
                )
                point_sets[abaqus_name(name)] = nodes
        out = meshio.Mesh(pointsd, [(k, c) for k, c, _ in cells], cell_sets=cell_sets, point_sets=point_sets)
    _write_atomic({path: out}, _MESHIO_FORMAT[suffix])
    logger.info(
        "wrote %s (%s): %d points, %s",
        path,
        FORMATS[suffix],
        len(points),
        ", ".join(f"{len(c)} {k}" for k, c, _ in blocks),
    )
    return path


def facets_path(path: str | Path) -> Path:
    """The facet file written beside an ``.xdmf`` mesh: ``NAME_facets.xdmf``."""
    path = Path(path)
    return path.with_name(f"{path.stem}_facets{path.suffix}")


def _write_atomic(meshes: dict[Path, Any], file_format: str) -> None:
    """meshio.write every mesh into a hidden folder beside the first, then rename them all (heavy
    data such as XDMF's ``.h5`` first, the last mesh file last), so a failure leaves nothing."""
    import meshio

    paths = list(meshes)
    parent = paths[-1].parent
    parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{paths[-1].stem}.partial-", dir=parent))
    try:
        for path, mesh in meshes.items():
            meshio.write(folder / path.name, mesh, file_format=file_format)
        names = {p.name for p in paths}
        for companion in sorted(p for p in folder.iterdir() if p.name not in names):
            os.replace(companion, parent / companion.name)
        for path in paths:
            os.replace(folder / path.name, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
