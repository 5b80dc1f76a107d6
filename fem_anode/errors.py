"""Exceptions with a meaning, and the CLI exit code each one maps to.

Library code raises these (never ``assert``) so that the CLI can print one clear line and exit
with a code that tells usage, input and solver problems apart.
"""

from __future__ import annotations

from typing import Any

__all__ = ["FemAnodeError", "UsageError", "InputError", "SolverError", "Interrupted", "EXIT_CODES"]


class FemAnodeError(Exception):
    """Base class of every error fem_anode raises on purpose."""

    exit_code: int = 1


class UsageError(FemAnodeError, ValueError):
    """Invalid arguments or settings: wrong value, unknown key, missing required option."""

    exit_code = 2


class InputError(FemAnodeError, ValueError):
    """An input file or array is missing, unreadable or not what the operation needs."""

    exit_code = 3


class SolverError(FemAnodeError, RuntimeError):
    """A numerical solve failed (divergence, non-finite values).

    Attributes:
        report: what the solver tried (failing time, step sizes, PETSc reasons), if it says.
        result: the model's partial result object, if any.
        progress: where a resumed run continues (phase field), if any.
    """

    exit_code = 4
    report: dict[str, Any] | None = None
    result: Any = None
    progress: Any = None


class Interrupted(FemAnodeError):
    """A run stopped at a safe point on SIGINT/SIGTERM; its checkpoint and partial results are saved.

    Attributes:
        result: the model's partial result object when the time loop raised it (else ``None``).
    """

    exit_code = 130

    def __init__(self, message: str, result: Any = None) -> None:
        super().__init__(message)
        self.result = result


EXIT_CODES = {"ok": 0, "error": 1, "usage": 2, "input": 3, "solver": 4, "interrupted": 130}
