"""Evaluating distributed dolfinx functions at arbitrary points and on boundary facets."""

from __future__ import annotations

import numpy as np
from dolfinx import fem, geometry
from dolfinx import mesh as dmesh
from mpi4py import MPI

__all__ = ["sample_points", "facet_samples"]


def _first_colliding_cells(mesh: dmesh.Mesh, tree: geometry.BoundingBoxTree, points: np.ndarray) -> np.ndarray:
    """Index of a local cell containing each point, -1 where none does.

    On curved (non-affine) cells dolfinx's pull-back raises when Newton fails for a point
    outside a candidate cell; the batch is then bisected so only such points are dropped.
    """
    cells = np.full(points.shape[0], -1, dtype=np.int32)
    if points.shape[0] == 0:
        return cells
    try:
        candidates = geometry.compute_collisions_points(tree, points)
        colliding = geometry.compute_colliding_cells(mesh, candidates, points)
    except RuntimeError:
        if points.shape[0] == 1:
            return cells
        half = points.shape[0] // 2
        return np.concatenate(
            [_first_colliding_cells(mesh, tree, points[:half]), _first_colliding_cells(mesh, tree, points[half:])]
        )
    found = np.flatnonzero(np.diff(colliding.offsets) > 0)
    cells[found] = colliding.array[colliding.offsets[found]]
    return cells


def _eval(u: fem.Function, points: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """``u.eval`` with the same bisection fallback (NaN where the curved pull-back fails)."""
    try:
        return np.reshape(u.eval(points, cells), (points.shape[0], -1))[:, 0]  # eval flattens one point
    except RuntimeError:
        if points.shape[0] == 1:
            return np.array([np.nan])
        half = points.shape[0] // 2
        return np.concatenate([_eval(u, points[:half], cells[:half]), _eval(u, points[half:], cells[half:])])


def sample_points(u: fem.Function, points: np.ndarray) -> np.ndarray:
    """Values of scalar ``u`` at ``points`` (n, 3) in mesh coordinates, on every rank.

    Points outside the mesh give NaN. Collective: every rank must pass the same points.
    """
    mesh = u.function_space.mesh
    points = np.ascontiguousarray(points, dtype=np.float64)
    tree = geometry.bb_tree(mesh, mesh.topology.dim)
    cells = _first_colliding_cells(mesh, tree, points)
    found = np.flatnonzero(cells >= 0)
    values = np.full(points.shape[0], -np.inf)
    if found.size:
        evaluated = _eval(u, points[found], cells[found])
        values[found] = np.where(np.isfinite(evaluated), evaluated, -np.inf)
    mesh.comm.Allreduce(MPI.IN_PLACE, values, op=MPI.MAX)  # buffer reduction: element-wise
    values[~np.isfinite(values)] = np.nan
    return values


def facet_samples(u: fem.Function, facets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per owned boundary facet: measure (m or m^2), mean, min and max of ``u`` (local data).

    Collective on 2D meshes (every rank must call it, also with no facets).

    2D: the mean is Simpson's rule along the edge (exact for P2 on a straight edge); on a curved
    (quadratic-geometry) edge the centre point is the edge's middle node, which lies on the
    curve, and the length is the 3-point Gauss rule of ``|x'(s)|`` over the quadratic map. 3D:
    the vertex/centroid average on the face (flat faces). Min and max are taken over vertices
    and centre.
    """
    mesh = u.function_space.mesh
    tdim = mesh.topology.dim
    fdim = tdim - 1
    mesh.topology.create_connectivity(fdim, tdim)
    f_to_c = mesh.topology.connectivity(fdim, tdim)
    facets = np.asarray(facets, dtype=np.int32)
    # 2D: the reference-point expression is compiled on every rank, also one without facets
    edge_points = _edge_points(u) if tdim == 2 else None
    if facets.size == 0:
        empty = np.zeros(0)
        return empty, empty, empty, empty
    nodes = dmesh.entities_to_geometry(mesh, fdim, facets, False)
    xyz = mesh.geometry.x[nodes]  # (n, nodes per facet, 3): the vertices first, then edge nodes
    if tdim == 2:
        n_vertices = 2
    else:
        n_vertices = 3 if mesh.topology.cell_type == dmesh.CellType.tetrahedron else 4
    vertices = xyz[:, :n_vertices]
    curved = tdim == 2 and xyz.shape[1] == 3
    cells = f_to_c.array[f_to_c.offsets[facets]]
    if tdim == 2:
        assert edge_points is not None  # made above for every 2D mesh
        at_vertices, at_centre = _on_edges(u, *edge_points, facets, cells)
    else:
        points = np.concatenate([vertices.reshape(-1, 3), vertices.mean(axis=1)])
        values = _eval(u, points, np.concatenate([np.repeat(cells, n_vertices), cells]))
        at_vertices = values[: -len(facets)].reshape(len(facets), n_vertices)
        at_centre = values[-len(facets) :]
    if tdim == 2:
        if curved:  # x(s) = v0 (1-s)(1-2s) + v1 s(2s-1) + m 4s(1-s) on [0, 1]
            v0, v1, m = xyz[:, 0], xyz[:, 1], xyz[:, 2]
            gauss = ((0.5 - np.sqrt(0.15), 5 / 18), (0.5, 8 / 18), (0.5 + np.sqrt(0.15), 5 / 18))
            measure = sum(
                w * np.linalg.norm(v0 * (4 * s - 3) + v1 * (4 * s - 1) + m * (4 - 8 * s), axis=1) for s, w in gauss
            )
        else:
            measure = np.linalg.norm(xyz[:, 1] - xyz[:, 0], axis=1)
        mean = (at_vertices.sum(axis=1) + 4 * at_centre) / 6.0
    else:
        if n_vertices == 3:
            measure = 0.5 * np.linalg.norm(np.cross(xyz[:, 1] - xyz[:, 0], xyz[:, 2] - xyz[:, 0]), axis=1)
        else:  # quadrilateral, tensor-product vertex order
            measure = 0.5 * np.linalg.norm(np.cross(xyz[:, 3] - xyz[:, 0], xyz[:, 2] - xyz[:, 1]), axis=1)
        mean = 0.5 * at_vertices.mean(axis=1) + 0.5 * at_centre
    both = np.column_stack([at_vertices, at_centre])
    return measure, mean, both.min(axis=1), both.max(axis=1)


def _edge_points(u: fem.Function) -> tuple[fem.Expression, list[list[int]]]:
    """``u`` at the two ends and the middle of every edge of the reference cell, as one
    expression (collective: dolfinx compiles it on the mesh's communicator), and the edges."""
    import basix

    mesh = u.function_space.mesh
    cell_type = basix.CellType[mesh.topology.cell_name()]
    reference = np.asarray(basix.geometry(cell_type), dtype=np.float64)  # (vertices, 2)
    edges = [list(edge) for edge in basix.topology(cell_type)[1]]
    points = np.array([p for a, b in edges for p in (reference[a], reference[b], 0.5 * (reference[a] + reference[b]))])
    return fem.Expression(u, points), edges


def _on_edges(
    u: fem.Function, expression: fem.Expression, edges: list[list[int]], facets: np.ndarray, cells: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``u`` at the two ends and the middle of each boundary edge of a 2D mesh, (n, 2) and (n,).

    Evaluated at the edge's points of the *reference* cell (:func:`_edge_points`), so no point
    has to be pulled back from physical coordinates: exact on curved (quadratic-geometry)
    cells too, where a boundary point can fail the Newton pull-back. Local (not collective).
    """
    mesh = u.function_space.mesh
    mesh.topology.create_connectivity(2, 1)
    c_to_f = mesh.topology.connectivity(2, 1)
    per_cell = c_to_f.array.reshape(-1, len(edges))  # every cell has the same number of edges
    local = np.argmax(per_cell[cells] == facets[:, None], axis=1)
    values = expression.eval(mesh, cells.astype(np.int32)).reshape(len(facets), len(edges), 3)
    picked = values[np.arange(len(facets)), local]  # (n, 3): the facet's own edge
    return picked[:, :2], picked[:, 2]
