"""Reading and writing 2D/3D label and gray images with their voxel size and phase map.

Formats: ``.npy``, ``.npz``, ``.tif``/``.tiff`` (single page or stack), ``.png`` (2D) and a
folder of numbered slices (``.png``/``.tif``/``.npy``). Voxel size and phase map travel with the
array: inside the file where the format has room (``.npz`` arrays, TIFF description), else in a
JSON sidecar (``roi.npy`` -> ``roi.npy.json``; a folder's ``metadata.json``).

Axis convention for every module: a 3D array is ``(z, y, x)``; axis 0 is the depth z with index
0 at the electrode surface (separator side), increasing toward the current collector. A 2D
array is ``(y, x)``. Voxel sizes are in metres, one per axis in the same order.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fem_anode.errors import InputError, UsageError
from fem_anode.io.output import atomic_path, write_json
from fem_anode.units import check_value, parse_lengths

__all__ = [
    "VoxelImage",
    "ImageLayers",
    "IMAGE_SUFFIXES",
    "open_image_layers",
    "read_image",
    "write_image",
    "write_image_layers",
    "parse_phase_map",
    "format_phase_map",
]

#: File suffixes read as images (a directory is read as a stack of numbered slices).
IMAGE_SUFFIXES = (".npy", ".npz", ".tif", ".tiff", ".png")
_SLICE_SUFFIXES = (".png", ".tif", ".tiff", ".npy")
_META_KEY = "fem_anode"
_PHASE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")

logger = logging.getLogger(__name__)

ImageKind = Literal["labels", "gray", "any"]


@dataclasses.dataclass(frozen=True)
class VoxelImage:
    """An image array with its voxel size (m, per axis) and optional phase map.

    Attributes:
        array: 2D ``(y, x)`` or 3D ``(z, y, x)`` array.
        voxel_size: edge length per axis in metres, or ``None`` when unknown.
        phases: phase name -> label value, or ``None`` for gray images / unknown.
        source: where the image was read from (for messages).
    """

    array: np.ndarray
    voxel_size: tuple[float, ...] | None = None
    phases: dict[str, int] | None = None
    source: str = "<array>"

    def __post_init__(self) -> None:
        if self.array.ndim not in (2, 3):
            raise InputError(
                f"{self.source}: expected a 2D or 3D image, got {self.array.ndim}D with shape {self.array.shape}"
            )
        if self.voxel_size is not None:
            vs = tuple(float(v) for v in self.voxel_size)
            if len(vs) == 1:
                vs = vs * self.array.ndim
            if len(vs) != self.array.ndim:
                raise UsageError(f"{self.source}: voxel size has {len(vs)} entries but the image is {self.array.ndim}D")
            if not all(np.isfinite(v) and v > 0 for v in vs):
                raise UsageError(f"{self.source}: voxel size must be positive and finite, got {vs}")
            for v in vs:
                check_value(v, None, f"{self.source}: voxel size")
            object.__setattr__(self, "voxel_size", vs)
        if self.phases is not None:
            object.__setattr__(self, "phases", _validate_phase_map(self.phases))

    @property
    def ndim(self) -> int:
        return self.array.ndim

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    def require_voxel_size(self) -> tuple[float, ...]:
        """Voxel size in metres, or a UsageError asking for ``--voxel-size``."""
        if self.voxel_size is None:
            raise UsageError(f"{self.source}: voxel size unknown; give it, e.g. --voxel-size 20nm or 40nm,20nm,20nm")
        return self.voxel_size

    def require_phases(self) -> dict[str, int]:
        """Phase map, or a UsageError asking for ``--phases``."""
        if self.phases is None:
            raise UsageError(f"{self.source}: phase map unknown; give it, e.g. --phases pore=0,si=1,graphite=2,sei=3")
        return dict(self.phases)

    def read_layers(self, start: int, stop: int) -> np.ndarray:
        """Axis-0 layers ``start ... stop - 1`` of the array (a view; reads only those of a memory map)."""
        return self.array[start:stop]

    @property
    def extent(self) -> tuple[float, ...]:
        """Physical size per axis in metres."""
        return tuple(n * h for n, h in zip(self.shape, self.require_voxel_size()))

    def with_metadata(self, voxel_size: Any = None, phases: Mapping[str, int] | str | None = None) -> VoxelImage:
        """Copy with the voxel size and/or phase map replaced (``None`` keeps the current one)."""
        vs = self.voxel_size if voxel_size is None else parse_lengths(voxel_size, self.ndim)
        ph = self.phases if phases is None else (parse_phase_map(phases) if isinstance(phases, str) else dict(phases))
        return dataclasses.replace(self, voxel_size=vs, phases=ph)

    def check_labels(self, require_all_phases: bool = True) -> VoxelImage:
        """Check this is a valid label image for its phase map; return self.

        Raises:
            InputError: non-integer array, label values missing from the phase map, or (with
                ``require_all_phases``) a phase with no voxels.
        """
        _require_integer(self.array, self.source)
        if self.phases is None:
            return self
        values = np.unique(self.array)
        known = set(self.phases.values())
        unknown = [int(v) for v in values if int(v) not in known]
        if unknown:
            raise InputError(
                f"{self.source}: label values {unknown[:10]} are not in the phase map {format_phase_map(self.phases)}"
            )
        if require_all_phases:
            present = {int(v) for v in values}
            empty = [name for name, v in self.phases.items() if v not in present]
            if empty:
                raise InputError(f"{self.source}: phase(s) {', '.join(empty)} have no voxels in the image")
        return self


def parse_phase_map(text: str | Mapping[str, int]) -> dict[str, int]:
    """Phase map from ``"pore=0,si=1,graphite=2,sei=3"`` (names are the user's) or a mapping."""
    if isinstance(text, Mapping):
        return _validate_phase_map(text)
    phases: dict[str, int] = {}
    for item in str(text).split(","):
        if not item.strip():
            continue
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep:
            raise UsageError(f"cannot read phase {item!r} in {text!r}: expected name=label, e.g. pore=0,si=1")
        try:
            label = int(value.strip())
        except ValueError:
            raise UsageError(f"phase {name!r} has label {value.strip()!r}, which is not an integer") from None
        if name in phases:
            raise UsageError(f"phase {name!r} is given twice in {text!r}")
        phases[name] = label
    return _validate_phase_map(phases)


def format_phase_map(phases: Mapping[str, int]) -> str:
    """Inverse of :func:`parse_phase_map`."""
    return ",".join(f"{k}={v}" for k, v in phases.items())


def _validate_phase_map(phases: Mapping[str, Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    if not phases:
        raise UsageError("phase map is empty; give e.g. pore=0,si=1")
    for name, value in phases.items():
        if not isinstance(name, str) or not _PHASE_NAME.match(name):
            raise UsageError(f"phase name {name!r} must start with a letter and contain only letters, digits, _ or -")
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise UsageError(f"phase {name!r} must map to an integer label, got {value!r}")
        out[name] = int(value)
    if len(set(out.values())) != len(out):
        raise UsageError(f"phase map {format_phase_map(out)} gives the same label to two phases")
    return out


def _require_integer(array: np.ndarray, source: str) -> None:
    if array.dtype == bool:
        return
    if not np.issubdtype(array.dtype, np.integer):
        raise InputError(
            f"{source}: expected integer labels, got a {array.dtype} array; segment gray images first "
            "(fem-anode segment) or convert the labels to integers"
        )


def _check_finite(array: np.ndarray, source: str) -> None:
    if np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.complexfloating):
        bad = int(np.count_nonzero(~np.isfinite(array)))
        if bad:
            raise InputError(f"{source}: image contains {bad} NaN or infinite values")
    elif not (np.issubdtype(array.dtype, np.integer) or array.dtype == bool):
        raise InputError(f"{source}: unsupported image data type {array.dtype}")


def _to_single_channel(array: np.ndarray, source: str) -> np.ndarray:
    """Collapse gray RGB(A) PNG/TIFF data (H, W, 3|4) to (H, W); refuse true colour."""
    if array.ndim == 3 and array.shape[-1] in (3, 4) and array.shape[0] > 4:
        rgb = array[..., :3]
        if np.all(rgb == rgb[..., :1]):
            return np.ascontiguousarray(rgb[..., 0])
        raise InputError(f"{source}: colour image (RGB); expected a single-channel gray or label image")
    return array


def _meta_dict(voxel_size: Sequence[float] | None, phases: Mapping[str, int] | None) -> dict[str, Any]:
    return {
        _META_KEY: {
            "voxel_size_m": list(voxel_size) if voxel_size else None,
            "phases": dict(phases) if phases else None,
        }
    }


def _meta_from(data: Any, where: str = "metadata") -> tuple[tuple[float, ...] | None, dict[str, int] | None] | None:
    """Voxel size and phase map of our metadata record, checked (InputError naming ``where``:
    the sidecar file, the .npz member or the TIFF description), or ``None`` if ``data`` is not ours."""
    if not isinstance(data, dict) or _META_KEY not in data:
        return None
    meta = data[_META_KEY]
    if not isinstance(meta, dict):
        raise InputError(f"{where}: '{_META_KEY}' must be a JSON object with voxel_size_m and phases, got {meta!r:.80}")
    vs = meta.get("voxel_size_m")
    voxel_size = None
    if vs is not None:
        if isinstance(vs, (int, float)) and not isinstance(vs, bool):
            vs = [vs]
        if (
            not isinstance(vs, list)
            or not vs
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vs)
        ):
            raise InputError(f"{where}: voxel_size_m must be a list of numbers (metres), got {vs!r:.80}")
        from fem_anode.units import check_length

        try:
            voxel_size = tuple(check_length(float(v), f"voxel_size_m {v!r}") for v in vs)
        except UsageError as err:
            raise InputError(f"{where}: {err}") from None
    phases = meta.get("phases") or None
    if phases is not None:
        if not isinstance(phases, Mapping):
            raise InputError(f"{where}: phases must be a JSON object name -> label, got {phases!r:.80}")
        try:
            phases = _validate_phase_map(phases)
        except UsageError as err:
            raise InputError(f"{where}: phases: {err}") from None
    return voxel_size, phases


def _sidecar(path: Path) -> Path:
    return path / "metadata.json" if path.is_dir() else path.with_name(path.name + ".json")


def _read_sidecar(path: Path) -> tuple[tuple[float, ...] | None, dict[str, int] | None]:
    sidecar = _sidecar(path)
    if not sidecar.exists():
        return None, None
    try:
        data = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise InputError(f"cannot read image metadata {sidecar}: {err}") from None
    found = _meta_from(data, str(sidecar))
    return found if found is not None else (None, None)


def _natural_index(path: Path) -> int:
    numbers = re.findall(r"\d+", path.stem)
    if not numbers:
        raise InputError(f"slice file {path.name} has no number in its name; name slices like slice_0000.png")
    return int(numbers[-1])


def _check_read_memory(path: Path, shape: Any, dtype: Any) -> None:
    """Refuse (InputError with the estimate) an image larger than the available memory."""
    from fem_anode.resources import check_memory, estimate_array_memory

    dtype = np.dtype(dtype)
    shape = tuple(int(s) for s in shape)
    check_memory(
        estimate_array_memory(shape, dtype.itemsize, f"reading {path} ({'x'.join(map(str, shape))} {dtype})"),
        hint="crop or bin the image first",
    )


def _npz_metadata(path: Path, data: Any) -> tuple[tuple[float, ...] | None, dict[str, int] | None] | None:
    """The ``metadata`` member of an .npz (a JSON string), checked; InputError naming the member."""
    where = f"{path} member 'metadata'"
    member = data["metadata"]
    if member.dtype.kind not in "US" or member.size != 1:
        raise InputError(f"{where}: expected a JSON string, got a {member.dtype} array of shape {member.shape}")
    try:
        parsed = json.loads(str(member.reshape(())[()]))
    except ValueError as err:
        raise InputError(f"{where}: not valid JSON: {err}") from None
    return _meta_from(parsed, where)


def _check_npz_members(path: Path, data: Any, key: str, keys: list[str]) -> None:
    """The image members of an .npz must agree: 'labels' and 'image' (when both are there) describe
    the same voxels, so they must have the same shape. Other members are ignored (logged)."""
    shape = data[key].shape
    for other in ("labels", "image"):
        if other != key and other in keys and data[other].shape != shape:
            raise InputError(
                f"{path}: member {other!r} has shape {'x'.join(map(str, data[other].shape))} but {key!r} has "
                f"{'x'.join(map(str, shape))}; the image members of an .npz must describe the same voxels"
            )
    ignored = [k for k in keys if k not in (key, "labels", "image")]
    if ignored:
        logger.info("%s: read member %r; ignored %s", path, key, ", ".join(map(repr, ignored)))


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype] | None:
    """Shape and dtype from a ``.npy`` header without reading the data (``None`` if unreadable)."""
    fmt = np.lib.format
    try:
        with open(path, "rb") as f:
            version = fmt.read_magic(f)
            reader = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, _, dtype = reader(f)
        return tuple(shape), dtype
    except Exception:  # let np.load report what is wrong with the file
        return None


def _read_array(path: Path) -> tuple[np.ndarray, tuple[float, ...] | None, dict[str, int] | None]:
    suffix = path.suffix.lower()
    if suffix == ".npy":
        header = _npy_header(path)
        if header is not None:
            _check_read_memory(path, *header)
        array = np.load(path, allow_pickle=False)
        return (array, *_read_sidecar(path))
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            keys = [k for k in data.files if k != "metadata"]
            for preferred in ("labels", "image", "arr_0"):
                if preferred in keys:
                    key = preferred
                    break
            else:
                if len(keys) != 1:
                    raise InputError(
                        f"{path}: .npz holds arrays {keys}; expected one, or one named 'labels' or 'image'"
                    )
                key = keys[0]
            array = data[key]
            meta = _npz_metadata(path, data) if "metadata" in data.files else None
            _check_npz_members(path, data, key, keys)
        return (array, *(meta or _read_sidecar(path)))
    if suffix in (".tif", ".tiff"):
        return _read_tiff(path)
    if suffix == ".png":
        import imageio.v3 as iio

        array = _to_single_channel(np.asarray(iio.imread(path)), str(path))
        return (array, *_read_sidecar(path))
    raise InputError(
        f"{path}: unsupported image format {path.suffix!r}; use one of {', '.join(IMAGE_SUFFIXES)} or a folder of "
        "slices"
    )


_TIFF_UNITS = {"micron": 1e-6, "um": 1e-6, "µm": 1e-6, "\\u00B5m": 1e-6, "nm": 1e-9, "mm": 1e-3, "cm": 1e-2, "m": 1.0}


def _tiff_metadata(tif: Any, path: Path, ndim: int) -> tuple[tuple[float, ...] | None, dict[str, int] | None, bool]:
    """Voxel size and phase map of an open TIFF (our JSON description, else ImageJ calibration
    and the sidecar), and whether they came from our description (then the data are ours:
    never colour)."""
    page = tif.pages[0]
    description = page.description or ""
    try:
        parsed = json.loads(description)
    except ValueError:
        parsed = None
    meta = _meta_from(parsed, f"{path} (TIFF description)")
    if meta is not None:
        return meta[0], meta[1], True
    # ImageJ-style calibration (unit + resolution tags, z spacing), as written by Fiji.
    ij = tif.imagej_metadata or {}
    unit = _TIFF_UNITS.get(str(ij.get("unit", "")).strip())
    voxel_size: tuple[float, ...] | None = None
    res = page.tags.get("XResolution"), page.tags.get("YResolution")
    if unit is not None and all(r is not None for r in res):
        xr = res[0].value[0] / res[0].value[1]
        yr = res[1].value[0] / res[1].value[1]
        if xr > 0 and yr > 0:
            voxel_size = (unit / yr, unit / xr)
            if ndim == 3:
                voxel_size = (float(ij.get("spacing", 1.0 / xr)) * unit, *voxel_size)
    sidecar = _read_sidecar(path)
    if (
        sidecar[0] is not None
        and voxel_size is not None
        and (len(sidecar[0]) != len(voxel_size) or not np.allclose(sidecar[0], voxel_size, rtol=1e-6, atol=0.0))
    ):
        logger.warning(
            "%s: the voxel size of %s %s differs from the TIFF calibration %s; using the sidecar's",
            path,
            _sidecar(path).name,
            sidecar[0],
            voxel_size,
        )
    return sidecar[0] or voxel_size, sidecar[1], False


def _describe_page(shape: Sequence[int], dtype: Any) -> str:
    return f"shape {'x'.join(map(str, shape))} ({np.dtype(dtype)})"


def _page_calibration(page: Any) -> tuple[Any, ...] | None:
    """The resolution tags of a TIFF page (``None`` for frames without tags)."""
    tags = getattr(page, "tags", None)
    if tags is None:
        return None
    values = []
    for name in ("XResolution", "YResolution", "ResolutionUnit"):
        tag = tags.get(name)
        values.append(None if tag is None else tag.value)
    return tuple(values)


def _tiff_series(tif: Any, path: Path) -> list[Any]:
    """The image series of a TIFF, checked for consistency: every full-resolution page must have
    the shape, data type and calibration of the first (InputError naming the odd page).
    Reduced-resolution pages (thumbnails, pyramid levels) are left out."""
    series = (
        [s for s in tif.series if not getattr(s.pages[0] if s.pages else None, "is_reduced", False)]
        if tif.series
        else []
    )
    if not series:
        raise InputError(f"cannot read image {path}: the TIFF file holds no image")
    first = series[0]
    page_shape = tuple(first.shape[-2:]) if len(first.shape) >= 2 else tuple(first.shape)
    for other in series[1:]:
        shape = tuple(other.shape[-2:]) if len(other.shape) >= 2 else tuple(other.shape)
        if shape != page_shape or other.dtype != first.dtype:
            index = getattr(other.pages[0], "index", "?") if other.pages else "?"
            raise InputError(
                f"{path}: page {index} has {_describe_page(shape, other.dtype)} but page 0 has "
                f"{_describe_page(page_shape, first.dtype)}; every page of a stack must have the same shape and data "
                "type"
            )
    reference = None
    for index, page in enumerate(tif.pages):
        if getattr(page, "is_reduced", False):
            continue
        calibration = _page_calibration(page)
        if calibration is None:
            continue
        if reference is None:
            reference = (index, calibration)
        elif calibration != reference[1]:
            raise InputError(
                f"{path}: page {index} has another calibration (resolution tags {calibration}) than page "
                f"{reference[0]} ({reference[1]}); every page of a stack must have the same pixel size"
            )
    return series


def _read_tiff(path: Path) -> tuple[np.ndarray, tuple[float, ...] | None, dict[str, int] | None]:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        series = _tiff_series(tif, path)
        if len(series) == 1:
            _check_read_memory(path, series[0].shape, series[0].dtype)
            array = series[0].asarray()
        else:  # pages written one by one (separate series of the same shape): a stack, as Fiji reads it
            n = sum(int(np.prod(s.shape[:-2])) if len(s.shape) > 2 else 1 for s in series)
            _check_read_memory(path, (n, *series[0].shape[-2:]), series[0].dtype)
            array = np.concatenate([s.asarray().reshape(-1, *s.shape[-2:]) for s in series], axis=0)
            logger.info("%s: %d pages written as %d separate images, read as one stack", path, n, len(series))
        voxel_size, phases, ours = _tiff_metadata(tif, path, array.ndim)
    return (array if ours else _to_single_channel(array, str(path))), voxel_size, phases


def _folder_slices(path: Path) -> list[Path]:
    """The slice files of a folder in slice order (InputError if none, mixed or ambiguous)."""
    files = [p for p in path.iterdir() if p.suffix.lower() in _SLICE_SUFFIXES and not p.name.startswith(".")]
    if not files:
        raise InputError(f"{path}: folder has no slice images ({', '.join(_SLICE_SUFFIXES)})")
    suffixes = {p.suffix.lower() for p in files}
    if len(suffixes) > 1:
        raise InputError(f"{path}: folder mixes slice formats {sorted(suffixes)}")
    files.sort(key=_natural_index)
    indices = [_natural_index(p) for p in files]
    if len(set(indices)) != len(indices):
        raise InputError(f"{path}: two slices share the same number")
    return files


def _slice_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of one slice file without reading its pixels (where the format allows)."""
    suffix = path.suffix.lower()
    if suffix == ".npy":
        header = _npy_header(path)
        if header is None:
            raise InputError(f"{path}: cannot read the .npy header of this slice")
        return tuple(int(n) for n in header[0]), np.dtype(header[1])
    if suffix in (".tif", ".tiff"):
        import tifffile

        with tifffile.TiffFile(path) as tif:
            series = _tiff_series(tif, path)
            return tuple(int(n) for n in series[0].shape), np.dtype(series[0].dtype)
    import imageio.v3 as iio

    props = iio.improps(path)
    return tuple(int(n) for n in props.shape), np.dtype(props.dtype)


def _check_slice(
    folder: Path, name: str, shape: tuple[int, ...], dtype: Any, first: tuple[str, tuple[int, ...], Any]
) -> None:
    """InputError naming slice ``name`` if it is not 2D or differs from the first in shape or dtype."""
    if len(shape) != 2:
        raise InputError(
            f"{folder}: slice {name} is {len(shape)}D with shape {'x'.join(map(str, shape))}; every slice must be a "
            "2D image"
        )
    if tuple(shape) != tuple(first[1]) or np.dtype(dtype) != np.dtype(first[2]):
        raise InputError(
            f"{folder}: slice {name} has {_describe_page(shape, dtype)} but slice {first[0]} has "
            f"{_describe_page(first[1], first[2])}; every slice must have the same shape and data type"
        )


def _check_folder_headers(path: Path, files: list[Path]) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of the slices of a folder, all checked against the first (from the headers)."""
    headers = [_slice_header(f) for f in files]
    first = (files[0].name, headers[0][0], headers[0][1])
    colour = len(first[1]) == 3 and first[1][-1] in (3, 4)
    for f, (shape, dtype) in zip(files, headers):
        if colour:  # gray stored as RGB(A): compared as stored, collapsed when read
            if tuple(shape) != tuple(first[1]) or dtype != first[2]:
                _check_slice(path, f.name, shape, dtype, first)
            continue
        _check_slice(path, f.name, shape, dtype, first)
    return headers[0]


def _read_folder(path: Path) -> tuple[np.ndarray, tuple[float, ...] | None, dict[str, int] | None]:
    files = _folder_slices(path)
    _check_folder_headers(path, files)
    slices = [_read_array(p)[0] for p in files]
    first = (files[0].name, slices[0].shape, slices[0].dtype)
    for f, s in zip(files, slices):
        _check_slice(path, f.name, s.shape, s.dtype, first)
    return (np.stack(slices, axis=0), *_read_sidecar(path))


def read_image(
    path: str | Path,
    *,
    voxel_size: Any = None,
    phases: Mapping[str, int] | str | None = None,
    kind: ImageKind = "any",
) -> VoxelImage:
    """Read a 2D or 3D image with its voxel size and phase map.

    Args:
        path: ``.npy``, ``.npz``, ``.tif``/``.tiff``, ``.png`` file or a folder of numbered slices.
        voxel_size: overrides the stored voxel size; metres or a string with units
            (``"20nm"``, ``"40nm,20nm,20nm"``), one value or one per axis (z, y, x).
        phases: overrides the stored phase map (``"pore=0,si=1"`` or a dict).
        kind: ``"labels"`` checks integer labels that match the phase map, ``"gray"`` returns
            float64, ``"any"`` only checks dimension and finiteness.

    Raises:
        InputError: missing/unreadable file, wrong dimension, NaN/inf, non-integer labels,
            label values not in the phase map, or phases with no voxels.
        UsageError: malformed voxel size or phase map.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"image not found: {path}")
    try:
        if path.is_dir():
            array, stored_vs, stored_phases = _read_folder(path)
        else:
            array, stored_vs, stored_phases = _read_array(path)
    except (InputError, UsageError):
        raise
    except Exception as err:  # any reader failure (corrupt file, wrong format) -> one clear line
        raise InputError(f"cannot read image {path}: {type(err).__name__}: {err}") from None
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
        if stored_vs is not None and len(stored_vs) == 3:
            stored_vs = stored_vs[1:]
    if array.ndim not in (2, 3):
        raise InputError(f"{path}: expected a 2D or 3D image, got {array.ndim}D with shape {array.shape}")
    if array.size == 0:
        raise InputError(f"{path}: image is empty (shape {array.shape})")
    _check_finite(array, str(path))
    if kind == "gray":
        array = array.astype(np.float64)
    if stored_vs is not None and len(stored_vs) not in (1, array.ndim):
        message = (
            f"{path}: the stored voxel size has {len(stored_vs)} entries {stored_vs} but the image is "
            f"{array.ndim}D {array.shape}"
        )
        if voxel_size is None:
            raise InputError(f"{message}; fix the metadata or give --voxel-size")
        logger.warning("%s; using the voxel size given instead", message)
        stored_vs = None
    image = VoxelImage(array, stored_vs, stored_phases, str(path)).with_metadata(voxel_size, phases)
    if kind == "labels":
        image.check_labels()
    return image


@dataclasses.dataclass(frozen=True)
class ImageLayers:
    """A 3D label image on disk read a few axis-0 layers at a time (for distributed meshing).

    Attributes:
        shape: ``(z, y, x)`` of the whole image.
        dtype: element type.
        voxel_size: edge length per axis in metres, or ``None``.
        phases: phase name -> label value, or ``None``.
        source: the path (for messages).
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    voxel_size: tuple[float, ...] | None
    phases: dict[str, int] | None
    source: str
    _read: Any = dataclasses.field(repr=False, compare=False)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def require_voxel_size(self) -> tuple[float, ...]:
        """Voxel size in metres, or a UsageError asking for it."""
        return VoxelImage(np.zeros((1,) * self.ndim, np.uint8), self.voxel_size, None, self.source).require_voxel_size()

    def require_phases(self) -> dict[str, int]:
        """Phase map, or a UsageError asking for it."""
        return VoxelImage(np.zeros((1,) * self.ndim, np.uint8), None, self.phases, self.source).require_phases()

    def read_layers(self, start: int, stop: int) -> np.ndarray:
        """Layers ``start ... stop - 1`` (only those are read from disk)."""
        start, stop = max(int(start), 0), min(int(stop), self.shape[0])
        if stop <= start:
            return np.zeros((0, *self.shape[1:]), dtype=self.dtype)
        layers = np.asarray(self._read(start, stop))
        if layers.shape != (stop - start, *self.shape[1:]):
            raise InputError(
                f"{self.source}: layers {start}..{stop - 1} have shape {layers.shape}, expected "
                f"{(stop - start, *self.shape[1:])}"
            )
        return layers


def open_image_layers(
    path: str | Path, *, voxel_size: Any = None, phases: Mapping[str, int] | str | None = None
) -> ImageLayers | VoxelImage:
    """Open a label image for reading by layers: ``.npy`` memory-mapped, multi-page TIFF page by
    page, folders of slices file by file. Other formats (and 2D images) are read whole and
    returned as a :class:`VoxelImage` (which reads layers from memory).

    Voxel size and phase map as :func:`read_image` (stored, overridden by the arguments).
    Label values are checked by the reader of the layers (e.g. the mesher), layer by layer.

    Raises:
        InputError: missing or unreadable file.
        UsageError: malformed voxel size or phase map.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"image not found: {path}")
    opened: tuple[tuple[int, ...], np.dtype, Any, Any, Any] | None = None
    try:
        if path.is_dir():
            files = _folder_slices(path)
            _check_folder_headers(path, files)
            first = _read_array(files[0])[0]
            if first.ndim == 2 and len(files) > 1:
                reference = (files[0].name, first.shape, first.dtype)

                def read_folder(a: int, b: int) -> np.ndarray:
                    layers = []
                    for f in files[a:b]:
                        layer = _read_array(f)[0]
                        _check_slice(path, f.name, layer.shape, layer.dtype, reference)
                        layers.append(layer)
                    return np.stack(layers)

                opened = ((len(files), *first.shape), first.dtype, *_read_sidecar(path), read_folder)
        elif path.suffix.lower() == ".npy":
            header = _npy_header(path)  # the data are mapped when layers are read: a memory
            if header is not None and len(header[0]) == 3 and header[0][0] > 1:  # check can refuse first

                def read_npy(a: int, b: int) -> np.ndarray:
                    try:
                        return np.load(path, mmap_mode="r", allow_pickle=False)[a:b]
                    except ValueError as err:
                        raise InputError(f"cannot read layers {a}..{b - 1} of {path}: {err}") from None

                opened = (header[0], header[1], *_read_sidecar(path), read_npy)
        elif path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tif:
                all_series = _tiff_series(tif, path)
                series = all_series[0] if len(all_series) == 1 else None
                if (
                    series is not None
                    and len(series.shape) == 3
                    and series.shape[0] > 1
                    and len(tif.pages) == series.shape[0]
                ):
                    stored_vs, stored_phases, _ = _tiff_metadata(tif, path, 3)

                    def read_pages(a: int, b: int) -> np.ndarray:
                        return tifffile.imread(path, key=range(a, b)).reshape(b - a, *series.shape[1:])

                    opened = (tuple(series.shape), series.dtype, stored_vs, stored_phases, read_pages)
    except (InputError, UsageError):
        raise
    except Exception as err:
        raise InputError(f"cannot read image {path}: {type(err).__name__}: {err}") from None
    if opened is None:
        return read_image(path, voxel_size=voxel_size, phases=phases)
    shape, dtype, stored_vs, stored_phases, reader = opened
    if stored_vs is not None and len(stored_vs) not in (1, len(shape)):
        message = (
            f"{path}: the stored voxel size has {len(stored_vs)} entries {stored_vs} but the image is "
            f"{len(shape)}D {tuple(shape)}"
        )
        if voxel_size is None:
            raise InputError(f"{message}; fix the metadata or give --voxel-size")
        logger.warning("%s; using the voxel size given instead", message)
        stored_vs = None
    probe = VoxelImage(np.zeros((1,) * len(shape), np.uint8), stored_vs, stored_phases, str(path)).with_metadata(
        voxel_size, phases
    )
    return ImageLayers(tuple(int(n) for n in shape), np.dtype(dtype), probe.voxel_size, probe.phases, str(path), reader)


def write_image(
    path: str | Path, image: VoxelImage | np.ndarray, *, voxel_size: Any = None, phases: Any = None
) -> Path:
    """Write an image (and its voxel size/phase map) to ``path``; format from the suffix.

    A path without suffix is written as a folder of numbered PNG slices (3D) plus
    ``metadata.json``. Files are written atomically.
    """
    if not isinstance(image, VoxelImage):
        image = VoxelImage(np.asarray(image))
    image = image.with_metadata(voxel_size, phases)
    path = Path(path)
    suffix = path.suffix.lower()
    meta = _meta_dict(image.voxel_size, image.phases)
    array = image.array
    if suffix == ".npy":
        with atomic_path(path) as tmp:
            np.save(tmp, array)
        write_json(_sidecar(path), meta)
    elif suffix == ".npz":
        with atomic_path(path) as tmp:
            np.savez_compressed(tmp, image=array, metadata=np.array(json.dumps(meta)))
    elif suffix in (".tif", ".tiff"):
        import tifffile

        with atomic_path(path) as tmp:
            tifffile.imwrite(tmp, array, description=json.dumps(meta), metadata=None)
    elif suffix == ".png":
        if array.ndim != 2:
            raise UsageError(f"{path}: PNG holds 2D images only; write 3D as .tif, .npy or a folder")
        _write_png(path, array)
        write_json(_sidecar(path), meta)
    elif suffix == "":
        path.mkdir(parents=True, exist_ok=True)
        stack = array if array.ndim == 3 else array[None]
        if stack.size:  # one data type for every slice
            stack = stack.astype(_folder_dtype(stack.dtype, float(stack.min()), float(stack.max())), copy=False)
        width = max(4, len(str(len(stack) - 1)))
        written: list[Path] = []
        try:
            for i, plane in enumerate(stack):
                written.append(path / f"slice_{i:0{width}d}.png")
                _write_png(written[-1], plane)
        except BaseException:
            _remove_files(written)  # no half-written folder
            raise
        write_json(path / "metadata.json", meta)
    else:
        raise UsageError(f"{path}: cannot write format {path.suffix!r}; use {', '.join(IMAGE_SUFFIXES)} or a folder")
    return path


def _folder_dtype(dtype: Any, low: float, high: float) -> Any:
    """The data type ``write_image`` stores a stack of ``dtype`` with values in ``[low, high]`` as in a
    folder of slices (small non-negative integers as uint8/uint16; others unchanged)."""
    dtype = np.dtype(dtype)
    if dtype not in (np.uint8, np.uint16, bool) and np.issubdtype(dtype, np.integer) and low >= 0 and high < 2**16:
        return np.dtype(np.uint16 if high > 255 else np.uint8)
    return dtype


def write_image_layers(
    path: str | Path,
    layers: np.ndarray,
    shape: Sequence[int],
    bounds: Sequence[int],
    comm: Any,
    *,
    voxel_size: Any = None,
    phases: Any = None,
) -> Path:
    """Write an image whose axis-0 layers are split over the ranks of ``comm`` (collective).

    Rank ``r`` passes ``layers``, the image's layers ``bounds[r] .. bounds[r + 1] - 1``. For a
    volume no rank holds more than its own layers and one more:

    * ``.npy``: every rank writes its layers into one memory-mapped file;
    * ``.tif``/``.tiff``: one series of pages, and ``.npz``: the compressed ``image`` member, both
      written by rank 0 as the other ranks send their layers one at a time (the same images as
      :func:`write_image` of the whole array writes);
    * a path without suffix: a folder of slices, each rank writing its own (one data type chosen
      over all ranks, as :func:`write_image` chooses it), ``metadata.json`` by rank 0;
    * 2D images (and ``.png``) are gathered on rank 0 and written by :func:`write_image`.

    The file appears only when every rank has written its part (a folder's ``metadata.json``
    last; on a failure every rank removes the slices it wrote); otherwise every rank raises
    :class:`InputError`.
    """
    from mpi4py import MPI

    from fem_anode.faults import share_error

    path = Path(path)
    meta = _meta_dict(voxel_size, phases)
    if comm is None or comm.size == 1:
        try:
            return write_image(path, np.asarray(layers), voxel_size=voxel_size, phases=phases)
        except OSError as err:
            raise InputError(f"{path}: cannot write: {err}") from None
    rank = comm.rank
    shape = tuple(int(n) for n in shape)
    bounds = [int(b) for b in bounds]
    suffix = path.suffix.lower()
    if len(shape) != 3 or suffix not in (".npy", ".npz", ".tif", ".tiff", ""):
        gathered = comm.gather(layers, root=0)
        error: Exception | None = None
        if rank == 0:
            try:
                stacked = np.concatenate(gathered or [])
                write_image(path, VoxelImage(stacked, None, None, str(path)), voxel_size=voxel_size, phases=phases)
            except (OSError, InputError, UsageError) as err:
                error = err if not isinstance(err, OSError) else InputError(f"{path}: cannot write: {err}")
        share_error(comm, error)
        return path
    dtype = np.dtype(comm.bcast(np.asarray(layers).dtype.str if rank == 0 else None, root=0))
    ok = True
    if suffix == "":
        has = np.asarray(layers).size > 0
        low = comm.allreduce(float(np.min(layers)) if has else np.inf, op=MPI.MIN)
        high = comm.allreduce(float(np.max(layers)) if has else -np.inf, op=MPI.MAX)
        stored = _folder_dtype(dtype, low, high)
        width = max(4, len(str(shape[0] - 1)))
        made = True
        if rank == 0:
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError:
                made = False
        ok = bool(comm.bcast(made, root=0))
        written: list[Path] = []
        try:
            for i, plane in enumerate(np.asarray(layers, dtype=stored) if ok else [], start=bounds[rank]):
                written.append(path / f"slice_{i:0{width}d}.png")
                _write_png(written[-1], plane)
        except (OSError, InputError, UsageError):
            ok = False
        if comm.allreduce(ok, op=MPI.LAND):
            if rank == 0:
                write_json(path / "metadata.json", meta)
        else:
            _remove_files(written)  # no half-written folder
    elif suffix == ".npy":
        ok = _write_npy_layers(path, layers, shape, dtype, bounds, comm, meta)
    else:
        writer = _npz_pages_writer if suffix == ".npz" else _tiff_pages_writer
        ok = _write_streamed(path, layers, dtype, bounds, comm, writer(shape, dtype, meta))
    if not comm.allreduce(ok, op=MPI.LAND):
        raise InputError(f"{path}: cannot write the image (a rank could not write its layers)")
    return path


def _write_npy_layers(
    path: Path, layers: np.ndarray, shape: tuple[int, ...], dtype: Any, bounds: list[int], comm: Any, meta: dict
) -> bool:
    """Every rank its layers of one memory-mapped ``.npy`` file, renamed when all are written."""
    import os
    import tempfile

    from mpi4py import MPI

    tmp = None
    if comm.rank == 0:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".npy", dir=path.parent)
            os.close(fd)
            np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape).flush()
        except OSError:
            tmp = None
    tmp = comm.bcast(tmp, root=0)
    if tmp is None:
        return False
    ok = True
    try:
        a, b = bounds[comm.rank], bounds[comm.rank + 1]
        if b > a:
            out = np.load(tmp, mmap_mode="r+")
            out[a:b] = layers
            out.flush()
            del out
    except OSError:
        ok = False
    ok = comm.allreduce(ok, op=MPI.LAND)
    if comm.rank == 0:
        try:
            if ok:
                os.replace(tmp, path)
                write_json(_sidecar(path), meta)
        except OSError:
            ok = False
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return bool(comm.bcast(ok, root=0))


def _write_streamed(
    path: Path,
    layers: np.ndarray,
    dtype: Any,
    bounds: list[int],
    comm: Any,
    write_pages: Any,
) -> bool:
    """Rank 0 calls ``write_pages(tmp, pages)`` with an iterator over every layer in order (its own,
    then every other rank's as they arrive, one page at a time) and renames ``tmp`` to ``path``;
    the other ranks send their layers. Rank 0 receives every page even if writing failed, so no
    rank waits forever. Returns whether the file was written (rank 0; True elsewhere)."""
    rank, size = comm.rank, comm.size
    tag = 7311
    if rank != 0:
        for plane in np.asarray(layers, dtype=dtype):
            comm.Send(np.ascontiguousarray(plane), dest=0, tag=tag)
        return True
    page = np.empty(np.asarray(layers).shape[1:], dtype)
    received = dict.fromkeys(range(1, size), 0)

    def pages() -> Any:
        yield from np.asarray(layers, dtype=dtype)
        for r in range(1, size):
            while received[r] < bounds[r + 1] - bounds[r]:
                comm.Recv(page, source=r, tag=tag)
                received[r] += 1
                yield page

    ok = True
    try:
        with atomic_path(path) as tmp:
            write_pages(tmp, pages())
    except (OSError, ValueError):
        ok = False
    finally:
        for r in range(1, size):  # the pages not taken (a failed write): received and dropped
            for _ in range(bounds[r + 1] - bounds[r] - received[r]):
                comm.Recv(page, source=r, tag=tag)
    return ok


def _tiff_pages_writer(shape: tuple[int, ...], dtype: Any, meta: dict) -> Any:
    """Writes pages as one TIFF series with our metadata (as :func:`write_image` writes a stack)."""

    def write(tmp: Path, pages: Any) -> None:
        import tifffile

        tifffile.imwrite(tmp, data=pages, shape=shape, dtype=dtype, description=json.dumps(meta), metadata=None)

    return write


def _npz_pages_writer(shape: tuple[int, ...], dtype: Any, meta: dict) -> Any:
    """Writes pages as the ``image`` member of a compressed ``.npz`` with our ``metadata`` member
    (what :func:`write_image` writes with ``np.savez_compressed``), streamed into the archive."""

    def write(tmp: Path, pages: Any) -> None:
        import io
        import zipfile

        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            with archive.open("image.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array_header_2_0(member, header)
                for plane in pages:
                    member.write(np.ascontiguousarray(plane).tobytes())
            buffer = io.BytesIO()
            np.save(buffer, np.array(json.dumps(meta)))
            archive.writestr("metadata.npy", buffer.getvalue())

    return write


def _remove_files(paths: Sequence[Path]) -> None:
    """Remove the files at ``paths`` that exist (what could not be removed stays)."""
    for path in paths:
        if path.is_file():
            path.unlink(missing_ok=True)


def _write_png(path: Path, array: np.ndarray) -> None:
    import imageio.v3 as iio

    if array.dtype == bool:
        array = array.astype(np.uint8)
    if array.dtype not in (np.uint8, np.uint16):
        if np.issubdtype(array.dtype, np.integer) and array.min() >= 0 and array.max() < 2**16:
            array = array.astype(np.uint16 if array.max() > 255 else np.uint8)
        else:
            raise UsageError(f"{path}: PNG stores uint8/uint16 only, got {array.dtype}; use .tif or .npy")
    with atomic_path(path) as tmp:
        iio.imwrite(tmp, array, extension=".png")
