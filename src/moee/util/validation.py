"""Checks every settings dataclass runs on itself: a field's annotated type, then its range,
each failure a `ConfigError` naming the field."""

from __future__ import annotations

import numbers
import types
import typing
from dataclasses import fields
from typing import Any, Union

from moee.errors import ConfigError


def check(ok: bool, name: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: {msg}")


def _matches(value: Any, hint: Any) -> bool:
    """Whether `value` has the annotated type (int: any integer but bool; float: any real)."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(hint))
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint in (int, float):
        kind = numbers.Integral if hint is int else numbers.Real
        return isinstance(value, kind) and not isinstance(value, bool)
    if origin is tuple:
        item = typing.get_args(hint)[0]
        return isinstance(value, (tuple, list)) and all(_matches(v, item) for v in value)
    return isinstance(value, origin or hint)


def _plain(value: Any) -> Any:
    """numpy scalars and lists as the Python values JSON and the stages expect."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    return tuple(_plain(v) for v in value) if isinstance(value, list) else value


def check_types(config: Any, section: str) -> None:
    """Every field holds its annotated type (a wrong type fails here, naming the field, not
    deep inside a stage, e.g. n_tokens="100" in a memmap shape); numbers become plain."""
    hints = typing.get_type_hints(type(config))
    for f in fields(config):
        value, hint = getattr(config, f.name), hints[f.name]
        if not _matches(value, hint):
            raise ConfigError(f"{section}.{f.name}: must be of type "
                              f"{getattr(hint, '__name__', hint)}, got "
                              f"{type(value).__name__} {value!r}")
        if _plain(value) is not value:
            object.__setattr__(config, f.name, _plain(value))  # frozen: set once, here
