"""Observed order of the transient diffusion solver against an exact solution in 2D and 3D.

The model (docs/diffusion.md) is ``eps dc/dt = div(D_eff grad c)`` in the transporting phase,
mass transfer ``D_eff grad c . n = k_f (c_bulk - c)`` on its interfaces with the pores, no flux on
Si interfaces (``k_si = 0``) and on the image box, ``c = 0`` at ``t = 0``. It has no source term, so
the exact solution must solve it as it is: on a block of the transporting phase with pore slabs
on its low x, y (and z) faces and a Si slab on its high x face, ``u = 1 - c / c_bulk`` is the
product of three one-dimensional solutions (each solves ``eps u_t = D_eff u''``, starts at 1 and
satisfies the homogeneous Robin condition on its pore face and no flux on the opposite face; a
product of such solutions solves the heat equation and every face condition of the block):

    c / c_bulk = 1 - prod_i phi(l - (x_i - x0_i), t),   phi = 1 - (Crank's plane sheet, eq. 4.53)

(Crank, *The Mathematics of Diffusion*, 1975, section 4.3.2). The block is meshed from a label
image through the package's voxel path (pore and Si interfaces tagged as in any image), solved
by :class:`~fem_anode.fem.diffusion.DiffusionProblem` with P1 (Q1) elements and BDF2 with small
steps, and the L2 error at the final time must fall with order 2 under mesh refinement.

The Si interfaces' first-order uptake ``D_eff grad c . n = -k_si c`` (``k_si > 0``) is checked on
a strip between a pore and a Si layer, where the solution is one-dimensional: the linear steady
state plus the series of the Robin-Robin eigenfunctions ``cos(mu x) + (k_f / (D_eff mu)) sin(mu x)``,
``(mu^2 - a b) sin(mu l) = (a + b) mu cos(mu l)`` with ``a = k_f / D_eff``, ``b = k_si / D_eff``
(coefficients by Gauss-Legendre quadrature of the initial condition).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import brentq

pytest.importorskip("dolfinx")

import ufl
from dolfinx import fem
from mpi4py import MPI

from fem_anode.fem.analytic import robin_sheet_roots
from fem_anode.fem.diffusion import (
    DiffusionProblem,
    DiffusionSettings,
    GeometrySettings,
    PhysicsSettings,
    TimeSettings,
)
from fem_anode.fem.mesh_io import image_to_tagged_mesh
from fem_anode.io import VoxelImage

PHASES = {"pore": 0, "si": 1, "sei": 3}
LENGTH = 1e-6  # m, edge of the block of the transporting phase
T_END = 5e-4  # s; D_eff t / (eps l^2) = 0.12 with the default physics
TERMS = 12  # series terms: the 13th decays like exp(-0.12 * (12 pi)^2) ~ 1e-74


def block_image(n: int, ndim: int) -> VoxelImage:
    """``n`` SEI voxels per edge; one pore layer below along every axis, a Si layer beyond the last x."""
    h = LENGTH / n
    labels = np.full((n + 1,) * (ndim - 1) + (n + 2,), PHASES["sei"], dtype=np.uint8)
    for axis in range(ndim):
        index = [slice(None)] * ndim
        index[axis] = 0
        labels[tuple(index)] = PHASES["pore"]
    labels[..., -1] = PHASES["si"]
    return VoxelImage(labels, (h,) * ndim, PHASES)


def strip_image(n: int) -> VoxelImage:
    """``n`` SEI pixels along x between a pore column and a Si column, two pixels high."""
    labels = np.full((2, n + 2), PHASES["sei"], dtype=np.uint8)
    labels[:, 0], labels[:, -1] = PHASES["pore"], PHASES["si"]
    return VoxelImage(labels, (LENGTH / n,) * 2, PHASES)


def settings(k_si: float = 0.0) -> DiffusionSettings:
    out = DiffusionSettings(
        geometry=GeometrySettings(mesh=Path("block.msh")),  # the mesh is passed in memory
        physics=PhysicsSettings(k_si=k_si),
        time=TimeSettings(t_end=T_END, output_times=[T_END], dt_initial=1e-8, steps_per_level=4, dt_max=T_END / 200),
    )
    out.check()
    return out


def exact_ratio(x: ufl.SpatialCoordinate, ndim: int, h: float, physics: PhysicsSettings) -> ufl.core.expr.Expr:
    """c / c_bulk at T_END as a UFL expression of the coordinates (m); the block starts at x_i = h."""
    biot = LENGTH * physics.k_f / physics.D_eff
    beta = robin_sheet_roots(biot, TERMS)
    T = T_END * physics.D_eff / (physics.eps * LENGTH**2)
    coeff = 2 * biot * np.exp(-(beta**2) * T) / ((beta**2 + biot**2 + biot) * np.cos(beta))
    product = 1.0
    for i in range(ndim):
        distance = (h + LENGTH - x[i]) / LENGTH  # from the no-flux face, in units of the edge
        phi = sum(float(a) * ufl.cos(float(b) * distance) for a, b in zip(coeff, beta))
        product = product * phi
    return 1.0 - product


def strip_exact_ratio(x: ufl.SpatialCoordinate, h: float, physics: PhysicsSettings) -> ufl.core.expr.Expr:
    """c / c_bulk at T_END on the pore-SEI-Si strip (pore interface at x = h, Si at x = h + l)."""
    a, b, length = physics.k_f / physics.D_eff, physics.k_si / physics.D_eff, LENGTH
    slope = -a * b / (b + a + a * b * length)  # steady state A + B s, s = x - h (units of c_bulk)
    offset = -slope * (1 + b * length) / b
    grid = np.linspace(1e-9, (TERMS + 1) * np.pi / length, 200_000)
    g = (grid**2 - a * b) * np.sin(grid * length) - (a + b) * grid * np.cos(grid * length)
    mu = np.array(
        [
            brentq(lambda m: (m**2 - a * b) * np.sin(m * length) - (a + b) * m * np.cos(m * length), lo, hi)
            for lo, hi in zip(grid[:-1][np.diff(np.sign(g)) != 0], grid[1:][np.diff(np.sign(g)) != 0])
        ]
    )
    nodes, weights = np.polynomial.legendre.leggauss(400)
    s_q, w_q = 0.5 * length * (nodes + 1), 0.5 * length * weights
    T = physics.D_eff * T_END / physics.eps
    s = x[0] - h
    total = offset + slope * s
    for m in mu[:TERMS]:
        mode = np.cos(m * s_q) + a / m * np.sin(m * s_q)
        coeff = -np.sum(w_q * (offset + slope * s_q) * mode) / np.sum(w_q * mode**2)
        total = total + float(coeff * np.exp(-(m**2) * T)) * (
            ufl.cos(float(m) * s) + float(a / m) * ufl.sin(float(m) * s)
        )
    return total


def l2_error(n: int, ndim: int, comm: MPI.Comm, k_si: float = 0.0) -> float:
    """Relative L2 error of c at T_END (collective): on the block with ``n`` voxels per edge
    (``k_si = 0``), or on the pore-SEI-Si strip of ``n`` pixels (``k_si > 0``, 2D)."""
    image = block_image(n, ndim) if k_si == 0 else strip_image(n)
    tagged = image_to_tagged_mesh(image, comm, method="voxel", keep=["sei"])
    assert {"pore|sei", "sei|si"} <= set(tagged.facet_groups)  # both interfaces are there
    problem = DiffusionProblem(tagged, settings(k_si))
    try:
        result = problem.run()
        assert result.status == "completed"
        x = ufl.SpatialCoordinate(tagged.mesh)
        physics = problem.settings.physics
        exact = exact_ratio(x, ndim, LENGTH / n, physics) if k_si == 0 else strip_exact_ratio(x, LENGTH / n, physics)
        dx = ufl.dx(domain=tagged.mesh, metadata={"quadrature_degree": 6})
        error, norm = (
            comm.allreduce(fem.assemble_scalar(fem.form(form * dx)), op=MPI.SUM)
            for form in ((problem.c - exact) ** 2, exact**2)
        )
    finally:
        problem.destroy()
    return float(np.sqrt(error / norm))


@pytest.mark.parametrize(
    ("ndim", "sizes", "k_si"), [(2, (8, 16, 32), 0.0), (3, (4, 8, 16), 0.0), (2, (8, 16, 32), 2e-4)]
)
def test_p1_error_falls_with_order_two(comm, ndim, sizes, k_si):
    errors = [l2_error(n, ndim, comm, k_si) for n in sizes]
    observed = np.polyfit(np.log(1.0 / np.array(sizes)), np.log(errors), 1)[0]
    assert 1.8 < observed < 2.3, f"errors {errors}, observed order {observed:.3f}"
    assert errors[-1] < 0.02  # and the finest mesh is close, not only converging
