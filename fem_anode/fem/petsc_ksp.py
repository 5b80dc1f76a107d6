"""A PETSc KSP configured from an options dict under its own prefix (the options are removed
from PETSc's global database right after, so solvers never see each other's options)."""

from __future__ import annotations

from typing import Any

__all__ = ["ksp_from_options"]


def ksp_from_options(
    comm: Any, operator: Any, options: dict[str, Any], name: str, *, nonzero_guess: bool = True
) -> Any:
    """A KSP on ``operator`` set up from ``options`` under the prefix ``fem_anode_<name>_<id>_``.

    Args:
        comm: communicator of the operator.
        operator: the PETSc matrix.
        options: PETSc options without prefix (``{"ksp_type": "cg", "pc_type": "sor"}``).
        name: part of the prefix naming the solver (for ``-options_left`` and logs).
        nonzero_guess: start from the solution vector's values.
    """
    from petsc4py import PETSc

    ksp = PETSc.KSP().create(comm)
    prefix = f"fem_anode_{name}_{id(ksp)}_"
    ksp.setOptionsPrefix(prefix)
    database = PETSc.Options()
    for key, value in options.items():
        database[f"{prefix}{key}"] = value
    try:
        ksp.setOperators(operator)
        ksp.setFromOptions()
    finally:
        for key in options:
            del database[f"{prefix}{key}"]
    ksp.setInitialGuessNonzero(nonzero_guess)
    return ksp
