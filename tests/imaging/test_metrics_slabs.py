"""3D metrics on slabs of z layers: the SciPy/scikit-image whole-volume results on any number of ranks.

Run serially and under ``mpirun -n 2``: every rank holds only its layers, and the record (and the
fields written by layers) must be the same bits as one process computes.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fem_anode.imaging import metrics as whole
from fem_anode.io.images import VoxelImage, open_image_layers, write_image

MPI = pytest.importorskip("mpi4py.MPI")
voxel_sweeps = pytest.importorskip("fem_anode.fem.voxel_sweeps")

PHASES = {"pore": 0, "si": 1, "graphite": 2}
SPACING = (5e-8, 4e-8, 6e-8)  # anisotropic: every length formula sees each axis


def three_phase(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """Smooth random pores (~40 %), Si grains (~15 %), graphite the rest."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    pore = ndimage.gaussian_filter(rng.random(shape), 1.5)
    si = ndimage.gaussian_filter(rng.random(shape), 1.0)
    labels = np.full(shape, PHASES["graphite"], dtype=np.uint8)
    labels[si > np.quantile(si, 0.85)] = PHASES["si"]
    labels[pore > np.quantile(pore, 0.6)] = PHASES["pore"]
    return labels


def library():
    return voxel_sweeps.load_sweep_library(MPI.COMM_SELF)


def close(new, old, rtol: float, path: str = "") -> list[str]:
    """Where two JSON-like records differ beyond ``rtol`` (numbers), or at all (the rest)."""
    if isinstance(old, dict):
        return [d for k in old for d in close(new.get(k), old[k], rtol, f"{path}/{k}")] + [
            f"{path}/{k} extra" for k in new if k not in old
        ]
    if isinstance(old, list) and old and isinstance(old[0], (int, float)):
        a = np.array([math.nan if v is None else v for v in new], dtype=float)
        b = np.array([math.nan if v is None else v for v in old], dtype=float)
        ok = a.shape == b.shape and np.allclose(a, b, rtol=rtol, atol=0.0, equal_nan=True)
        return [] if ok else [path]
    if isinstance(old, float) and isinstance(new, float):
        same = new == old or (math.isnan(new) and math.isnan(old)) or abs(new - old) <= rtol * abs(old)
        return [] if same else [f"{path}: {new} vs {old}"]
    return [] if new == old else [f"{path}: {new!r} vs {old!r}"]


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), SPACING])
def test_compiled_geodesic_search_gives_the_bits_of_mcp_geometric(spacing):
    from skimage.graph import MCP_Geometric

    pore = np.random.default_rng(3).random((18, 15, 13)) < 0.55
    distance = np.full(pore.shape, np.inf)
    distance[0][pore[0]] = 0.0
    voxel_sweeps.geodesic_distance(pore, spacing, distance, np.flatnonzero(np.isfinite(distance)), library())
    starts = np.argwhere(pore[0])
    starts = np.column_stack([np.zeros(len(starts), dtype=int), starts])
    costs, _ = MCP_Geometric(np.where(pore, 1.0, np.inf), fully_connected=True, sampling=spacing).find_costs(starts)
    expected = np.where(pore, costs, np.inf)
    assert np.isfinite(expected).sum() > 0.5 * pore.sum()  # a real search, not an empty one
    np.testing.assert_array_equal(distance, expected)


def test_geodesic_search_restarts_from_lowered_seeds_only():
    """Seeding again from one voxel whose distance dropped lowers exactly what a fresh search does."""
    pore = np.random.default_rng(4).random((12, 10, 10)) < 0.6
    pore[:, 5, 5] = True
    fresh = np.full(pore.shape, np.inf)
    fresh[0][pore[0]] = 0.0
    fresh[11, 5, 5] = 0.0  # a second source, deep in the volume
    voxel_sweeps.geodesic_distance(pore, (1.0,) * 3, fresh, np.flatnonzero(np.isfinite(fresh)), library())
    staged = np.full(pore.shape, np.inf)
    staged[0][pore[0]] = 0.0
    voxel_sweeps.geodesic_distance(pore, (1.0,) * 3, staged, np.flatnonzero(np.isfinite(staged)), library())
    staged[11, 5, 5] = 0.0
    lowered = voxel_sweeps.geodesic_distance(pore, (1.0,) * 3, staged, np.array([11 * 100 + 55]), library())
    assert lowered > 0
    np.testing.assert_array_equal(staged, fresh)


def test_slab_metrics_of_one_process_equal_the_whole_volume_functions():
    """The slab path (default for 3D) against the SciPy/scikit-image functions on the whole array."""
    image = VoxelImage(three_phase((26, 21, 19), seed=5), SPACING, PHASES, "volume")
    slabs = whole.compute_metrics(image)
    reference = {
        "phase_fractions": whole.phase_fractions(image),
        "per_slice": whole.per_slice_fractions(image),
        "si_particles": whole.si_particles(image),
        "tortuosity": whole.geodesic_tortuosity(image),
        "connections_per_depth": whole.connections_per_depth(image),
        "pore_si_distance": whole.pore_si_distance(image),
    }
    reference["tortuosity"].pop("method")
    slabs["tortuosity"].pop("method")
    differences = close({k: slabs[k] for k in reference}, reference, rtol=1e-12)
    assert not differences, differences
    # Marching cubes on each pair of layers places vertices near 0 in float32, the whole volume's
    # at up to z = 26: the same triangles, rounded differently (measured 7e-10 relative at 96 layers).
    assert slabs["pore_surface_area_m2"] == pytest.approx(whole.pore_surface_area(image), rel=1e-7)


def serpentine(nz: int = 20) -> np.ndarray:
    """A pore channel that crosses the middle layer (the two-rank interface) three times."""
    labels = np.full((nz, 5, 12), PHASES["graphite"], dtype=np.uint8)
    labels[0:16, 2, 1] = PHASES["pore"]  # down past the middle
    labels[15, 2, 1:6] = PHASES["pore"]  # across
    labels[3:16, 2, 5] = PHASES["pore"]  # up above the middle
    labels[3, 2, 5:10] = PHASES["pore"]  # across
    labels[3:nz, 2, 9] = PHASES["pore"]  # and down to the bottom
    labels[8, 4, 3] = PHASES["si"]
    return labels


def serpentine_across_rows() -> np.ndarray:
    """A pore channel that crosses the middle y row (the two ranks' column interface) three times:
    the geodesic search runs on columns of y rows when several ranks share it."""
    labels = np.full((14, 12, 5), PHASES["graphite"], dtype=np.uint8)
    pore = PHASES["pore"]
    labels[0:13, 1, 1] = pore  # down at y = 1
    labels[12, 1:10, 1] = pore  # across to y = 9
    labels[2:13, 9, 1] = pore  # up
    labels[2, 4:10, 1] = pore  # back to y = 4
    labels[2:11, 4, 1] = pore  # down
    labels[10, 4, 1:5] = pore  # over to x = 4 (three voxels from the other runs: no corner contact)
    labels[10, 4:10, 4] = pore  # across to y = 9 again
    labels[10:14, 9, 4] = pore  # and down to the bottom
    labels[6, 6, 3] = PHASES["si"]
    return labels


@pytest.mark.parametrize(
    "labels",
    [three_phase((23, 17, 15), seed=6), serpentine(), serpentine_across_rows(), three_phase((3, 9, 8), seed=7)],
    ids=["random", "serpentine", "serpentine-across-rows", "thin"],
)
def test_metrics_on_the_ranks_are_the_bits_of_one_process(comm, shared_tmp_path, labels):
    path = shared_tmp_path / "volume.npy"
    if comm.rank == 0:
        write_image(path, VoxelImage(labels, SPACING, PHASES, "volume"))
    comm.barrier()
    layers = open_image_layers(path)
    fields: dict[str, np.ndarray] = {}
    distributed = whole.compute_metrics(layers, comm=comm, fields=fields)
    alone = whole.compute_metrics(VoxelImage(labels, SPACING, PHASES, str(path)), fields=(kept := {}))
    for record in (distributed, alone):
        record.pop("timings_s")
    assert json.dumps(distributed, sort_keys=True) == json.dumps(alone, sort_keys=True)
    if comm.size > 1:
        bounds = fields["layer_bounds"]
        z0, z1 = int(bounds[comm.rank]), int(bounds[comm.rank + 1])
    else:
        z0, z1 = 0, labels.shape[0]
    for name in ("tortuosity", "geodesic_m"):
        np.testing.assert_array_equal(fields[name], kept[name][z0:z1])
    if labels.shape in ((20, 5, 12), (14, 12, 5)):  # the serpentines: MCP_Geometric, the same bits
        from skimage.graph import MCP_Geometric

        pore = labels == PHASES["pore"]
        starts = np.column_stack([np.zeros(int(pore[0].sum()), dtype=int), np.argwhere(pore[0])])
        costs, _ = MCP_Geometric(np.where(pore, 1.0, np.inf), sampling=SPACING).find_costs(starts)
        np.testing.assert_array_equal(kept["geodesic_m"], np.where(pore, costs, np.nan))
        assert np.nanmax(kept["geodesic_m"]) > 2.5 * labels.shape[0] * SPACING[0]  # up and down again


def test_metrics_command_on_the_ranks_writes_the_fields_of_one_process(comm, shared_tmp_path):
    from fem_anode.cli import main

    labels = three_phase((16, 14, 13), seed=8)
    path = shared_tmp_path / "volume.npy"
    if comm.rank == 0:
        write_image(path, VoxelImage(labels, SPACING, PHASES, "volume"))
    comm.barrier()
    out = shared_tmp_path / "out"
    assert main(["metrics", str(path), "--fields", "--no-render", "--out", str(out)]) == 0
    alone: dict[str, np.ndarray] = {}
    record = whole.compute_metrics(VoxelImage(labels, SPACING, PHASES, str(path)), fields=alone)
    written = json.loads((out / "metrics.json").read_text())
    assert written["tortuosity"]["mean"] == record["tortuosity"]["mean"]
    assert written["pore_si_distance"]["median_m"] == record["pore_si_distance"]["median_m"]
    for name in ("tortuosity", "geodesic_m"):
        np.testing.assert_array_equal(np.load(out / f"{name}.npy"), alone[name].astype(np.float32))
    assert (out / "tortuosity_map.png").stat().st_size > 1000


def test_without_the_compiled_kernels_a_volume_read_by_layers_gets_the_scipy_path(tmp_path, monkeypatch):
    labels = three_phase((14, 12, 11), seed=9)
    path = write_image(tmp_path / "volume.npy", VoxelImage(labels, SPACING, PHASES, "volume"))
    slabs = whole.compute_metrics(open_image_layers(path))
    monkeypatch.setattr(whole, "_voxel_kernels", lambda comm: None)
    scipy_path = whole.compute_metrics(open_image_layers(path))
    assert "skimage.graph.MCP_Geometric" in scipy_path["tortuosity"]["method"]
    for record in (slabs, scipy_path):
        record.pop("timings_s")
        record["tortuosity"].pop("method")
    area = scipy_path.pop("pore_surface_area_m2")
    assert slabs.pop("pore_surface_area_m2") == pytest.approx(area, rel=1e-7)
    differences = close(slabs, scipy_path, rtol=1e-12)
    assert not differences, differences


def test_the_command_refuses_a_named_phase_without_voxels_in_a_volume_read_by_layers(comm, shared_tmp_path, capsys):
    """As for an image read whole: exit 3 with the phase named, before any metric, nothing written."""
    from fem_anode.cli import main

    labels = three_phase((12, 10, 9), seed=10)
    path = shared_tmp_path / "volume.npy"
    if comm.rank == 0:
        write_image(path, VoxelImage(labels, SPACING, {**PHASES, "sei": 3}, "volume"))
    comm.barrier()
    out = shared_tmp_path / "out"
    assert main(["metrics", str(path), "--no-render", "--out", str(out)]) == 3
    assert "phase(s) sei have no voxels" in capsys.readouterr().err
    assert not out.exists()
    # the Python API reports it as not applicable instead
    record = whole.compute_metrics(open_image_layers(path))
    assert record["phase_fractions"]["sei"] == 0.0
