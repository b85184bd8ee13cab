"""Every cache key follows one rule (moee.util.cache_key.stage_key): each setting is either
read by the stage, and then changes its key, or named in the stage's ignore set. A new
setting fails here until it is one or the other."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import nn

from moee.config import CarveConfig, DistillConfig, ExtractConfig, LocalDistillConfig
from moee.extraction.budget import options_key
from moee.extraction.cluster_cache import clustering_key
from moee.extraction.local_distill import local_key
from moee.extraction.record import store_key
from moee.training.distill import run_key
from moee.util.cache_key import IGNORED
from moee_lab.study.matching import matching_key
from moee_lab.study.points import StudyPoint
from moee_lab.study.runner import point_key

# A value for each setting that is None by default, or a string, that a change can take.
OTHER: dict[str, Any] = {
    "record.dtype": "float32", "cluster.algorithm": "kmeans", "cluster.max_tokens": 1000,
    "cluster.max_clusters": 4, "cluster.dense_below_stability": 0.1,
    "cluster.merge_below_stability": 0.2, "select.criterion": "magnitude",
    "select.tokens": "cluster", "select.width": 0.5, "router.metric": "dot",
    "router.centres": "random", "budget.target_macs": 0.5, "budget.scope": "mlp",
    "budget.target_latency": 0.5, "budget.engine": "onnxruntime", "carve": CarveConfig(),
    "carve.style": "moefication", "local": LocalDistillConfig(), "layers": (0,),
    "work_dir": "elsewhere", "max_memory_gib": 1.0, "loss": "mse", "device": "cuda",
}


def _changed(path: str, value: Any) -> Any:
    if path in OTHER and value != OTHER[path]:
        return OTHER[path]
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value / 2
    if isinstance(value, tuple) and len(value) > 1:
        return value[:-1]
    raise AssertionError(f"setting {path}: add a value it can change to to OTHER")


def variants(config: Any, prefix: str = "") -> Iterator[tuple[str, Any, Any]]:
    """(setting, a config, the same config with that setting changed) for every setting
    of `config` and of the configs nested in it, also those unset (None) by default."""
    for f in dataclasses.fields(config):
        path, value = prefix + f.name, getattr(config, f.name)
        nested = value if value is not None else OTHER.get(path)  # set, or unset by default
        if not dataclasses.is_dataclass(value):
            yield path, config, dataclasses.replace(config, **{f.name: _changed(path, value)})
        if dataclasses.is_dataclass(nested):
            for sub, a, b in variants(nested, path + "."):
                yield (sub, dataclasses.replace(config, **{f.name: a}),
                       dataclasses.replace(config, **{f.name: b}))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(2, 2)


def _extraction_keys() -> dict[str, Callable[[ExtractConfig], str]]:
    """Each stage's key as the stage computes it, from a whole ExtractConfig."""
    origin = {"model": "m", "data": "d"}
    probe = [torch.ones(1, 2)]
    return {
        "record": lambda c: store_key("m", ["mlp"], c.record),
        "clustering": lambda c: clustering_key(origin, c, 0),
        "budget": lambda c: options_key(origin, c, probe, [0]),
        "local": lambda c: local_key(origin, 0, "start", c.local, c.held_out, c.seed),
        "study": lambda c: point_key(StudyPoint("g", "n", "s", c), 1.0, 100, 0),
        "matching": lambda c: matching_key(c, 0),
    }


def _ignored(stage: str, path: str) -> bool:
    parts = path.split(".")
    return any(".".join(parts[:n]) in IGNORED[stage] for n in range(1, len(parts) + 1))


def _key_cases() -> list[tuple[str, Callable[[Any], str], Any]]:
    cases = [(stage, key, ExtractConfig()) for stage, key in _extraction_keys().items()]
    student, teacher, data = _model(), _model(), [torch.ones(1, 2)]
    cases.append(("distill", lambda c: run_key(student, teacher, data, c), DistillConfig()))
    return cases


def test_every_stage_has_a_key_case_and_its_ignore_set_names_real_settings():
    cases = _key_cases()
    assert sorted(stage for stage, *_ in cases) == sorted(IGNORED)
    for stage, _, base in cases:
        paths = [p for p, *_ in variants(base)]
        unknown = [name for name in IGNORED[stage]
                   if not any(p == name or p.startswith(name + ".") for p in paths)]
        assert unknown == [], f"{stage}: the ignore set names no such setting"


@pytest.mark.parametrize("stage", sorted(IGNORED))
def test_every_setting_is_read_by_the_key_or_ignored(stage):
    (key, base), = [(k, b) for s, k, b in _key_cases() if s == stage]
    wrong = []
    for path, a, b in variants(base):
        same = key(a) == key(b)
        if same != _ignored(stage, path):
            wrong.append(path)
    assert wrong == [], (f"{stage}: these settings change the key but are ignored, or leave "
                         "it unchanged but are not in moee.util.cache_key.IGNORED")


def test_the_budgets_key_changes_with_the_seed_and_held_out():
    """The past defect: a second --seed reused the first seed's table of options."""
    key = _extraction_keys()["budget"]
    base = ExtractConfig()
    assert key(base) != key(dataclasses.replace(base, seed=1))
    assert key(base) != key(dataclasses.replace(base, held_out=0.3))
    assert key(base) == key(dataclasses.replace(base, budget=dataclasses.replace(
        base.budget, target_macs=0.4)))  # another target reuses the table


def test_progress_and_the_work_dir_change_no_key():
    for stage, key in _extraction_keys().items():
        base = ExtractConfig()
        for other in (dataclasses.replace(base, progress=False),
                      dataclasses.replace(base, work_dir="/somewhere/else")):
            assert key(base) == key(other), stage


def test_the_study_seed_changes_the_study_and_matching_keys():
    point = StudyPoint("g", "n", "s", ExtractConfig())
    assert point_key(point, 1.0, 100, 0) != point_key(point, 1.0, 100, 1)
    assert point_key(point, 1.0, 100, 0) != point_key(point, 0, 100, 0)
    assert matching_key(ExtractConfig(), 0) != matching_key(ExtractConfig(), 1)
