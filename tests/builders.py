"""Small inputs shared by several test modules (importable because pytest puts ``tests/``,
the directory of ``conftest.py``, on ``sys.path``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fem_anode.io import VoxelImage

STRIP_LENGTH = 1e-6  # m


def strip_mesh(n: int, directory: Path, comm):  # type: ignore[no-untyped-def]
    """1D limit of the diffusion model (Crank's plane sheet): a strip of ``n`` SEI pixels of
    total length 1 um, one pore pixel column at x = 0, one pixel high. Collective."""
    from fem_anode.fem.mesh_io import read_mesh
    from fem_anode.meshing import write_voxel_mesh

    h = STRIP_LENGTH / n
    labels = np.full((1, n + 1), 3, dtype=np.uint8)
    labels[:, 0] = 0
    path = directory / f"strip{n}.msh"
    if comm.rank == 0:
        write_voxel_mesh(VoxelImage(labels, (h, h), {"pore": 0, "sei": 3}), path, keep=["sei"])
    comm.barrier()
    return read_mesh(path, comm)


def small_roi() -> VoxelImage:
    """A 24 x 30 label image (20 nm pixels): pore channel on the left, a Si disc, SEI/C/B."""
    labels = np.full((24, 30), 3, dtype=np.uint8)
    labels[:, :3] = 0
    yy, xx = np.mgrid[:24, :30]
    labels[(yy - 6) ** 2 + (xx - 22) ** 2 <= 9] = 1
    return VoxelImage(labels, (20e-9, 20e-9), {"pore": 0, "si": 1, "sei": 3})
