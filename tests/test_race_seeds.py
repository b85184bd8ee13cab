"""benchmarks/race_seeds.py pairs each routed point with static pruning at the same budget and
summarises the difference over seeds; pareto_engines.py keeps each engine's Pareto front."""

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(name, series, top1):
    return {"name": name, "series": series, "group": "race",
            "before_kd": {"top1": 0.5, "macs_per_image": 1.0},
            "after_kd": {"top1": top1, "macs_per_image": 1.0}}


def test_routed_and_static_are_paired_by_budget_over_seeds():
    race = _load("race_seeds")
    by_seed = {0: [_row("routed, MAC budget 50%", "routed", 0.91),
                   _row("static, MAC budget 50%", "static", 0.90),
                   _row("routed, the demo (p 0.8)", "routed", 0.92),
                   _row("static, MAC budget 55% (the demo's MACs)", "static", 0.925)],
               1: [_row("routed, MAC budget 50%", "routed", 0.90),
                   _row("static, MAC budget 50%", "static", 0.91),
                   _row("routed, the demo (p 0.8)", "routed", 0.92),
                   _row("static, MAC budget 55% (the demo's MACs)", "static", 0.93)]}
    result = race.aggregate(by_seed)
    assert result["points"]["routed, MAC budget 50%"]["mean"] == pytest.approx(0.905)
    assert result["points"]["routed, MAC budget 50%"]["spread"] == pytest.approx(0.005)
    pair = result["pairs"]["MAC budget 50%"]
    assert pair["mean"] == pytest.approx(0.0) and pair["spread"] == pytest.approx(0.01)
    assert pair["wins"] == 1 and pair["seeds"] == 2
    demo = result["pairs"]["the demo"]
    assert demo["mean"] == pytest.approx(-0.0075) and demo["wins"] == 0


def test_the_pareto_front_keeps_the_points_nothing_beats():
    pareto = _load("pareto_engines")
    points = [(1.0, 90.0), (2.0, 92.0), (1.5, 89.0), (3.0, 91.0), (0.5, 85.0)]
    assert pareto.front(points) == [(0.5, 85.0), (1.0, 90.0), (2.0, 92.0)]
