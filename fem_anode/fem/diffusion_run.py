"""A complete diffusion run: settings -> mesh -> solve -> results.json, VTX fields, figures.

Used by ``fem-anode diffusion CONFIG.toml --out DIR`` and by the demo pipeline.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from mpi4py import MPI
from scipy import ndimage

from fem_anode.errors import InputError
from fem_anode.fem.diffusion import DiffusionProblem, DiffusionSettings
from fem_anode.fem.mesh_io import TaggedMesh, read_mesh
from fem_anode.fem.sampling import facet_samples, sample_points
from fem_anode.io.images import VoxelImage, read_image

__all__ = ["fig8_settings", "run_diffusion", "load_geometry", "si_particle_report", "suggest_regions", "timescales"]

logger = logging.getLogger(__name__)


def load_geometry(settings: DiffusionSettings, workdir: Path, comm: MPI.Comm) -> tuple[TaggedMesh, VoxelImage | None]:
    """Mesh the image's transporting phase (written to ``workdir/mesh.msh``) or read the mesh."""
    geometry = settings.geometry
    if geometry.mesh is not None:
        return read_mesh(geometry.mesh, comm), None
    image = read_image(geometry.image, voxel_size=geometry.pixel_size, phases=geometry.phases, kind="labels")  # type: ignore[arg-type]
    phases = image.require_phases()
    image.require_voxel_size()
    for role, name in (("transport_phase", geometry.transport_phase), ("pore_phase", geometry.pore_phase)):
        if name not in phases:
            raise InputError(f"geometry.{role} {name!r} is not in the phase map {phases}")
        if not np.any(image.array == phases[name]):
            raise InputError(f"geometry.{role} {name!r} has no pixels in {image.source}")
    path = workdir / "mesh.msh"
    mesh_settings = settings.mesh
    if mesh_settings.method == "smooth" and image.ndim != 2:
        raise InputError("mesh.method = 'smooth' is for 2D images; 3D volumes use 'voxel'")
    error = None
    if comm.rank == 0:
        from fem_anode.errors import FemAnodeError
        from fem_anode.meshing.build import mesh_image
        from fem_anode.meshing.smooth2d import SmoothMeshOptions

        try:
            if mesh_settings.method == "smooth":
                options = SmoothMeshOptions(size=mesh_settings.size, order=mesh_settings.order)
                mesh_image(image, path, method="smooth", keep=[geometry.transport_phase], options=options, quality_path=workdir / "mesh.quality.json")
            else:
                mesh_image(image, path, method="voxel", keep=[geometry.transport_phase])
        except FemAnodeError as err:  # every rank must fail, not only the one that meshed
            error = err
    error = comm.bcast(error, root=0)
    if error is not None:
        raise error
    return read_mesh(path, comm), image


def timescales(settings: DiffusionSettings, length: float) -> dict[str, float]:
    """Diffusion time eps L^2 / D_eff (s) and Biot number k_f L / D_eff for a length L (m)."""
    physics = settings.physics
    return {
        "length_m": length,
        "diffusion_time_s": physics.eps * length**2 / physics.D_eff,
        "biot_number": physics.k_f * length / physics.D_eff,
    }


def si_particle_report(problem: DiffusionProblem, image: VoxelImage) -> list[dict[str, Any]]:
    """Per Si particle (connected Si component of the image): c statistics on its interface.

    Returns, per particle with an interface in the mesh: ``id``, ``interface_measure_m``
    (length in 2D, area in 3D), ``mean``, ``min``, ``max`` (mol/m^3) and
    ``fraction_above_half_bulk`` of its surface. Collective.
    """
    geometry = problem.settings.geometry
    phases = image.require_phases()
    si = image.array == phases[geometry.si_phase] if geometry.si_phase in phases else np.zeros(image.shape, bool)
    mesh, comm = problem.mesh, problem.comm
    tag = problem.tagged.facet_groups.get(problem.si_interface)
    if tag is None or not si.any():
        return []
    particle_ids, n_particles = ndimage.label(si, structure=np.ones((3,) * image.ndim))
    nearest = ndimage.distance_transform_edt(~si, return_distances=False, return_indices=True)
    fdim = mesh.topology.dim - 1
    n_owned = mesh.topology.index_map(fdim).size_local
    facets = problem.tagged.facet_tags.find(tag)
    facets = facets[facets < n_owned]
    c_bulk = problem.settings.physics.c_bulk
    c = problem.concentration()
    measure, mean, low, high = facet_samples(c, facets)
    from dolfinx.mesh import compute_midpoints

    midpoints = compute_midpoints(mesh, fdim, facets) if facets.size else np.zeros((0, 3))
    spacing = np.asarray(image.require_voxel_size())
    # mesh x = last array axis ... -> array index order
    index = np.floor(midpoints[:, : image.ndim][:, ::-1] / spacing).astype(int)
    index = np.clip(index, 0, np.asarray(image.shape) - 1)
    pixel = tuple(nearest[(axis, *index.T)] for axis in range(image.ndim))
    owner = particle_ids[pixel] - 1 if facets.size else np.zeros(0, int)
    sums = np.zeros((3, n_particles))
    np.add.at(sums[0], owner, measure)
    np.add.at(sums[1], owner, measure * mean)
    np.add.at(sums[2], owner, measure * (mean > 0.5 * c_bulk))
    lows = np.full(n_particles, np.inf)
    highs = np.full(n_particles, -np.inf)
    np.minimum.at(lows, owner, low)
    np.maximum.at(highs, owner, high)
    for array, op in ((sums, MPI.SUM), (lows, MPI.MIN), (highs, MPI.MAX)):
        comm.Allreduce(MPI.IN_PLACE, array, op=op)  # element-wise buffer reductions
    report = []
    for i in np.flatnonzero(sums[0] > 0):
        report.append(
            {
                "id": int(i + 1),
                "interface_measure_m": float(sums[0, i]),
                "mean": float(sums[1, i] / sums[0, i]),
                "min": float(lows[i]),
                "max": float(highs[i]),
                "fraction_above_half_bulk": float(sums[2, i] / sums[0, i]),
            }
        )
    return report


def _max_distance_to_pore(image: VoxelImage, settings: DiffusionSettings) -> float:
    """Largest distance (m) from a transporting-phase pixel to the nearest pore pixel."""
    phases = image.require_phases()
    geometry = settings.geometry
    distance = ndimage.distance_transform_edt(image.array != phases[geometry.pore_phase], sampling=image.require_voxel_size())
    return float(distance[image.array == phases[geometry.transport_phase]].max())


def _image_grid_points(image: VoxelImage) -> tuple[np.ndarray, tuple[int, ...]]:
    """Pixel centres of a 2D image (or the middle z slice of a 3D one) in mesh coordinates."""
    spacing = image.require_voxel_size()
    if image.ndim == 2:
        ny, nx = image.shape
        y, x = np.meshgrid((np.arange(ny) + 0.5) * spacing[0], (np.arange(nx) + 0.5) * spacing[1], indexing="ij")
        points = np.column_stack([x.ravel(), y.ravel(), np.zeros(x.size)])
        return points, (ny, nx)
    nz, ny, nx = image.shape
    y, x = np.meshgrid((np.arange(ny) + 0.5) * spacing[1], (np.arange(nx) + 0.5) * spacing[2], indexing="ij")
    z = np.full(x.size, (nz // 2 + 0.5) * spacing[0])
    return np.column_stack([x.ravel(), y.ravel(), z]), (ny, nx)


def run_diffusion(settings: DiffusionSettings, staging: Path, comm: MPI.Comm) -> dict[str, Any]:
    """Run the model; write ``results.json``, ``c.bp`` (VTX) and figures into ``staging``.

    Returns the results dict (same on every rank). Only rank 0 writes JSON and figures.
    """
    from fem_anode.io.output import write_json

    start = time.perf_counter()
    tagged, image = load_geometry(settings, staging, comm)
    problem = DiffusionProblem(tagged, settings)
    logger.info(
        "diffusion: %d cells, %d dofs (P%d), D_eff = %.3g m^2/s, %d rank(s)",
        tagged.mesh.topology.index_map(tagged.mesh.topology.dim).size_global,
        problem.V.dofmap.index_map.size_global,
        settings.mesh.order,
        settings.physics.D_eff,
        comm.size,
    )
    writer = None
    if settings.output.fields:
        from dolfinx.io import VTXWriter

        c_out = problem.concentration()
        writer = VTXWriter(comm, str(staging / "c.bp"), [c_out], engine="BP4")
    grid = _image_grid_points(image) if image is not None and settings.output.figures else None
    snapshots: dict[float, np.ndarray] = {}
    particles: dict[str, list[dict[str, Any]]] = {}

    def on_output(t: float, prob: DiffusionProblem) -> None:
        if writer is not None:
            c_out.x.array[:] = prob.settings.physics.c_bulk * prob.c.x.array
            writer.write(t)
        if grid is not None:
            snapshots[t] = settings.physics.c_bulk * sample_points(prob.c, grid[0]).reshape(grid[1])
        if image is not None and t > 0:
            particles[f"{t:g}"] = si_particle_report(prob, image)

    try:
        result = problem.run(on_output)
    finally:
        if writer is not None:
            writer.close()
    c_bulk = settings.physics.c_bulk
    at_outputs = result.at_output_times()
    results: dict[str, Any] = {
        "times": at_outputs["times"],
        "regions": at_outputs["regions"],
        "domain_mean": at_outputs["domain_mean"],
        "t90_s": result.t90(c_bulk),
        "mass_balance_rel_error": result.mass_balance_rel_error,
        "ndofs": result.ndofs,
        "ncells": result.ncells,
        "element_degree": settings.mesh.order,
        "ranks": comm.size,
        "steps": result.steps,
        "factorisations": result.factorisations,
        "final_min_c": c_bulk * float(comm.allreduce(problem.c.x.array.min(initial=np.inf), op=MPI.MIN)),
        "final_max_c": c_bulk * float(comm.allreduce(problem.c.x.array.max(initial=-np.inf), op=MPI.MAX)),
        "history": {"times": result.times, "regions": result.region_means, "domain_mean": result.domain_mean},
        "si_particles": particles if image is not None else None,
        "timescales": timescales(settings, _max_distance_to_pore(image, settings)) if image is not None else None,
        "wall_time_s": time.perf_counter() - start,
        "settings": settings.to_dict(),
    }
    if comm.rank == 0:
        write_json(staging / "results.json", results)
        if settings.output.figures:
            from fem_anode.fem.diffusion_plots import plot_concentration_fields, plot_region_history

            plot_region_history(results, staging / "c_regions.png", c_bulk=c_bulk)
            if image is not None and snapshots:
                plot_concentration_fields(image, snapshots, settings, staging / "c_fields.png")
    problem.destroy()
    logger.info(
        "diffusion done in %.1f s: %d steps, %d factorisations, mass balance error %.1e",
        results["wall_time_s"], result.steps, result.factorisations, result.mass_balance_rel_error,
    )
    return results


def suggest_regions(image: VoxelImage, settings: DiffusionSettings, *, size: float = 0.6e-6, names: tuple[str, ...] = ("I", "II", "III", "IV")) -> list:
    """Square regions (edge ``size``, m) from near a pore channel (I) to deep in the SEI/C/B (IV).

    Centres are transporting-phase pixels whose distance to the nearest pore is at evenly spaced
    quantiles (5 % ... 100 %) of that distance, so region I sits next to a pore and the last
    one at the point farthest from any pore, as regions I-IV of the paper's Fig. 8.
    Deterministic; 2D images only.
    """
    from fem_anode.fem.diffusion import Region

    if image.ndim != 2:
        raise InputError("suggest_regions works on 2D images; give [[regions]] explicitly in 3D")
    phases = image.require_phases()
    geometry = settings.geometry
    spacing = np.asarray(image.require_voxel_size())
    transport = image.array == phases[geometry.transport_phase]
    distance = ndimage.distance_transform_edt(image.array != phases[geometry.pore_phase], sampling=spacing)
    candidates = np.flatnonzero(transport)
    order = candidates[np.argsort(distance.ravel()[candidates], kind="stable")]
    regions = []
    extent = np.asarray(image.extent)
    for name, quantile in zip(names, np.linspace(0.05, 1.0, len(names))):
        flat = order[min(int(quantile * (len(order) - 1)), len(order) - 1)]
        row, col = np.unravel_index(flat, image.shape)
        centre = np.array([(col + 0.5) * spacing[1], (row + 0.5) * spacing[0]])
        low = np.clip(centre - size / 2, 0, extent[::-1] - size)
        regions.append(Region(name=name, box=[float(low[0]), float(low[1]), float(low[0] + size), float(low[1] + size)]))
    return regions


def fig8_settings(image_path: Path, *, quick: bool = False) -> DiffusionSettings:
    """The paper's Fig. 8 set-up on a 2D ROI: its parameters, regions I-IV from
    :func:`suggest_regions`, outputs at 2, 10, 100 s plus early times where the physics happens."""
    from fem_anode.fem.diffusion import GeometrySettings, TimeSettings

    times = [0.01, 2.0, 10.0, 100.0] if quick else [0.001, 0.003, 0.01, 2.0, 10.0, 100.0]
    settings = DiffusionSettings(geometry=GeometrySettings(image=Path(image_path)), time=TimeSettings(output_times=times))
    return settings.replace(regions=suggest_regions(read_image(image_path, kind="labels"), settings))
