"""imaging/ and detachment/ (and the CLI's help) must work where dolfinx, gmsh and MPI are absent; a
finite-volume diffusion run must not load dolfinx."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from conftest import UNDER_MPI

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


@pytest.mark.skipif(UNDER_MPI, reason="spawns its own Python; run serially only")
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


@pytest.mark.skipif(UNDER_MPI, reason="spawns its own Python; run serially only")
def test_finite_volume_diffusion_runs_without_dolfinx(tmp_path):
    """``mesh.discretisation = "fv"`` solves with PETSc and NumPy alone: dolfinx, UFL, basix and FFCx
    are blocked, and the CLI run must still write its results (about 60 MB less per rank)."""
    blocker = BLOCKER.replace(
        '{"dolfinx", "gmsh", "ufl", "basix", "ffcx", "petsc4py", "mpi4py", "pyvista", "vtk"}',
        '{"dolfinx", "gmsh", "ufl", "basix", "ffcx"}',
    )
    script = blocker + textwrap.dedent(
        f"""
        import json, pathlib
        import numpy as np
        from fem_anode.cli import main
        from fem_anode.io import VoxelImage, write_image
        labels = np.full((6, 10, 10), 3, np.uint8)
        labels[:, :3] = 0
        labels[2:4, 5:7, 5:7] = 1
        write_image({str(tmp_path)!r} + "/v.npy", VoxelImage(labels, (2e-8,) * 3, {{"pore": 0, "si": 1, "sei": 3}}))
        pathlib.Path({str(tmp_path)!r} + "/run.toml").write_text(
            '[geometry]\\nimage = "v.npy"\\n[mesh]\\ndiscretisation = "fv"\\n'
            '[time]\\nt_end = 1e-4\\noutput_times = [1e-4]\\n'
        )
        out = {str(tmp_path / "out")!r}
        assert main(["diffusion", {str(tmp_path / "run.toml")!r}, "--out", out, "-q"]) == 0
        results = json.loads(pathlib.Path(out, "results.json").read_text())
        bad = [m for m in sys.modules if m.split(".")[0] in BLOCKED]
        assert not bad, bad
        assert results["status"] == "completed", results.get("status")
        print("OK")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env={**os.environ, "MPLBACKEND": "Agg"}
    )
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


@pytest.mark.skipif(UNDER_MPI, reason="spawns its own Python; run serially only")
def test_finite_volume_solver_modules_load_no_scipy():
    """The finite-volume solver, its driver and the CLI import no SciPy (30 MB per rank, most of
    it scipy.ndimage); the features that need it (Si particles, region suggestions, the FE
    tortuosity) import it when they run."""
    script = textwrap.dedent(
        """
        import sys
        import fem_anode.cli, fem_anode.commands.diffusion, fem_anode.fem.diffusion.run
        import fem_anode.fem.diffusion.finite_volume, fem_anode.fem.tortuosity
        bad = [m for m in sys.modules if m.split(".")[0] == "scipy"]
        assert not bad, bad[:5]
        print("OK")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout
