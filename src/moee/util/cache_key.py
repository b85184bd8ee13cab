"""Keys of cached results: one rule for every result kept on disk.

A stage's key is the digest of its input key (what the result was made from: the model's
digest, the calibration data's or the activation store's origin, the previous stage's key)
and of the full settings it was given (`ExtractConfig`, `DistillConfig`, as plain data),
less the settings the stage provably does not read (`IGNORED`). A setting is either read
(and then in the key) or named in the table: tests/test_cache_keys.py checks every field."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

_NOT_EXTRACTION = frozenset({"work_dir", "progress"})  # where results go, what is shown

# Per stage, the settings it provably does not read, as dotted fields of the settings it is
# keyed on (ExtractConfig's for the extraction stages and the study, DistillConfig's for
# distillation); a name covers every field under it.
IGNORED: dict[str, frozenset[str]] = {
    # The activation store reads the record settings alone (its model, MLP blocks and data
    # are its input).
    "record": _NOT_EXTRACTION | {"cluster", "select", "router", "budget", "carve", "local",
                                 "layers", "max_memory_gib", "held_out", "seed"},
    # A layer's clustering, before any remedy for instability (the remedies act on the cached
    # clustering); `max_memory_gib` acts through `cluster.max_tokens`, which it sets; the
    # store's origin (its input) carries the record settings.
    "clustering": _NOT_EXTRACTION | {
        "record", "select", "router", "budget", "carve", "local", "layers", "max_memory_gib",
        "held_out", "cluster.dense_below_stability", "cluster.merge_below_stability"},
    # The MAC budget's table of every layer's options: measured at every p of `p_grid`
    # whatever the target, the scope and `select.p`; the latency budget keeps no table;
    # layer-local distillation runs after the choice.
    "budget": _NOT_EXTRACTION | {
        "select.p", "budget.target_macs", "budget.scope", "budget.target_latency",
        "budget.engine", "budget.batch", "budget.methods", "local", "max_memory_gib"},
    # One layer's layer-local distillation: it starts from the layer's weights (its input,
    # which the earlier stages' settings made) and reads `local`, `held_out` and `seed`.
    "local": _NOT_EXTRACTION | {"record", "cluster", "select", "router", "budget", "carve",
                                "layers", "max_memory_gib"},
    # A study point and a matched knob: the study sets the work dir and progress itself and
    # runs every extraction with its own seed (part of the input key).
    "study": _NOT_EXTRACTION | {"seed"},
    "matching": _NOT_EXTRACTION | {"seed"},
    # A distillation run's resumable state reads every DistillConfig field.
    "distill": frozenset(),
}


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
    """SHA-256 of `body` as canonical JSON (sorted keys; paths as strings)."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def _without(settings: Any, ignore: frozenset[str], prefix: str = "") -> Any:
    if not isinstance(settings, dict):
        return settings
    return {k: _without(v, ignore, f"{prefix}{k}.") for k, v in settings.items()
            if f"{prefix}{k}" not in ignore}


def stage_key(stage: str, input_key: Any, settings: Any) -> str:
    """The key of a result of `stage` (a name of `IGNORED`) made from `input_key` under
    `settings`: the stage's whole config, or the part of it the stage is handed (what it is
    not handed must be in its ignore set)."""
    kept = _without(settings_dict(settings), IGNORED[stage])
    return digest({"stage": stage, "input": settings_dict(input_key), "settings": kept})
