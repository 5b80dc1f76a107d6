"""The model runs on an image-derived 2D mesh (smooth or voxel meshing of a segmented section)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("dolfinx")

from fem_anode.fem.mesh_io import image_to_tagged_mesh  # noqa: E402
from fem_anode.fem.phasefield.run import run_phasefield  # noqa: E402
from fem_anode.fem.phasefield.settings import CyclingSettings, GeometrySettings, OutputSettings, PhaseFieldSettings  # noqa: E402
from fem_anode.io.images import VoxelImage  # noqa: E402


@pytest.mark.parametrize("method", ["smooth", "voxel"])
def test_cycle_on_image_mesh_swells_by_one_plus_beta(comm, method):
    n = 24
    y, x = np.mgrid[:n, :n] + 0.5
    section = ((x - n / 2) ** 2 + (y - n / 2) ** 2 < (0.4 * n) ** 2).astype(np.uint8)  # pore = 0, si = 1
    image = VoxelImage(section, voxel_size=(2e-9, 2e-9), phases={"pore": 0, "si": 1})
    kwargs = {"keep": ["si"], "method": method}
    if method == "smooth":
        from fem_anode.meshing.smooth2d import SmoothMeshOptions

        kwargs["options"] = SmoothMeshOptions(size=4e-9)
    tagged = image_to_tagged_mesh(image, comm, **kwargs)
    settings = PhaseFieldSettings(
        geometry=GeometrySettings(surface=["pore|si"], phase="si"),
        cycling=CyclingSettings(half_cycles=2, half_cycle_time=0.3),
        output=OutputSettings(fields=False, figures=False, times=[]),
    )
    lith, delith = run_phasefield(settings, None, comm, tagged=tagged)["half_cycles"]
    assert lith["mean_c_li"] == pytest.approx(0.86, abs=1e-3) and delith["mean_c_li"] == pytest.approx(0.14, abs=1e-3)
    assert lith["axial_stretch"] == pytest.approx(1.5874, rel=2e-3)
    assert lith["area_m2"] / delith["area_m2"] == pytest.approx(1.5874**2, rel=5e-3)
