"""The diffusion model of fem_anode re-implemented with scikit-fem + SciPy (run in the peers venv).

Same mesh (points, quad/hex cells and Robin facets read from an ``.npz`` written by
``bench_diffusion.py``), same Lagrange space (Q1/Q2), same scaled equations and the same BDF
coefficients per step:

    (a0 eps M + K + R) c^{n+1} = rate_f w_pore - eps M (a1 c^n + a2 c^{n-1}),
    K = rate_D (grad u, grad v),  R = rate_f (u, v)_pore,  M = (u, v),

lengths in micrometres, c / c_bulk. Linear solver: SciPy SuperLU (``splu``) factorised once
per distinct a0 (``--solver direct``), or SciPy CG preconditioned with PyAMG smoothed
aggregation built once per a0 (``--solver amg``; PyAMG is what SciPy users reach for).

Usage::

    .peers-venv/bin/python peer_skfem_diffusion.py case.npz --solver direct|amg [--rtol 1e-12]

Prints one JSON object: domain_mean (per step, c / c_bulk), timings and iterations.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def reorder(points: np.ndarray, cells: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Permute each cell's nodes into the reference order of unit-box corners (0/1 offsets)."""
    corners = points[cells]  # (m, k, d)
    low = corners.min(axis=1, keepdims=True)
    high = corners.max(axis=1, keepdims=True)
    bits = np.rint((corners - low) / (high - low)).astype(int)  # (m, k, d)
    code = (bits * (2 ** np.arange(bits.shape[2]))).sum(axis=2)  # (m, k)
    ref_code = (reference * (2 ** np.arange(reference.shape[1]))).sum(axis=1)  # (k,)
    lookup = np.empty(2 ** bits.shape[2], dtype=int)
    lookup[ref_code] = np.arange(len(ref_code))
    order = np.argsort(lookup[code], axis=1)
    return np.take_along_axis(cells, order, axis=1)


def main() -> None:
    import pyamg
    import scipy.sparse.linalg as sla
    from skfem import (
        Basis,
        BilinearForm,
        ElementHex1,
        ElementHex2,
        ElementQuad1,
        ElementQuad2,
        FacetBasis,
        LinearForm,
        MeshHex,
        MeshQuad,
    )
    from skfem.helpers import dot, grad

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("case")
    parser.add_argument("--solver", choices=("direct", "amg"), default="direct")
    parser.add_argument("--rtol", type=float, default=1e-12)
    args = parser.parse_args()
    data = np.load(args.case)
    points, cells, facets = data["points"], data["cells"], data["facets"]
    order, eps, rate_D, rate_f = int(data["order"]), float(data["eps"]), float(data["rate_D"]), float(data["rate_f"])
    a = data["bdf"]  # (steps, 3)
    timings = {}
    start = time.perf_counter()
    gdim = points.shape[1]
    if gdim == 3:
        ref = np.array([[0, 0, 0], [0, 0, 1], [0, 1, 0], [1, 0, 0], [0, 1, 1], [1, 0, 1], [1, 1, 0], [1, 1, 1]])
        mesh = MeshHex(points.T.copy(), reorder(points, cells, ref).T.copy())
        element = ElementHex1() if order == 1 else ElementHex2()
    else:
        ref = np.array([[0, 0], [1, 0], [1, 1], [0, 1]])
        mesh = MeshQuad(points.T.copy(), reorder(points, cells, ref).T.copy())
        element = ElementQuad1() if order == 1 else ElementQuad2()
    # Robin facets: match the given facet node sets against the mesh's boundary facets.
    boundary = mesh.boundary_facets()
    keys_mesh = np.sort(mesh.facets[:, boundary].T, axis=1)
    keys_pore = np.sort(facets, axis=1)
    both = np.concatenate([keys_mesh, keys_pore])
    _, inverse, counts = np.unique(both, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.ravel()
    matched = counts[inverse[: len(keys_mesh)]] == 2
    pore = boundary[matched]
    if len(pore) != len(keys_pore):
        raise SystemExit(f"matched {len(pore)} of {len(keys_pore)} pore facets")
    timings["mesh"] = time.perf_counter() - start

    t = time.perf_counter()
    basis = Basis(mesh, element)
    fbasis = FacetBasis(mesh, element, facets=pore)

    @BilinearForm
    def stiffness(u, v, w):
        return dot(grad(u), grad(v))

    @BilinearForm
    def mass(u, v, w):
        return u * v

    @LinearForm
    def one(v, w):
        return v

    K = rate_D * stiffness.assemble(basis)
    R = rate_f * mass.assemble(fbasis)
    M = mass.assemble(basis).tocsr()
    KR = (K + R).tocsr()
    w_dx = one.assemble(basis)
    w_pore = one.assemble(fbasis)
    source = rate_f * w_pore
    volume = w_dx.sum()
    timings["assembly"] = time.perf_counter() - t

    c = np.zeros(basis.N)
    c_old = np.zeros(basis.N)
    c_older = np.zeros(basis.N)
    solvers: dict[float, object] = {}
    setup_time = 0.0
    step_times, iterations, means = [], [], [0.0]
    for a0, a1, a2 in a:
        t = time.perf_counter()
        key = float(f"{a0:.12e}")
        if key not in solvers:
            A = (KR + (a0 * eps) * M).tocsc() if args.solver == "direct" else (KR + (a0 * eps) * M).tocsr()
            solvers[key] = (
                (sla.splu(A), None)
                if args.solver == "direct"
                else (A, pyamg.smoothed_aggregation_solver(A, symmetry="symmetric").aspreconditioner(cycle="V"))
            )
            setup_time += time.perf_counter() - t
            t = time.perf_counter()
        rhs = source - eps * (M @ (a1 * c_old + a2 * c_older))
        solver, precond = solvers[key]
        if args.solver == "direct":
            c = solver.solve(rhs)
            iterations.append(0)
        else:
            count = [0]

            def callback(_xk: np.ndarray) -> None:
                count[0] += 1

            c, info = sla.cg(solver, rhs, x0=c_old, rtol=args.rtol, atol=0.0, M=precond, maxiter=500, callback=callback)
            if info != 0:
                raise SystemExit(f"CG failed ({info})")
            iterations.append(count[0])
        c_older, c_old = c_old, c
        means.append(float(w_dx @ c / volume))
        step_times.append(time.perf_counter() - t)
    timings["solver_setup"] = setup_time
    timings["steps"] = float(np.sum(step_times))
    timings["total"] = time.perf_counter() - start
    print(
        json.dumps(
            {
                "ndofs": int(basis.N),
                "domain_mean": means,
                "step_time_median_s": float(np.median(step_times)),
                "iterations": iterations,
                "factorisations": len(solvers),
                "timings_s": timings,
                "solver": "scipy splu (SuperLU)" if args.solver == "direct" else "scipy cg + pyamg SA",
            }
        )
    )


if __name__ == "__main__":
    main()
