"""Chemo-mechanical phase field of a Si nanowire cross-section (paper 002, Methods eqs. 1-6).

Li Cahn-Hilliard (regular-solution double well) coupled to finite-strain mechanics with
``F = Fe Fc Fp``, Hencky elasticity and J2 plasticity, generalised plane strain; see
``docs/phasefield.md``. Entry points: :class:`PhaseFieldSettings`, :class:`PhaseFieldProblem`,
:func:`run_phasefield`.
"""

from fem_anode.fem.phasefield.problem import PhaseFieldProblem
from fem_anode.fem.phasefield.run import run_phasefield
from fem_anode.fem.phasefield.settings import PhaseFieldSettings

__all__ = ["PhaseFieldProblem", "PhaseFieldSettings", "run_phasefield"]
