"""Keys of cached results: a digest of the settings and inputs a result was made from."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any


def settings_dict(config: Any) -> Any:
    """A config as plain data, with every None-valued setting left out: a new optional
    setting (None by default) leaves the keys of results cached before it existed unchanged,
    and they stay valid."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    if isinstance(config, dict):
        return {k: settings_dict(v) for k, v in config.items() if v is not None}
    if isinstance(config, (list, tuple)):
        return [settings_dict(v) for v in config]
    return config


def digest(body: Any) -> str:
    """SHA-256 of `body` as canonical JSON (sorted keys)."""
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
