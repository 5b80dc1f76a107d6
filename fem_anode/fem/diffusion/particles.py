"""Per-Si-particle statistics of c on the Si interfaces: the finite-element report, and the
reduction over ranks that the finite-volume report shares (no dolfinx at import)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from mpi4py import MPI

from fem_anode.io.images import ImageLayers, VoxelImage

if TYPE_CHECKING:
    from fem_anode.fem.diffusion.finite_element import DiffusionProblem

__all__ = ["reduce_particle_statistics", "si_particle_report"]


def reduce_particle_statistics(
    comm: MPI.Comm, sums: np.ndarray, lows: np.ndarray, highs: np.ndarray
) -> list[dict[str, Any]]:
    """The report rows from this rank's per-particle sums (interface measure, measure x mean c,
    measure above half c_bulk), minima and maxima of c, reduced over ``comm`` (collective): one row
    per particle with an interface, ``id`` counted from 1."""
    for array, op in ((sums, MPI.SUM), (lows, MPI.MIN), (highs, MPI.MAX)):
        comm.Allreduce(MPI.IN_PLACE, array, op=op)  # element-wise buffer reductions
    return [
        {
            "id": int(i + 1),
            "interface_measure_m": float(sums[0, i]),
            "mean": float(sums[1, i] / sums[0, i]),
            "min": float(lows[i]),
            "max": float(highs[i]),
            "fraction_above_half_bulk": float(sums[2, i] / sums[0, i]),
        }
        for i in np.flatnonzero(sums[0] > 0)
    ]


def si_particle_report(problem: DiffusionProblem, image: VoxelImage | ImageLayers) -> list[dict[str, Any]]:
    """Per Si particle (connected Si component of the image, 8/26-connected): c statistics on its interface.

    Returns, per particle with an interface in the mesh: ``id`` (numbered as
    ``scipy.ndimage.label`` numbers the Si components of the whole image), ``interface_measure_m``
    (length in 2D, area in 3D), ``mean``, ``min``, ``max`` (mol/m^3) and
    ``fraction_above_half_bulk`` of its surface. Collective.

    On voxel meshes partitioned by slabs every rank labels the Si of its own slab
    (:func:`~fem_anode.imaging.slabs.label_slabs`) and takes each interface facet's particle from
    the Si voxel across it; on other meshes (smooth 2D) the image is labelled whole and each
    facet takes the particle of the nearest Si pixel.
    """
    geometry = problem.settings.geometry
    phases = image.require_phases()
    mesh, comm = problem.mesh, problem.comm
    tag = problem.tagged.facet_groups.get(problem.si_interface)
    if tag is None or geometry.si_phase not in phases:
        return []
    si_label = phases[geometry.si_phase]
    fdim = mesh.topology.dim - 1
    n_owned = mesh.topology.index_map(fdim).size_local
    facets = problem.tagged.facet_tags.find(tag)
    facets = facets[facets < n_owned]
    spacing = np.asarray(image.require_voxel_size())
    ndim = len(image.shape)
    from dolfinx.mesh import compute_midpoints

    from fem_anode.fem.sampling import facet_samples

    midpoints = (
        compute_midpoints(mesh, fdim, facets)[:, :ndim][:, ::-1] / spacing if facets.size else np.zeros((0, ndim))
    )  # array order, voxel units
    connectivity = np.ones((3,) * ndim, dtype=bool)
    bounds = problem.tagged.slab_bounds
    if bounds is not None:
        from fem_anode.imaging.slabs import Slab, label_slabs

        slab = Slab.from_bounds(bounds, comm.rank)
        labels, n_particles, below, above = label_slabs(
            comm, slab, np.asarray(image.read_layers(slab.z0, slab.z1)) == si_label, connectivity
        )
        plane = np.zeros((1, *image.shape[1:]), dtype=np.int64)
        stack = np.concatenate(
            [plane if below is None else below[None], labels, plane if above is None else above[None]]
        )
        # Each facet lies on a voxel face: the Si voxel is on one side along its normal axis.
        axis = np.argmax(np.rint(2.0 * midpoints).astype(np.int64) % 2 == 0, axis=1)
        rows = np.arange(facets.size)
        owner = np.zeros(facets.size, dtype=np.int64)
        for side in (-0.5, 0.5):
            point = midpoints.copy()
            point[rows, axis] += side
            index = np.floor(point).astype(np.int64)
            index[:, 0] -= slab.z0 - 1
            index = np.clip(index, 0, np.asarray(stack.shape) - 1)
            owner = np.maximum(owner, stack[tuple(index.T)])
        owner -= 1
        if (owner < 0).any():
            raise RuntimeError("an Si interface facet has no Si voxel next to it")  # a bug, never bad input
    else:  # smooth meshes (2D, made on rank 0 from the image in memory)
        from scipy import ndimage  # here, not at import: 30 MB per process that only some runs need

        si = image.array == si_label  # type: ignore[union-attr]  # an in-memory image on this path
        particle_ids, n_particles = ndimage.label(si, structure=connectivity)
        nearest = ndimage.distance_transform_edt(~si, return_distances=False, return_indices=True)
        index = np.clip(np.floor(midpoints).astype(int), 0, np.asarray(image.shape) - 1)
        pixel = tuple(nearest[(axis, *index.T)] for axis in range(ndim))
        owner = particle_ids[pixel] - 1 if facets.size else np.zeros(0, int)
    c_bulk = problem.settings.physics.c_bulk
    c = problem.concentration()
    measure, mean, low, high = facet_samples(c, facets)
    sums = np.zeros((3, n_particles))
    np.add.at(sums[0], owner, measure)
    np.add.at(sums[1], owner, measure * mean)
    np.add.at(sums[2], owner, measure * (mean > 0.5 * c_bulk))
    lows = np.full(n_particles, np.inf)
    highs = np.full(n_particles, -np.inf)
    np.minimum.at(lows, owner, low)
    np.maximum.at(highs, owner, high)
    return reduce_particle_statistics(comm, sums, lows, highs)
