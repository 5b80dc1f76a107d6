r"""Vacancies, voids and electrolyte percolation: the second half of the phase-field model.

He et al. (2021) (Methods, eqs. 1-5) adds a vacancy field ``c_v`` (``c_min``: Li_xSi, ``c_max``:
void) with its own Cahn-Hilliard equation. What is implemented (normalised units of
Supplementary Table 1; ``docs/phasefield.md`` has the derivation and the reasons):

* **Free energy** (eq. 2, with the interpolation function ``h``):

  .. math::

      f_\mathrm{ch}(c, c_v) = f_\mathrm{Li}(c) + h(c)\,f_v^0(c_v) + (1 - h(c))\,f_v(c_v),

  ``f_v = c_v ln c_v + (1 - c_v) ln(1 - c_v) + Omega_v c_v (1 - c_v)`` (eq. 3), ``f_v^0`` the
  same without the ``Omega_v`` term, and ``h(c) = xi^3 (6 xi^2 - 15 xi + 10)``,
  ``xi = (c - c_min) / (c_max - c_min)`` clipped to [0, 1], so ``h(c_min) = 0``,
  ``h(c_max) = 1``, ``h' = 0`` at both ends. In delithiated Si the vacancies feel the double
  well and condense into voids; in lithiated Si they are an ideal solution and voids dissolve.
  The Li double well ``f_Li`` is kept everywhere: eq. 2 read literally (``h f_Li + (1 - h) f_v``)
  removes it from delithiated Si, where ``d mu_Li / dc`` then vanishes (Li could not leave
  through the delithiated shell).
* **Kinetics** (eqs. 4-5), backward Euler:

  .. math::

      \dot c = \nabla\cdot(M_\mathrm{Li}(1 - (1 - \epsilon)\chi)\nabla\mu) + k_S|\nabla\chi|(c_s - c),\qquad
      \dot c_v = \nabla\cdot(M_v\nabla\mu_v) + R(\mathbf x)(1 - c_v)\max(-\dot c, 0),

  ``mu = f_Li'(c) - h'(c) Omega_v c_v (1 - c_v) + mu_mech - kappa_Li lap c`` and
  ``mu_v = ln(c_v / (1 - c_v)) + (1 - h) Omega_v (1 - 2 c_v) - kappa_v lap c_v``. ``chi`` is the
  electrolyte indicator (P1, 1 on the nodes of electrolyte-filled voids): Li mobility vanishes
  there (factor ``epsilon``), and ``k_S |grad chi|`` is a diffuse surface delta on their walls
  (``int |grad chi| dx`` is their perimeter) through which Li is exchanged with the electrolyte
  at the surface concentration ``c_s`` of the half-cycle: eq. 4's source ``S(x)``. ``R(x)`` is
  the random nucleation field of eq. 5, active during delithiation only, where Li leaves (the
  reaction front); ``(1 - c_v)`` keeps ``c_v < 1``. The vacancy flux vanishes on the outer
  surface, so vacancies are conserved apart from this source.
* **Nucleation sites** are drawn for every delithiation from ``numpy.random.default_rng([seed,
  half-cycle])`` in the bounding box of the global mesh (Poisson number with density
  ``1 / spacing^2``), ``R(x) = R0 min(1, sum_k exp(-|x - x_k|^2 / 2 r^2))``: a function of the
  position only, so the same on any number of ranks.
* **Percolation** after every delithiation (:class:`VoidGraph`): void nodes (``c_v >
  threshold``) are joined along mesh edges into connected components over the whole
  distributed mesh (labelled in parallel: local components, then the index map's ghost
  exchange until the labels settle); components that touch the outer surface or an
  electrolyte-filled void become electrolyte-filled. The electrolyte set only grows (SEI-lined voids are preserved);
  the Li trapped in them cannot leave, so they stay delithiated and void.
"""

from __future__ import annotations

import logging
from typing import Any, cast

import basix.ufl
import numpy as np
import ufl
from dolfinx import fem, la
from dolfinx.fem import petsc as fem_petsc
from mpi4py import MPI
from petsc4py import PETSc
from scipy import sparse
from scipy.sparse import csgraph
from scipy.spatial import cKDTree

from fem_anode.fem.phasefield import chemistry
from fem_anode.fem.phasefield.problem import PhaseFieldProblem

__all__ = [
    "VacancyPhaseFieldProblem",
    "VoidGraph",
    "interpolation",
    "nucleation_sites",
    "nucleation_field",
    "VOID_RECORD_KEYS",
    "PROXIMITY_RECORD_KEYS",
]

logger = logging.getLogger(__name__)

#: Keys each half-cycle record gains from the vacancy model.
VOID_RECORD_KEYS = (
    "void_fraction",
    "accessible_void_fraction",
    "inaccessible_void_fraction",
    "electrolyte_fraction",
    "sei_penetration_depth_m",
    "n_voids",
    "n_accessible_voids",
    "n_accessible_voids_at_surface",
    "core_connectivity",
    "mean_c_v",
    "vacancy_source_total",
    "equivalent_real_cycles",
)

#: Keys a delithiation record gains: where the new voids formed (the ratios and the distance
#: only when defined: new voids, and for the second ratio electrolyte-filled voids, exist).
PROXIMITY_RECORD_KEYS = (
    "new_void_fraction",
    "new_void_distance_ratio",
    "new_void_distance_to_preserved_ratio",
    "new_void_distance_m",
)


def interpolation(c: Any, c_min: float, c_max: float) -> tuple[Any, Any]:
    """``h(c)`` and ``h'(c)``: the quintic smoothstep of ``(c - c_min)/(c_max - c_min)`` clipped to [0, 1]
    (NumPy or UFL)."""
    span = c_max - c_min
    if isinstance(c, (float, int, np.ndarray, np.floating)):
        xi = np.clip((np.asarray(c, dtype=float) - c_min) / span, 0.0, 1.0)
    else:
        xi = ufl.max_value(ufl.min_value((c - c_min) / span, 1.0), 0.0)
    h = xi**3 * (6 * xi**2 - 15 * xi + 10)
    dh = 30 * xi**2 * (1 - xi) ** 2 / span
    return h, dh


def nucleation_sites(seed: int, half_cycle: int, box: tuple[np.ndarray, np.ndarray], spacing: float) -> np.ndarray:
    """Random nucleation sites (n, 2) for one half-cycle in ``box = (lower, upper)`` (same units as ``spacing``)."""
    rng = np.random.default_rng([seed, half_cycle])
    lower, upper = np.asarray(box[0], float), np.asarray(box[1], float)
    area = float(np.prod(upper - lower))
    count = rng.poisson(area / spacing**2)
    return lower + rng.random((count, 2)) * (upper - lower)


def nucleation_field(x: np.ndarray, sites: np.ndarray, radius: float, rate: float) -> np.ndarray:
    """``R(x) = rate min(1, sum_k exp(-|x - x_k|^2 / 2 r^2))`` at points ``x`` (2, n) or (3, n)."""
    if len(sites) == 0:
        return np.zeros(x.shape[1])
    d2 = (x[0][:, None] - sites[:, 0]) ** 2 + (x[1][:, None] - sites[:, 1]) ** 2
    return rate * np.minimum(1.0, np.exp(-d2 / (2 * radius**2)).sum(axis=1))


class VoidGraph:
    """Connected void regions over the distributed mesh, labelled in parallel.

    Every rank labels the components of its part of the P1 node graph (the edges of its owned
    cells, over its owned and ghost nodes) with SciPy. Component-wise maxima (of the negated
    global node index, giving each component the label of its smallest node, and of flags such
    as "touches the surface") are then made global by alternating that local pass with the index
    map's ghost exchange (reverse scatter with MAX to the owners, forward scatter to the ghosts)
    until no value changes on any rank: a component that crosses the partition boundary ``k``
    times needs at most about ``k + 1`` rounds (:attr:`rounds`). Metrics are sums over owned
    nodes reduced with ``allreduce``; the area of a solid cluster is summed on the rank owning its
    label. No rank holds the node graph or a field of the whole mesh. The one exception: the
    depth below the outer surface needs every node's distance to the nearest surface node, so
    the coordinates of the surface nodes are allgathered once (the surface is a curve in this
    2D problem: O(sqrt(N)) points). The results do not depend on the partition (up to the
    summation order of the areas).

    Args:
        V1: P1 space of the mesh.
        dx: the problem's cell measure (areas only enter as fractions).
        surface_dofs: local indices of the outer-surface nodes of ``V1``.
        length_unit: the mesh coordinates are divided by this (m per unit of the distances
            reported times ``length_scale``).
    """

    def __init__(self, V1: fem.FunctionSpace, dx: Any, surface_dofs: np.ndarray, length_unit: float = 1.0) -> None:
        self.V1 = V1
        self.comm: MPI.Comm = V1.mesh.comm
        self.imap = V1.dofmap.index_map
        self.n_owned = self.imap.size_local
        n_local = self.n_owned + self.imap.num_ghosts
        self.global_index = self.imap.local_to_global(np.arange(n_local, dtype=np.int32)).astype(np.int64)
        area_vec = fem_petsc.assemble_vector(fem.form(ufl.TestFunction(V1) * dx))
        area_vec.ghostUpdate(addv=PETSc.InsertMode.ADD, mode=PETSc.ScatterMode.REVERSE)
        area_vec.ghostUpdate(addv=PETSc.InsertMode.INSERT, mode=PETSc.ScatterMode.FORWARD)
        with area_vec.localForm() as local:
            self.area = local.array.copy()  #: lumped node areas, owned and ghost nodes
        area_vec.destroy()
        self.xy = V1.tabulate_dof_coordinates()[:, :2] / length_unit
        surface = np.zeros(n_local)
        surface[surface_dofs] = 1.0
        self.surface = self._ghost_max(surface[:, None])[:, 0] > 0  # the same flag on every copy of a node
        n_cells = V1.mesh.topology.index_map(V1.mesh.topology.dim).size_local
        pairs = np.array(basix.topology(V1.mesh.basix_cell())[1])  # the cell's edges (P1 dof i = vertex i)
        cell_dofs = V1.dofmap.list[:n_cells]
        edges = np.sort(cell_dofs[:, pairs].reshape(-1, 2), axis=1)
        self.edges = np.unique(edges, axis=0) if len(edges) else edges.reshape(0, 2)
        owned = slice(0, self.n_owned)
        surface_xy = np.concatenate(self.comm.allgather(self.xy[owned][self.surface[owned]]))
        self.depth = cKDTree(surface_xy).query(self.xy)[0] if len(surface_xy) else np.full(n_local, np.inf)
        sums = self.comm.allreduce(np.array([self.area[owned].sum(), *(self.area[owned] @ self.xy[owned])]), op=MPI.SUM)
        self.total_area = float(sums[0])
        self.centroid = sums[1:] / sums[0]
        self.electrolyte = np.zeros(n_local, dtype=bool)  #: electrolyte-filled nodes, owned and ghost
        self.rounds = 0  #: local-pass + ghost-exchange rounds of the last void labelling

    def _ghost_max(self, values: np.ndarray) -> np.ndarray:
        """Collective: each column's maximum over every copy of each local node (owned and ghost)."""
        vec = la.create_petsc_vector(self.imap, values.shape[1])
        try:
            with vec.localForm() as local:
                local.array[:] = values.reshape(-1)
            vec.ghostUpdate(addv=PETSc.InsertMode.MAX_VALUES, mode=PETSc.ScatterMode.REVERSE)
            vec.ghostUpdate(addv=PETSc.InsertMode.INSERT, mode=PETSc.ScatterMode.FORWARD)
            with vec.localForm() as local:
                return local.array.reshape(values.shape).copy()
        finally:
            vec.destroy()

    def _owner_values(self, values: np.ndarray) -> np.ndarray:
        """The owners' values at the ghost nodes too (collective): one mask on every copy of a node."""
        out = np.full((len(values), 1), -np.inf)
        out[: self.n_owned, 0] = values[: self.n_owned]
        return self._ghost_max(out)[:, 0]

    def _component_max(self, mask: np.ndarray, columns: np.ndarray) -> tuple[np.ndarray, int]:
        """Collective: for every local node in ``mask``, each column's maximum over the node's
        connected component of the subgraph induced by ``mask`` over the whole mesh (-inf
        outside), and the number of rounds it took."""
        keep = mask[self.edges[:, 0]] & mask[self.edges[:, 1]]
        e = self.edges[keep]
        n = len(mask)
        graph = sparse.coo_matrix((np.ones(len(e)), (e[:, 0], e[:, 1])), shape=(n, n))
        count, component = csgraph.connected_components(graph, directed=False)
        values = np.where(mask[:, None], columns, -np.inf)
        rounds = 0
        while True:
            rounds += 1
            best = np.full((count, columns.shape[1]), -np.inf)
            np.maximum.at(best, component, values)
            values = np.where(mask[:, None], best[component], -np.inf)
            if self.comm.size == 1:
                return values, rounds
            exchanged = self._ghost_max(values)
            changed = bool(np.any(exchanged != values))
            values = exchanged
            if not self.comm.allreduce(changed, op=MPI.LOR):
                return values, rounds

    def _sum(self, values: np.ndarray) -> float:
        """Collective: sum over the owned nodes."""
        return float(self.comm.allreduce(float(values[: self.n_owned].sum()), op=MPI.SUM))

    def reset(self) -> None:
        """Forget the electrolyte-filled voids."""
        self.electrolyte[:] = False

    def load_electrolyte(self, local: np.ndarray) -> None:
        """Rebuild the electrolyte set from local node values (owned and ghost; > 0.5: electrolyte),
        e.g. after a checkpoint was restored. Collective."""
        self.electrolyte = self._owner_values(np.asarray(local, dtype=float)) > 0.5

    def electrolyte_values(self) -> np.ndarray:
        """The electrolyte indicator (0/1) at this rank's local nodes (owned and ghost)."""
        return self.electrolyte.astype(float)

    def analyse(self, c_v: np.ndarray, threshold: float, percolate: bool, length_scale: float) -> dict[str, float]:
        """Void metrics of the local node values ``c_v``; with ``percolate`` first let the
        electrolyte fill every void component touching the surface or the electrolyte. Collective.

        Returns:
            ``void_fraction``, ``accessible_void_fraction``, ``inaccessible_void_fraction``,
            ``electrolyte_fraction`` (area fractions of the reference section),
            ``sei_penetration_depth_m`` (deepest electrolyte node below the outer surface, m),
            ``n_voids``, ``n_accessible_voids``, ``n_accessible_voids_at_surface`` and
            ``core_connectivity`` (area fraction of the solid, neither void nor electrolyte,
            in the largest solid cluster reaching within a quarter of the equivalent radius of
            the section's centroid: the Si still connected to the wire's core).
        """
        void = self._owner_values(np.asarray(c_v, dtype=float)) > threshold
        before = self.electrolyte
        flags = np.column_stack(
            [-self.global_index, void & before, void & self.surface, void & before & self.surface]
        ).astype(float)
        reached, self.rounds = self._component_max(void, flags)
        root = void & (-reached[:, 0] == self.global_index)  # one node per component: its smallest
        if percolate:
            self.electrolyte = before | (void & ((reached[:, 1] > 0) | (reached[:, 2] > 0)))
            accessible_component, at_surface = self.electrolyte, reached[:, 2] > 0
        else:
            accessible_component, at_surface = reached[:, 1] > 0, reached[:, 3] > 0
        accessible = void & self.electrolyte
        total = self.total_area
        depths = self.depth[: self.n_owned][self.electrolyte[: self.n_owned]]
        depth = self.comm.allreduce(float(depths.max(initial=0.0)), op=MPI.MAX)
        void_fraction = self._sum(self.area * void) / total
        accessible_fraction = self._sum(self.area * accessible) / total
        return {
            "void_fraction": void_fraction,
            "accessible_void_fraction": accessible_fraction,
            "inaccessible_void_fraction": void_fraction - accessible_fraction,
            "electrolyte_fraction": self._sum(self.area * self.electrolyte) / total,
            "sei_penetration_depth_m": depth * length_scale,
            "n_voids": int(self._sum(root)),
            "n_accessible_voids": int(self._sum(root & accessible_component)),
            "n_accessible_voids_at_surface": int(self._sum(root & at_surface)),
            "core_connectivity": self._core_connectivity(~void & ~self.electrolyte),
        }

    def _distance_to(self, target: np.ndarray) -> np.ndarray:
        """Collective: distance of every local node to the nearest node of ``target`` (a node
        mask, the same on every copy of a node) over the whole mesh; inf if there is none. The
        owned target nodes' coordinates are allgathered (once per call)."""
        points = np.concatenate(self.comm.allgather(self.xy[: self.n_owned][target[: self.n_owned]]))
        if len(points) == 0:
            return np.full(len(self.xy), np.inf)
        return cKDTree(points).query(self.xy)[0]

    def proximity(self, c_v: np.ndarray, threshold: float, length_scale: float) -> dict[str, float]:
        """Where the voids of a delithiation formed relative to the electrolyte (He et al. 2021: new
        voids nucleate next to the preserved, electrolyte-filled ones). Call before
        :meth:`analyse` percolates. Collective.

        New voids are the void nodes outside the electrolyte. Their area-weighted mean distance
        to the electrolyte (the electrolyte-filled voids and the outer surface, which the
        electrolyte wets) is compared with the mean over all Si nodes outside the electrolyte,
        i.e. with voids placed at random in the Si: a ratio below 1 means the voids formed
        nearer the electrolyte than random placement would put them. The same ratio with the
        distance to the preserved voids alone.

        Returns:
            ``new_void_fraction`` (area fraction of the section); if there are new voids,
            ``new_void_distance_ratio`` and ``new_void_distance_m`` (their mean distance to the
            electrolyte, m, reference configuration), and if some voids hold electrolyte,
            ``new_void_distance_to_preserved_ratio`` (keys without a value are left out, so that
            records compare and serialise without NaN).
        """
        void = self._owner_values(np.asarray(c_v, dtype=float)) > threshold
        si = ~self.electrolyte
        new = void & si
        new_area, si_area = self._sum(self.area * new), self._sum(self.area * si)
        out = {"new_void_fraction": new_area / self.total_area}
        if new_area == 0 or si_area == 0:
            return out
        for key, target in (
            ("new_void_distance_ratio", self.electrolyte | self.surface),
            ("new_void_distance_to_preserved_ratio", self.electrolyte),
        ):
            if not self.comm.allreduce(bool(np.any(target[: self.n_owned])), op=MPI.LOR):
                continue
            d = self._distance_to(target)
            mean_new = self._sum(self.area * d * new) / new_area
            out[key] = mean_new / (self._sum(self.area * d * si) / si_area)
            if key == "new_void_distance_ratio":
                out["new_void_distance_m"] = mean_new * length_scale
        return out

    def _core_connectivity(self, solid: np.ndarray) -> float:
        """Area fraction of the solid in the core cluster (see :meth:`analyse`). Collective.

        The core: the largest solid cluster reaching into the central disk of a quarter of the
        equivalent radius (the node nearest the centroid alone may sit in a pocket between
        voids); if none reaches it, the cluster of the solid node nearest the centroid.
        """
        solid_area = self._sum(self.area * solid)
        if solid_area == 0:
            return 0.0
        distance = np.hypot(*(self.xy - self.centroid).T)
        central = solid & (distance <= 0.25 * np.sqrt(self.total_area / np.pi))
        values, _ = self._component_max(solid, np.column_stack([-self.global_index, central]).astype(float))
        label = np.where(solid, -values[:, 0], -1.0).astype(np.int64)
        owned = np.zeros(len(solid), dtype=bool)
        owned[: self.n_owned] = True
        if self.comm.allreduce(bool(np.any(central[owned])), op=MPI.LOR):
            reference = self._largest_central(
                label[owned & solid & (values[:, 1] > 0)], self.area[owned & solid & (values[:, 1] > 0)]
            )
        else:
            candidates = np.flatnonzero(owned & solid)
            mine: tuple[float, float, float, int] = (np.inf, 0.0, 0.0, -1)
            if len(candidates):  # the nearest (then lowest x, y) solid node: the same on any partition
                k = candidates[np.lexsort((self.xy[candidates, 1], self.xy[candidates, 0], distance[candidates]))[0]]
                mine = (float(distance[k]), float(self.xy[k, 0]), float(self.xy[k, 1]), int(label[k]))
            reference = min(self.comm.allgather(mine))[3]
        return self._sum(self.area * (solid & (label == reference))) / solid_area

    def _largest_central(self, labels: np.ndarray, areas: np.ndarray) -> int:
        """Collective: the label of the central cluster with the largest area. Each rank sums its
        owned nodes' areas per label; the partial sums go to the rank owning the label's node."""
        ranges = np.array(self.comm.allgather(self.imap.local_range))
        unique, inverse = np.unique(labels, return_inverse=True)
        partial = np.bincount(inverse, weights=areas, minlength=len(unique))
        owner = np.searchsorted(ranges[:, 1], unique, side="right")
        outgoing = [(unique[owner == r], partial[owner == r]) for r in range(self.comm.size)]
        incoming = self.comm.alltoall(outgoing)
        mine_labels = np.concatenate([lab for lab, _ in incoming])
        mine_areas = np.concatenate([a for _, a in incoming])
        clusters, where = np.unique(mine_labels, return_inverse=True)
        sizes = np.bincount(where, weights=mine_areas, minlength=len(clusters))
        best = (float(sizes.max()), -int(clusters[np.argmax(sizes)])) if len(clusters) else (-np.inf, 0)
        return -max(self.comm.allgather(best))[1]


class VacancyPhaseFieldProblem(PhaseFieldProblem):
    """:class:`PhaseFieldProblem` plus the vacancy field, void nucleation and electrolyte percolation.

    The mixed space gains ``c_v`` and ``mu_v`` (P1). Each delithiation draws a new nucleation
    field; after it, electrolyte percolates into surface-connected voids. Every half-cycle
    record gains :data:`VOID_RECORD_KEYS`.
    """

    def _setup_fields(self) -> None:
        vac = self.settings.vacancy
        self.V1 = fem.functionspace(self.mesh, ("Lagrange", 1))
        self.electrolyte = fem.Function(self.V1, name="electrolyte")
        self.D0 = fem.functionspace(self.mesh, ("DG", 0))
        self.electrolyte_cells = fem.Function(self.D0, name="electrolyte_cells")
        self.nucleation = fem.Function(self.V1, name="nucleation_rate")
        self.mobility_v = fem.Constant(self.mesh, PETSc.ScalarType(vac.mobility_v))
        exchange = vac.sei_exchange_rate if self.settings.cycling.surface_bc == "dirichlet" else 0.0
        self.sei_exchange = fem.Constant(self.mesh, PETSc.ScalarType(exchange))
        self.omega_v = fem.Constant(self.mesh, PETSc.ScalarType(vac.omega_v))
        self._frozen_in_equilibrium += [self.mobility_v, self.sei_exchange]
        self._cv_dofs = self.W.sub(3).collapse()[1]
        self._muv_dofs = self.W.sub(4).collapse()[1]
        facets = np.concatenate([self.tagged.facet_tags.find(t) for t in self.surface_tags]).astype(np.int32)
        surface_dofs = fem.locate_dofs_topological(self.V1, 1, facets)
        self.voids = VoidGraph(self.V1, self.dx, surface_dofs, length_unit=self.l0)
        coords = self.V1.tabulate_dof_coordinates()[:, :2] / self.l0
        lower = np.array([self.comm.allreduce(float(coords[:, i].min(initial=np.inf)), op=MPI.MIN) for i in range(2)])
        upper = np.array([self.comm.allreduce(float(coords[:, i].max(initial=-np.inf)), op=MPI.MAX) for i in range(2)])
        self._box = (lower, upper)
        self.vacancy_source_total = 0.0
        self.before_half_cycle.append(VacancyPhaseFieldProblem._prepare_half_cycle)
        self.after_half_cycle.insert(0, VacancyPhaseFieldProblem._void_record)
        self._source_integral: fem.Form | None = None

    def _concentration_dofs(self) -> np.ndarray:
        return np.concatenate([self._c_dofs, self._cv_dofs])

    def _elements(self) -> list:
        p1 = basix.ufl.element("Lagrange", self.mesh.basix_cell(), 1)
        return [*super()._elements(), p1, p1]

    def scalar_fields(self) -> dict[str, Any]:
        return {"c_v": self.w.sub(3), "electrolyte": self.electrolyte}

    def _residual_terms(self, k: dict[str, Any], tests: tuple) -> Any:
        vac = self.settings.vacancy
        q, v, _, qv, vv = tests
        c, mu = k["c"], k["mu"]
        cv, muv = ufl.split(self.w)[3:5]
        _, dh = interpolation(c, self.settings.material.c_min, self.settings.material.c_max)
        frozen = (1 - vac.electrolyte_mobility) * self.electrolyte_cells
        li = dh * self.omega_v * cv * (1 - cv) * v - frozen * self.mobility * ufl.inner(self.grad(mu), self.grad(q))
        vacancy = (1 - frozen) * self.mobility_v * ufl.inner(self.grad(muv), self.grad(qv)) - vac.kappa_v * ufl.inner(
            self.grad(cv), self.grad(vv)
        )
        return super()._residual_terms(k, tests) + li + vacancy

    def _lumped_terms(self, k: dict[str, Any], tests: tuple) -> Any:
        """Vacancy storage, source and homogeneous potential and the SEI source at the nodes
        (vertex rule), as the base class does for Li: keeps every nodal ``c_v`` in (0, 1) and
        puts the SEI source on the Si nodes next to electrolyte, none on electrolyte nodes."""
        mat = self.settings.material
        q, qv, vv = tests[0], tests[3], tests[4]
        c, cv, muv = k["c"], ufl.split(self.w)[3], ufl.split(self.w)[4]
        c_old, cv_old = ufl.split(self.w_old)[0], ufl.split(self.w_old)[3]
        h, _ = interpolation(c, mat.c_min, mat.c_max)
        self._source_density = self.nucleation * (1 - cv) * ufl.max_value(c_old - c, 0.0)
        cv_concave = cv_old if self.settings.solver.time_scheme == "convex_split" else cv
        mu_v_hom = ufl.ln(cv) - ufl.ln(1 - cv) + (1 - h) * self.omega_v * (1 - 2 * cv_concave)
        grad_chi = self.grad(self.electrolyte)
        wall = (1 - self.electrolyte) * ufl.sqrt(ufl.inner(grad_chi, grad_chi))
        sei_source = self.sei_exchange * wall * (self.c_surface - c)
        vacancy = ((cv - cv_old) - self._source_density) / self.dt * qv + (muv - mu_v_hom) * vv
        return super()._lumped_terms(k, tests) + vacancy - sei_source * q

    def _build_forms(self) -> None:
        super()._build_forms()
        cv = ufl.split(self.w)[3]
        self._source_integral = fem.form(self._source_density * self.dx_vertex)
        self._scalar_forms["vacancies"] = fem.form(cv * self.dx_vertex)

    # -- state ----------------------------------------------------------------------------
    def set_initial_condition(self, c: Any = None) -> None:
        """As the base class; ``c_v = c_min`` (no voids), no electrolyte, no nucleation."""
        super().set_initial_condition(c)
        self.set_vacancies(self.settings.material.c_min)
        self.set_electrolyte(np.zeros_like(self.electrolyte.x.array))
        self.nucleation.x.array[:] = 0.0
        self.voids.reset()
        self.vacancy_source_total = 0.0

    def set_vacancies(self, c_v: Any) -> None:
        """Set ``c_v`` (value, function of the normalised coordinates, or P1 node values) and
        ``mu_v`` at equilibrium of the local part, in the current and previous state."""
        mat, vac = self.settings.material, self.settings.vacancy
        V3, dofs3 = self.W.sub(3).collapse()
        cvf = fem.Function(V3)
        if callable(c_v):
            cvf.interpolate(self.normalised(c_v))
        else:
            cvf.x.array[:] = c_v
        V0, dofs0 = self.W.sub(0).collapse()
        cf = fem.Function(V0)
        cf.x.array[:] = self.w.x.array[dofs0]
        cv_nodes = fem.Function(V0)
        cv_nodes.interpolate(cvf)
        h, _ = interpolation(cf.x.array, mat.c_min, mat.c_max)
        cv_arr = np.clip(cv_nodes.x.array, chemistry.CLIP, 1 - chemistry.CLIP)
        mu_v = np.log(cv_arr) - np.log(1 - cv_arr) + (1 - h) * vac.omega_v * (1 - 2 * cv_arr)
        self.w.x.array[dofs3] = cvf.x.array
        self.w.x.array[self.W.sub(4).collapse()[1]] = mu_v
        self.w.x.scatter_forward()
        self.w_old.x.array[:] = self.w.x.array
        self._dt_prev = None

    def set_electrolyte(self, nodes: np.ndarray) -> None:
        """Set the electrolyte indicator from its local node values (0/1, owned and ghost) and
        mark every cell touching an electrolyte node (Li and vacancy mobilities vanish there)."""
        self.electrolyte.x.array[:] = nodes
        n_cells = self.mesh.topology.index_map(2).size_local + self.mesh.topology.index_map(2).num_ghosts
        touching = nodes[self.V1.dofmap.list[:n_cells]].max(axis=1)
        self.electrolyte_cells.x.array[self.D0.dofmap.list[:n_cells, 0]] = touching
        self.newton.invalidate()  # the mobilities changed

    def vacancy_values(self) -> np.ndarray:
        """``c_v`` at the local nodes of :attr:`V1` (owned and ghost)."""
        out = fem.Function(self.V1)
        out.interpolate(self.w.sub(3))
        return out.x.array.copy()

    # -- hooks ----------------------------------------------------------------------------
    def _prepare_half_cycle(self, index: int, kind: str) -> None:
        """Draw the nucleation field for a delithiation; none during lithiation."""
        vac = self.settings.vacancy
        if kind != "delithiation" or vac.nucleation_rate == 0:
            self.nucleation.x.array[:] = 0.0
            return
        l0 = self.l0
        sites = nucleation_sites(vac.seed, index, self._box, vac.nucleus_spacing / l0)
        self.nucleation.interpolate(
            self.normalised(lambda x: nucleation_field(x, sites, vac.nucleus_radius / l0, vac.nucleation_rate))
        )
        logger.debug("half-cycle %d: %d nucleation sites", index, len(sites))

    def _before_accept(self) -> None:
        """Accumulate the vacancy source of the accepted step (``int R (1 - c_v) max(c_old - c, 0)``)."""
        source = cast(fem.Form, self._source_integral)  # set with the forms, before any step
        self.vacancy_source_total += self.comm.allreduce(fem.assemble_scalar(source))

    def checkpoint_state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        state, arrays = super().checkpoint_state()
        state["vacancy_source_total"] = self.vacancy_source_total
        return state, {**arrays, "electrolyte": self.electrolyte, "nucleation": self.nucleation}

    def restore(self, state: dict[str, Any], checkpoint: Any) -> None:
        super().restore(state, checkpoint)
        self.vacancy_source_total = float(state["vacancy_source_total"])
        checkpoint.restore("problem.nucleation", self.nucleation)
        electrolyte = fem.Function(self.V1)
        checkpoint.restore("problem.electrolyte", electrolyte)
        self.set_electrolyte(np.round(electrolyte.x.array))
        self.voids.load_electrolyte(self.electrolyte.x.array)

    def _void_record(self, record: dict[str, Any]) -> None:
        vac = self.settings.vacancy
        percolate = record["kind"] == "delithiation"
        if percolate:
            record.update(self.voids.proximity(self.vacancy_values(), vac.threshold, self.l0))
        record.update(self.voids.analyse(self.vacancy_values(), vac.threshold, percolate, self.l0))
        if percolate:
            self.set_electrolyte(self.voids.electrolyte_values())
        area = self.scalar("area_ref")
        record["mean_c_v"] = self.scalar("vacancies") / area
        record["vacancy_source_total"] = self.vacancy_source_total / area
        record["equivalent_real_cycles"] = (record["index"] + 1) // 2 * vac.real_cycles_per_cycle
        logger.info(
            "  voids: %.2f %% of the section (%d), electrolyte-filled %.2f %%, SEI depth %.2f nm, core connectivity "
            "%.3f",
            100 * record["void_fraction"],
            record["n_voids"],
            100 * record["accessible_void_fraction"],
            record["sei_penetration_depth_m"] * 1e9,
            record["core_connectivity"],
        )
