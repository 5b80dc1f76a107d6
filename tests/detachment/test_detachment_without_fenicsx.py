"""The detachment workflow (measure, fit, simulate) runs where dolfinx, gmsh and mpi4py are absent."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from conftest import UNDER_MPI

SCRIPT = textwrap.dedent(
    """
    import sys, importlib.abc
    BLOCKED = {"dolfinx", "gmsh", "ufl", "basix", "ffcx", "petsc4py", "mpi4py", "pyvista", "vtk"}
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(name + " blocked for this test")
    sys.meta_path.insert(0, Block())
    import numpy as np
    from fem_anode.cli import main
    from fem_anode.detachment import gapped_electrode, sample_gap_data, write_gap_csv, ModelParameters
    from fem_anode.io.images import write_image
    out = sys.argv[1]
    image, _ = gapped_electrode([0.6e-6, 0.8e-6], [0.2e-6, 0.3e-6], shape=(120, 120), voxel_size=40e-9)
    path = write_image(out + "/img.npy", image)
    assert main(["detachment", "measure", str(path), "--cycle", "1", "--out", out + "/m", "-q"]) == 0
    gaps = sample_gap_data(ModelParameters(), [1, 3], 15, np.random.default_rng(0))
    write_gap_csv(out + "/g.csv", gaps)
    assert main(["detachment", "fit", out + "/g.csv", "--bootstrap", "5", "--out", out + "/f", "-q"]) == 0
    assert main(["detachment", "simulate", "--cycles", "3", "--out", out + "/s", "-q"]) == 0
    bad = [m for m in sys.modules if m.split(".")[0] in BLOCKED]
    assert not bad, bad
    print("OK")
    """
)


@pytest.mark.skipif(UNDER_MPI, reason="spawns its own Python; run serially only")
def test_detachment_cli_without_fenicsx_or_mpi(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        env={**os.environ, "MPLBACKEND": "Agg"},
    )
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout
    assert (tmp_path / "s" / "results.json").exists() and (tmp_path / "f" / "fit.json").exists()
