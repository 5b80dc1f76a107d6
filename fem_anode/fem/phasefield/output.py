"""Field output of the phase-field model on the deformed configuration (VTX) and PNG snapshots.

* :class:`FieldWriter` writes ``fields.bp`` (P1: ``c_li``, ``mu``, ``u`` in metres, and with
  vacancies ``c_v`` and ``electrolyte``) and
  ``stress.bp`` (cell averages: ``von_mises`` normalised Cauchy stress, ``eq_plastic_strain``)
  on the deformed mesh ``(X + u)`` in metres, a copy of the problem's mesh whose nodes move at
  each write (the problem's mesh is never moved; ParaView opens ``*.bp``);
* :func:`gather_snapshot` collects the deformed triangles, c at their corners and the cell
  von Mises stress on rank 0 for :func:`plot_snapshot`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dolfinx.mesh
import numpy as np
import ufl
from dolfinx import fem
from dolfinx.fem import petsc as fem_petsc
from petsc4py import PETSc

__all__ = [
    "FieldWriter",
    "gather_snapshot",
    "plot_snapshot",
    "plot_morphology",
    "morphology_classes",
    "MORPHOLOGY_COLOURS",
]


class _Fields:
    """P1 and DG0 output functions interpolated/averaged from a problem's state."""

    def __init__(self, problem: Any) -> None:
        self.p = problem
        mesh = problem.mesh
        self.V1 = fem.functionspace(mesh, ("Lagrange", 1))
        self.V2 = fem.functionspace(mesh, ("Lagrange", 1, (2,)))
        self.D0 = fem.functionspace(mesh, ("DG", 0))
        self.c = fem.Function(self.V1, name="c_li")
        self.mu = fem.Function(self.V1, name="mu")
        self.u = fem.Function(self.V2, name="u")
        self.vm = fem.Function(self.D0, name="von_mises")
        self.ep = fem.Function(self.D0, name="eq_plastic_strain")
        self._extra_sources = problem.scalar_fields()
        self.extra = {name: fem.Function(self.V1, name=name) for name in self._extra_sources}
        rm = problem.k["rm"]
        q = ufl.TestFunction(self.D0)
        self._vm_form = fem.form(rm.q / rm.Je * q * problem.dx)
        self._ep_form = fem.form((problem.state[4]) * q * problem.dx)
        area = fem_petsc.assemble_vector(fem.form(q * problem.dx))
        area.ghostUpdate(addv=PETSc.InsertMode.ADD, mode=PETSc.ScatterMode.REVERSE)
        self._area = area.getArray(readonly=True).copy()
        geom = mesh.geometry
        self.nodes = geom.dofmap.reshape(-1)
        self.node_dofs = np.empty(geom.x.shape[0], dtype=np.int64)
        self.node_dofs[self.nodes] = self.V1.dofmap.list[: geom.dofmap.shape[0]].reshape(-1)
        self.x_ref = geom.x.copy()

    def update(self) -> None:
        w = self.p.w
        self.c.interpolate(w.sub(0))
        self.mu.interpolate(w.sub(1))
        self.u.interpolate(w.sub(2))
        self.u.x.array[:] *= self.p.l0
        for name, source in self._extra_sources.items():
            self.extra[name].interpolate(source)
        n = len(self._area)
        for fn, form in ((self.vm, self._vm_form), (self.ep, self._ep_form)):
            vec = fem_petsc.assemble_vector(form)
            vec.ghostUpdate(addv=PETSc.InsertMode.ADD, mode=PETSc.ScatterMode.REVERSE)
            fn.x.array[:n] = vec.getArray(readonly=True) / self._area
            fn.x.scatter_forward()
            vec.destroy()

    def deformed_coordinates(self) -> np.ndarray:
        """Node coordinates of the deformed mesh in metres (geometry-node order)."""
        x = self.x_ref.copy()
        x[:, :2] += self.u.x.array.reshape(-1, 2)[self.node_dofs]
        return x


def _mesh_copy(mesh: dolfinx.mesh.Mesh) -> dolfinx.mesh.Mesh:
    """A mesh on the same topology (so every space has the same dof layout) with its own copy
    of the node coordinates, which may be moved without touching ``mesh``."""
    geometry = mesh.geometry
    cpp_geometry = type(geometry._cpp_object)(
        geometry.index_map(),
        geometry.dofmap,
        geometry.cmap._cpp_object,
        geometry.x.copy(),
        geometry.input_global_indices,
    )
    cpp_mesh = type(mesh._cpp_object)(mesh.comm, mesh.topology._cpp_object, cpp_geometry)
    return dolfinx.mesh.Mesh(cpp_mesh, ufl.Mesh(mesh.ufl_domain().ufl_coordinate_element()))


def _copy_function(source: fem.Function, mesh: dolfinx.mesh.Mesh) -> fem.Function:
    """A function of the same name on the same element over ``mesh`` (same topology)."""
    space = fem.functionspace(mesh, source.function_space.ufl_element())
    if not np.array_equal(space.dofmap.list, source.function_space.dofmap.list):
        raise RuntimeError("the output mesh copy has another dof layout than the problem's mesh")
    return fem.Function(space, name=source.name)


class FieldWriter:
    """VTX output of the fields on the deformed mesh (collective).

    Args:
        problem: the :class:`~fem_anode.fem.phasefield.problem.PhaseFieldProblem`.
        directory: where ``fields.bp`` and ``stress.bp`` go.
    """

    def __init__(self, problem: Any, directory: str | Path) -> None:
        from dolfinx.io import VTXWriter

        self.f = _Fields(problem)
        comm = problem.comm
        directory = Path(directory)
        self.mesh = _mesh_copy(problem.mesh)  #: the deformed mesh of the output
        f = self.f
        fields = [f.c, f.mu, f.u, *f.extra.values()]
        stress = [f.vm, f.ep]
        self._pairs = [(source, _copy_function(source, self.mesh)) for source in fields + stress]
        copies = [copy for _, copy in self._pairs]
        self._writers = [
            VTXWriter(comm, str(directory / "fields.bp"), copies[: len(fields)], engine="BP4"),
            VTXWriter(comm, str(directory / "stress.bp"), copies[len(fields) :], engine="BP4"),
        ]

    def write(self, t: float) -> None:
        """Write the current state at time ``t`` (normalised) on the deformed mesh."""
        self.f.update()
        for source, copy in self._pairs:
            copy.x.array[:] = source.x.array
        self.mesh.geometry.x[:] = self.f.deformed_coordinates()
        for writer in self._writers:
            writer.write(t)

    def close(self) -> None:
        for writer in self._writers:
            writer.close()


def _snapshot_fields(problem: Any) -> _Fields:
    """The output functions of ``problem``, built once (spaces and forms) and kept on it."""
    fields = getattr(problem, "_snapshot_fields", None)
    if fields is None:
        fields = problem._snapshot_fields = _Fields(problem)
    return fields


def gather_snapshot(problem: Any, fields: _Fields | None = None) -> dict[str, np.ndarray] | None:
    """Deformed triangles (nm), corner c (and the extra scalar fields) and cell von Mises of the
    owned cells, on rank 0 (collective)."""
    f = fields or _snapshot_fields(problem)
    f.update()
    mesh = problem.mesh
    n_cells = mesh.topology.index_map(2).size_local
    x = f.deformed_coordinates()[:, :2] / 1e-9
    nodes = mesh.geometry.dofmap[:n_cells]
    dofs = f.V1.dofmap.list[:n_cells]
    local = {
        "triangles": x[nodes],  # (n, 3, 2)
        "c": f.c.x.array[dofs],  # (n, 3)
        "von_mises": f.vm.x.array[f.D0.dofmap.list[:n_cells, 0]],
        **{name: fn.x.array[dofs] for name, fn in f.extra.items()},
    }
    parts = problem.comm.gather(local, root=0)
    if problem.comm.rank != 0:
        return None
    return {key: np.concatenate([p[key] for p in parts]) for key in local}


def plot_snapshot(
    snapshot: dict[str, np.ndarray],
    path: str | Path,
    title: str,
    c_range: tuple[float, float],
    vm_max: float | None = None,
) -> Path:
    """Two panels, c_Li and von Mises stress on the deformed cross-section (nm axes)."""
    from matplotlib.tri import Triangulation

    from fem_anode.io.figures import pyplot, save_figure

    plt = pyplot()
    tri = snapshot["triangles"]
    n = len(tri)
    triangulation = Triangulation(tri[:, :, 0].ravel(), tri[:, :, 1].ravel(), np.arange(3 * n).reshape(n, 3))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4), constrained_layout=True)
    im = axes[0].tripcolor(
        triangulation, snapshot["c"].ravel(), shading="gouraud", cmap="viridis", vmin=c_range[0], vmax=c_range[1]
    )
    fig.colorbar(im, ax=axes[0], label="c_Li (normalised)")
    vmax = vm_max if vm_max is not None else max(float(snapshot["von_mises"].max(initial=0.0)), 1e-12)
    im = axes[1].tripcolor(triangulation, facecolors=snapshot["von_mises"], cmap="magma", vmin=0.0, vmax=vmax)
    fig.colorbar(im, ax=axes[1], label="von Mises stress / (c_max R T)")
    for ax, name in zip(axes, ("Li concentration", "von Mises stress")):
        ax.set_aspect("equal")
        ax.set_xlabel("x (nm)")
        ax.set_ylabel("y (nm)")
        ax.set_title(name)
    fig.suptitle(title)
    return save_figure(fig, path)


#: Colours of Fig. 5 of He et al. (2021): Si, Li_xSi, void, electrolyte; SEI lines.
MORPHOLOGY_COLOURS = {"Si": "#3a9a3a", "Li_xSi": "#f2d12e", "void": "#ffffff", "electrolyte": "#3fd0c9"}
SEI_COLOUR = "#1f4fb4"


def morphology_classes(snapshot: dict[str, np.ndarray], c_mid: float, threshold: float) -> np.ndarray:
    """Phase of every triangle (index into :data:`MORPHOLOGY_COLOURS`) from its corner means:
    electrolyte if most corners are electrolyte-filled, else void if mean ``c_v`` > ``threshold``,
    else Li_xSi if mean ``c`` > ``c_mid``, else Si."""
    classes = np.where(snapshot["c"].mean(axis=1) > c_mid, 1, 0)
    classes = np.where(snapshot["c_v"].mean(axis=1) > threshold, 2, classes)
    return np.where(snapshot["electrolyte"].mean(axis=1) > 0.5, 3, classes)


def _draw_morphology(
    ax: Any,
    snapshot: dict[str, np.ndarray],
    c_mid: float,
    threshold: float,
    title: str,
    limits: tuple[np.ndarray, np.ndarray],
) -> None:
    from matplotlib.collections import LineCollection, PolyCollection

    tri = snapshot["triangles"]
    colours = np.array(list(MORPHOLOGY_COLOURS.values()))
    classes = morphology_classes(snapshot, c_mid, threshold)
    ax.add_collection(PolyCollection(list(tri), facecolors=colours[classes], edgecolors="none"))
    # SEI: the outer surface (boundary edges) and the walls of electrolyte-filled voids
    edges = np.concatenate([tri[:, [i, (i + 1) % 3]] for i in range(3)])
    owner = np.tile(np.arange(len(tri)), 3)
    key = np.round(
        np.sort(np.concatenate([edges[:, 0], edges[:, 1]], axis=1).reshape(-1, 2, 2), axis=1).reshape(-1, 4), 6
    )
    _, inverse, counts = np.unique(key, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.ravel()
    boundary = counts[inverse] == 1
    electrolyte = classes[owner] == 3
    other = np.zeros(len(counts), dtype=int)
    np.add.at(other, inverse, (~electrolyte).astype(int))
    wall = electrolyte & (other[inverse] > 0)
    ax.add_collection(LineCollection(edges[boundary | wall], colors=SEI_COLOUR, linewidths=1.6))
    lo, hi = limits
    pad = 0.05 * float((hi - lo).max())
    ax.set_xlim(lo[0] - pad, hi[0] + pad)
    ax.set_ylim(lo[1] - pad, hi[1] + pad)
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_morphology(
    panels: list[tuple[dict[str, np.ndarray], str]],
    path: str | Path,
    c_mid: float,
    threshold: float,
    suptitle: str = "",
) -> Path:
    """Cross-sections in the colours of Fig. 5 of He et al. (2021) (green Si, yellow Li_xSi, white
    void, turquoise electrolyte, blue SEI lines), one panel per ``(snapshot, title)``."""
    from matplotlib.patches import Patch

    from fem_anode.io.figures import pyplot, save_figure

    plt = pyplot()
    n = len(panels)
    cols = min(n, 4)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.3 * rows + 0.6), squeeze=False, layout="constrained")
    points = np.concatenate([snapshot["triangles"].reshape(-1, 2) for snapshot, _ in panels])
    limits = (points.min(axis=0), points.max(axis=0))  # common scale: the swelling shows
    for ax, (snapshot, title) in zip(axes.ravel(), panels):
        _draw_morphology(ax, snapshot, c_mid, threshold, title, limits)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    handles = [Patch(facecolor=colour, edgecolor="0.5", label=name) for name, colour in MORPHOLOGY_COLOURS.items()]
    handles.append(Patch(facecolor=SEI_COLOUR, label="SEI"))
    fig.legend(handles=handles, loc="outside lower center", ncol=5, fontsize=8, frameon=False)
    if suptitle:
        fig.suptitle(suptitle)
    return save_figure(fig, path)
