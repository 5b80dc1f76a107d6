"""File input and output: images with voxel size and phase map, atomic result writing."""

from fem_anode.io.images import (
    IMAGE_SUFFIXES,
    VoxelImage,
    format_phase_map,
    parse_phase_map,
    read_image,
    write_image,
)
from fem_anode.io.output import atomic_path, output_directory, to_jsonable, write_json, write_text_atomic

__all__ = [
    "IMAGE_SUFFIXES",
    "VoxelImage",
    "atomic_path",
    "format_phase_map",
    "output_directory",
    "parse_phase_map",
    "read_image",
    "to_jsonable",
    "write_image",
    "write_json",
    "write_text_atomic",
]
