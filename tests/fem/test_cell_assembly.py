"""The cached cell assembler (fem_anode.fem.cell_assembly.CellMatrixAssembler) gives dolfinx's
matrix bit for bit: a mixed space with Dirichlet conditions on a sub-space, a blocked P2 vector
space, subdomain integrals and a quadrilateral mesh, on 1 and 2 ranks; after the coefficients
change it follows them; forms it does not serve are refused with the reason. The bordered
assembler (BorderedCellAssembler) gives the six separately assembled quantities of a system
bordered by a global scalar from two forms on W x DG0."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("dolfinx")

import basix.ufl
import ufl
from dolfinx import fem, la, mesh
from mpi4py import MPI

from fem_anode.errors import SolverError
from fem_anode.fem.cell_assembly import AssemblyUnsupported, BorderedCellAssembler, CellMatrixAssembler


def _dolfinx_matrix(form: fem.Form, bcs: list[fem.DirichletBC]) -> np.ndarray:
    matrix = fem.create_matrix(form, la.BlockMode.expanded)
    fem.assemble_matrix(matrix, form, bcs=bcs)
    return matrix.data.copy()


def _cached_matrix(form: fem.Form, bcs: list[fem.DirichletBC]) -> tuple[CellMatrixAssembler, np.ndarray]:
    matrix = fem.create_matrix(form, la.BlockMode.expanded)  # blocked spaces unrolled, as PETSc's AIJ
    matrix.data[:] = np.nan  # every value must be written, none left over
    assembler = CellMatrixAssembler(form, matrix, bcs)
    assembler.assemble()
    return assembler, matrix.data


def _assert_follows_the_change(
    assembler: CellMatrixAssembler, form: fem.Form, bcs: list[fem.DirichletBC], reference: np.ndarray
) -> None:
    """After the form's coefficients or constants changed: the cached assembly equals dolfinx's
    again, and dolfinx's matrix did change."""
    reference_new = _dolfinx_matrix(form, bcs)
    assembler.assemble()
    assert np.array_equal(assembler.matrix.data, reference_new)
    assert not np.array_equal(reference_new, reference)


def _mixed_problem(cell_type: mesh.CellType = mesh.CellType.triangle):
    """A nonlinear mixed form (P1 scalar pair and a P2 vector) with coefficient-dependent entries,
    clamped displacement on the left edge, like the phase field's Jacobian."""
    domain = mesh.create_unit_square(MPI.COMM_WORLD, 7, 5, cell_type)
    cell = domain.basix_cell()
    p1 = basix.ufl.element("Lagrange", cell, 1)
    p2 = basix.ufl.element("Lagrange", cell, 2, shape=(2,))
    W = fem.functionspace(domain, basix.ufl.mixed_element([p1, p1, p2]))
    w = fem.Function(W)
    w.sub(0).interpolate(lambda x: 0.3 + 0.2 * x[0])
    w.sub(1).interpolate(lambda x: np.sin(x[1]))
    w.sub(2).interpolate(lambda x: np.vstack([0.1 * x[0] * x[1], -0.05 * x[1]]))
    c, mu, u = ufl.split(w)
    q, v, z = ufl.TestFunctions(W)
    eps = ufl.sym(ufl.grad(u))
    residual = (
        (ufl.ln(c) - ufl.ln(1 - c)) * q * ufl.dx
        + (1 + c**2) * ufl.inner(ufl.grad(mu), ufl.grad(q)) * ufl.dx
        + (mu - c**3) * v * ufl.dx
        + ufl.inner((1 + c) * eps + ufl.tr(eps) ** 2 * ufl.Identity(2), ufl.grad(z)) * ufl.dx
    )
    jacobian = fem.form(ufl.derivative(residual, w))
    left = mesh.locate_entities_boundary(domain, 1, lambda x: np.isclose(x[0], 0.0))
    U, _ = W.sub(2).collapse()
    dofs = fem.locate_dofs_topological((W.sub(2), U), 1, left)
    bc = fem.dirichletbc(fem.Function(U), dofs, W.sub(2))
    return w, jacobian, [bc]


@pytest.mark.parametrize("cell_type", [mesh.CellType.triangle, mesh.CellType.quadrilateral])
def test_mixed_form_with_dirichlet_rows_equals_dolfinx(cell_type):
    w, jacobian, bcs = _mixed_problem(cell_type)
    reference = _dolfinx_matrix(jacobian, bcs)
    assembler, cached = _cached_matrix(jacobian, bcs)
    assert np.array_equal(cached, reference)
    assert np.count_nonzero(reference) > 0
    # new coefficients: the positions stay, the values follow (and differ from the old ones)
    w.x.array[:] *= 1.1
    w.x.array[:] += 0.01
    _assert_follows_the_change(assembler, jacobian, bcs, reference)


def test_blocked_space_and_subdomain_integrals_equal_dolfinx():
    domain = mesh.create_unit_square(MPI.COMM_WORLD, 6, 6)
    V = fem.functionspace(domain, ("Lagrange", 2, (2,)))
    tdim = domain.topology.dim
    n_cells = domain.topology.index_map(tdim).size_local
    midpoints = mesh.compute_midpoints(domain, tdim, np.arange(n_cells, dtype=np.int32))
    values = np.where(midpoints[:, 0] < 0.5, 1, 2).astype(np.int32)
    tags = mesh.meshtags(domain, tdim, np.arange(n_cells, dtype=np.int32), values)
    dx = ufl.Measure("dx", domain=domain, subdomain_data=tags)
    u, v = ufl.TrialFunction(V), ufl.TestFunction(V)
    k = fem.Constant(domain, 3.0)
    form = fem.form(
        ufl.inner(ufl.grad(u), ufl.grad(v)) * dx(1) + k * ufl.inner(u, v) * dx(2) + ufl.div(u) * ufl.div(v) * dx
    )
    facets = mesh.locate_entities_boundary(domain, 1, lambda x: np.isclose(x[1], 0.0))
    bc = fem.dirichletbc(np.zeros(2), fem.locate_dofs_topological(V, 1, facets), V)
    # the reference: dolfinx 0.9's insert_diagonal fails on expanded blocked matrices in parallel
    bcs = [bc] if domain.comm.size == 1 else []
    reference = _dolfinx_matrix(form, bcs)
    assembler, cached = _cached_matrix(form, bcs)
    assert np.array_equal(cached, reference)
    k.value = 5.0  # constants are packed at every assembly
    _assert_follows_the_change(assembler, form, bcs, reference)


def test_unserved_forms_are_refused_with_the_reason():
    domain = mesh.create_unit_square(MPI.COMM_WORLD, 3, 3)
    V = fem.functionspace(domain, ("Lagrange", 1))
    Q = fem.functionspace(domain, ("Lagrange", 2))
    u, v = ufl.TrialFunction(V), ufl.TestFunction(V)
    facet_form = fem.form(u * v * ufl.ds)
    with pytest.raises(AssemblyUnsupported, match="only cell integrals"):
        CellMatrixAssembler(facet_form, fem.create_matrix(facet_form), [])
    rectangular = fem.form(ufl.TrialFunction(Q) * v * ufl.dx)
    with pytest.raises(AssemblyUnsupported, match="spaces differ"):
        CellMatrixAssembler(rectangular, fem.create_matrix(rectangular), [])
    blocked = fem.functionspace(domain, ("Lagrange", 1, (2,)))
    mass = fem.form(ufl.inner(ufl.TrialFunction(blocked), ufl.TestFunction(blocked)) * ufl.dx)
    with pytest.raises(AssemblyUnsupported, match="block size 1"):
        CellMatrixAssembler(mass, fem.create_matrix(mass), [])
    nedelec = fem.functionspace(domain, ("N1curl", 1))
    curl_form = fem.form(ufl.inner(ufl.TrialFunction(nedelec), ufl.TestFunction(nedelec)) * ufl.dx)
    with pytest.raises(AssemblyUnsupported, match="dof transformations"):
        CellMatrixAssembler(curl_form, fem.create_matrix(curl_form), [])


def _owned_sum(form: fem.Form, n_owned: int, bcs: list[fem.DirichletBC] | None = None) -> np.ndarray:
    """dolfinx's vector of ``form`` (ghost contributions added), owned entries; with ``bcs`` zero
    at their dofs."""
    vector = fem.assemble_vector(form)
    vector.scatter_reverse(la.InsertMode.add)
    if bcs:
        for bc in bcs:
            bc.set(vector.array, alpha=0.0)
    return vector.array[:n_owned].copy()


def _close(value: np.ndarray, reference: np.ndarray) -> bool:
    """Equal up to round-off, relative to the reference's size."""
    scale = np.linalg.norm(reference)
    return bool(scale > 0 and np.linalg.norm(value - reference) <= 1e-12 * scale)


def test_bordered_forms_give_the_separate_forms_quantities(monkeypatch):
    """R, g, dR/dw (with Dirichlet rows), dR/dlambda, dg/dw and dg/dlambda of a nonlinear mixed
    system with a global scalar lambda, from the two extended forms, before and after the
    state changes."""
    w, _, bcs = _mixed_problem()
    W = w.function_space
    domain = W.mesh
    lam = fem.Constant(domain, 1.2)
    lam_v = ufl.variable(lam)
    c, mu, u = ufl.split(w)

    def residual_terms(tests):
        q, v, z = tests
        eps = ufl.sym(ufl.grad(u))
        stress = lam_v**2 * (1 + c) * eps + ufl.tr(eps) * ufl.Identity(2) * ufl.ln(lam_v)
        return (
            (1 + c**2) * ufl.inner(ufl.grad(mu), ufl.grad(q)) + (mu - c**3 * lam_v) * v + ufl.inner(stress, ufl.grad(z))
        )

    g_integrand = (lam_v - 1) * (1 + c) + ufl.div(u) * lam_v**2 + mu * c
    r = residual_terms(ufl.TestFunctions(W))
    separate = {
        "R": fem.form(r * ufl.dx),
        "J": fem.form(ufl.derivative(r * ufl.dx, w)),
        "b": fem.form(ufl.diff(r, lam_v) * ufl.dx),
        "c": fem.form(ufl.derivative(g_integrand * ufl.dx, w, ufl.TestFunction(W))),
        "g": fem.form(g_integrand * ufl.dx),
        "d": fem.form(ufl.diff(g_integrand, lam_v) * ufl.dx),
    }
    dg0 = basix.ufl.element("DG", domain.basix_cell(), 0)
    extended = fem.functionspace(domain, basix.ufl.mixed_element([*W.ufl_element().sub_elements, dg0]))
    *tests, q0 = ufl.TestFunctions(extended)
    trial = ufl.TrialFunction(extended)
    dw = ufl.as_vector([trial[i] for i in range(w.ufl_shape[0])])
    r_ext = residual_terms(tuple(tests))
    residual = r_ext * ufl.dx + g_integrand * q0 * ufl.dx
    jacobian = (
        ufl.derivative(residual, w, dw)
        + (ufl.diff(r_ext, lam_v) + ufl.diff(g_integrand, lam_v) * q0) * ufl.TrialFunctions(extended)[-1] * ufl.dx
    )
    matrix = fem.create_matrix(separate["J"])
    matrix.data[:] = np.nan
    assembler = BorderedCellAssembler(fem.form(residual), fem.form(jacobian), W, matrix, bcs)
    index_map = W.dofmap.index_map
    n_owned, n_local = index_map.size_local, index_map.size_local + index_map.num_ghosts
    vectors = {name: la.vector(index_map) for name in ("R", "b", "c")}
    comm = domain.comm
    for change in (False, True):
        if change:
            w.x.array[:] *= 1.05
            lam.value = 0.9
        g = comm.allreduce(assembler.assemble_residual(vectors["R"].array))
        d = comm.allreduce(assembler.assemble_jacobian(vectors["b"].array, vectors["c"].array))
        for vector in vectors.values():
            assert vector.array.shape == (n_local,)
            vector.scatter_reverse(la.InsertMode.add)
        assert _close(vectors["R"].array[:n_owned], _owned_sum(separate["R"], n_owned))
        for name in ("b", "c"):
            assert _close(vectors[name].array[:n_owned], _owned_sum(separate[name], n_owned, bcs))
        assert _close(np.array([g]), np.array([comm.allreduce(fem.assemble_scalar(separate["g"]))]))
        assert _close(np.array([d]), np.array([comm.allreduce(fem.assemble_scalar(separate["d"]))]))
        assert _close(matrix.data, _dolfinx_matrix(separate["J"], bcs))
    # the form on W itself is not an extension of W
    with pytest.raises(AssemblyUnsupported, match="extended"):
        BorderedCellAssembler(separate["R"], separate["J"], W, matrix, bcs)
    _check_pruned(fem.form(residual), fem.form(jacobian), W, separate["J"], bcs)
    _check_pruned_entries_are_watched(fem.form(residual), fem.form(jacobian), W, separate["J"], bcs, monkeypatch)


def _check_pruned_entries_are_watched(residual, jacobian, W, reference_form, bcs, monkeypatch) -> None:
    """Left-out entries that the kernel does fill (here: probing made to miss the c-mu block)
    stop the assembly with a SolverError instead of vanishing from the matrix."""
    import fem_anode.fem.cell_assembly as cell_assembly

    probe = cell_assembly._probe_couplings

    def missing_block(*args):
        coupled = probe(*args)
        coupled[0, 1] = False
        return coupled

    monkeypatch.setattr(cell_assembly, "_probe_couplings", missing_block)
    assembler = BorderedCellAssembler(residual, jacobian, W, fem.create_matrix(reference_form), bcs, prune=True)
    n = assembler.n_dofs
    with pytest.raises(SolverError, match="field blocks"):
        assembler.assemble_jacobian(np.zeros(n), np.zeros(n))


def _check_pruned(residual: fem.Form, jacobian: fem.Form, W: fem.FunctionSpace, reference_form, bcs) -> None:
    """Pruned: the pattern leaves out exactly the blocks the equations do not couple (c and mu
    rows: u columns; u rows: mu columns), those entries of the full matrix are zero, and the
    rest equals the full matrix (one rank: in the pruned arrays; several: in the CSR matrix,
    whose left-out entries stay zero, with the kept ones marked)."""
    full = fem.create_matrix(reference_form)
    fem.assemble_matrix(full, reference_form, bcs=bcs)
    matrix = fem.create_matrix(reference_form)
    assembler = BorderedCellAssembler(residual, jacobian, W, matrix, bcs, prune=True)
    n = assembler.n_dofs
    assembler.assemble_jacobian(np.zeros(n), np.zeros(n))
    index_map = W.dofmap.index_map
    fields = np.full(index_map.size_local + index_map.num_ghosts, -1)
    for i in range(3):
        fields[np.asarray(W.sub(i).dofmap.list)] = i
    rows = np.repeat(np.arange(n), np.diff(full.indptr))
    columns = np.asarray(full.indices)
    # the block rule where both fields are known here (several ranks: the matrix's columns may
    # hold ghosts beyond the dofmap's, couplings of ghost rows)
    known = (rows < len(fields)) & (columns < len(fields))
    left_out = {(0, 2), (1, 2), (2, 1)}
    blocks = zip(fields[rows[known]], fields[columns[known]])
    expected = np.array([block not in left_out for block in blocks]) | (rows[known] == columns[known])
    assert not expected.all()
    if W.mesh.comm.size == 1:
        pattern = assembler.pattern
        assert pattern is not None and assembler.kept is None
        assert np.all(full.data[~expected] == 0.0)
        assert np.array_equal(pattern.indices, columns[expected])
        assert _close(pattern.data, full.data[expected])
    else:
        kept = assembler.kept
        assert assembler.pattern is None and kept is not None
        assert np.array_equal(kept[known], expected)
        assert np.all(full.data[~kept] == 0.0)
        assert np.all(matrix.data[~kept] == 0.0)
        assert _close(matrix.data, full.data)
