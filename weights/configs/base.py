"""What every config dataclass shares: reading and writing its JSON file, and checking fields by name and type.

A config.json that does not describe a model this project can build is refused with a `ConfigError` that
names the file, the field and what was expected, before any weight is read. No torch, no jax.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from typing import Any

from weights.atomic import atomic_write

PathLike = str | os.PathLike


class ConfigError(ValueError):
    """A config.json that does not describe a model this project can build."""


def check_config_keys(cls_name: str, raw: dict[str, Any], known: set[str], source: str) -> dict[str, Any]:
    # Keys starting with "_" are diffusers bookkeeping (_class_name, _diffusers_version, ...).
    fields = {k: v for k, v in raw.items() if not k.startswith("_")}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConfigError(
            f"{source}: unknown {cls_name} config keys {unknown}. This project knows {sorted(known)}; "
            "check that the folder holds the right model (a transformer config in vae/, say)."
        )
    return fields


def _type_name(tp: Any) -> str:
    """How a JSON value of type `tp` is described to a person: 'int', 'number or null', 'list of 3 int'."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if typing.get_origin(tp) is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {_type_name(args[0])}"
        return f"list of {len(args)} {_type_name(args[0])}"
    return {int: "int", float: "number", bool: "true/false", str: "string", type(None): "null"}.get(tp, str(tp))


def _matches(value: Any, tp: Any) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(v, args[0]) for v in value)
        return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args))
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if tp is type(None):
        return value is None
    return isinstance(value, tp)


def check_field_types(values: dict[str, Any], types_: dict[str, Any], source: str) -> None:
    """Raise ConfigError naming the file, the field and the expected type for the first value of `values`
    whose key is in `types_` and whose value does not have that type (JSON lists stand for tuples; a
    number must be finite; true/false is not a number)."""
    for key, value in values.items():
        if key in types_ and not _matches(value, types_[key]):
            raise ConfigError(
                f"{source}: field {key!r} is {json.dumps(value, default=str)[:80]} ({type(value).__name__}); "
                f"expected {_type_name(types_[key])}"
            )


def field_types(cls: type) -> dict[str, Any]:
    """The declared types of a config dataclass's fields (resolved from their annotations)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


class JsonConfig:
    """File and copy helpers shared by the config dataclasses (each defines to_dict; from_dict reads diffusers' JSON)."""

    @classmethod
    def from_json(cls, path: PathLike):
        return cls.from_dict(read_json(path), source=str(path))

    def to_json(self, path: PathLike) -> None:
        write_json(path, self.to_dict())

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config"):
        """A diffusers config.json's dict (keys, `_class_name` and field types checked); configs whose JSON is not
        diffusers' define their own."""
        fields = cls._diffusers_fields(raw, source)
        try:
            return cls(**fields)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def _diffusers_fields(cls, raw: dict[str, Any], source: str) -> dict[str, Any]:
        """The dataclass fields of a diffusers config.json, after checking its keys and `_class_name`."""
        fields = check_config_keys(cls.__name__, raw, {f.name for f in dataclasses.fields(cls)}, source)
        check_field_types(fields, field_types(cls), source)
        cls_name = raw.get("_class_name", cls.DIFFUSERS_CLASS)
        if cls_name != cls.DIFFUSERS_CLASS:
            raise ConfigError(f"{source}: _class_name is {cls_name!r}, expected {cls.DIFFUSERS_CLASS!r}")
        return fields


def read_json(path: PathLike) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return raw


def write_json(path: PathLike, data: dict[str, Any]) -> None:
    """Write JSON atomically: a crash leaves either the old file or the new one, never half of one (nor a temp file)."""
    text = json.dumps(data, indent=2, sort_keys=False) + "\n"  # serialise first: a bad value writes nothing
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(text)
