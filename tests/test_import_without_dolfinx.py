"""imaging/ and detachment/ (and the CLI's help) must work where dolfinx, gmsh and MPI are absent."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

BLOCKER = textwrap.dedent(
    """
    import sys, importlib.abc
    BLOCKED = {"dolfinx", "gmsh", "ufl", "basix", "ffcx", "petsc4py", "mpi4py", "pyvista", "vtk"}
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} blocked for this test")
    sys.meta_path.insert(0, Block())
    """
)


@pytest.mark.skipif("OMPI_COMM_WORLD_SIZE" in os.environ, reason="spawns its own Python; run serially only")
def test_imaging_detachment_and_cli_without_fenicsx(tmp_path):
    script = BLOCKER + textwrap.dedent(
        f"""
        import fem_anode, fem_anode.imaging, fem_anode.detachment, fem_anode.io
        from fem_anode.imaging import anode_volume, phase_fractions
        from fem_anode.io import write_image
        from fem_anode.cli import main, build_parser
        build_parser().format_help()
        image = anode_volume(shape=(8, 12, 12))
        assert abs(sum(phase_fractions(image).values()) - 1) < 1e-12
        path = write_image({str(tmp_path)!r} + "/v.npy", image)
        assert main(["metrics", str(path), "--out", {str(tmp_path / "out")!r}, "-q"]) == 0
        bad = [m for m in sys.modules if m.split(".")[0] in BLOCKED]
        assert not bad, bad
        print("OK")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env={**os.environ, "MPLBACKEND": "Agg"}
    )
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout
