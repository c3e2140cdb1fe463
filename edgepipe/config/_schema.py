"""Turn TOML tables into validated dataclasses, with errors that name file, field, value and what is allowed."""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

from edgepipe._fs import read_bounded
from edgepipe.errors import ConfigError

T = TypeVar("T")


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is tuple:
        return f"list of {_type_name(get_args(tp)[0])}"
    if origin is dict:
        return "table"
    if dataclasses.is_dataclass(tp):
        return "table"
    return getattr(tp, "__name__", str(tp))


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:  # `X | None`: X's own message says more (e.g. a table's bad field)
            raise errors[0]
        raise ConfigError(f"{where} = {value!r}: expected {_type_name(tp)}")
    if origin is Literal:
        if value not in get_args(tp):
            allowed = ", ".join(repr(a) for a in get_args(tp))
            raise ConfigError(f"{where} = {value!r} is not allowed; choose one of {allowed}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where} = {value!r}: expected a list")
        (item,) = get_args(tp)[:1]
        return tuple(_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} = {value!r}: expected a table")
        _, vt = get_args(tp)
        return {str(k): _coerce(vt, v, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where} = {value!r}: expected a table")
        return from_dict(tp, value, where)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where} = {value!r}: expected a number")
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise ConfigError(f"{where} = {value!r}: expected a finite number (not nan or inf)")
        return number
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} = {value!r}: expected an integer")
        return value
    if tp in (str, bool):
        if not isinstance(value, tp):
            raise ConfigError(f"{where} = {value!r}: expected {tp.__name__}")
        return value
    raise TypeError(f"unsupported schema type {tp!r} at {where}")


#: keys that one backend has and another lacks: what the error says about where they exist
KEY_HINTS = {
    "activation_type": "16-bit activations: onnxruntime's activation_type = \"uint16\" and tflite's activations = "
                       "\"int16\"; openvino and tensorrt have none",
    "activations": "16-bit activations: tflite's activations = \"int16\" and onnxruntime's activation_type = "
                   "\"uint16\"; openvino and tensorrt have none",
}


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ``ConfigError``."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        hint = KEY_HINTS.get(unknown[0], "")
        raise ConfigError(
            f"unknown key '{prefix}{unknown[0]}'; allowed keys here: {', '.join(sorted(fields))}"
            + (f" ({hint})" if hint else "")
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{where}.{name}" if where else name)
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"missing required key {(where + '.' if where else '') + missing[0]!r}")
    return cls(**kwargs)


#: a name that becomes a file or directory name (a target's ``name`` is its release directory): one plain path
#: component, so no name can point outside the directory it is written into
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}")


def check_name(value: str, where: str) -> str:
    """``value`` when it is one safe path component (letters, digits, ``._+-``, starting with a letter or digit,
    at most 100 characters); else a ``ConfigError`` naming ``where``."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ConfigError(f"{where} = {value!r}: a name becomes a directory name, so it must be 1-100 letters, "
                          "digits, '.', '_', '+' or '-', starting with a letter or digit (no '/', '..', spaces)")
    return value


def to_dict(obj: Any) -> dict[str, Any]:
    """A dataclass as a TOML-ready dict: tuples become lists, ``None`` values are left out."""

    def clean(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: clean(getattr(v, f.name)) for f in dataclasses.fields(v)
                    if f.init and getattr(v, f.name) is not None}
        if isinstance(v, tuple | list):
            return [clean(x) for x in v]
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items() if x is not None}
        return v

    return clean(obj)


def load_toml(path: Path, kind: str) -> dict[str, Any]:
    """Read a TOML file as a dict, with ``name`` defaulting to the file's stem.

    Args:
        path: the file.
        kind: what it is, for the error message ("target", "recipe").
    """
    import tomllib

    text = read_bounded(path, MAX_CONFIG_BYTES, f"{kind} file").decode("utf-8", errors="replace")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{kind} file {str(path)!r} is not valid TOML: {e}") from None
    except RecursionError:
        raise ConfigError(f"{kind} file {str(path)!r} nests its tables or arrays too deeply to be read; a {kind} "
                          "file needs a few levels at most") from None
    data.setdefault("name", path.stem)
    return data


#: the largest target, recipe or search file read: real ones are a few KiB
MAX_CONFIG_BYTES = 1 << 20

