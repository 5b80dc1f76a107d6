"""One entry point for every image-to-mesh method, in memory or to a ``.msh`` file.

Methods:

* ``smooth`` (2D default): sub-pixel smooth interfaces, size control, order 1 or 2
  (:mod:`fem_anode.meshing.smooth2d`);
* ``voxel`` (3D default): one quadrilateral/hexahedron per pixel/voxel
  (:mod:`fem_anode.meshing.voxel`);
* ``tet`` (3D): six conforming tetrahedra per voxel (:mod:`fem_anode.meshing.tet3d`).

Files: ``.msh`` by gmsh; ``.vtu``, ``.xdmf``, ``.inp``, ``.med`` through meshio
(:mod:`fem_anode.meshing.export`).

Voxel and tetrahedral meshes conserve every phase area/volume exactly; all methods give the
same group names and tags (:mod:`fem_anode.meshing.tags`) and are read by
:func:`fem_anode.fem.mesh_io.read_mesh`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fem_anode.errors import InputError, UsageError
from fem_anode.io.images import VoxelImage
from fem_anode.io.output import atomic_path, write_json

__all__ = ["METHODS", "BuiltModel", "MeshResult", "build_model", "mesh_image", "default_method"]

logger = logging.getLogger(__name__)

METHODS = ("smooth", "voxel", "tet")
#: Meshes with more cells are written as binary ``.msh`` by default.
BINARY_ABOVE_CELLS = 500_000


@dataclasses.dataclass
class BuiltModel:
    """What :func:`build_model` added to the gmsh session.

    Attributes:
        groups: physical group name -> (dimension, tag).
        gdim: geometric dimension (2 or 3).
        method: the method used.
        meshed_labels: the labels that were meshed (after cleaning).
        cleaning: what cleaning changed (smooth method): islands_removed, island_pixels,
            pinch_pixels.
    """

    groups: dict[str, tuple[int, int]]
    gdim: int
    method: str
    meshed_labels: np.ndarray
    cleaning: dict[str, int] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class MeshResult:
    """Result of :func:`mesh_image`: groups, quality report and where the files went."""

    groups: dict[str, tuple[int, int]]
    quality: dict[str, Any]
    path: Path | None
    method: str


def default_method(image: VoxelImage) -> str:
    """``smooth`` for 2D images, ``voxel`` for 3D volumes."""
    return "smooth" if image.ndim == 2 else "voxel"


def build_model(
    image: VoxelImage,
    *,
    method: str | None = None,
    keep: Sequence[str] | None = None,
    options: Any = None,
    order: int | None = None,
    memory_check: bool = True,
) -> BuiltModel:
    """Mesh ``image`` into a new model of the current (initialised) gmsh session.

    Args:
        image: label image with voxel size and phase map.
        method: ``smooth``, ``voxel`` or ``tet`` (default: :func:`default_method`).
        keep: phases to mesh (default all); the others become tagged boundaries.
        options: :class:`~fem_anode.meshing.smooth2d.SmoothMeshOptions` (smooth only).
        order: element order 1 or 2; overrides ``options.order``.
        memory_check: refuse a mesh whose estimated memory exceeds the available memory
            (``False``: the CLI's ``--no-memory-check``).

    Raises:
        UsageError: unknown method or phase, options that do not apply to the method.
        InputError: unusable image, or a mesh whose estimated memory exceeds the available
            memory (:func:`fem_anode.resources.check_memory`).
    """
    import gmsh

    from fem_anode.meshing.smooth2d import SmoothMeshOptions, build_smooth_model_2d
    from fem_anode.meshing.voxel import resolve_keep

    if image.array.size == 0:
        raise InputError(f"{image.source}: image is empty")
    method = method or default_method(image)
    if method not in METHODS:
        raise UsageError(f"unknown mesh method {method!r}; choose one of {', '.join(METHODS)}")
    if order is not None and order not in (1, 2):
        raise UsageError(f"element order must be 1 or 2, got {order}")
    image.require_voxel_size()
    resolve_keep(image, keep)
    from fem_anode.resources import check_memory, estimate_mesh_memory

    mesh_order = order if order is not None else getattr(options, "order", 1)
    check_memory(
        estimate_mesh_memory(image, method, keep, order=mesh_order),
        hint="crop or coarsen the image or mesh fewer phases",
        enabled=memory_check,
    )
    if method == "smooth":
        opts = dataclasses.replace(options) if options is not None else SmoothMeshOptions()
        if order is not None:
            opts.order = order
        result = build_smooth_model_2d(image, keep, opts)
        return BuiltModel(result.groups, 2, method, result.labels, dataclasses.asdict(result.network.clean))
    if options is not None and getattr(options, "size", None) is not None:
        raise UsageError(f"--size applies to the smooth method only; {method} meshes have one cell per voxel")
    if method == "tet":
        from fem_anode.meshing.tet3d import tet_mesh_data

        data = tet_mesh_data(image, keep)
    else:
        from fem_anode.meshing.voxel import voxel_mesh_data

        data = voxel_mesh_data(image, keep)
    from fem_anode.meshing.voxel import add_voxel_model

    add_voxel_model(data, name=f"{method}_mesh")
    if order == 2:
        gmsh.model.mesh.setOrder(2)
    return BuiltModel(dict(data.groups), data.gdim, method, image.array)


def mesh_image(
    image: VoxelImage,
    path: str | Path | None = None,
    *,
    method: str | None = None,
    keep: Sequence[str] | None = None,
    options: Any = None,
    order: int | None = None,
    quality_path: str | Path | None = None,
    binary: bool | None = None,
    memory_check: bool = True,
) -> MeshResult:
    """Mesh an image with gmsh, write the mesh file (metres) and a quality report.

    Args:
        image: label image with voxel size and phase map.
        path: output file (``None``: nothing written, report only); the suffix picks the
            format: ``.msh`` (gmsh 4.1), ``.vtu``, ``.xdmf``, ``.inp`` or ``.med``
            (:mod:`fem_anode.meshing.export`).
        method, keep, options, order, memory_check: see :func:`build_model`.
        quality_path: JSON file for the quality report (``None``: not written).
        binary: write the ``.msh`` in binary (``None``: binary above
            :data:`BINARY_ABOVE_CELLS` cells, where ASCII files get slow to write and read).

    Returns:
        The groups and the quality report (see :func:`fem_anode.meshing.quality.mesh_quality`).
    """
    import gmsh

    from fem_anode.meshing.export import check_format
    from fem_anode.meshing.quality import mesh_quality

    if path is not None:
        path = Path(path)
        check_format(path)
    start = time.perf_counter()
    gmsh.initialize(interruptible=False)
    try:
        gmsh.option.setNumber("General.Terminal", 0)
        built = build_model(image, method=method, keep=keep, options=options, order=order, memory_check=memory_check)
        elapsed = time.perf_counter() - start
        quality = mesh_quality(
            built.groups,
            phases=image.require_phases(),
            image_labels=image.array,
            meshed_labels=built.meshed_labels,
            voxel_size=image.require_voxel_size(),
        )
        quality.update(
            {
                "cleaning": built.cleaning,
                "method": built.method,
                "source": image.source,
                "shape": list(image.shape),
                "voxel_size_m": list(image.require_voxel_size()),
                "mesh_seconds": elapsed,
            }
        )
        if path is not None and path.suffix.lower() == ".msh":
            gmsh.option.setNumber("Mesh.MshFileVersion", 4.1)
            use_binary = quality["cells"] > BINARY_ABOVE_CELLS if binary is None else binary
            gmsh.option.setNumber("Mesh.Binary", int(use_binary))
            with atomic_path(path) as tmp:
                gmsh.write(str(tmp))
        elif path is not None:
            from fem_anode.meshing.export import current_model_to_meshio, export_meshio

            exported, groups = current_model_to_meshio()
            export_meshio(exported, groups, path, built.gdim)
        if path is not None:
            quality["file"] = str(path)
            quality["file_bytes"] = path.stat().st_size
    finally:
        gmsh.finalize()
    if quality_path is not None:
        write_json(Path(quality_path), quality)
    logger.info(
        "%s mesh: %d cells in %.1f s, groups: %s", built.method, quality["cells"], elapsed, ", ".join(built.groups)
    )
    return MeshResult(built.groups, quality, path, built.method)
