"""Config files: reading YAML mappings, a run's config from a file plus dotted overrides, saving it, comparing two.

Options are named by their dotted path (`grpo.beta`), in overrides, in errors and in `flat_options`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import yaml

from nested_reft.config.checks import ConfigError, from_dict, section_type, to_dict
from nested_reft.config.options import RESUMABLE_OPTIONS, TrainConfig
from nested_reft.store.files import atomic_write_text


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error (PyYAML keeps the last,
    so `seed: 1` below `seed: 2` would silently win)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, Hashable) and key in seen:  # an unhashable key is PyYAML's own error below
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            if isinstance(key, Hashable):
                seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml_mapping(path: str | os.PathLike, what: str) -> dict:
    """The mapping a YAML file holds (empty for an empty file); a ConfigError naming `what` and `path` if not."""
    try:
        values = yaml.load(Path(path).read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} {path} is a directory; give the path of a YAML file") from None
    except OSError as error:
        raise ConfigError(f"{what} {path} cannot be read: {error.strerror}") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{what} {path} is not UTF-8 text (byte {error.start}): save it as UTF-8") from None
    except yaml.MarkedYAMLError as error:  # one line: where, and what is wrong there
        where = f", line {error.problem_mark.line + 1}" if error.problem_mark else ""
        raise ConfigError(f"{what} {path}{where}: {error.problem} (not valid YAML)") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{what} {path} is not valid YAML: {error}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{what} {path} must hold a mapping of options")
    return values


def load_config(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """A TrainConfig from an optional YAML file plus dotted overrides ({"nesting.skip_ratio": 0.15})."""
    values: dict = read_yaml_mapping(path, "config file") if path is not None else {}
    for dotted, value in (overrides or {}).items():
        _check_dotted_name(dotted)
        target = values
        *sections, key = dotted.split(".")
        for depth, section in enumerate(sections, start=1):
            target = target.setdefault(section, {})
            if not isinstance(target, dict):  # `grpo: 5` in the file, and a flag sets grpo.num_generations
                name = ".".join(sections[:depth])
                raise ConfigError(f"{name} must be a mapping of options, got {target!r}"
                                  + (f" in config file {path}" if path is not None else ""))
        target[key] = value
    return from_dict(TrainConfig, values)


def _check_dotted_name(dotted: str) -> None:
    """Refuse an override whose name has an empty part (`--set =5`) or goes below a plain option
    (`model.name`), naming the whole option rather than what the override would make of it."""
    *sections, key = dotted.split(".")
    if not all([*sections, key]):
        raise ConfigError(f"option {dotted!r} has an empty name; expected SECTION.OPTION or OPTION")
    options = {spec.name for spec in dataclasses.fields(TrainConfig)}
    if sections and sections[0] in options and section_type(TrainConfig, sections[0]) is None:
        raise ConfigError(f"unknown option {dotted}: {sections[0]} is an option, not a section of options")


def config_differences(saved: TrainConfig, current: TrainConfig) -> list[str]:
    """The dotted options (outside RESUMABLE_OPTIONS) whose values differ, as "option: saved -> current"."""
    before, after = flat_options(to_dict(saved)), flat_options(to_dict(current))
    return [
        f"{name}: {before.get(name)!r} -> {after.get(name)!r}"
        for name in sorted(set(before) | set(after))
        if name not in RESUMABLE_OPTIONS and before.get(name) != after.get(name)
    ]


def flat_options(values: dict, prefix: str = "") -> dict:
    """{"grpo": {"beta": 0}} -> {"grpo.beta": 0}: the option names errors and trackers use."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flat_options(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def save_config(config: TrainConfig, path: Path) -> None:
    """Write the resolved config as YAML, atomically."""
    atomic_write_text(path, yaml.safe_dump(to_dict(config), sort_keys=False))
