"""Image I/O: every format round-trips array, voxel size and phase map; bad files fail clearly."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fem_anode.errors import InputError, UsageError
from fem_anode.io import VoxelImage, parse_phase_map, read_image, write_image

PHASES = {"pore": 0, "si": 1, "graphite": 2, "sei": 3}


@pytest.fixture
def labels3d() -> VoxelImage:
    rng = np.random.default_rng(1)
    return VoxelImage(rng.integers(0, 4, size=(5, 7, 6), dtype=np.uint8), (40e-9, 20e-9, 20e-9), PHASES)


@pytest.mark.parametrize("name", ["vol.npy", "vol.npz", "vol.tif", "vol.tiff", "slices"])
def test_3d_round_trip(tmp_path, labels3d, name):
    path = write_image(tmp_path / name, labels3d)
    back = read_image(path, kind="labels")
    np.testing.assert_array_equal(back.array, labels3d.array)
    assert back.voxel_size == pytest.approx(labels3d.voxel_size, rel=1e-12)
    assert back.phases == PHASES


@pytest.mark.parametrize("name", ["roi.png", "roi.npy", "roi.npz", "roi.tif"])
def test_2d_round_trip(tmp_path, name):
    image = VoxelImage(np.arange(12, dtype=np.uint8).reshape(3, 4) % 3, (10e-9, 20e-9), {"pore": 0, "si": 1, "sei": 2})
    back = read_image(write_image(tmp_path / name, image), kind="labels")
    np.testing.assert_array_equal(back.array, image.array)
    assert back.voxel_size == pytest.approx((10e-9, 20e-9))
    assert back.phases == image.phases


def test_gray_float_round_trip_and_uint16_png(tmp_path):
    gray = VoxelImage(np.linspace(0, 1, 20).reshape(4, 5), (1e-6, 1e-6))
    back = read_image(write_image(tmp_path / "g.tif", gray), kind="gray")
    np.testing.assert_allclose(back.array, gray.array)
    wide = VoxelImage(np.array([[0, 1000], [65535, 7]], dtype=np.uint16), (1e-6, 1e-6))
    np.testing.assert_array_equal(read_image(write_image(tmp_path / "w.png", wide)).array, wide.array)


def test_folder_numbering_is_natural_not_lexical(tmp_path):
    import imageio.v3 as iio

    folder = tmp_path / "stack"
    folder.mkdir()
    for i in (1, 2, 10):  # lexical order would put 10 before 2
        iio.imwrite(folder / f"img{i}.png", np.full((3, 3), i, dtype=np.uint8))
    image = read_image(folder, voxel_size="40nm,20nm,20nm")
    assert image.array[:, 0, 0].tolist() == [1, 2, 10]
    assert image.voxel_size == pytest.approx((40e-9, 20e-9, 20e-9))


def test_imagej_tiff_calibration_is_read(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    data = np.zeros((3, 4, 5), dtype=np.uint8)
    path = tmp_path / "fiji.tif"
    tifffile.imwrite(path, data, imagej=True, resolution=(1 / 0.02, 1 / 0.02), metadata={"spacing": 0.04, "unit": "um"})
    image = read_image(path)
    assert image.voxel_size == pytest.approx((40e-9, 20e-9, 20e-9))


def test_overrides_and_units(tmp_path, labels3d):
    path = write_image(tmp_path / "v.npy", labels3d)
    image = read_image(path, voxel_size="0.65um", phases="a=0,b=1,c=2,d=3")
    assert image.voxel_size == pytest.approx((0.65e-6,) * 3)
    assert image.phases == {"a": 0, "b": 1, "c": 2, "d": 3}
    assert image.extent == pytest.approx((5 * 0.65e-6, 7 * 0.65e-6, 6 * 0.65e-6))


@pytest.mark.parametrize(
    ("array", "kind", "message"),
    [
        (np.array([[0.5, np.nan], [1.0, 2.0]]), "any", "NaN or infinite"),
        (np.array([[0.0, 1.0], [1.0, 2.0]]), "labels", "expected integer labels"),
        (np.zeros((2, 2, 2, 2), dtype=np.uint8), "any", "2D or 3D"),
        (np.zeros(5, dtype=np.uint8), "any", "2D or 3D"),
    ],
)
def test_bad_arrays(tmp_path, array, kind, message):
    path = tmp_path / "bad.npy"
    np.save(path, array)
    with pytest.raises(InputError, match=message):
        read_image(path, kind=kind)


def test_missing_corrupt_and_unsupported_files(tmp_path):
    with pytest.raises(InputError, match="image not found"):
        read_image(tmp_path / "nope.npy")
    (tmp_path / "junk.tif").write_bytes(b"not a tiff at all")
    with pytest.raises(InputError, match="cannot read image"):
        read_image(tmp_path / "junk.tif")
    (tmp_path / "x.bmp").write_bytes(b"BM")
    with pytest.raises(InputError, match="unsupported image format"):
        read_image(tmp_path / "x.bmp")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no slice images"):
        read_image(tmp_path / "empty")


def test_labels_checked_against_phase_map(tmp_path):
    path = write_image(tmp_path / "l.npy", VoxelImage(np.array([[0, 1], [5, 1]], dtype=np.uint8)))
    with pytest.raises(InputError, match=r"label values \[5\] are not in the phase map"):
        read_image(path, phases="pore=0,si=1", kind="labels")
    with pytest.raises(InputError, match="sei have no voxels"):
        read_image(path, phases="pore=0,si=1,x=5,sei=3", kind="labels")


def test_sidecar_metadata_is_json(tmp_path, labels3d):
    write_image(tmp_path / "v.npy", labels3d)
    meta = json.loads((tmp_path / "v.npy.json").read_text())
    assert meta["fem_anode"]["voxel_size_m"] == list(labels3d.voxel_size)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("pore=0,si", "expected name=label"),
        ("pore=0,si=x", "not an integer"),
        ("pore=0,si=0", "same label"),
        ("1x=0", "must start with a letter"),
        ("", "empty"),
    ],
)
def test_bad_phase_maps(text, message):
    with pytest.raises(UsageError, match=message):
        parse_phase_map(text)


def test_voxel_size_checks():
    with pytest.raises(UsageError, match="positive"):
        VoxelImage(np.zeros((2, 2), dtype=np.uint8), (0.0, 1e-9))
    with pytest.raises(UsageError, match="2 axes|image is 2D"):
        VoxelImage(np.zeros((2, 2), dtype=np.uint8)).with_metadata(voxel_size="1nm,2nm,3nm")
    with pytest.raises(UsageError, match="voxel size unknown"):
        VoxelImage(np.zeros((2, 2), dtype=np.uint8)).require_voxel_size()
