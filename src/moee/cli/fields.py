"""CLI options mapped onto config fields from one table: each row names an option, the config
field it sets (a dotted path such as "record.n_tokens") and how the option's value becomes the
field's. The same rows add the options to a parser (their defaults read from the config) and
build the config from the parsed arguments (moee.cli.options holds the tables)."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

# (the option's parsed value, every parsed argument, the base config's value of the field)
Convert = Callable[[Any, argparse.Namespace, Any], Any]


@dataclasses.dataclass(frozen=True)
class Option:
    """One row: `flag` ("--tokens"; None: a field computed from other options), `path` (the
    field it sets; None: an option another row's `convert` reads), `convert` (the option's
    value to the field's; default: as it is), `to_option` (the config's value to the
    option's default; default: as it is; a `default` in `settings` wins) and `settings`
    (add_argument's keywords; a callable `help` is given the base config)."""

    flag: str | None
    path: str | None
    convert: Convert | None = None
    to_option: Callable[[Any], Any] | None = None
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def dest(self) -> str:
        return self.settings.get("dest") or self.flag.lstrip("-").replace("-", "_")


def option(flag: str | None, path: str | None, convert: Convert | None = None,
           to_option: Callable[[Any], Any] | None = None, **settings: Any) -> Option:
    return Option(flag, path, convert, to_option, settings)


def field_value(config: Any, path: str) -> Any:
    for name in path.split("."):
        config = getattr(config, name)
    return config


def add_options(p: argparse.ArgumentParser, rows: Iterable[Option], base: Any,
                defaults: dict[str, Any] | None = None) -> None:
    """Add the rows' options to `p`, in order; each default from `defaults` (by flag), the
    row's `settings`, else the field's value in `base`."""
    for row in rows:
        if row.flag is None:
            continue
        settings = dict(row.settings)
        if callable(settings.get("help")):
            settings["help"] = settings["help"](base)
        if defaults and row.flag in defaults:
            settings["default"] = defaults[row.flag]
        elif "default" not in settings and row.path is not None:
            settings["default"] = (row.to_option or _same)(field_value(base, row.path))
        p.add_argument(row.flag, **settings)


def build_config(base: Any, rows: Iterable[Option], args: argparse.Namespace) -> Any:
    """`base` with every row's field set from the parsed `args`."""
    updates = {}
    for row in rows:
        if row.path is None:
            continue
        value = getattr(args, row.dest) if row.flag is not None else None
        updates[row.path] = (row.convert(value, args, field_value(base, row.path))
                             if row.convert else value)
    return _replace(base, updates)


def _replace(config: Any, updates: dict[str, Any]) -> Any:
    """dataclasses.replace by dotted paths: each sub-config replaced (and validated) once."""
    own, nested = {}, {}
    for path, value in updates.items():
        head, _, rest = path.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            own[path] = value
    for head, sub in nested.items():
        own[head] = _replace(getattr(config, head), sub)
    return dataclasses.replace(config, **own)


def _same(value: Any) -> Any:
    return value
