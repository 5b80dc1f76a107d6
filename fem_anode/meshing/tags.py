"""Physical-group names and tag numbers of every mesh fem_anode writes.

Names are the contract (solvers look tags up by name); numbers are fixed so that files from
different runs agree:

* a kept phase with label value ``v`` -> cell group named after the phase, tag ``100 + v``;
* an interface between phases ``a`` and ``b`` -> facet group ``"a|b"`` (names in alphabetical
  order), tag ``10000 + 256 * min(va, vb) + max(va, vb)``;
* the sides of the image box -> facet groups with the tags of :data:`BOX_SIDE_TAGS`.

Coordinates follow the array axes: mesh ``x`` = last array axis (columns), mesh ``y`` = the
axis before it (rows), and in 3D mesh ``z`` = axis 0, the depth from the electrode surface.
``top`` is the side at index 0 of axis 0 (image top row in 2D; the electrode surface in 3D),
``bottom`` the opposite side; ``left``/``right`` are x = 0 / x = max and, in 3D,
``front``/``back`` are y = 0 / y = max.
"""

from __future__ import annotations

from fem_anode.errors import UsageError

__all__ = ["BOX_SIDE_TAGS", "PHASE_TAG_OFFSET", "INTERFACE_TAG_OFFSET", "phase_tag", "interface_name", "interface_tag"]

#: Facet tags of the image-box sides.
BOX_SIDE_TAGS: dict[str, int] = {"left": 1, "right": 2, "front": 3, "back": 4, "top": 5, "bottom": 6}
PHASE_TAG_OFFSET = 100
INTERFACE_TAG_OFFSET = 10000
_MAX_LABEL = 255


def _check_label(value: int) -> int:
    if not 0 <= int(value) <= _MAX_LABEL:
        raise UsageError(f"label value {value} cannot be meshed: labels must lie in 0..{_MAX_LABEL}")
    return int(value)


def phase_tag(label_value: int) -> int:
    """Cell tag of the phase with this label value."""
    return PHASE_TAG_OFFSET + _check_label(label_value)


def interface_name(phase_a: str, phase_b: str) -> str:
    """``"a|b"`` with the two phase names in alphabetical order."""
    if phase_a == phase_b:
        raise UsageError(f"an interface needs two different phases, got {phase_a!r} twice")
    first, second = sorted((phase_a, phase_b))
    return f"{first}|{second}"


def interface_tag(label_a: int, label_b: int) -> int:
    """Facet tag of the interface between the phases with these label values."""
    low, high = sorted((_check_label(label_a), _check_label(label_b)))
    if low == high:
        raise UsageError(f"an interface needs two different labels, got {low} twice")
    return INTERFACE_TAG_OFFSET + 256 * low + high
