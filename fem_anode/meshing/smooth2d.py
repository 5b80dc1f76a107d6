"""Smooth, tagged triangle meshes of 2D segmented images through gmsh.

The phase boundaries of :func:`fem_anode.meshing.contours.boundary_network` (sub-pixel,
shared between neighbouring phases) become gmsh curves: interfaces are splines through the
simplified chain vertices, the box edges are straight lines. Every region of a kept phase
becomes a plane surface bounded by its loops (holes included). Phases that are not kept are
not meshed; their boundaries with kept phases remain as tagged facets.

Size control: the element size is ``H * phi(x)`` with a dimensionless refinement factor
``phi`` in ``[min_ratio, 1]`` that depends on the image only, so halving ``H`` refines
everywhere by two (about four times the elements): ``phi`` falls linearly to
``interface_ratio`` at the interfaces over ``refine_distance``, and to
``width / gap_width`` inside narrow parts of a phase (width = twice the medial-axis distance).
It is passed to gmsh as a background ``PostView`` field.

The gmsh geometry is built in pixel units (gmsh's tolerances break geometry in metres at the
10 nm scale); the finished mesh is scaled to metres, so the model in memory and the ``.msh``
written are in metres. Groups follow :mod:`fem_anode.meshing.tags`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from fem_anode.errors import InputError, UsageError
from fem_anode.io.images import VoxelImage
from fem_anode.meshing.contours import BoundaryNetwork, boundary_network
from fem_anode.meshing.tags import BOX_SIDE_TAGS, interface_name, interface_tag, phase_tag
from fem_anode.meshing.voxel import resolve_keep

__all__ = ["SmoothMeshOptions", "SmoothMeshResult", "build_smooth_model_2d", "size_factor_2d", "resolve_keep"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class SmoothMeshOptions:
    """Options of the smooth 2D mesher (lengths in metres unless stated).

    Attributes:
        size: global element size ``H`` in metres (``None``: 4 pixels).
        order: element order, 1 (linear) or 2 (quadratic, curved boundaries).
        interface_ratio: element size at interfaces relative to ``H`` (1 = no refinement).
        refine_distance: distance from the interfaces over which the size grows back to ``H``
            (``None``: 10 pixels).
        gap_width: parts of a phase narrower than this are refined in proportion to their
            width (``None``: 10 pixels; 0 disables).
        min_ratio: smallest size relative to ``H``.
        sigma: Gaussian smoothing of the phase indicators in pixels (sub-pixel boundary
            placement; 0 gives plain marching squares).
        tolerance: curve simplification tolerance in pixels.
        min_island_pixels: regions with fewer pixels are merged into their surroundings.
        algorithm: gmsh 2D algorithm (5 Delaunay, 6 Frontal-Delaunay, ...).
    """

    size: float | None = None
    order: int = 1
    interface_ratio: float = 0.5
    refine_distance: float | None = None
    gap_width: float | None = None
    min_ratio: float = 0.1
    sigma: float = 1.0
    tolerance: float = 0.1
    min_island_pixels: int = 0
    algorithm: int = 6

    def validate(self) -> None:
        if self.order not in (1, 2):
            raise UsageError(f"element order must be 1 or 2, got {self.order}")
        if self.size is not None and not (np.isfinite(self.size) and self.size > 0):
            raise UsageError(f"mesh size must be positive, got {self.size}")
        if not 0 < self.interface_ratio <= 1 or not 0 < self.min_ratio <= 1:
            raise UsageError("interface_ratio and min_ratio must lie in (0, 1]")
        for name in ("refine_distance", "gap_width"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise UsageError(f"{name} must be >= 0, got {value}")
        if self.sigma < 0 or self.tolerance < 0 or self.min_island_pixels < 0:
            raise UsageError("sigma, tolerance and min_island_pixels must be >= 0")


@dataclasses.dataclass
class SmoothMeshResult:
    """What :func:`build_smooth_model_2d` put into the gmsh model.

    Attributes:
        groups: physical group name -> (dimension, tag).
        labels: the cleaned label image that was meshed.
        size: the global size ``H`` used, metres.
        length_unit: metres per internal (pixel) unit; the mesh was scaled by it.
        network: the boundary network.
    """

    groups: dict[str, tuple[int, int]]
    labels: np.ndarray
    size: float
    length_unit: float
    network: BoundaryNetwork


def size_factor_2d(
    labels: np.ndarray, kept_labels: Sequence[int], scale: tuple[float, float], opts: SmoothMeshOptions, h: float
) -> np.ndarray:
    """Refinement factor ``phi`` per pixel (see the module docstring); lengths in pixel units.

    Args:
        labels: cleaned 2D labels.
        kept_labels: label values that are meshed.
        scale: internal length of a pixel along (y, x).
        opts: options with ``refine_distance``/``gap_width`` already in internal units.
        h: global size in internal units (only for the log).
    """
    kept = np.isin(labels, list(kept_labels))
    boundary = np.zeros(labels.shape, dtype=bool)
    for axis in (0, 1):
        a = np.take(labels, range(labels.shape[axis] - 1), axis=axis)
        b = np.take(labels, range(1, labels.shape[axis]), axis=axis)
        ka = np.take(kept, range(labels.shape[axis] - 1), axis=axis)
        kb = np.take(kept, range(1, labels.shape[axis]), axis=axis)
        edge = (a != b) & (ka | kb)
        lo = [slice(None)] * 2
        hi = [slice(None)] * 2
        lo[axis] = slice(0, -1)
        hi[axis] = slice(1, None)
        boundary[tuple(lo)] |= edge
        boundary[tuple(hi)] |= edge
    phi = np.ones(labels.shape)
    if boundary.any() and opts.interface_ratio < 1:
        d = ndimage.distance_transform_edt(~boundary, sampling=scale) + 0.5 * min(scale)
        dist = max(float(opts.refine_distance or 0.0), 1e-12)
        phi = np.minimum(phi, opts.interface_ratio + (1 - opts.interface_ratio) * np.clip(d / dist, 0, 1))
    if opts.gap_width:
        from skimage.morphology import medial_axis

        for value in kept_labels:
            mask = labels == value
            skeleton, dist = medial_axis(mask, return_distance=True)
            if not skeleton.any():
                continue
            _, (iy, ix) = ndimage.distance_transform_edt(~skeleton, return_indices=True)
            width = 2.0 * np.asarray(dist)[iy, ix] * min(scale)
            phi = np.where(mask, np.minimum(phi, width / opts.gap_width), phi)
    phi = np.clip(phi, opts.min_ratio, 1.0)
    logger.debug("size factor: min %.3g, mean %.3g (H = %.3g px)", phi.min(), phi[kept].mean(), h)
    return phi


def _add_size_view(phi: np.ndarray, scale: tuple[float, float], h: float) -> int:
    """Background size as a gmsh list-based quad view over the whole box; returns the field tag."""
    import gmsh

    ny, nx = phi.shape
    padded = np.pad(phi, 1, mode="edge")
    corner = np.minimum.reduce([padded[:-1, :-1], padded[:-1, 1:], padded[1:, :-1], padded[1:, 1:]]) * h  # (ny+1, nx+1)
    r, c = np.mgrid[:ny, :nx]
    r, c = r.ravel(), c.ravel()
    rows = np.stack([r, r, r + 1, r + 1], axis=1)
    cols = np.stack([c, c + 1, c + 1, c], axis=1)
    data = np.hstack([cols * scale[1], rows * scale[0], np.zeros_like(rows, dtype=float), corner[rows, cols]])
    view = gmsh.view.add("size field")
    gmsh.view.addListData(view, "SQ", data.shape[0], data.ravel().tolist())
    field = gmsh.model.mesh.field.add("PostView")
    gmsh.model.mesh.field.setNumber(field, "ViewTag", view)
    return field


def _catmull_rom(points: np.ndarray, samples: int = 8) -> np.ndarray:
    """Dense samples of the uniform Catmull-Rom spline through ``points`` (gmsh's geo ``Spline``)."""
    p = np.vstack([2 * points[0] - points[1], points, 2 * points[-1] - points[-2]])
    t = np.linspace(0, 1, samples, endpoint=False)[:, None, None]
    p0, p1, p2, p3 = p[:-3], p[1:-2], p[2:-1], p[3:]
    c = 0.5 * (2 * p1 + (p2 - p0) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2 + (3 * p1 - p0 - 3 * p2 + p3) * t**3)
    return np.vstack([c.transpose(1, 0, 2).reshape(-1, 2), points[-1:]])


def _spline_shape(points: np.ndarray) -> np.ndarray:
    """Sampled shape of a chain drawn as line + spline + line (see :func:`_mesh_geometry`)."""
    return np.vstack([points[:1], _catmull_rom(points[1:-1]), points[-1:]])


def _spline_safe(network: BoundaryNetwork, used: list[int]) -> set[int]:
    """Chains (with >= 5 vertices) whose splines cross no other curve nor themselves."""
    from fem_anode.meshing.contours import _crossing_chains

    candidates = {i for i in used if len(network.chains[i].points) >= 5}
    for _ in range(4):
        shapes = [
            dataclasses.replace(
                network.chains[i],
                points=_spline_shape(network.chains[i].points) if i in candidates else network.chains[i].points,
            )
            for i in used
        ]
        bad = {used[k] for k in _crossing_chains(shapes)} & candidates
        if not bad:
            break
        logger.debug("%d chains drawn as polylines: their splines would cross", len(bad))
        candidates -= bad
    return candidates


def _mesh_geometry(
    network: BoundaryNetwork,
    used: list[int],
    kept_region: np.ndarray,
    name_of: dict[int, str],
    scale: tuple[float, float],
    phi: np.ndarray,
    h: float,
    opts: SmoothMeshOptions,
    mode: str,
) -> tuple[dict[str, tuple[int, int]], int]:
    """Add the geometry of the used chains as a new gmsh model and mesh it (pixel units).

    ``mode`` ``spline``: each chain is a spline through its inner vertices with straight first
    and last segments (so curves meeting at a junction cannot cross there); ``polyline``: one
    straight line per segment (never crosses, since the chains do not).
    """
    import gmsh

    gmsh.model.add(f"smooth_mesh_2d_{mode}")
    geo = gmsh.model.geo
    region_label = network.region_label
    point_tag: dict[int, int] = {}

    def node_point(node: int, xy: np.ndarray) -> int:
        if node not in point_tag:
            point_tag[node] = geo.addPoint(xy[0] * scale[1], xy[1] * scale[0], 0.0)
        return point_tag[node]

    curves: dict[int, list[int]] = {}
    facet_members: dict[int, list[int]] = {}
    tag_name: dict[int, str] = {}
    smooth_ok = _spline_safe(network, used) if mode == "spline" else set()
    for i in used:
        ch = network.chains[i]
        pts = ch.points
        tags = (
            [node_point(ch.start, pts[0])]
            + [geo.addPoint(x * scale[1], y * scale[0], 0.0) for x, y in pts[1:-1]]
            + [node_point(ch.end, pts[-1])]
        )
        n = len(tags)
        if i in smooth_ok:
            curves[i] = [geo.addLine(tags[0], tags[1]), geo.addSpline(tags[1:-1]), geo.addLine(tags[-2], tags[-1])]
        else:
            curves[i] = [geo.addLine(tags[k], tags[k + 1]) for k in range(n - 1)]
        side = network.side_of(ch.right)
        if side is not None:
            tag, name = BOX_SIDE_TAGS[side], side
        else:
            la, lb = int(region_label[ch.left]), int(region_label[ch.right])
            tag, name = interface_tag(la, lb), interface_name(name_of[la], name_of[lb])
        facet_members.setdefault(tag, []).extend(curves[i])
        tag_name[tag] = name
    surfaces: dict[int, list[int]] = {}
    for region in map(int, np.flatnonzero(kept_region)):
        loop_tags = []
        for loop in network.loops(region):
            signed: list[int] = []
            for k in loop:
                signed.extend(curves[k] if k >= 0 else [-c for c in reversed(curves[~k])])
            loop_tags.append(geo.addCurveLoop(signed, reorient=False))
        surfaces.setdefault(int(region_label[region]), []).append(geo.addPlaneSurface(loop_tags))
    geo.synchronize()

    groups: dict[str, tuple[int, int]] = {}
    for value, tags in sorted(surfaces.items()):
        groups[name_of[value]] = (2, phase_tag(value))
        gmsh.model.addPhysicalGroup(2, tags, phase_tag(value), name=name_of[value])
    for tag, members in sorted(facet_members.items()):
        groups[tag_name[tag]] = (1, tag)
        gmsh.model.addPhysicalGroup(1, members, tag, name=tag_name[tag])

    field = _add_size_view(phi, scale, h)
    gmsh.model.mesh.field.setAsBackgroundMesh(field)
    for option, number in (
        ("Mesh.MeshSizeExtendFromBoundary", 0.0),
        ("Mesh.MeshSizeFromPoints", 0),
        ("Mesh.MeshSizeFromCurvature", 0),
        ("Mesh.MeshSizeMax", h),
        ("Mesh.MeshSizeMin", opts.min_ratio * h * 0.5),
        ("Mesh.Algorithm", opts.algorithm),
        ("Mesh.ElementOrder", 1),
        ("Mesh.LcIntegrationPrecision", 1e-3),  # default 1e-9 makes 1D meshing of long splines slow
    ):
        gmsh.option.setNumber(option, number)
    try:
        gmsh.model.mesh.generate(2)
        if opts.order == 2:
            gmsh.model.mesh.setOrder(2)
    except Exception as err:  # gmsh raises plain Exception
        raise InputError(f"gmsh could not mesh the image: {err}") from None
    if not any(len(t) for t in gmsh.model.mesh.getElements(2)[1]):
        raise InputError("gmsh produced no triangles")
    return groups, sum(len(v) for v in surfaces.values())


def build_smooth_model_2d(
    image: VoxelImage, keep: Sequence[str] | None = None, options: SmoothMeshOptions | None = None
) -> SmoothMeshResult:
    """Mesh the kept phases of a 2D label image in the current gmsh session (model added).

    The caller owns the gmsh session (``gmsh.initialize()`` ... ``gmsh.finalize()``). On return
    the current model holds the tagged mesh in metres. If meshing with spline boundaries fails,
    the session is restarted (other models in it are lost) and polyline boundaries are used.

    Raises:
        UsageError: unknown phase names, bad options, a size larger than the domain.
        InputError: not a 2D label image, kept phases without pixels.
    """
    import gmsh

    opts = dataclasses.replace(options or SmoothMeshOptions())
    opts.validate()
    if image.ndim != 2:
        raise InputError(
            f"{image.source}: the smooth mesher needs a 2D image, got {image.ndim}D; use --method voxel or tet for 3D"
        )
    if image.array.size == 0:
        raise InputError(f"{image.source}: image is empty")
    kept = resolve_keep(image, keep)
    phases = image.require_phases()
    hy, hx = image.require_voxel_size()
    unit = min(hx, hy)
    scale = (hy / unit, hx / unit)
    ny, nx = image.shape
    if min(ny, nx) < 2:
        raise InputError(f"{image.source}: image {ny} x {nx} is too small to mesh (need at least 2 x 2 pixels)")
    extent = min(ny * hy, nx * hx)
    size = float(opts.size) if opts.size is not None else 4.0 * unit
    if size > extent:
        raise UsageError(
            f"mesh size {size:.4g} m is larger than the domain ({ny * hy:.4g} x {nx * hx:.4g} m); use a smaller --size"
        )
    if size < 0.05 * unit:
        raise UsageError(
            f"mesh size {size:.4g} m is below 1/20 of a pixel ({unit:.4g} m): the mesh would be needlessly huge"
        )
    opts.refine_distance = (10.0 * unit if opts.refine_distance is None else opts.refine_distance) / unit
    opts.gap_width = (10.0 * unit if opts.gap_width is None else opts.gap_width) / unit
    h = size / unit

    network = boundary_network(
        image.array,
        sigma=opts.sigma,
        tolerance=opts.tolerance,
        min_island_pixels=opts.min_island_pixels,
        protected_labels=(),
    )
    labels = network.labels
    present = set(np.unique(labels).tolist())
    vanished = [n for n, v in kept.items() if v not in present]
    if vanished:
        raise InputError(
            f"kept phase(s) {', '.join(vanished)} vanished after removing islands below {opts.min_island_pixels} pixels"
        )
    name_of = {v: n for n, v in phases.items()}
    kept_values = set(kept.values())
    region_label = network.region_label
    nreg = network.n_regions
    kept_region = np.isin(region_label, list(kept_values))

    def is_kept(region: int) -> bool:
        return region < nreg and bool(kept_region[region])

    used = [i for i, ch in enumerate(network.chains) if is_kept(ch.left) or is_kept(ch.right)]
    phi = size_factor_2d(labels, sorted(kept_values), scale, opts, h)
    try:
        groups, n_surfaces = _mesh_geometry(network, used, kept_region, name_of, scale, phi, h, opts, "spline")
    except InputError as err:
        # After a failed generate() gmsh silently meshes nothing more in this session: restart it.
        logger.warning("gmsh failed with spline boundaries (%s); retrying with polyline boundaries", err)
        terminal = gmsh.option.getNumber("General.Terminal")
        gmsh.finalize()
        gmsh.initialize(interruptible=False)
        gmsh.option.setNumber("General.Terminal", terminal)
        try:
            groups, n_surfaces = _mesh_geometry(network, used, kept_region, name_of, scale, phi, h, opts, "polyline")
        except InputError as again:
            raise InputError(
                f"{image.source}: {again}; the image probably has pixel-scale noise: merge small regions "
                "with --min-island (e.g. 10) or segment with more smoothing"
            ) from None
    gmsh.model.mesh.affineTransform([unit, 0, 0, 0, 0, unit, 0, 0, 0, 0, unit, 0])
    logger.info(
        "smooth 2D mesh of %s: %d curves, %d surfaces, H = %.3g m, order %d",
        image.source,
        len(used),
        n_surfaces,
        size,
        opts.order,
    )
    return SmoothMeshResult(groups, labels, size, unit, network)
