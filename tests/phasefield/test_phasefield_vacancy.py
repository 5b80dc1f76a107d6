"""Vacancies, voids and electrolyte percolation: the pieces against exact answers and
the multi-cycle mechanism of Fig. 5 of He et al. (2021) on the records."""

from __future__ import annotations

import math

import numpy as np
import pytest

dolfinx = pytest.importorskip("dolfinx")

import ufl  # noqa: E402
from dolfinx import fem  # noqa: E402
from mpi4py import MPI  # noqa: E402

from fem_anode.errors import UsageError  # noqa: E402
from fem_anode.fem.phasefield.geometry import disk_mesh  # noqa: E402
from fem_anode.fem.phasefield.run import run_phasefield  # noqa: E402
from fem_anode.fem.phasefield.settings import (
    CyclingSettings,
    MeshSettings,
    OutputSettings,
    PhaseFieldSettings,
    SolverSettings,
    VacancySettings,
)  # noqa: E402
from fem_anode.fem.phasefield.vacancy import (
    VOID_RECORD_KEYS,
    VoidGraph,
    interpolation,
    nucleation_field,
    nucleation_sites,
)  # noqa: E402

NM = 1e-9


def test_interpolation_function_ends_and_derivative():
    c = np.linspace(0.0, 1.0, 2001)
    h, dh = interpolation(c, 0.14, 0.86)
    assert interpolation(0.14, 0.14, 0.86)[0] == 0.0 and interpolation(0.86, 0.14, 0.86)[0] == 1.0
    assert np.all(h[c <= 0.14] == 0) and np.all(h[c >= 0.86] == 1) and np.all(np.diff(h) >= 0)
    numeric = np.gradient(h, c)
    inside = (c > 0.15) & (c < 0.85)
    assert np.allclose(dh[inside], numeric[inside], atol=2e-3)
    assert dh.max() == pytest.approx(30 / 16 / 0.72, rel=1e-3)  # 30 xi^2 (1 - xi)^2 peaks at xi = 1/2


def test_nucleation_sites_are_seeded_per_half_cycle_and_the_field_depends_on_position_only():
    box = (np.array([-1.0, -1.0]), np.array([1.0, 1.0]))
    a, b = nucleation_sites(3, 2, box, 0.4), nucleation_sites(3, 2, box, 0.4)
    assert np.array_equal(a, b) and not np.array_equal(a, nucleation_sites(3, 4, box, 0.4))
    counts = [len(nucleation_sites(s, 2, box, 0.4)) for s in range(200)]
    assert np.mean(counts) == pytest.approx(4 / 0.16, rel=0.05)  # Poisson with mean area / spacing^2
    sites = np.array([[0.0, 0.0], [0.5, 0.0]])
    x = np.array([[0.0, 0.25, 2.0], [0.0, 0.0, 0.0]])
    expected = [
        min(1.0, 1 + math.exp(-0.25 / (2 * 0.01))),
        2 * math.exp(-0.0625 / 0.02),
        math.exp(-4 / 0.02) + math.exp(-2.25 / 0.02),
    ]
    assert np.allclose(nucleation_field(x, sites, 0.1, 0.8), 0.8 * np.minimum(1.0, expected))


def test_vacancy_settings_are_validated():
    with pytest.raises(UsageError, match="nucleation_rate"):
        VacancySettings.from_dict({"nucleation_rate": 1.5})
    with pytest.raises(UsageError, match="did you mean 'threshold'"):
        VacancySettings.from_dict({"treshold": 0.4})


def _void_graph(comm):
    tagged = disk_mesh(20 * NM, 1 * NM, comm)
    V1 = fem.functionspace(tagged.mesh, ("Lagrange", 1))
    facets = tagged.facet_tags.find(tagged.facet_tag("surface"))
    surface = fem.locate_dofs_topological(V1, 1, facets)
    return VoidGraph(V1, ufl.dx(domain=tagged.mesh), surface), V1


def _lens_area(R: float, r: float, d: float) -> float:
    """Area of the intersection of circles of radii R and r whose centres are d apart."""
    k = math.sqrt((-d + r + R) * (d + r - R) * (d - r + R) * (d + r + R))
    return (
        r**2 * math.acos((d**2 + r**2 - R**2) / (2 * d * r))
        + R**2 * math.acos((d**2 + R**2 - r**2) / (2 * d * R))
        - k / 2
    )


def _disks(V1, disks):
    x = V1.tabulate_dof_coordinates()
    inside = np.zeros(len(x), dtype=bool)
    for cx, cy, r in disks:
        inside |= np.hypot(x[:, 0] - cx, x[:, 1] - cy) < r
    return np.where(inside, 0.86, 0.14)


def test_void_graph_components_percolation_depth_and_core(comm):
    graph, V1 = _void_graph(comm)
    total = math.pi * 20**2
    # A crosses the outer surface (its part inside the wire reaches 8 nm deep), B is inside
    c_v = _disks(V1, [(17 * NM, 0.0, 5 * NM), (-5 * NM, 0.0, 4 * NM)])
    before = graph.analyse(c_v, 0.5, percolate=False, length_scale=1.0)
    assert before["n_voids"] == 2 and before["accessible_void_fraction"] == 0 and before["sei_penetration_depth_m"] == 0
    area_a = _lens_area(20.0, 5.0, 17.0)
    after = graph.analyse(c_v, 0.5, percolate=True, length_scale=1.0)
    assert after["n_voids"] == 2 and after["n_accessible_voids"] == after["n_accessible_voids_at_surface"] == 1
    assert after["void_fraction"] == pytest.approx((area_a + 16 * math.pi) / total, rel=0.12)
    assert after["accessible_void_fraction"] == pytest.approx(area_a / total, rel=0.15)
    assert after["sei_penetration_depth_m"] == pytest.approx(8 * NM, abs=1.2 * NM)
    assert after["core_connectivity"] == 1.0
    # A closes again: the electrolyte stays where it was, but no void is accessible any more
    later = graph.analyse(_disks(V1, [(-5 * NM, 0.0, 4 * NM)]), 0.5, percolate=True, length_scale=1.0)
    assert (
        later["electrolyte_fraction"] == pytest.approx(after["electrolyte_fraction"])
        and later["accessible_void_fraction"] == 0
    )
    assert later["sei_penetration_depth_m"] == after["sei_penetration_depth_m"]
    # a void ring cuts the core (r < 8 nm) off the outer shell (10 nm < r < 20 nm)
    graph.reset()
    x = V1.tabulate_dof_coordinates()
    ring = np.where(np.abs(np.hypot(x[:, 0], x[:, 1]) - 9 * NM) < 1.0 * NM, 0.86, 0.14)
    cut = graph.analyse(ring, 0.5, percolate=True, length_scale=1.0)
    assert cut["n_voids"] == 1 and cut["accessible_void_fraction"] == 0
    assert cut["core_connectivity"] == pytest.approx(64 / (64 + 300), rel=0.15)
    graph.comm.barrier()


def test_new_void_proximity_to_the_electrolyte_against_random_placement(comm):
    """A new void next to a preserved electrolyte-filled void has a distance
    ratio well below 1 (random placement: 1), one on the far side above 1; before any void holds
    electrolyte the ratio to preserved voids is undefined (left out); the same on one and all ranks."""
    results = {}
    for name, c in (("all", comm), ("one", MPI.COMM_SELF)):
        graph, V1 = _void_graph(c)
        preserved = (17 * NM, 0.0, 5 * NM)  # crosses the outer surface: fills with electrolyte
        first = graph.proximity(_disks(V1, [preserved]), 0.5, length_scale=1.0)
        graph.analyse(_disks(V1, [preserved]), 0.5, percolate=True, length_scale=1.0)
        near = graph.proximity(_disks(V1, [preserved, (9 * NM, 0.0, 2 * NM)]), 0.5, length_scale=1.0)
        far = graph.proximity(_disks(V1, [preserved, (-12 * NM, 0.0, 2 * NM)]), 0.5, length_scale=1.0)
        results[name] = (first, near, far)
    (first, near, far), serial = results["all"], results["one"]
    assert (
        "new_void_distance_to_preserved_ratio" not in first and first["new_void_distance_ratio"] < 0.7
    )  # at the surface
    for r in (near, far):
        assert r["new_void_fraction"] == pytest.approx(4 / 400, rel=0.25)  # a 2 nm disk in the 20 nm wire
    assert near["new_void_distance_to_preserved_ratio"] < 0.4 and far["new_void_distance_to_preserved_ratio"] > 1.1
    assert near["new_void_distance_m"] == pytest.approx(
        3.0 * NM, abs=1.0 * NM
    )  # 12 nm (void wall) - 9 nm, averaged over the disk
    for a, b in zip((first, near, far), serial):
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-12), key


def _serpentine(V1, to_surface: bool = False):
    """A void meandering through the wire: five horizontal strips (|x| <= 12 nm, 2 nm wide)
    joined alternately at their right and left ends, so that any cut of the section through the
    centre crosses it several times; optionally a radial channel from its end to the surface."""
    x = V1.tabulate_dof_coordinates()[:, :2] / NM
    ys = [-9.0, -4.5, 0.0, 4.5, 9.0]
    void = np.zeros(len(x), dtype=bool)
    for k, y in enumerate(ys):
        void |= (np.abs(x[:, 1] - y) < 1.0) & (np.abs(x[:, 0]) < 12.0)
        if k < len(ys) - 1:  # the connector to the next strip, right and left in turn
            side = 11.0 if k % 2 == 0 else -11.0
            void |= (np.abs(x[:, 0] - side) < 1.0) & (x[:, 1] > y) & (x[:, 1] < ys[k + 1])
    if to_surface:
        void |= (np.abs(x[:, 0] - 11.0) < 1.0) & (x[:, 1] > 9.0)
    return np.where(void, 0.86, 0.14)


def test_void_graph_labels_a_serpentine_crossing_the_partition_the_same_on_one_and_all_ranks(comm):
    """Distributed labelling: one component that crosses the partition boundary again and again
    (min-label propagation over the ghost exchange, several rounds on 2 ranks), the same
    metrics as on one rank; the analysis sends only scalars through the communicator."""
    results = {}
    for name, c in (("all", comm), ("one", MPI.COMM_SELF)):
        graph, V1 = _void_graph(c)
        closed = graph.analyse(_serpentine(V1), 0.5, percolate=True, length_scale=1.0)
        rounds = graph.rounds
        spy = _SpyComm(graph.comm)
        graph.comm = spy
        opened = graph.analyse(_serpentine(V1, to_surface=True), 0.5, percolate=True, length_scale=1.0)
        graph.comm = spy._comm
        results[name] = (closed, opened, rounds, spy.sizes, V1.dofmap.index_map.size_global)
    (closed, opened, rounds, sizes, n_nodes), (closed_1, opened_1, rounds_1, _, _) = results["all"], results["one"]
    assert closed["n_voids"] == 1 and closed["n_accessible_voids"] == 0 and closed["electrolyte_fraction"] == 0
    assert opened["n_voids"] == opened["n_accessible_voids"] == opened["n_accessible_voids_at_surface"] == 1
    assert opened["accessible_void_fraction"] == pytest.approx(opened["void_fraction"], rel=1e-12)
    assert opened["sei_penetration_depth_m"] > 15 * NM  # the whole serpentine filled: down to the centre region
    assert rounds_1 == 1 and (rounds >= 2 or comm.size == 1)  # it crossed the partition boundary
    for a, b in ((closed, closed_1), (opened, opened_1)):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-12, abs=0), key
    assert max(sizes, default=0) < 8 * n_nodes / 20  # no gather of the node values


class _SpyComm:
    """A communicator that records the pickled size of every object it sends or returns."""

    def __init__(self, comm):
        self._comm = comm
        self.sizes: list[int] = []

    def __getattr__(self, name):
        attribute = getattr(self._comm, name)
        if name not in ("bcast", "gather", "allgather", "scatter", "alltoall", "allreduce", "reduce", "send", "recv"):
            return attribute

        def spied(*args, **kwargs):
            import pickle

            self.sizes += [len(pickle.dumps(a)) for a in args[:1]]
            result = attribute(*args, **kwargs)
            self.sizes.append(len(pickle.dumps(result)))
            return result

        return spied


def _short_settings(reuse_factorisation: bool = True, **vacancy):
    return PhaseFieldSettings(
        mesh=MeshSettings(size=4e-9),
        cycling=CyclingSettings(half_cycles=2, half_cycle_time=1.0),
        vacancy=VacancySettings(**vacancy),
        solver=SolverSettings(reuse_factorisation=reuse_factorisation),
        output=OutputSettings(fields=False, figures=False, times=[]),
    )


def test_vacancies_are_conserved_apart_from_the_nucleation_source_and_runs_agree_on_1_and_all_ranks():
    # exact LU at every Newton iteration: with the lagged factorisation the GMRES iteration
    # counts (and so the refactorisations and, rarely, a step decision) follow the round-off of
    # MUMPS's parallel factorisation, which is not reproducible bit for bit
    world = run_phasefield(_short_settings(reuse_factorisation=False), None, MPI.COMM_WORLD)["half_cycles"]
    serial = run_phasefield(_short_settings(reuse_factorisation=False), None, MPI.COMM_SELF)["half_cycles"]
    lith, delith = world
    assert lith["vacancy_source_total"] == 0 and lith["mean_c_v"] == pytest.approx(0.14, abs=1e-12)
    assert delith["vacancy_source_total"] > 0.02 and delith["n_voids"] > 0
    # d/dt int c_v = int R (1 - c_v) max(-dc/dt, 0): no flux through the surface, nothing else
    assert delith["mean_c_v"] - 0.14 == pytest.approx(delith["vacancy_source_total"], rel=1e-8)
    for a, b in zip(world, serial):
        assert set(VOID_RECORD_KEYS) <= set(a)
        for key in ("n_voids", "n_accessible_voids", "steps", "rejected_steps"):
            assert a[key] == b[key], key
        for key in (*VOID_RECORD_KEYS, "mean_c_li", "outer_radius_m"):
            assert abs(a[key] - b[key]) <= 1e-6 * max(abs(a[key]), abs(b[key])) + 1e-12, (key, a[key], b[key])


def test_no_nucleation_means_no_voids():
    lith, delith = run_phasefield(_short_settings(nucleation_rate=0.0), None, MPI.COMM_WORLD)["half_cycles"]
    assert delith["void_fraction"] == 0 and delith["mean_c_v"] == pytest.approx(0.14, abs=1e-10)


def test_voids_demo_quick_shows_the_mechanism_of_fig5(shared_tmp_path, comm, load_demo):
    module = load_demo("phasefield_voids_sei")
    out = shared_tmp_path / "voids"
    records = module.main(out, quick=True, comm=comm)["half_cycles"]  # raises unless the sequence holds
    assert len(records) == 6
    depths = [r["sei_penetration_depth_m"] for r in records]
    assert depths[-1] > 2e-9
    if comm.rank == 0:
        assert (out / "morphology_montage.png").stat().st_size > 20_000
        assert len(list(out.glob("morphology_0*_*.png"))) == 6
