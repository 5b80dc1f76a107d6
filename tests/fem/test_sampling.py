"""Boundary-facet sampling (fem_anode.fem.sampling.facet_samples) on straight and curved edges."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("dolfinx")

from dolfinx import fem
from dolfinx import mesh as dmesh
from mpi4py import MPI

from fem_anode.fem.sampling import facet_samples

RADIUS = 1e-6


def _disc(order: int, comm: MPI.Comm) -> dmesh.Mesh:
    """A gmsh disc of radius RADIUS with geometry of ``order`` (2: curved boundary edges)."""
    import gmsh
    from dolfinx.io import gmshio

    if comm.rank == 0:
        gmsh.initialize(interruptible=False)
        gmsh.option.setNumber("General.Terminal", 0)
        disc = gmsh.model.occ.addDisk(0, 0, 0, RADIUS, RADIUS)
        gmsh.model.occ.synchronize()
        gmsh.model.addPhysicalGroup(2, [disc], 1)
        gmsh.option.setNumber("Mesh.CharacteristicLengthMax", RADIUS / 4)
        gmsh.model.mesh.generate(2)
        gmsh.model.mesh.setOrder(order)
    mesh = gmshio.model_to_mesh(gmsh.model if comm.rank == 0 else None, comm, 0, gdim=2)[0]
    if comm.rank == 0:
        gmsh.finalize()
    return mesh


@pytest.mark.parametrize("order", [1, 2])
def test_facet_samples_on_a_disc(order, comm):
    """u = x^2 + y^2 (in P2 exactly) is RADIUS^2 on the circle: at every sample point of a curved
    (order 2) edge, whose nodes lie on the circle; the edge lengths add up to the circumference
    (quadratic arcs: 1e-5; chords: the polygon's perimeter)."""
    mesh = _disc(order, comm)
    V = fem.functionspace(mesh, ("Lagrange", 2))
    u = fem.Function(V)
    u.interpolate(lambda x: x[0] ** 2 + x[1] ** 2)
    mesh.topology.create_connectivity(1, 2)
    boundary = dmesh.exterior_facet_indices(mesh.topology)
    owned = boundary[boundary < mesh.topology.index_map(1).size_local]
    measure, mean, low, high = facet_samples(u, owned)
    assert np.isfinite(np.concatenate([measure, mean, low, high])).all()
    length = comm.allreduce(float(measure.sum()))
    edges = comm.allreduce(len(owned))
    if order == 2:
        assert length == pytest.approx(2 * math.pi * RADIUS, rel=1e-5)
        for values in (mean, low, high):
            np.testing.assert_allclose(values, RADIUS**2, rtol=1e-9)
    else:  # chords of the polygon whose vertices lie on the circle; u is below R^2 inside them
        polygon = 2 * edges * RADIUS * math.sin(math.pi / edges)
        assert length == pytest.approx(polygon, rel=1e-2)
        np.testing.assert_allclose(high, RADIUS**2, rtol=1e-9)
        assert (mean < RADIUS**2).all()


def test_facet_samples_with_facets_on_one_rank_only(comm):
    """Collective on 2D meshes: a rank without facets still takes part (no deadlock) and the
    rank with facets gets the values."""
    mesh = _disc(2, comm)
    V = fem.functionspace(mesh, ("Lagrange", 2))
    u = fem.Function(V)
    u.interpolate(lambda x: x[0] ** 2 + x[1] ** 2)
    mesh.topology.create_connectivity(1, 2)
    boundary = dmesh.exterior_facet_indices(mesh.topology)
    owned = boundary[boundary < mesh.topology.index_map(1).size_local]
    mine = owned if comm.rank == comm.size - 1 else owned[:0]
    measure, mean, _, _ = facet_samples(u, mine)
    assert measure.size == mine.size
    np.testing.assert_allclose(mean, RADIUS**2, rtol=1e-9)
