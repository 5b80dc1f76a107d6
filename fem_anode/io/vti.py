"""VTK ImageData (``.vti``) files written by every rank's slab at once, and read back.

The files hold raw appended arrays with a UInt64 byte count each (ParaView and pyvista read them):
point data on the ``(nz + 1, ny + 1, nx + 1)`` nodes or cell data on the ``(nz, ny, nx)`` voxels
of the image grid, x fastest, origin 0, spacing the voxel size in metres. Each rank writes its own
consecutive range of values of each array by MPI-IO (no gather). ``.pvd`` collections list the
files of a time series.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["SlabArray", "read_vti", "write_pvd", "write_vti"]

_VTK_TYPES = {"<f4": "Float32", "<f8": "Float64", "|u1": "UInt8"}


@dataclasses.dataclass
class SlabArray:
    """One data array of a ``.vti`` file and this rank's part of it.

    Attributes:
        section: ``"PointData"`` or ``"CellData"``.
        name: the array's name.
        dtype: ``"<f4"``, ``"<f8"`` or ``"|u1"``.
        count: values in the whole array (all ranks).
        start: index of this rank's first value.
        blocks: makes this rank's values, consecutive blocks in order (any shapes).
    """

    section: str
    name: str
    dtype: str
    count: int
    start: int
    blocks: Callable[[], Iterable[np.ndarray]]


def _header(dims: Sequence[int], spacing: Sequence[float], arrays: Sequence[SlabArray]) -> tuple[bytes, list[int]]:
    """The XML before the appended data and each array's offset in it."""
    nx, ny, nz = dims
    hx, hy, hz = spacing
    extent = f"0 {nx} 0 {ny} 0 {nz}"
    offsets, position = [], 0
    for array in arrays:
        offsets.append(position)
        position += 8 + array.count * np.dtype(array.dtype).itemsize
    lines = [
        '<?xml version="1.0"?>',
        '<VTKFile type="ImageData" version="1.0" byte_order="LittleEndian" header_type="UInt64">',
        f'  <ImageData WholeExtent="{extent}" Origin="0 0 0" Spacing="{hx:.9g} {hy:.9g} {hz:.9g}">',
        f'    <Piece Extent="{extent}">',
    ]
    for section in ("PointData", "CellData"):
        members = [(a, o) for a, o in zip(arrays, offsets) if a.section == section]
        if not members:
            continue
        lines.append(f'      <{section} Scalars="{members[0][0].name}">')
        for array, offset in members:
            lines.append(
                f'        <DataArray type="{_VTK_TYPES[array.dtype]}" Name="{array.name}" format="appended" '
                f'offset="{offset}"/>'
            )
        lines.append(f"      </{section}>")
    lines += ["    </Piece>", "  </ImageData>", '  <AppendedData encoding="raw">', "   _"]
    return "\n".join(lines).encode(), offsets


def write_vti(
    comm: Any, path: Path, dims: Sequence[int], spacing: Sequence[float], arrays: Sequence[SlabArray]
) -> None:
    """Write ``path`` (collective; a file of the same name is replaced).

    Args:
        comm: the communicator (mpi4py).
        dims: voxels ``(nx, ny, nz)``.
        spacing: voxel edges ``(h_x, h_y, h_z)`` in metres.
        arrays: the data arrays (every rank the same list, each with its own part).
    """
    from mpi4py import MPI

    header, offsets = _header(dims, spacing, arrays)
    base = len(header)
    end = base + sum(8 + a.count * np.dtype(a.dtype).itemsize for a in arrays)
    handle = MPI.File.Open(comm, str(path), MPI.MODE_WRONLY | MPI.MODE_CREATE)
    try:
        handle.Set_size(0)  # collective: an earlier file is replaced, not overwritten in part
        if comm.rank == 0:
            handle.Write_at(0, header)
            for array, offset in zip(arrays, offsets):
                nbytes = array.count * np.dtype(array.dtype).itemsize
                handle.Write_at(base + offset, np.uint64(nbytes).tobytes())
            handle.Write_at(end, b"\n  </AppendedData>\n</VTKFile>\n")
        for array, offset in zip(arrays, offsets):
            itemsize = np.dtype(array.dtype).itemsize
            position = base + offset + 8 + array.start * itemsize
            for block in array.blocks():
                data = np.ascontiguousarray(block, dtype=array.dtype)
                handle.Write_at(position, data)
                position += data.nbytes
    finally:
        handle.Close()
    comm.Barrier()


def write_pvd(path: Path, entries: Sequence[tuple[float, str]]) -> None:
    """A ParaView collection of ``(time, file name)`` entries."""
    lines = "\n".join(f'    <DataSet timestep="{t:.9g}" file="{name}"/>' for t, name in entries)
    Path(path).write_text(
        f'<?xml version="1.0"?>\n<VTKFile type="Collection" version="1.0">\n  <Collection>\n{lines}\n'
        "  </Collection>\n</VTKFile>\n"
    )


def read_vti(path: str | Path) -> tuple[dict[str, tuple[str, np.ndarray]], tuple[float, float, float]]:
    """The arrays of a file as :func:`write_vti` writes it: name -> (section, ``(z, y, x)`` array:
    nodes for point data, voxels for cell data), and the spacing ``(h_z, h_y, h_x)`` (m)."""
    raw = Path(path).read_bytes()
    if b"<AppendedData" not in raw:
        raise ValueError(f"{path}: no appended data")
    start = raw.index(b"<AppendedData")
    head = raw[:start].decode()
    whole, spacing = re.search(r'WholeExtent="([^"]+)"', head), re.search(r'Spacing="([^"]+)"', head)
    if whole is None or spacing is None:
        raise ValueError(f"{path}: not a VTK ImageData file (no WholeExtent/Spacing)")
    if 'header_type="UInt64"' not in head or b'encoding="raw"' not in raw[start : start + 64]:
        raise ValueError(f"{path}: not raw appended data with a UInt64 header")
    extent = [int(v) for v in whole.group(1).split()]
    cells = (extent[5] - extent[4], extent[3] - extent[2], extent[1] - extent[0])
    hx, hy, hz = (float(v) for v in spacing.group(1).split())
    data = raw.index(b"_", start) + 1
    types = {v: k for k, v in _VTK_TYPES.items()}
    out: dict[str, tuple[str, np.ndarray]] = {}
    for section_match in re.finditer(r"<(PointData|CellData)[^>]*>(.*?)</\1>", head, re.S):
        section = section_match.group(1)
        shape = cells if section == "CellData" else tuple(n + 1 for n in cells)
        for array in re.finditer(r"<DataArray([^>]*)/>", section_match.group(2)):
            attributes = dict(re.findall(r'(\w+)="([^"]*)"', array.group(1)))
            dtype = types.get(attributes.get("type", ""))
            if dtype is None or attributes.get("format") != "appended":
                raise ValueError(f"{path}: unsupported data array {attributes.get('Name')!r}")
            offset = data + int(attributes["offset"])
            nbytes = int(np.frombuffer(raw, dtype="<u8", count=1, offset=offset)[0])
            values = np.frombuffer(raw, dtype=dtype, count=nbytes // np.dtype(dtype).itemsize, offset=offset + 8)
            out[attributes["Name"]] = (section, values.reshape(shape))
    return out, (hz, hy, hx)
