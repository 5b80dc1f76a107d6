"""Writing an image from the ranks' layers (``write_image_layers``): the same file as the serial
writer of the whole array for every format, on any number of ranks (also ranks without layers),
no file and the same error on every rank when it cannot be written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fem_anode.errors import InputError
from fem_anode.io.images import open_image_layers, read_image, write_image, write_image_layers

PHASES = {"pore": 0, "si": 1, "graphite": 2, "sei": 3}
VOXEL = (2e-8, 1e-8, 1e-8)


def bounds_for(nz: int, size: int) -> list[int]:
    return [nz * r // size for r in range(size + 1)]


@pytest.mark.parametrize("name", ["labels.npy", "labels.tif", "labels", "labels.npz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int32])
def test_layers_written_equal_the_whole_image(shared_tmp_path, comm, name, dtype):
    volume = np.random.default_rng(3).integers(0, 4, (7, 5, 6)).astype(dtype)
    if dtype == np.int32:
        volume[0, 0, 0] = 300  # a folder stores it as uint16, as the serial writer does
    bounds = bounds_for(volume.shape[0], comm.size)
    mine = volume[bounds[comm.rank] : bounds[comm.rank + 1]]
    path = shared_tmp_path / f"{np.dtype(dtype).name}" / name
    write_image_layers(path, mine, volume.shape, bounds, comm, voxel_size=VOXEL, phases=PHASES)
    comm.barrier()
    serial = shared_tmp_path / f"{np.dtype(dtype).name}-serial-{comm.rank}" / name
    write_image(serial, volume, voxel_size=VOXEL, phases=PHASES)
    got, expected = read_image(path), read_image(serial)
    np.testing.assert_array_equal(got.array, expected.array)
    assert got.array.dtype == expected.array.dtype
    assert got.voxel_size == pytest.approx(VOXEL, rel=1e-12) and got.phases == PHASES
    if name == "labels.npz":  # the members np.savez_compressed writes
        with np.load(path) as got_npz, np.load(serial) as expected_npz:
            assert sorted(got_npz.files) == sorted(expected_npz.files) == ["image", "metadata"]
    else:  # readable layer by layer (one TIFF series, not a page per rank)
        layers = open_image_layers(path)
        np.testing.assert_array_equal(layers.read_layers(2, 5), volume[2:5])
    assert not [p for p in Path(path).parent.iterdir() if p.name.startswith(".")]  # no temporary left


def test_ranks_without_layers(shared_tmp_path, comm):
    volume = np.arange(2 * 3 * 4, dtype=np.uint16).reshape(2, 3, 4)
    bounds = [0] * comm.size + [2]  # every layer on the last rank
    mine = volume[bounds[comm.rank] : bounds[comm.rank + 1]]
    for name in ("a.tif", "a.npy", "a"):
        write_image_layers(shared_tmp_path / name, mine, volume.shape, bounds, comm)
        comm.barrier()
        np.testing.assert_array_equal(read_image(shared_tmp_path / name).array, volume)


@pytest.mark.parametrize("name", ["out.npy", "out.tif", "out", "out.npz"])
def test_unwritable_path_raises_on_every_rank(shared_tmp_path, comm, name):
    blocker = shared_tmp_path / f"file-{name}"
    if comm.rank == 0:
        blocker.write_text("a file, not a folder")
    comm.barrier()
    volume = np.zeros((4, 3, 3), np.uint8)
    bounds = bounds_for(4, comm.size)
    with pytest.raises(InputError, match="cannot write"):
        write_image_layers(
            blocker / name, volume[bounds[comm.rank] : bounds[comm.rank + 1]], volume.shape, bounds, comm
        )
    comm.barrier()
    assert blocker.read_text() == "a file, not a folder"


def test_a_failed_slice_leaves_no_half_written_folder(shared_tmp_path, comm):
    folder = shared_tmp_path / "slices"
    if comm.rank == 0:
        (folder / "slice_0003.png").mkdir(parents=True)  # a folder where a slice file should go
    comm.barrier()
    volume = np.ones((6, 3, 4), np.uint8)
    bounds = bounds_for(6, comm.size)
    with pytest.raises(InputError, match="cannot write"):
        write_image_layers(folder, volume[bounds[comm.rank] : bounds[comm.rank + 1]], volume.shape, bounds, comm)
    comm.barrier()
    assert sorted(p.name for p in folder.iterdir()) == ["slice_0003.png"]  # only what was there before
