"""3D figures (fem_anode.io.render3d): voxel-face geometry, the VTX/VTI readers, the PNGs the
commands write (size, not blank, the phase colours), and the warnings where nothing can render.

Rendering runs in a child process with its own Xvfb (see the module); under MPI the commands
render on rank 0 from files, and the tests that render directly run on rank 0 only.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest

from fem_anode.io import VoxelImage, write_image
from fem_anode.io import render3d
from fem_anode.io.render3d import PANEL_SIZE, downsample, read_vti_cells, voxel_faces

PHASES = {"pore": 0, "si": 1, "graphite": 2, "sei": 3}


def _packed(rgb: np.ndarray) -> np.ndarray:
    """One integer per pixel (0xRRGGBB): np.unique on it is fast, unlike np.unique(axis=0)."""
    rgb = rgb.astype(np.uint32)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def _rank_size() -> tuple[int, int]:
    for rank, size in (("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"), ("PMI_RANK", "PMI_SIZE")):
        if rank in os.environ:
            return int(os.environ[rank]), int(os.environ[size])
    return 0, 1


def _rank0_only() -> None:
    rank, size = _rank_size()
    if rank != 0:
        pytest.skip("renders on rank 0 only (the other ranks would render the same pictures again)")


@pytest.fixture(autouse=True)
def _rendering_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests render, whatever the suite sets for the others."""
    monkeypatch.delenv(render3d.DISABLE_ENV, raising=False)


def _on_root(comm, check) -> None:  # type: ignore[no-untyped-def]
    """Run ``check()`` on rank 0; every rank then meets at a barrier even when it failed (a
    failure on rank 0 must not leave the other ranks waiting in the next test's collectives)."""
    error = None
    if comm.rank == 0:
        try:
            check()
        except BaseException as err:  # re-raised below, after the barrier
            error = err
    comm.barrier()
    if error is not None:
        raise error


def _image_stats(path: Path) -> tuple[tuple[int, int], int, np.ndarray]:
    from PIL import Image

    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB"))
    colours = np.unique(_packed(rgb))
    return (rgb.shape[1], rgb.shape[0]), len(colours), rgb


def _check_png(path: Path, panels: int) -> np.ndarray:
    """The PNG exists, has the size of its panels and is a picture (many colours, mostly not background)."""
    assert path.is_file(), f"{path.name} missing"
    size, ncolours, rgb = _image_stats(path)
    assert size == (PANEL_SIZE[0] * panels, PANEL_SIZE[1])
    assert ncolours > 50, f"{path.name} has only {ncolours} colours"
    background = rgb[5, PANEL_SIZE[0] // 2]  # top middle: background above the object
    covered = np.any(np.abs(rgb.astype(int) - background.astype(int)) > 30, axis=-1).mean()
    assert covered > 0.05, f"{path.name}: only {100 * covered:.1f} % of the pixels differ from the background"
    return rgb


# ----------------------------------------------------------------------------- geometry


def test_voxel_faces_of_boxes_and_coordinates():
    one = np.zeros((3, 4, 5), dtype=bool)
    one[1, 2, 3] = True
    points, owner = voxel_faces(one, (1e-6, 2e-6, 3e-6))
    assert points.shape == (24, 3) and owner.tolist() == [np.ravel_multi_index((1, 2, 3), one.shape)] * 6
    # display coordinates in um: x = 3 * ix, y = 2 * iy, z = -depth
    assert points[:, 0].min() == pytest.approx(9.0) and points[:, 0].max() == pytest.approx(12.0)
    assert points[:, 1].min() == pytest.approx(4.0) and points[:, 1].max() == pytest.approx(6.0)
    assert points[:, 2].min() == pytest.approx(-2.0) and points[:, 2].max() == pytest.approx(-1.0)
    box = np.zeros((6, 7, 8), dtype=bool)
    box[1:3, 2:5, 1:5] = True  # 2 x 3 x 4 voxels
    points, owner = voxel_faces(box, (1e-6,) * 3)
    assert len(owner) == 2 * (2 * 3 + 3 * 4 + 2 * 4)  # the surface of the box, in voxel faces
    assert box.ravel()[owner].all()
    # every quad is a unit square
    quads = points.reshape(-1, 4, 3)
    area = np.linalg.norm(np.cross(quads[:, 1] - quads[:, 0], quads[:, 3] - quads[:, 0]), axis=1)
    assert area == pytest.approx(np.ones(len(quads)))
    full = np.ones((2, 3, 4), dtype=bool)  # faces on the image border count
    assert len(voxel_faces(full, (1e-6,) * 3)[1]) == 2 * (6 + 12 + 8)
    assert len(voxel_faces(np.zeros((2, 2, 2), bool), (1e-6,) * 3)[1]) == 0
    with pytest.raises(ValueError, match="3D"):
        voxel_faces(np.ones((2, 2), bool), (1e-6,) * 2)


def test_downsample_keeps_labels_and_reports_the_stride():
    labels = np.arange(300 * 10 * 7, dtype=np.int32).reshape(300, 10, 7)
    shown, stride = downsample(labels, 128)
    assert stride == 3 and shown.shape == (100, 4, 3)
    assert np.array_equal(shown, labels[::3, ::3, ::3])
    assert downsample(labels[:100], 128)[1] == 1


def test_vti_reader_reads_the_finite_volume_output_format(tmp_path):
    """The layout VoxelFieldWriter writes: raw appended Float32 cell data with a UInt64 byte count."""
    nz, ny, nx = 3, 4, 5
    values = np.arange(nz * ny * nx, dtype="<f4").reshape(nz, ny, nx)
    values[0, 0, 0] = np.nan
    header = (
        '<?xml version="1.0"?>\n<VTKFile type="ImageData" version="1.0" byte_order="LittleEndian" header_type="UInt64">\n'
        f'  <ImageData WholeExtent="0 {nx} 0 {ny} 0 {nz}" Origin="0 0 0" Spacing="3e-08 2e-08 1e-08">\n'
        f'    <Piece Extent="0 {nx} 0 {ny} 0 {nz}">\n      <CellData Scalars="c">\n'
        '        <DataArray type="Float32" Name="c" format="appended" offset="0"/>\n      </CellData>\n    </Piece>\n'
        '  </ImageData>\n  <AppendedData encoding="raw">\n   _'
    ).encode()
    path = tmp_path / "c_0.vti"
    path.write_bytes(
        header + np.uint64(values.nbytes).tobytes() + values.tobytes() + b"\n  </AppendedData>\n</VTKFile>\n"
    )
    read, spacing = read_vti_cells(path)
    assert spacing == pytest.approx((1e-8, 2e-8, 3e-8))
    np.testing.assert_array_equal(read, values)


def test_vtx_reader_joins_the_blocks_of_every_rank(shared_tmp_path, comm):
    """c = 1 + x + 2y + 3z (P1, exact at the nodes) written by dolfinx's VTXWriter on all ranks and
    read back whole on rank 0: every node value matches the function of its coordinates."""
    pytest.importorskip("dolfinx")
    from dolfinx import fem, mesh
    from dolfinx.io import VTXWriter

    domain = mesh.create_unit_cube(comm, 3, 2, 2, cell_type=mesh.CellType.hexahedron)
    V = fem.functionspace(domain, ("Lagrange", 1))
    c = fem.Function(V, name="c")
    path = shared_tmp_path / "c.bp"
    with VTXWriter(comm, str(path), [c], engine="BP4") as writer:
        for t in (0.0, 0.5):
            c.interpolate(lambda x, t=t: 1.0 + x[0] + 2.0 * x[1] + 3.0 * x[2] + t)
            writer.write(t)
    comm.barrier()

    def check() -> None:
        data = render3d.read_vtx(path, "c")
        assert data["times"] == pytest.approx([0.0, 0.5]) and data["cell_type"] == 12
        x = data["points"]
        for t, values in zip(data["times"], data["values"]):
            np.testing.assert_allclose(values, 1.0 + x[:, 0] + 2 * x[:, 1] + 3 * x[:, 2] + t, rtol=1e-12)
        assert len(data["cells"]) == 3 * 2 * 2  # ghost cells (written by two ranks) kept once
        assert data["cells"].max() < len(x)
        with pytest.raises(KeyError, match="no function 'u'"):
            render3d.read_vtx(path, "u")

    _on_root(comm, check)


# ----------------------------------------------------------------------------- the commands' PNGs


def _volume() -> VoxelImage:
    """A small anode-like volume: pores open to the surface, one enclosed pore (unreachable), Si."""
    from fem_anode.imaging.synthetic import anode_volume

    image = anode_volume(shape=(16, 24, 24), seed=1)
    labels = image.array.copy()
    labels[10:13, 10:13, 10:13] = PHASES["sei"]
    labels[11, 11, 11] = PHASES["pore"]  # a pore cavity nothing reaches
    return VoxelImage(labels, image.voxel_size, image.phases)


def test_metrics_writes_the_3d_figures_and_a_report_chromium_opens(shared_tmp_path, comm):
    from fem_anode.cli import main

    image_path = shared_tmp_path / "vol.npy"
    if comm.rank == 0:
        write_image(image_path, _volume())
    comm.barrier()
    out = shared_tmp_path / "metrics"
    assert main(["metrics", str(image_path), "--out", str(out), "-q"]) == 0

    def check() -> None:
        manifest = json.loads((out / "figures3d.json").read_text())
        names = [r["file"] for r in manifest]
        assert names == [
            "segmented_3d.png",
            "pores_si_3d.png",
            "tortuosity_3d.png",
            "pore_surface_3d.png",
            "pore_si_distance_3d.png",
        ]
        for name in names:
            _check_png(out / name, panels=1)
        rgb = _check_png(out / "segmented_3d.png", panels=1).astype(int)
        r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
        assert ((b > r + 60) & (b > g + 30)).mean() > 0.01  # pores (blue) show
        assert ((r > g + 60) & (r > b + 60)).mean() > 0.0005  # Si (red) shows
        assert all("every voxel" in record["caption"] for record in manifest)  # small: not downsampled
        # the report embeds the 2D and 3D figures, and every one of them loads in a real browser
        from fem_anode.io.report_html import browser_check, find_chromium

        page = (out / "report.html").read_text()
        assert "37.54" in page and page.count("<img") == len(list(out.glob("*.png")))
        if find_chromium() is not None:  # skipped only where the setup did not install it
            check = browser_check(out / "report.html", shared_tmp_path / "browser")
            assert check.images == len(list(out.glob("*.png"))) and check.broken == 0
            size, ncolours, _ = _image_stats(check.screenshot)
            assert size == (1200, 2400) and ncolours > 100  # not blank

    _on_root(comm, check)


def test_big_volumes_are_downsampled_and_the_caption_says_so(tmp_path):
    """Also: the render process stops the Xvfb it started."""
    _rank0_only()
    labels = np.repeat(np.repeat(np.repeat(_volume().array, 3, 0), 3, 1), 3, 2)  # 48 x 72 x 72
    image = VoxelImage(labels, (0.1e-6,) * 3, PHASES)
    job = render3d.metrics_scenes({"big": (image, {}, {})}, tmp_path, max_voxels=24)
    assert [f.file for f in job.figures] == [
        "segmented_3d.png",
        "pores_si_3d.png",
        "pore_surface_3d.png",
        "pore_si_distance_3d.png",
    ]
    assert all("big: 1 in 3 voxels per axis" in f.caption for f in job.figures)
    job.scenes, job.figures = job.scenes[:2], job.figures[:2]
    before = _xvfb_processes()
    figures = render3d.render_scenes(job)
    assert [f.file for f in figures] == ["segmented_3d.png", "pores_si_3d.png"]
    for figure in figures:
        _check_png(tmp_path / figure.file, panels=1)
    assert _xvfb_processes() == before


@pytest.mark.parametrize("discretisation", ["fe", "fv"])
def test_diffusion_on_a_3d_mesh_renders_c_with_a_clip_plane(shared_tmp_path, comm, discretisation):
    """P1 voxel mesh (c.bp) or finite volumes (c.pvd + .vti): the field files are written by all
    ranks and rendered by rank 0 from the files."""
    pytest.importorskip("dolfinx")
    from fem_anode.cli import main

    labels = np.full((8, 6, 6), PHASES["sei"], dtype=np.uint8)
    labels[:2] = PHASES["pore"]
    labels[5:7, 2:4, 2:4] = PHASES["si"]
    write_image(shared_tmp_path / "vol.npy", VoxelImage(labels, (20e-9,) * 3, {"pore": 0, "si": 1, "sei": 3}))
    config = shared_tmp_path / "vol.toml"
    if comm.rank == 0:
        config.write_text(
            f'[geometry]\nimage = "vol.npy"\n\n[mesh]\ndiscretisation = "{discretisation}"\n\n[time]\nt_end = 0.002\noutput_times = [1e-5, 1e-4, 0.002]\n\n'
            '[[regions]]\nname = "deep"\nbox = [0.0, 0.0, 100e-9, 120e-9, 120e-9, 160e-9]\n'
        )
    comm.barrier()
    out = shared_tmp_path / "out"
    assert main(["diffusion", str(config), "--out", str(out), "-q"]) == 0

    def check() -> None:
        rgb = _check_png(out / "c_3d.png", panels=3).astype(int)
        width = PANEL_SIZE[0]
        # c rises with time: the first panel bluer than the last (coolwarm: blue low, red high)
        first, last = rgb[:, : width - 120], rgb[:, 2 * width : 3 * width - 120]
        assert (first[..., 2] - first[..., 0]).mean() > (last[..., 2] - last[..., 0]).mean() + 5
        assert [r["file"] for r in json.loads((out / "figures3d.json").read_text())] == ["c_3d.png"]
        assert (out / "report.html").is_file() and (out / "report.md").is_file()
        assert "c_3d.png" in (out / "report.md").read_text()

    _on_root(comm, check)


# ----------------------------------------------------------------------------- no rendering: warnings, no crash


def _vtk_needs_x() -> bool:
    import vtkmodules.vtkRenderingOpenGL2 as gl

    return not any(hasattr(gl, name) for name in ("vtkEGLRenderWindow", "vtkOSOpenGLRenderWindow"))


def test_no_display_is_a_warning_not_a_crash(tmp_path, monkeypatch, caplog):
    """No X server and no Xvfb: VTK (X-only build) aborts the render process; the caller logs a
    warning naming the cause and carries on without the PNGs."""
    _rank0_only()
    if not _vtk_needs_x():
        pytest.skip("this VTK renders off-screen without X (EGL/OSMesa): there is no failure to simulate")
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no Xvfb
    image = VoxelImage(_volume().array, (0.5e-6,) * 3, PHASES)
    with caplog.at_level(logging.WARNING, logger="fem_anode"):
        figures = render3d.render_metrics_figures({"s": (image, {}, {})}, tmp_path / "out")
    assert figures == []
    messages = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert (
        "3D figures not rendered" in messages and "no display could be made" in messages and "xvfb" in messages.lower()
    )
    assert not list((tmp_path / "out").glob("*.png")) and not (tmp_path / "out" / "figures3d.json").exists()
    assert not list((tmp_path / "out").glob(".render3d-*"))  # the job's temporary files are gone


def test_missing_pyvista_and_no_render_switch(shared_tmp_path, comm, monkeypatch, capsys):
    from fem_anode.cli import main

    image_path = shared_tmp_path / "vol.npy"
    if comm.rank == 0:
        write_image(image_path, _volume())
    comm.barrier()
    real_find_spec = render3d.importlib.util.find_spec
    monkeypatch.setattr(
        render3d.importlib.util, "find_spec", lambda name, *a: None if name == "pyvista" else real_find_spec(name, *a)
    )
    assert main(["metrics", str(image_path), "--out", str(shared_tmp_path / "a"), "-q"]) == 0
    err = capsys.readouterr().err

    def check_a() -> None:
        assert "3D figures not rendered: pyvista is not installed" in err
        assert not list((shared_tmp_path / "a").glob("*_3d.png")) and (shared_tmp_path / "a" / "report.html").is_file()

    _on_root(comm, check_a)
    monkeypatch.undo()
    assert main(["metrics", str(image_path), "--out", str(shared_tmp_path / "b"), "--no-render", "-q"]) == 0
    err = capsys.readouterr().err

    def check() -> None:
        assert err == ""
        assert not list((shared_tmp_path / "b").glob("*_3d.png")) and (shared_tmp_path / "b" / "metrics.json").is_file()

    _on_root(comm, check)


def test_a_crashing_renderer_is_a_warning(tmp_path, monkeypatch, caplog):
    """A render process that dies (here: a DISPLAY with no server and no Xvfb) loses only the pictures."""
    _rank0_only()
    if not _vtk_needs_x():
        pytest.skip("this VTK renders off-screen without X: a dead DISPLAY does not stop it")
    monkeypatch.setenv("DISPLAY", ":9731")  # nobody listens there
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    image = VoxelImage(_volume().array, (0.5e-6,) * 3, PHASES)
    with caplog.at_level(logging.WARNING, logger="fem_anode"):
        assert render3d.render_metrics_figures({"s": (image, {}, {})}, tmp_path / "out") == []
    assert any("DISPLAY=:9731" in r.getMessage() for r in caplog.records)


def _xvfb_processes() -> set[int]:
    """Xvfb processes started by this session's render processes (their environment has our mark)."""
    mark = os.environ.get("FEM_ANODE_TEST_SESSION", "")
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (
                b"Xvfb" in (entry / "cmdline").read_bytes().split(b"\0")[0]
                and mark.encode() in (entry / "environ").read_bytes()
            ):
                found.add(int(entry.name))
        except OSError:
            continue
    return found
