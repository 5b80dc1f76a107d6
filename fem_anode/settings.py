"""Typed, validated settings objects that can be read from and written to TOML.

Every model has one settings class built from these pieces; the same object drives the CLI,
the demos and the tests. A settings class is a dataclass whose fields are either sections
(dataclasses themselves) or values declared with :func:`setting`, which carries the
documentation, the SI unit and simple constraints::

    @dataclass
    class Physics(Section):
        D: float = setting(3.01e-10, "Li diffusivity in the transporting phase", unit="m^2/s", positive=True)

    @dataclass
    class DiffusionSettings(Settings):
        physics: Physics = section(Physics)

``DiffusionSettings.from_toml(path)`` rejects unknown keys (suggesting the nearest valid one),
wrong types and values outside their constraints with a :class:`~fem_anode.errors.UsageError`.

Objects built in Python are held to the same rules when they are constructed: a section may be
given as an object or as a nested dict (``DiffusionSettings(time={"t_end": 1.0})``), values are
converted to their declared types (an ``int`` for a ``float``, a ``str`` for a ``Path``), and an
unknown keyword, a wrong type or a value outside its constraints raises the
:class:`~fem_anode.errors.UsageError` the TOML path raises (``PhysicsSettings(D=-3e-10)``:
``PhysicsSettings.D must be positive, got -3e-10``; ``SolverSettings(typ="direct")``: ``unknown
setting 'SolverSettings.typ'; did you mean 'type'?``).
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import dataclasses
import difflib
import functools
import logging
import math
import tomllib
import types
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Self, TypeVar, get_args, get_origin

from fem_anode.errors import InputError, UsageError
from fem_anode.units import QUANTITIES, check_value

logger = logging.getLogger(__name__)

__all__ = ["Section", "Settings", "setting", "section", "dumps_toml", "read_toml"]

T = TypeVar("T")
_MISSING = dataclasses.MISSING

#: While set, constructing a section does not validate it (``from_dict`` and ``describe``
#: validate the finished object themselves, with the key paths of the file).
_DEFER_CHECK: contextvars.ContextVar[bool] = contextvars.ContextVar("fem_anode_defer_settings_check", default=False)


@contextlib.contextmanager
def _deferred_check() -> Iterator[None]:
    token = _DEFER_CHECK.set(True)
    try:
        yield
    finally:
        _DEFER_CHECK.reset(token)


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    """``typing.get_type_hints`` of a settings class, cached (it resolves string annotations)."""
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    return hints


_SECTION_NAMES: dict[type, str] = {}


def _section_name(cls: type) -> str | None:
    """The field name under which the top-level settings classes defined so far hold sections
    of type ``cls``, if they all use the same one."""
    names: set[str] = set()
    pending = list(Settings.__subclasses__())
    while pending:
        top = pending.pop()
        pending.extend(top.__subclasses__())
        if not dataclasses.is_dataclass(top):
            continue
        try:
            hints = _hints(top)
        except Exception:  # an unresolvable annotation elsewhere must not break a message
            continue
        names.update(f.name for f in dataclasses.fields(top) if hints.get(f.name) is cls)
    return names.pop() if len(names) == 1 else None


def _unknown_key_message(key: str, valid: list[str], where: str) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(valid)}"
    return f"unknown setting {_join(where, key)!r}{hint}"


def setting(
    default: Any = _MISSING,
    doc: str = "",
    *,
    unit: str | None = None,
    positive: bool = False,
    nonnegative: bool = False,
    choices: tuple | None = None,
    bounds: tuple[float | None, float | None] | None = None,
    required: bool = False,
) -> Any:
    """Declare a settings value with its documentation, SI unit and constraints.

    Args:
        default: default value; lists and dicts are copied per instance.
        doc: one-line description shown in ``describe()`` and the docs.
        unit: SI unit string (``"m"``, ``"m^2/s"``, ``"s"``) or ``None`` for dimensionless.
        positive: value (or every list entry) must be > 0.
        nonnegative: value (or every list entry) must be >= 0.
        choices: allowed values.
        bounds: inclusive ``(low, high)``; ``None`` for an open side.
        required: no default; the TOML must give it.
    """
    metadata = {
        "doc": doc,
        "unit": unit,
        "positive": positive,
        "nonnegative": nonnegative,
        "choices": choices,
        "bounds": bounds,
        "required": required,
    }
    if required or default is _MISSING:
        metadata["required"] = True
        return dataclasses.field(default=None, metadata=metadata)
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=functools.partial(copy.copy, default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def section(cls: type[T], doc: str = "") -> T:
    """Declare a nested section (a :class:`Section` dataclass) with its defaults."""
    return dataclasses.field(default_factory=cls, metadata={"doc": doc or (cls.__doc__ or "").strip().splitlines()[0]})


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a TOML value to the declared type ``tp`` or raise UsageError."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except UsageError as err:
                errors.append(str(err))
        raise UsageError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {_type_name(tp)}")
    if tp is Any:
        return value
    if _is_dataclass_type(tp):
        return value if isinstance(value, tp) else tp.from_dict(value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise UsageError(f"{where} must be true or false, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise UsageError(f"{where} must be a number, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise UsageError(f"{where} must be an integer, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise UsageError(f"{where} must be a string, got {value!r}")
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise UsageError(f"{where} must be a file path (string), got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise UsageError(f"{where} must be a list, got {value!r}")
        args = get_args(tp)
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise UsageError(f"{where} must be a table, got {value!r}")
        key_tp, val_tp = get_args(tp) or (Any, Any)
        return {_coerce(k, key_tp, where): _coerce(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    raise TypeError(f"unsupported settings type {tp!r} at {where}")  # programming error, not input


def _check_constraints(value: Any, meta: Mapping[str, Any], where: str) -> None:
    if value is None:
        return
    values = value if isinstance(value, (list, tuple)) else [value]
    for v in values:
        if isinstance(v, float) and not math.isfinite(v):
            raise UsageError(f"{where} must be finite, got {v!r}")
        if isinstance(v, float):
            check_value(v, None, where)  # numerical limits (error); plausibility is Settings.check's
        if meta.get("positive") and not v > 0:
            raise UsageError(f"{where} must be positive, got {v!r}")
        if meta.get("nonnegative") and not v >= 0:
            raise UsageError(f"{where} must be non-negative, got {v!r}")
        bounds = meta.get("bounds")
        if bounds is not None:
            low, high = bounds
            if (low is not None and v < low) or (high is not None and v > high):
                raise UsageError(f"{where} must lie in [{low}, {high}], got {v!r}")
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        close = (
            difflib.get_close_matches(value, [c for c in choices if isinstance(c, str)], n=1, cutoff=0.5)
            if isinstance(value, str)
            else []
        )
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UsageError(f"{where} must be one of {', '.join(map(repr, choices))}, got {value!r}{hint}")


class Section:
    """Base of a settings section; subclasses are dataclasses and may override :meth:`validate`.

    Constructing one validates it (:meth:`check`): unknown keywords raise a
    :class:`~fem_anode.errors.UsageError` with the nearest valid name, nested sections may be
    given as dicts, and values are converted to their declared types.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> Self:
        if kwargs and dataclasses.is_dataclass(cls):
            names = [f.name for f in dataclasses.fields(cls)]
            unknown = [k for k in kwargs if k not in names]
            if unknown:
                raise UsageError(_unknown_key_message(unknown[0], names, cls._where()))
        return super().__new__(cls)

    @classmethod
    def _where(cls) -> str:
        """Prefix of the key paths in messages about an object built in Python: the section's
        name in its settings file (``PhysicsSettings(D=-1)``: ``physics.D ...``, as from TOML),
        else the class name; a top-level :class:`Settings` has none."""
        name = _SECTION_NAMES.get(cls)
        if name is None:
            name = _section_name(cls)
            if name is not None:
                _SECTION_NAMES[cls] = name
        return name or cls.__name__

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        where = self._where()
        for f in dataclasses.fields(self):  # type: ignore[arg-type]  # every subclass is a dataclass
            value = getattr(self, f.name)
            if value is None:
                continue
            try:
                converted = _coerce(value, hints[f.name], _join(where, f.name))
            except TypeError:  # a type the settings machinery does not convert: leave it as given
                continue
            if converted is not value:
                object.__setattr__(self, f.name, converted)
        if not _DEFER_CHECK.get():
            self.check(where)

    def validate(self) -> None:
        """Cross-field checks; raise :class:`UsageError`. Single-field constraints are automatic."""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "") -> Self:
        """Build from a (TOML) mapping, rejecting unknown keys and wrong types."""
        if not isinstance(data, Mapping):
            raise UsageError(f"[{where or cls.__name__}] must be a table, got {data!r}")
        hints = _hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]  # every subclass is a dataclass
        unknown = [k for k in data if k not in fields]
        if unknown:
            raise UsageError(_unknown_key_message(unknown[0], list(fields), where))
        kwargs: dict[str, Any] = {}
        with _deferred_check():
            for name, value in data.items():
                tp = hints[name]
                path = _join(where, name)
                if _is_dataclass_type(tp):
                    kwargs[name] = value if isinstance(value, tp) else tp.from_dict(value, path)
                else:
                    kwargs[name] = _coerce(value, tp, path)
            obj = cls(**kwargs)
        obj.check(where)
        return obj

    def check(self, where: str = "") -> None:
        """Check every field's constraints, required fields and :meth:`validate`; recurse into sections."""
        hints = _hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]  # every subclass is a dataclass
            value = getattr(self, f.name)
            path = _join(where, f.name)
            if _is_dataclass_type(hints[f.name]):
                value.check(path)
                continue
            if f.metadata.get("required") and value is None:
                raise UsageError(f"missing required setting {path!r}: {f.metadata.get('doc', '')}")
            if isinstance(value, (list, tuple)) and value and all(isinstance(v, Section) for v in value):
                for i, item in enumerate(value):
                    item.check(f"{path}[{i}]")
                continue
            _check_constraints(value, f.metadata, path)
        self.validate()

    def implausible(self, where: str = "") -> list[str]:
        """Messages for the values outside the plausible range of their unit
        (:data:`fem_anode.units.QUANTITIES`; zero and values without a unit are not judged)."""
        messages: list[str] = []
        hints = _hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]  # every subclass is a dataclass
            value = getattr(self, f.name)
            path = _join(where, f.name)
            if _is_dataclass_type(hints[f.name]):
                messages.extend(value.implausible(path))
                continue
            if isinstance(value, (list, tuple)) and value and all(isinstance(v, Section) for v in value):
                for i, item in enumerate(value):
                    messages.extend(item.implausible(f"{path}[{i}]"))
                continue
            quantity = QUANTITIES.get(f.metadata.get("unit") or "")
            if quantity is None:
                continue
            for v in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(v, (int, float)) and not isinstance(v, bool) and v != 0 and math.isfinite(v):
                    low, high = quantity.plausible
                    if not low <= abs(v) <= high:
                        messages.append(
                            f"{path} = {v:g} {quantity.unit} is outside the plausible range of a {quantity.name} "
                            f"({low:g} to {high:g} {quantity.unit}); check its unit"
                        )
        return messages

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (paths as strings, tuples as lists, ``None`` values left out)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]  # every subclass is a dataclass
            value = getattr(self, f.name)
            if isinstance(value, Section):
                out[f.name] = value.to_dict()
            elif value is not None:
                out[f.name] = _plain(value)
        return out

    @classmethod
    def describe(cls, where: str = "") -> list[tuple[str, Any, str | None, str]]:
        """Rows ``(key, default, unit, doc)`` of every setting, for docs and ``--help``."""
        rows = []
        hints = _hints(cls)
        with _deferred_check():  # required settings have no default yet
            defaults = cls()
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]  # every subclass is a dataclass
            path = _join(where, f.name)
            if _is_dataclass_type(hints[f.name]):
                rows.extend(hints[f.name].describe(path))
            else:
                default = "(required)" if f.metadata.get("required") else getattr(defaults, f.name)
                rows.append((path, default, f.metadata.get("unit"), f.metadata.get("doc", "")))
        return rows

    def resolve_paths(self, base: Path) -> Self:
        """Copy with every relative path setting made relative to ``base`` (a config's folder)."""
        changes: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]  # every subclass is a dataclass
            value = getattr(self, f.name)
            if isinstance(value, Section):
                changes[f.name] = value.resolve_paths(base)
            elif isinstance(value, Path) and not value.is_absolute():
                changes[f.name] = Path(base) / value
            elif isinstance(value, list) and value and all(isinstance(v, Section) for v in value):
                changes[f.name] = [v.resolve_paths(base) for v in value]
        return dataclasses.replace(self, **changes) if changes else self  # type: ignore[type-var]  # every subclass is a dataclass

    @classmethod
    def with_overrides(cls, settings: Self | None = None, **overrides: Any) -> Self:
        """``settings`` (default: the defaults) with the fields in ``overrides`` changed, checked
        again (its fields may have changed since it was made): the ``settings=None, **overrides``
        arguments of a function in one call. A wrong class, an unknown name or a bad value is a
        :class:`~fem_anode.errors.UsageError`."""
        if settings is None:
            return cls(**overrides)
        if not isinstance(settings, cls):
            raise UsageError(f"settings must be a {cls.__name__}, got {type(settings).__name__}")
        if overrides:
            return settings.replace(**overrides)
        settings.check()
        return settings

    def replace(self, **changes: Any) -> Self:
        """Copy with some fields changed, validated again."""
        new = dataclasses.replace(self, **changes)  # type: ignore[type-var]  # every subclass is a dataclass
        new.check()
        return new


class Settings(Section):
    """Top-level settings: a set of sections, read from and written to TOML files."""

    @classmethod
    def _where(cls) -> str:
        return ""

    def check(self, where: str = "") -> None:
        """As :meth:`Section.check`, then log a warning for every value outside its plausible
        range (once per settings object and set of messages)."""
        super().check(where)
        messages = self.implausible(where)
        if messages and messages != getattr(self, "_implausible_logged", None):
            for message in messages:
                logger.warning("%s", message)
            object.__setattr__(self, "_implausible_logged", messages)

    @classmethod
    def from_toml(cls, path: str | Path) -> Self:
        """Read and validate a TOML file; relative paths inside stay relative to the caller."""
        data = read_toml(path)
        try:
            return cls.from_dict(data)
        except UsageError as err:
            raise UsageError(f"{path}: {err}") from None

    def to_toml(self, path: str | Path | None = None) -> str:
        """TOML text of these settings; also written (atomically) to ``path`` if given."""
        text = dumps_toml(self)
        if path is not None:
            from fem_anode.io.output import write_text_atomic

            write_text_atomic(path, text)
        return text


def read_toml(path: str | Path) -> dict[str, Any]:
    """The tables of a TOML file.

    Raises:
        InputError: missing or unreadable file.
        UsageError: not valid TOML.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"settings file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"cannot read settings file {path}: {err}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise UsageError(f"{path} is not valid TOML: {err}") from None


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _plain(value: Any) -> Any:
    if isinstance(value, Section):
        return value.to_dict()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else _toml_value(key)


def dumps_toml(settings: Section) -> str:
    """TOML text of a settings object: each section as a ``[table]``, mappings inline."""
    chunks: list[str] = []

    def emit(obj: Section, prefix: str) -> None:
        body, nested, arrays = [], [], []
        for f in dataclasses.fields(obj):  # type: ignore[arg-type]  # a settings dataclass
            value = getattr(obj, f.name)
            if isinstance(value, Section):
                nested.append((f.name, value))
            elif isinstance(value, (list, tuple)) and value and all(isinstance(v, Section) for v in value):
                arrays.append((f.name, value))
            elif value is not None:
                body.append(f"{_toml_key(f.name)} = {_toml_value(_plain(value))}")
        if prefix:
            chunks.append("\n".join([f"[{prefix}]", *body]))
        elif body:
            chunks.append("\n".join(body))
        for name, value in nested:
            emit(value, f"{prefix}.{name}" if prefix else name)
        for name, items in arrays:  # arrays of tables: [[name]]
            full = f"{prefix}.{name}" if prefix else name
            for item in items:
                lines = [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in item.to_dict().items()]
                chunks.append("\n".join([f"[[{full}]]", *lines]))

    emit(settings, "")
    return "\n\n".join(chunks) + "\n"
