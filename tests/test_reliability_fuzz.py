"""Property-based fuzzing (hypothesis) of the image metrics and the settings parsing.

Only the documented errors (:class:`~fem_anode.errors.FemAnodeError` subclasses; for settings
only :class:`~fem_anode.errors.UsageError`) may come out, and the invariants of the results
must hold: phase fractions sum to 1, tortuosities >= 1, distances and areas >= 0; valid
settings round-trip through TOML. Each test is small (<= 40 examples, tiny images) so the
module runs in a few seconds, serially and on every rank under MPI (no communication).
"""

from __future__ import annotations

import datetime
import math
import tomllib
from typing import Any

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, assume, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fem_anode.detachment.settings import DetachmentSettings  # noqa: E402
from fem_anode.errors import FemAnodeError, InputError, UsageError  # noqa: E402
from fem_anode.fem.diffusion.settings import DiffusionSettings  # noqa: E402
from fem_anode.fem.phasefield.settings import PhaseFieldSettings  # noqa: E402
from fem_anode.imaging.metrics import compute_metrics  # noqa: E402
from fem_anode.imaging.settings import MultistageSettings, RegionSettings  # noqa: E402
from fem_anode.imaging.trainable import FeatureSettings  # noqa: E402
from fem_anode.io.images import VoxelImage, parse_phase_map  # noqa: E402
from fem_anode.units import parse_lengths  # noqa: E402

FUZZ = settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
NAMES = ["pore", "si", "sei", "graphite", "cbd", "void"]


# ----------------------------------------------------------------------------- image metrics


@st.composite
def label_images(draw: Any) -> tuple[VoxelImage, str, str]:
    """A small random 2D/3D label image with a random phase map and anisotropic voxels."""
    ndim = draw(st.sampled_from([2, 3]))
    shape = tuple(draw(st.lists(st.integers(1 if ndim == 3 else 2, 7), min_size=ndim, max_size=ndim)))
    n_phases = draw(st.integers(1, 4))
    names = draw(st.permutations(NAMES))[:n_phases]
    values = draw(st.lists(st.integers(0, 255), min_size=n_phases, max_size=n_phases, unique=True))
    phases = dict(zip(names, values))
    dtype = draw(st.sampled_from([np.uint8, np.int32, np.int64, np.uint16]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    # blobs or noise: cumulative random fields give connected regions of various sizes
    if draw(st.booleans()):
        array = rng.choice(np.asarray(values), size=shape)
    else:
        field = rng.random(shape)
        for axis in range(ndim):
            field = np.cumsum(field, axis=axis)
        ranks = np.argsort(np.argsort(field.ravel())).reshape(shape)
        array = np.asarray(values)[(ranks * n_phases) // ranks.size]
    voxel_size = tuple(draw(st.floats(1e-9, 1e-5)) for _ in range(ndim))
    pore = draw(st.sampled_from(names + ["pore"]))
    si = draw(st.sampled_from([n for n in names + ["si", "absent"] if n != pore]))
    return VoxelImage(array.astype(dtype), voxel_size, phases, "fuzz"), pore, si


def _finite(values: Any) -> np.ndarray:
    array = np.asarray([np.nan if v is None else v for v in np.ravel(values)], dtype=float)
    return array[np.isfinite(array)]


@FUZZ
@given(case=label_images(), bins=st.integers(1, 12))
def test_metrics_fuzz_invariants(case, bins):
    image, pore, si = case
    fields: dict[str, np.ndarray] = {}
    try:
        metrics = compute_metrics(image, pore_phase=pore, si_phase=si, bins=bins, fields=fields)
    except FemAnodeError as err:
        event(f"refused: {type(err).__name__}")
        return  # documented refusal (e.g. a phase name not in the map); anything else fails the test
    event(f"computed {image.ndim}D")
    fractions = metrics["phase_fractions"]
    assert set(fractions) == set(image.phases)
    assert sum(fractions.values()) == pytest.approx(1.0, abs=1e-12)
    assert all(0.0 <= f <= 1.0 for f in fractions.values())
    profiles = np.array([metrics["per_slice"][name]["profile"] for name in image.phases])
    np.testing.assert_allclose(profiles.sum(axis=0), 1.0, atol=1e-12)
    tortuosity = metrics["tortuosity"]
    if tortuosity is not None:
        values = _finite(
            [tortuosity["mean"], tortuosity["median"], tortuosity["max_finite"], *tortuosity["per_depth_mean"]]
        )
        assert np.all(values >= 1.0 - 1e-12)
        assert 0.0 <= tortuosity["unreachable_fraction"]["overall"] <= 1.0
        tau = fields["tortuosity"]
        assert np.all(tau[np.isfinite(tau)] >= 1.0 - 1e-12)
        assert np.all(np.isnan(tau) == (image.array != image.phases[pore]))
        geodesic = fields["geodesic_m"]
        assert np.all(geodesic[np.isfinite(geodesic)] >= 0.0)
    distance = metrics["pore_si_distance"]
    if distance is not None:
        values = _finite([distance[k] for k in ("mean_m", "max_m", "median_m", "std_m", "hausdorff_m")])
        assert np.all(values >= 0.0)
        assert distance["max_m"] <= distance["hausdorff_m"] + 1e-18
        assert sum(distance["histogram"]["counts"]) == distance["surface_points"]
    particles = metrics["si_particles"]
    if particles is not None:
        assert particles["count"] >= 1
        assert np.all(np.asarray(particles["equivalent_diameters_m"]) > 0)
        assert sum(particles["size_distribution"]["counts"]) == particles["count"]
    for key in ("pore_surface_area_m2", "pore_perimeter_m"):
        if metrics.get(key) is not None:
            assert metrics[key] >= 0.0


@FUZZ
@given(
    array=st.one_of(
        st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=4, max_size=16).map(
            lambda v: np.asarray(v).reshape(2, -1) if len(v) % 2 == 0 else np.asarray(v)
        ),
        st.lists(st.integers(-3, 300), min_size=1, max_size=16).map(np.asarray),
    ),
    phases=st.dictionaries(st.sampled_from(NAMES), st.integers(0, 5), min_size=1, max_size=3),
)
def test_arbitrary_arrays_are_accepted_or_refused_with_documented_errors(array, phases):
    try:
        image = VoxelImage(array, (1e-8,) * max(array.ndim, 1), phases, "fuzz")
        compute_metrics(image, bins=3)
    except FemAnodeError:
        return


@FUZZ
@given(text=st.text(alphabet="0123456789.,-+eE nmuµAx=abcdefgh_", max_size=20))
def test_length_and_phase_map_parsers_raise_only_usage_errors(text):
    for parse in (lambda t: parse_lengths(t), lambda t: parse_lengths(t, ndim=3), parse_phase_map):
        try:
            parse(text)
        except UsageError:
            pass


# ----------------------------------------------------------------------------- settings parsing

VALID_BASE: dict[type, dict[str, Any]] = {
    DiffusionSettings: {"geometry": {"image": "roi.npy"}},
    PhaseFieldSettings: {},
    DetachmentSettings: {},
    MultistageSettings: {},
    FeatureSettings: {},
    RegionSettings: {},
}

toml_scalars = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(-1e3, 1e3),
    st.integers(-10, 10**6),
    st.booleans(),
    st.text(max_size=8),
    st.datetimes(min_value=datetime.datetime(2000, 1, 1), max_value=datetime.datetime(2030, 1, 1)),
)
toml_values = st.recursive(
    toml_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=3), st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=5,
)


def _leaf_paths(cls: type) -> list[tuple[str, ...]]:
    """Dotted paths of every setting of a settings class (from its own ``describe()``)."""
    return [tuple(key.split(".")) for key, *_ in cls.describe()]


def _merge(base: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    node = out
    for key in path[:-1]:
        node[key] = dict(node.get(key) or {}) if isinstance(node.get(key), dict) else {}
        node = node[key]
    node[path[-1]] = value
    return out


@st.composite
def mutated_configs(draw: Any) -> tuple[type, dict[str, Any]]:
    """A valid config with 0-3 random mutations: wrong types, NaN/inf, negatives, unknown keys."""
    cls = draw(st.sampled_from(list(VALID_BASE)))
    base = VALID_BASE[cls]
    full = {**cls.from_dict(base).to_dict()}
    paths = _leaf_paths(cls)
    config = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for _ in range(draw(st.integers(0, 2))):
        path = draw(st.sampled_from(paths))
        kind = draw(st.sampled_from(["perturb", "perturb", "perturb", "value", "negative", "unknown", "section"]))
        default = _get(full, path) if _has(full, path) else None
        if kind == "perturb":  # a plausible valid change: scale a number, flip a flag
            if isinstance(default, bool):
                config = _merge(config, path, not default)
            elif isinstance(default, float):
                config = _merge(config, path, default * draw(st.floats(0.5, 2.0)))
            elif isinstance(default, int):
                config = _merge(config, path, default + draw(st.integers(0, 3)))
        elif kind == "value":
            config = _merge(config, path, draw(toml_values))
        elif kind == "negative":
            if isinstance(default, (int, float)) and not isinstance(default, bool):
                config = _merge(config, path, -abs(default) * draw(st.sampled_from([1, 2, 0])))
        elif kind == "unknown":
            config = _merge(config, (*path[:-1], path[-1] + draw(st.sampled_from(["_", "s", "x"]))), 1.0)
        else:
            config = _merge(config, path[:1], draw(toml_scalars))
    return cls, config


def _has(d: dict[str, Any], path: tuple[str, ...]) -> bool:
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return False
        d = d[key]
    return True


def _get(d: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        d = d[key]
    return d


def _contains_nonfinite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_contains_nonfinite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_contains_nonfinite(v) for v in value)
    return False


@settings(max_examples=40, deadline=None, derandomize=True)
@given(case=mutated_configs())
def test_settings_fuzz_only_usage_errors_and_toml_round_trip(case):
    cls, config = case
    try:
        obj = cls.from_dict(config)
    except UsageError as err:
        assert str(err) and "\n" not in str(err)  # one line naming the problem
        event("refused")
        return
    event("accepted")
    # accepted: every value is finite and the object survives a TOML round trip unchanged
    assert not _contains_nonfinite(obj.to_dict())
    again = cls.from_dict(tomllib.loads(obj.to_toml()))
    assert again.to_dict() == obj.to_dict()


@pytest.mark.parametrize("cls", list(VALID_BASE))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_every_float_setting_rejects_nan_and_inf(cls, bad):
    """Exhaustive (not random): each numeric setting of each model refuses NaN and +-inf."""
    full = cls.from_dict(VALID_BASE[cls]).to_dict()
    numeric = [p for p in _leaf_paths(cls) if isinstance(_get(full, p) if _has(full, p) else None, float)]
    assert numeric, f"{cls.__name__} has no float settings?"
    for path in numeric:
        with pytest.raises(UsageError, match="finite|must be|positive"):
            cls.from_dict(_merge(VALID_BASE[cls], path, bad))


@FUZZ
@given(key=st.sampled_from(["physics", "time", "mesh", "solver"]), typo=st.integers(0, 100))
def test_unknown_keys_suggest_the_nearest_valid_key(key, typo):
    full = DiffusionSettings.from_dict(VALID_BASE[DiffusionSettings]).to_dict()
    names = sorted(full[key])
    name = names[typo % len(names)]
    assume(len(name) >= 3)
    wrong = name[:-1] + ("x" if name[-1] != "x" else "y")
    assume(wrong not in full[key])
    with pytest.raises(UsageError, match=f"unknown setting '{key}.{wrong}'; did you mean '{name}'"):
        DiffusionSettings.from_dict(_merge(VALID_BASE[DiffusionSettings], (key, wrong), full[key][name]))


def test_image_refusals_are_input_errors():
    with pytest.raises(InputError, match="integer labels"):
        VoxelImage(np.full((3, 3), 0.5), (1e-8, 1e-8), {"a": 0}).check_labels()
