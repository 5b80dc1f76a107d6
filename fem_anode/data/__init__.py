"""Bundled example data (see ``README.md`` in this folder for source and licence)."""

from __future__ import annotations

from importlib import resources

from fem_anode.io.images import VoxelImage, read_image

__all__ = ["REAL_ELECTRODE_PHASES", "REAL_ELECTRODE_VOXEL_SIZE", "real_electrode"]

#: Labels of the bundled real electrode volume.
REAL_ELECTRODE_PHASES: dict[str, int] = {"pore": 0, "solid": 128}
#: Nominal voxel size (m) assumed for it; the source does not state one.
REAL_ELECTRODE_VOXEL_SIZE = 0.5e-6


def real_electrode() -> VoxelImage:
    """The measured 128^3 two-phase electrode volume (MIT licence, (c) 2021 Amir Dahari)."""
    path = resources.files("fem_anode.data") / "real_electrode_128cube.tif"
    with resources.as_file(path) as file:
        return read_image(file, voxel_size=REAL_ELECTRODE_VOXEL_SIZE, phases=REAL_ELECTRODE_PHASES, kind="labels")
