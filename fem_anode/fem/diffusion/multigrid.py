"""Solver set-ups the transient diffusion keeps across step sizes: the shifted multigrid, factor sizes."""

from __future__ import annotations

import logging
import time
from typing import Any

from mpi4py import MPI
from petsc4py import PETSc

from fem_anode.fem.petsc_ksp import prefixed_options

__all__ = ["ShiftedMultigrid", "factor_bytes"]

logger = logging.getLogger(__name__)


class ShiftedMultigrid:
    r"""One multigrid hierarchy for ``A(s) = K + R + s M`` at every shift ``s = a0 eps``.

    Set up once per run, from ``K + R`` alone (so it does not depend on the history of step
    sizes, and a resumed run rebuilds exactly the same one): PETSc GAMG (smoothed aggregation)
    gives the interpolations ``P_l``; the Galerkin products ``(K+R)_l = P_l^T (K+R)_{l+1} P_l``
    and ``M_l = P_l^T M_{l+1} P_l`` are computed once. Since ``P^T A(s) P = P^T (K+R) P + s P^T M P``,
    a new shift costs one copy and one AXPY per coarse level (same sparsity) and the Cholesky
    factorisation of the coarsest level (a few hundred unknowns): no new hierarchy.

    Smoothers: one symmetric SOR sweep (local on each rank) before and after the coarse
    correction, which needs no set-up per shift (no eigenvalue estimates); fewer CG iterations
    and less time than one or two Chebyshev/Jacobi steps (docs/benchmarks.md, 64^3 electrode crop).

    Args:
        KR: ``K + R`` (fine level), SPD.
        M: mass matrix (same sparsity as ``KR``).
        eps: the transporting-phase fraction multiplying ``a0 M``.
        prefix: options prefix of the reference GAMG setup (``<prefix>ref_``).
        user_options: the user's ``petsc_options``; ``pc_gamg_*`` entries reach the reference setup.
    """

    def __init__(self, KR: PETSc.Mat, M: PETSc.Mat, eps: float, prefix: str, user_options: dict[str, Any]) -> None:
        start = time.perf_counter()
        comm = KR.getComm()
        self.eps = eps
        reference = PETSc.KSP().create(comm)
        ref_prefix = f"{prefix}ref_"
        reference.setOptionsPrefix(ref_prefix)
        options: dict[str, Any] = {"ksp_type": "preonly", "pc_type": "gamg"}
        options.update({k: v for k, v in user_options.items() if k.startswith("pc_gamg_")})
        KR.setOption(PETSc.Mat.Option.SPD, True)
        reference.setOperators(KR)
        with prefixed_options(ref_prefix, options):
            reference.setFromOptions()
            reference.setUp()
        pc = reference.getPC()
        n = pc.getMGLevels()
        # Level 0 is the coarsest, n - 1 the fine level (PCMG's numbering).
        self.P: list[PETSc.Mat] = [pc.getMGInterpolation(level) for level in range(1, n)]  # P[l - 1]: level l-1 -> l
        reference.destroy()
        self.KR: list[PETSc.Mat] = [KR] * n
        self.M: list[PETSc.Mat] = [M] * n
        for level in range(n - 1, 0, -1):
            P = self.P[level - 1]
            self.KR[level - 1] = self.KR[level].ptap(P)
            self.M[level - 1] = self.M[level].ptap(P)
        # A_l shares the sparsity of (K+R)_l: M_l has the same one (the same symbolic product).
        self.A: list[PETSc.Mat] = [
            self.KR[level].duplicate(copy=PETSc.Mat.DuplicateOption.SHARE_NONZERO_PATTERN) for level in range(n - 1)
        ]
        self.levels = n
        self.shift_a0: float | None = None
        self.setup_s = time.perf_counter() - start
        logger.info(
            "multigrid for every step size: %d levels (%s unknowns), set up once in %.2f s",
            n,
            " / ".join(str(self.KR[level].getSize()[0]) for level in range(n)),
            self.setup_s,
        )

    @staticmethod
    def options(comm: MPI.Comm) -> dict[str, Any]:
        """Options of the CG + shifted-multigrid KSP (the user's are merged over them)."""
        options: dict[str, Any] = {
            "pc_type": "mg",
            "pc_mg_galerkin": "none",
            "pc_mg_type": "multiplicative",
            "pc_mg_cycle_type": "v",
            "mg_levels_ksp_type": "richardson",
            "mg_levels_pc_type": "sor",
            "mg_levels_ksp_max_it": 1,
            "mg_levels_ksp_norm_type": "none",
            "mg_coarse_ksp_type": "preonly",
        }
        if comm.size == 1:
            options["mg_coarse_pc_type"] = "cholesky"
        else:  # GAMG gathers the coarsest level on one rank; every rank solves it
            options.update({"mg_coarse_pc_type": "redundant", "mg_coarse_redundant_pc_type": "cholesky"})
        return options

    def attach(self, ksp: PETSc.KSP, A: PETSc.Mat, a0: float) -> None:
        """Make ``ksp``'s preconditioner this multigrid, on the fine operator ``A = A(a0)``."""
        self.shift(a0)
        pc = ksp.getPC()
        pc.setType("mg")
        pc.setMGLevels(self.levels)
        for level in range(1, self.levels):
            pc.setMGInterpolation(level, self.P[level - 1])
            pc.getMGSmoother(level).setOperators(A if level == self.levels - 1 else self.A[level])
        pc.getMGCoarseSolve().setOperators(self.A[0])

    def shift(self, a0: float) -> None:
        """Coarse operators for ``a0``: ``A_l = (K+R)_l + a0 eps M_l`` (recomputed, not updated)."""
        if a0 == self.shift_a0:
            return
        for level in range(self.levels - 1):
            self.KR[level].copy(self.A[level], structure=PETSc.Mat.Structure.SAME_NONZERO_PATTERN)
            self.A[level].axpy(a0 * self.eps, self.M[level], structure=PETSc.Mat.Structure.SAME_NONZERO_PATTERN)
        self.shift_a0 = a0

    def nbytes(self) -> float:
        """Bytes of the coarse operators (three value arrays, two patterns) and interpolations, all ranks."""
        total = 0.0
        for level in range(self.levels - 1):
            nnz, rows = self.KR[level].getInfo()["nz_used"], self.KR[level].getSize()[0]
            total += nnz * (3 * 8 + 2 * 4) + 2 * 4 * rows
        for P in self.P:
            total += P.getInfo()["nz_used"] * 12 + 4 * P.getSize()[0]
        return total

    def destroy(self) -> None:
        """Free the hierarchy (the fine-level matrices belong to the problem)."""
        for mat in self.KR[:-1] + self.M[:-1] + self.A + self.P:
            mat.destroy()


def factor_bytes(ksp: PETSc.KSP) -> float | None:
    """Bytes of a factorisation (all ranks): entries of the factor x 12 B, or the solver's own count."""
    try:
        info = ksp.getPC().getFactorMatrix().getInfo()
    except PETSc.Error:
        return None
    return max(float(info.get("memory", 0.0)), 12.0 * float(info.get("nz_used", 0.0))) or None
