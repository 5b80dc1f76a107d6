"""Length parsing and the typed settings machinery (TOML round trip, validation, suggestions)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

from fem_anode.errors import InputError, UsageError
from fem_anode.settings import Section, Settings, section, setting
from fem_anode.units import format_length, parse_length, parse_lengths


@pytest.mark.parametrize(
    ("text", "metres"),
    [
        ("20nm", 20e-9),
        ("0.65um", 0.65e-6),
        ("0.65 µm", 0.65e-6),
        ("1e-6", 1e-6),
        ("3mm", 3e-3),
        (2.5e-8, 2.5e-8),
        ("5A", 5e-10),
    ],
)
def test_parse_length(text, metres):
    assert parse_length(text) == pytest.approx(metres, rel=1e-12)


def test_parse_lengths_forms():
    assert parse_lengths("40nm,20nm,20nm") == pytest.approx((40e-9, 20e-9, 20e-9))
    assert parse_lengths("40x20x20nm") == pytest.approx((40e-9, 20e-9, 20e-9))
    assert parse_lengths("20nm", ndim=3) == pytest.approx((20e-9,) * 3)
    assert parse_lengths([1e-6, 2e-6]) == pytest.approx((1e-6, 2e-6))
    with pytest.raises(UsageError, match="2 entries but the image has 3"):
        parse_lengths("1nm,2nm", ndim=3)


@pytest.mark.parametrize("text", ["-1nm", "0", "abc", "5 furlongs", "nan", "1nm,2"])
def test_parse_length_rejects(text):
    with pytest.raises(UsageError):
        parse_lengths(text)


def test_format_length():
    assert format_length(2e-8) == "20 nm"
    assert format_length(6.5e-7) == "650 nm"
    assert format_length(1.5e-6) == "1.5 um"


@dataclasses.dataclass
class Physics(Section):
    """Physical parameters."""

    D: float = setting(3.01e-10, "diffusivity", unit="m^2/s", positive=True)
    eps: float = setting(0.63985, "transporting fraction", bounds=(0.0, 1.0))
    scheme: str = setting("bdf2", "time scheme", choices=("euler", "bdf2"))


@dataclasses.dataclass
class Geometry(Section):
    """Geometry input."""

    image: Path = setting(doc="segmented image", required=True)
    phases: dict[str, int] = setting({"pore": 0, "si": 1}, "phase map")
    output_times: list[float] = setting([2.0, 10.0], "output times", unit="s", positive=True)


@dataclasses.dataclass
class ToySettings(Settings):
    geometry: Geometry = section(Geometry)
    physics: Physics = section(Physics)


def test_settings_toml_round_trip(tmp_path):
    text = '[geometry]\nimage = "roi.npy"\nphases = {pore = 0, sei = 3}\n\n[physics]\nD = 1e-9\n'
    (tmp_path / "c.toml").write_text(text)
    settings = ToySettings.from_toml(tmp_path / "c.toml")
    assert settings.physics.D == 1e-9 and settings.physics.eps == 0.63985
    assert settings.geometry.image == Path("roi.npy") and settings.geometry.phases == {"pore": 0, "sei": 3}
    settings.to_toml(tmp_path / "back.toml")
    again = ToySettings.from_toml(tmp_path / "back.toml")
    assert again == settings


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[geometry]\nimage = "a"\n[physics]\nDD = 1.0', "did you mean 'D'"),
        ('[geometry]\nimage = "a"\n[physiks]\nD = 1.0', "did you mean 'physics'"),
        ('[geometry]\nimage = "a"\n[physics]\nD = "fast"', "must be a number"),
        ('[geometry]\nimage = "a"\n[physics]\nD = -1.0', "must be positive"),
        ('[geometry]\nimage = "a"\n[physics]\neps = 1.5', r"must lie in \[0.0, 1.0\]"),
        ('[geometry]\nimage = "a"\n[physics]\nscheme = "rk4"', "must be one of"),
        ('[geometry]\nimage = "a"\noutput_times = [1.0, -2.0]', "must be positive"),
        ("[physics]\nD = 1.0", "missing required setting 'geometry.image'"),
        ('[geometry]\nimage = "a"\n[physics]\nD = nan', "must be finite"),
        ("[geometry\n", "not valid TOML"),
    ],
)
def test_settings_errors(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(UsageError, match=message):
        ToySettings.from_toml(path)


def test_settings_missing_file(tmp_path):
    with pytest.raises(InputError, match="settings file not found"):
        ToySettings.from_toml(tmp_path / "none.toml")


def test_describe_lists_every_key_with_unit():
    rows = {key: (default, unit) for key, default, unit, _ in ToySettings.describe()}
    assert rows["physics.D"] == (3.01e-10, "m^2/s")
    assert rows["geometry.image"][0] == "(required)"
    assert set(rows) == {
        "geometry.image",
        "geometry.phases",
        "geometry.output_times",
        "physics.D",
        "physics.eps",
        "physics.scheme",
    }


def test_replace_validates():
    settings = ToySettings(geometry=Geometry(image=Path("x")))
    assert settings.physics.replace(D=2.0).D == 2.0
    with pytest.raises(UsageError):
        settings.physics.replace(D=-math.inf)


@dataclasses.dataclass
class Box(Section):
    """A named box."""

    name: str = setting("I", "region name")
    box: list[float] = setting([0.0, 0.0, 1.0, 1.0], "corners", unit="m")

    def validate(self) -> None:
        if len(self.box) not in (4, 6):
            raise UsageError(f"region {self.name!r}: box needs 4 (2D) or 6 (3D) numbers")


@dataclasses.dataclass
class WithRegions(Settings):
    physics: Physics = section(Physics)
    regions: list[Box] = setting([], "regions to report")


def test_arrays_of_tables_round_trip(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text(
        '[[regions]]\nname = "I"\nbox = [0, 0, 1e-6, 1e-6]\n\n[[regions]]\nname = "II"\nbox = [1e-6, 0, 2e-6, 1e-6]\n'
    )
    settings = WithRegions.from_toml(path)
    assert [r.name for r in settings.regions] == ["I", "II"] and settings.regions[1].box[0] == 1e-6
    settings.to_toml(tmp_path / "back.toml")
    assert WithRegions.from_toml(tmp_path / "back.toml") == settings
    path.write_text('[[regions]]\nname = "I"\nbox = [0, 0, 1]\n')
    with pytest.raises(UsageError, match="needs 4"):
        WithRegions.from_toml(path)
    path.write_text('[[regions]]\nnme = "I"\n')
    with pytest.raises(UsageError, match="did you mean 'name'"):
        WithRegions.from_toml(path)


def test_resolve_paths_makes_relative_paths_relative_to_the_config(tmp_path):
    settings = ToySettings(geometry=Geometry(image=Path("roi.npy")))
    resolved = settings.resolve_paths(tmp_path)
    assert resolved.geometry.image == tmp_path / "roi.npy" and resolved.physics == settings.physics
    absolute = ToySettings(geometry=Geometry(image=Path("/data/roi.npy")))
    assert absolute.resolve_paths(tmp_path).geometry.image == Path("/data/roi.npy")


# ----------------------------------------------------------- validation on construction


def test_construction_validates_like_toml(tmp_path):
    """An object built in Python gets the TOML path's message, with the section's name in the
    key path (the field under which the top-level settings hold it)."""
    with pytest.raises(UsageError, match=r"^physics\.D must be positive, got -1\.0$"):
        Physics(D=-1.0)
    (tmp_path / "c.toml").write_text('[geometry]\nimage = "a"\n[physics]\nD = -1.0\n')
    with pytest.raises(UsageError, match=r"c\.toml: physics\.D must be positive, got -1\.0$"):
        ToySettings.from_toml(tmp_path / "c.toml")
    with pytest.raises(UsageError, match=r"unknown setting 'physics\.DD'; did you mean 'D'\?"):
        Physics(DD=1.0)
    with pytest.raises(
        UsageError, match=r"physics\.scheme must be one of 'euler', 'bdf2', got 'bdf'; did you mean 'bdf2'\?"
    ):
        Physics(scheme="bdf")
    with pytest.raises(UsageError, match=r"physics\.D must be a number, got 'fast'"):
        ToySettings(geometry={"image": "a"}, physics={"D": "fast"})
    with pytest.raises(UsageError, match=r"missing required setting 'geometry\.image'"):
        ToySettings()  # the required image has no default
    with pytest.raises(UsageError, match=r"^unknown setting 'physiks'; did you mean 'physics'\?"):
        ToySettings(physiks={})


def test_sections_as_dicts_are_converted_and_equal_to_objects():
    from_dicts = ToySettings(geometry={"image": "roi.npy", "output_times": [1, 2]}, physics={"D": 1})
    from_objects = ToySettings(
        geometry=Geometry(image=Path("roi.npy"), output_times=[1.0, 2.0]), physics=Physics(D=1.0)
    )
    assert from_dicts == from_objects
    assert isinstance(from_dicts.geometry.image, Path) and isinstance(from_dicts.physics.D, float)
    regions = WithRegions(regions=[{"name": "I", "box": [0, 0, 1, 1]}, Box(name="II")])
    assert [type(r) for r in regions.regions] == [Box, Box] and regions.regions[0].box == [0.0, 0.0, 1.0, 1.0]
    with pytest.raises(UsageError, match="needs 4"):
        WithRegions(regions=[{"name": "I", "box": [0, 0, 1]}])
    with pytest.raises(UsageError, match=r"did you mean 'name'"):
        WithRegions(regions=[{"nme": "I"}])


def test_replace_and_describe_with_required_settings():
    settings = ToySettings(geometry=Geometry(image=Path("x")))
    with pytest.raises(UsageError, match=r"missing required setting 'geometry\.image'"):
        Geometry(image=None)
    with pytest.raises(UsageError, match=r"physics\.eps must lie in"):
        settings.replace(physics={"eps": 2.0})
    rows = {key: default for key, default, _, _ in ToySettings.describe()}
    assert rows["geometry.image"] == "(required)"  # describe does not need the required values
