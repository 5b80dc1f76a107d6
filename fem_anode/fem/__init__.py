"""FEniCSx (dolfinx 0.9) solvers on tagged image meshes. The solvers need dolfinx; importing
this package alone does not (names below are imported on first use)."""

from importlib import import_module
from typing import Any

__all__ = ["TaggedMesh", "read_mesh"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(import_module("fem_anode.fem.mesh_io"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
