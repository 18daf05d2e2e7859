"""Command-line `key=value` words read by the declared type of their key.

OmegaConf's dotlist reads every value as YAML, so `run_name=off` becomes False and
`data.schema.time_format=%Y%m%d` is a YAML syntax error. Here a key declared as a string
keeps exactly what was typed (`null` still unsets an optional one); any other key is read
as YAML, and a value that is not valid YAML is a one-line error showing how to quote it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

UNKNOWN = object()  # the key is not declared anywhere (check_keys reports it later)


def field_types(cls: type) -> dict[str, Any]:
    """Type hints of the dataclass's fields (class attributes such as a method's `inputs` are not keys)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def dataclass_of(tp: Any) -> type | None:
    """The dataclass inside a type hint (X, X | None), if any."""
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (list, dict):
        return None
    for arg in typing.get_args(tp):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def _without_none(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def declared_type(root: type, path: list[str], model: type | None = None) -> Any:
    """The type hint of a dotted key under dataclass `root`; `model.*` keys are the method config's."""
    if path and path[0] == "model" and model is not None:
        root, path = model, path[1:]
    tp: Any = root
    for part in path:
        tp = _without_none(tp)
        inner = dataclass_of(tp)
        if inner is not None:
            hints = field_types(inner)
            if part not in hints:
                return UNKNOWN
            tp = hints[part]
        elif typing.get_origin(tp) is dict:
            tp = typing.get_args(tp)[1] if typing.get_args(tp) else Any
        elif typing.get_origin(tp) is list and part.isdigit():
            tp = typing.get_args(tp)[0] if typing.get_args(tp) else Any
        else:
            return Any
    return tp


def is_string(tp: Any) -> bool:
    return _without_none(tp) is str


def yaml_value(key: str, raw: str) -> Any:
    """`raw` read as OmegaConf reads a dotlist value; invalid YAML is an error that shows the quoting."""
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist([f"value={raw}"]))["value"]
    except (OmegaConfBaseException, yaml.YAMLError) as err:
        reason = " ".join(str(err).split())
        raise ValueError(f"{key}={raw}: not a valid YAML value ({reason}); quote it inside the word, e.g. '{key}=\"{raw}\"'") from None


def typed_dotlist(words: list[str], root: type, model: type | None = None) -> DictConfig:
    """`key=value` words -> a config tree, each value read by its key's declared type."""
    conf = OmegaConf.create({})
    for word in words:
        key, raw = word.split("=", 1)
        tp = declared_type(root, key.split("."), model)
        if tp is not UNKNOWN and is_string(tp) and not (raw in ("null", "~") and _without_none(tp) is not tp):
            value: Any = raw
        else:
            value = yaml_value(key, raw)
        try:
            OmegaConf.update(conf, key, value, merge=True)
        except OmegaConfBaseException as err:
            raise ValueError(f"{word}: {str(err).splitlines()[0]}") from None
    return conf
