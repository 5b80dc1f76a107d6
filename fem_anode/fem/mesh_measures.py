"""Measures of a distributed tagged mesh: cells, the measure of the domain and of each facet group.

Integrated by dolfinx over every rank (:func:`scifem.assemble_scalar` sums the ranks' parts),
so they check what dolfinx loaded, on any number of ranks, against what the mesher wrote.
"""

from __future__ import annotations

from typing import TypedDict

import scifem
import ufl
from dolfinx import default_scalar_type, fem

from fem_anode.fem.mesh_io import TaggedMesh

__all__ = ["MeshMeasures", "mesh_measures"]


class MeshMeasures(TypedDict):
    """Measures of a tagged mesh, SI units (``measure`` in m^d, facet groups in m^(d-1))."""

    ranks: int
    cells: int
    measure: float
    facet_groups: dict[str, float]


def mesh_measures(tagged: TaggedMesh) -> MeshMeasures:
    """Cells, domain measure and the measure of every facet group of ``tagged`` (collective).

    Facet groups are integrated over the mesh boundary (box sides, interfaces with phases that
    were not meshed); a group of interior facets (between two meshed phases) measures 0 here.
    """
    mesh = tagged.mesh
    one = fem.Constant(mesh, default_scalar_type(1.0))
    ds = ufl.Measure("ds", domain=mesh, subdomain_data=tagged.facet_tags)
    return {
        "ranks": mesh.comm.size,
        "cells": mesh.topology.index_map(mesh.topology.dim).size_global,
        "measure": float(scifem.assemble_scalar(one * ufl.dx(domain=mesh))),
        "facet_groups": {
            name: float(scifem.assemble_scalar(one * ds(tag))) for name, tag in sorted(tagged.facet_groups.items())
        },
    }
