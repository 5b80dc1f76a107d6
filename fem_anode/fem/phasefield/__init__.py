"""Chemo-mechanical phase field of a Si nanowire cross-section (He et al. 2021, Methods eqs. 1-6).

Li Cahn-Hilliard (regular-solution double well) coupled to finite-strain mechanics with
``F = Fe Fc Fp``, Hencky elasticity and J2 plasticity, generalised plane strain; see
``docs/phasefield.md``. Entry points: :class:`PhaseFieldSettings`, :class:`PhaseFieldProblem`,
:func:`run_phasefield`.
"""

from importlib import import_module
from typing import Any

__all__ = ["PhaseFieldProblem", "PhaseFieldSettings", "run_phasefield"]

# Imported on first use: the settings (and ``fem-anode phasefield --defaults``) need no dolfinx.
_WHERE = {"PhaseFieldProblem": "problem", "run_phasefield": "run", "PhaseFieldSettings": "settings"}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(import_module(f"fem_anode.fem.phasefield.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
