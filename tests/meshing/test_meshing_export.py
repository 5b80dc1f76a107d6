"""Mesh export through meshio: every format read back by meshio keeps the cells, the facets and
the phase/interface tags (or sets); unknown suffixes are refused; failures leave no file."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("gmsh")
meshio = pytest.importorskip("meshio")

from fem_anode.cli import main  # noqa: E402
from fem_anode.errors import UsageError  # noqa: E402
from fem_anode.io.images import VoxelImage, write_image  # noqa: E402
from fem_anode.meshing import mesh_image  # noqa: E402
from fem_anode.meshing.export import FORMATS, abaqus_name, check_format, facets_path  # noqa: E402
from fem_anode.meshing.smooth2d import SmoothMeshOptions  # noqa: E402
from fem_anode.meshing.tags import BOX_SIDE_TAGS, interface_tag, phase_tag  # noqa: E402


def _image() -> VoxelImage:
    yy, xx = np.mgrid[:30, :40] + 0.5
    labels = np.full((30, 40), 3, dtype=np.uint8)
    labels[(xx - 14) ** 2 + (yy - 15) ** 2 < 8**2] = 1
    labels[(xx - 31) ** 2 + (yy - 10) ** 2 < 6**2] = 0
    return VoxelImage(labels, (20e-9, 20e-9), {"pore": 0, "si": 1, "sei": 3})


def _counts(mesh, key: str, sign: int = 1) -> dict[tuple[str, int], int]:  # type: ignore[no-untyped-def]
    counts: dict[tuple[str, int], int] = {}
    for block, tags in zip(mesh.cells, mesh.cell_data[key]):
        for tag, n in zip(*np.unique(sign * np.asarray(tags), return_counts=True)):
            counts[(block.type, int(tag))] = counts.get((block.type, int(tag)), 0) + int(n)
    return counts


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("suffix", [".vtu", ".xdmf", ".med"])
def test_round_trip_keeps_cells_facets_and_tags(tmp_path, suffix, order):
    path = tmp_path / f"roi{suffix}"
    result = mesh_image(_image(), path, keep=["sei", "si"], options=SmoothMeshOptions(size=80e-9, order=order))
    mesh = meshio.read(path)
    counts = _counts(mesh, "cell_tags", -1) if suffix == ".med" else _counts(mesh, "tag")
    if suffix == ".xdmf":  # the facets are in a file of their own beside the cells
        assert {t for t, _ in counts} == {"triangle" if order == 1 else "triangle6"}
        counts.update(_counts(meshio.read(facets_path(path)), "tag"))
    cell_type, facet_type = ("triangle", "line") if order == 1 else ("triangle6", "line3")
    assert {t for t, _ in counts} == {cell_type, facet_type}
    assert sum(n for (t, _), n in counts.items() if t == cell_type) == result.quality["cells"]
    expected_tags = {phase_tag(3), phase_tag(1), interface_tag(0, 3), interface_tag(1, 3)} | {
        BOX_SIDE_TAGS[s] for s in ("left", "right", "top", "bottom")
    }
    assert {tag for _, tag in counts} == expected_tags
    assert {tag for t, tag in counts if t == cell_type} == {phase_tag(3), phase_tag(1)}
    assert np.ptp(mesh.points[:, 0]) == pytest.approx(40 * 20e-9, rel=1e-9)  # metres
    if suffix == ".med":
        names = {tag: names for tag, names in mesh.cell_tags.items()}
        assert names[-interface_tag(0, 3)] == ["pore|sei"] and names[-phase_tag(1)] == ["si"]
    if suffix == ".xdmf":
        assert sorted(p.name for p in tmp_path.iterdir()) == ["roi.h5", "roi.xdmf", "roi_facets.h5", "roi_facets.xdmf"]
        assert mesh.points.shape[1] == 2
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_same_counts_as_the_msh(tmp_path):
    """The .vtu holds exactly the .msh's elements per type and tag (one meshing, compared through meshio)."""
    from fem_anode.meshing.export import export_meshio

    path = tmp_path / "ref.msh"
    mesh_image(_image(), path, keep=["sei", "si"], options=SmoothMeshOptions(size=80e-9, order=2))
    mesh = meshio.read(path)
    groups = {name: (int(v[1]), int(v[0])) for name, v in mesh.field_data.items()}
    assert set(groups) == {"sei", "si", "pore|sei", "sei|si", "left", "right", "top", "bottom"}
    export_meshio(mesh, groups, tmp_path / "same.vtu", 2)
    assert _counts(meshio.read(tmp_path / "same.vtu"), "tag") == _counts(mesh, "gmsh:physical")


@pytest.mark.parametrize("order", [1, 2])
def test_abaqus_sets(tmp_path, order):
    path = tmp_path / "roi.inp"
    result = mesh_image(_image(), path, keep=["sei", "si"], options=SmoothMeshOptions(size=80e-9, order=order))
    mesh = meshio.read(path)
    assert [block.type for block in mesh.cells] == ["triangle" if order == 1 else "triangle6"]  # cells only
    n = len(mesh.cells[0].data)
    assert n == result.quality["cells"]
    sei, si = (np.concatenate(mesh.cell_sets[name]) for name in ("sei", "si"))
    assert len(sei) + len(si) == n and len(np.intersect1d(sei, si)) == 0
    assert set(mesh.point_sets) == {"pore_sei", "sei_si", "left", "right", "top", "bottom"}
    # the interface node set is the nodes of the cells on both sides that lie on the Si disc's boundary
    si_nodes = np.unique(mesh.cells[0].data[si])
    sei_nodes = np.unique(mesh.cells[0].data[sei])
    assert set(mesh.point_sets["sei_si"].tolist()) == set(np.intersect1d(si_nodes, sei_nodes).tolist())
    assert abaqus_name("pore|sei") == "pore_sei" and abaqus_name("1x") == "g_1x"


def test_unknown_suffix_lists_the_formats(tmp_path, capsys):
    with pytest.raises(UsageError, match=r"\.msh.*\.vtu.*\.xdmf.*\.inp.*\.med"):
        check_format(tmp_path / "roi.stl")
    image = tmp_path / "roi.npy"
    write_image(image, _image())
    out = tmp_path / "roi.obj"
    assert main(["mesh", str(image), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "unknown format '.obj'" in err and all(s in err for s in FORMATS) and "Traceback" not in err
    assert main(["mesh", str(image), "--xdmf", "--out", str(tmp_path / "roi.vtu")]) == 2
    assert "drop --xdmf" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["roi.npy", "roi.npy.json"]  # the image and its metadata only


def test_cli_writes_the_format_of_the_suffix(shared_tmp_path, comm):
    image = shared_tmp_path / "roi.npy"
    if comm.rank == 0:
        write_image(image, _image())
    comm.barrier()
    for suffix in FORMATS:
        out = shared_tmp_path / f"roi{suffix}"
        assert main(["mesh", str(image), "--keep", "sei", "--size", "80nm", "--out", str(out), "-q"]) == 0
        assert out.is_file() and (shared_tmp_path / "roi.quality.json").is_file()
        assert len(meshio.read(out).points) > 0
        comm.barrier()


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    import meshio as meshio_module

    def broken(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError("disk full")

    monkeypatch.setattr(meshio_module, "write", broken)
    with pytest.raises(OSError, match="disk full"):
        mesh_image(_image(), tmp_path / "roi.xdmf", keep=["sei"], options=SmoothMeshOptions(size=80e-9))
    assert list(tmp_path.iterdir()) == []
