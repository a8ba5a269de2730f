"""Checking and converting options: the error naming an option, type checks, dataclasses to and from plain dicts.

`from_dict` turns YAML and command-line values into the fields' types and rejects unknown keys by their dotted name;
the dataclasses' own checks (`check_types`, `check_option`) then name the option of a value out of range.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any


class ConfigError(ValueError):
    """A configuration value or key that is not valid; the message names the option."""


def default_of(cls: type, name: str) -> Any:
    """The default of field `name` of dataclass `cls`."""
    return {f.name: f.default for f in dataclasses.fields(cls)}[name]


def check_option(ok: bool, option: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{option} must be {expected}, got {value!r}")


def check_path_component(value: Any, option: str) -> None:
    """Refuse a name that becomes one directory of a path (a grid's name, a warm-up's or a variant's label) unless it
    is one: letters, digits, '.', '_' or '-', and not only dots ('.' is the directory itself, '..' its parent, so
    two runs would share a directory)."""
    name = value if isinstance(value, str) else ""
    check_option(bool(re.fullmatch(r"[\w.-]+", name)) and name.strip(".") != "", option, value,
                 "a name of letters, digits, '.', '_' or '-', not only dots (it names a directory)")


def check_types(config: Any, prefix: str) -> None:
    """Every option of a config dataclass holds its declared type, numbers finite: checked before the ranges, so
    that a list where a name belongs, or an infinite learning rate, stops the run at start-up naming the option
    (and never becomes a directory named "['a', 'b']", or a run that diverges at its first step)."""
    for spec in dataclasses.fields(config):
        value = getattr(config, spec.name)
        if not dataclasses.is_dataclass(value):
            expected = _expected_type(value, str(spec.type))
            check_option(expected is None, f"{prefix}{spec.name}", value, expected or "")


def _expected_type(value: Any, annotation: str) -> str | None:
    """What `value` should be for a field annotated `annotation` (str, int, float, bool, tuple[str, ...], each
    optionally "| None"), or None when it is that."""
    kind, _, optional = annotation.partition(" | ")
    if value is None:
        return None if optional == "None" else f"a {kind} (not null)"
    if kind.startswith("tuple"):
        return None if isinstance(value, tuple) and all(isinstance(item, str) for item in value) else "a list of names"
    if kind == "float":
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        return None if number and math.isfinite(value) else "a finite number"
    wanted, description = {"str": (str, "a string"), "int": (int, "an integer"), "bool": (bool, "true or false")}.get(
        kind, (object, ""))  # another annotation (none so far) is not checked here
    right = isinstance(value, wanted) and (wanted is bool or not isinstance(value, bool))
    return None if right else description


def to_dict(config: Any) -> dict:
    """A plain, YAML-ready dict of a config dataclass (tuples become lists)."""
    return dataclasses.asdict(config, dict_factory=lambda items: {k: _plain(v) for k, v in items})


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def from_dict(cls: type, values: dict, where: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, rejecting unknown keys by their full dotted name. Fields that `cls`
    lists in a class attribute OMITTED_OPTIONS are not options there (what uses it sets them)."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where.rstrip('.') or 'config'} must be a mapping of options, got {type(values).__name__}")
    omitted = getattr(cls, "OMITTED_OPTIONS", ())
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in omitted}
    unknown = sorted(set(values) - set(fields), key=str)  # YAML keys may be numbers too
    if unknown:
        names = ", ".join(f"{where}{key}" for key in unknown)
        raise ConfigError(f"unknown option(s) {names}; valid options here: {', '.join(sorted(fields))}")
    kwargs = {}
    for key, value in values.items():
        nested_type = section_type(cls, key)
        if nested_type is not None:
            kwargs[key] = from_dict(nested_type, {} if value is None else value, f"{where}{key}.")
        else:
            kwargs[key] = _coerce(value, fields[key], f"{where}{key}")
    try:
        return cls(**kwargs)
    except TypeError as error:
        raise ConfigError(f"{where or 'config'}: {error}") from None


def section_type(cls: type, name: str) -> type | None:
    """The dataclass of option `name` of `cls` where it is a section of options (its default one), else None."""
    default = {f.name: f for f in dataclasses.fields(cls)}[name]
    if default.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        made = default.default_factory()  # type: ignore[misc]
        return type(made) if dataclasses.is_dataclass(made) else None
    return None


def _coerce(value: Any, spec: dataclasses.Field, option: str) -> Any:
    """Turn YAML/CLI values into the field's type (ints from strings, lists into tuples)."""
    annotation = str(spec.type)
    # `--set model.x=1`, or a section of options under a plain option in a file
    if isinstance(value, dict) and not annotation.startswith("dict"):
        raise ConfigError(f"{option} is a single value, not a section of options; got {value!r}")
    try:
        if value is None or annotation.startswith("str"):  # a number may name a directory; a list may not
            return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value
        if annotation.startswith("tuple"):
            if isinstance(value, (str, list)):  # anything else is left for `check_types` to name
                return tuple(value.split(",")) if isinstance(value, str) else tuple(value)
            return value
        if annotation.startswith("bool"):
            return _as_bool(value)
        if isinstance(value, bool) and not annotation.startswith("bool"):
            raise ValueError(value)  # int(True) would pass silently
        if annotation.endswith("| None") and value in ("None", "none", "null"):
            return None
        if annotation.startswith("int"):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)  # int(2.5) would truncate silently
            return int(value)
        if annotation.startswith("float"):
            return float(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: int(inf)
        raise ConfigError(f"{option} must be a {annotation}, got {value!r}") from None
    return value


def _as_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "1", "yes"):
        return True
    if str(value).lower() in ("false", "0", "no"):
        return False
    raise ValueError(value)
