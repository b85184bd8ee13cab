"""Latency-budget mode: dense, static or routed per layer, chosen on measured seconds.

The allocation is checked with a deterministic timer (seconds = weights a module or model
multiplies), so that the choice and the target can be asserted; the real timers run once each
(torch, ONNX Runtime) for the mechanics, never for a speed figure."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moee
from moee.extraction.budget import Option, allocate
from moee.extraction.latency_budget import best_allocation, by_seconds, timing_batch
from moee.moe import MoEMLP


class WeightTimer:
    """Seconds = the neurons a token computes (a routed layer: its mean expert), plus a fixed
    1000 for the rest of a model: a stand-in for a clock that makes the choice reproducible."""

    engine = "weights"

    def time_layers(self, modules, x):
        return {k: _layer_cost(m) for k, m in modules.items()}

    def time_models(self, models, batch):
        return {k: 1000.0 + sum(_layer_cost(next((m for m in lay.modules()
                                                  if isinstance(m, MoEMLP)), None))
                                for lay in model.vit.layers)
                for k, model in models.items()}


def _layer_cost(m) -> float:
    if m is None:  # a dense ViT MLP of the tiny model
        return 100.0 * 48
    sizes = m.expert_sizes()
    return 100.0 * sum(sizes) / len(sizes)


def _config(tmp_path, target, engine="torch", batch=16):
    return moee.ExtractConfig(
        record=moee.RecordConfig(n_tokens=1000),
        cluster=moee.ClusterConfig(min_cluster_fraction=0.05, min_samples=5, reduce_dims=8),
        budget=moee.BudgetConfig(target_latency=target, engine=engine, batch=batch,
                                 p_grid=(0.95, 0.8, 0.6)),
        work_dir=str(tmp_path), progress=False)


def test_latency_budget_config_is_validated():
    for bad in ({"target_latency": 1.0}, {"target_latency": 0.0}, {"engine": "tensorrt"},
                {"batch": 0}, {"target_latency": 0.5, "target_macs": 0.5}):
        with pytest.raises(moee.ConfigError, match="budget"):
            moee.BudgetConfig(**bad)


def test_the_timing_batch_has_the_rows_asked_for():
    probe = [torch.arange(6.0).reshape(3, 2), torch.arange(6.0, 10.0).reshape(2, 2)]
    assert timing_batch(probe, 4).shape == (4, 2)
    assert torch.equal(timing_batch(probe, 7)[5:], probe[0][:2])  # repeated from the start
    pairs = [(x, torch.zeros(len(x))) for x in probe]
    assert timing_batch(pairs, 2)[0].shape == (2, 2)
    text = [{"input_ids": torch.ones(2, 5, dtype=torch.long)}]
    assert timing_batch(text, 3)["input_ids"].shape == (3, 5)


def _loss(choice):
    return sum(o.divergence for o in choice)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.tuples(st.sampled_from(["static", "moee"]),
                                   st.floats(1, 99), st.floats(0, 5)), min_size=1, max_size=4),
                min_size=1, max_size=3),
       st.floats(0.3, 0.95))
def test_the_mix_is_never_worse_than_one_method_alone(rows, target):
    table = [[Option(None, 0.0, 0.0, "dense", 100.0)]
             + [Option(0.5, 0.0, loss, method, sec) for method, sec, loss in row]
             for row in rows]
    dense = 100.0 * len(table) + 50.0
    try:
        mixed, fraction = best_allocation(table, 50.0, dense, target)
    except moee.ConfigError:  # then no single-method menu reaches the target either
        for method in ("static", "moee"):
            menu = [[o for o in row if o.method in ("dense", method)] for row in table]
            with pytest.raises(moee.ConfigError):
                allocate(menu, 50.0, dense, target, by_seconds)
        return
    assert 50.0 + sum(o.seconds for o in mixed) == pytest.approx(fraction * dense)
    assert fraction <= target + 1e-9
    for method in ("static", "moee"):
        menu = [[o for o in row if o.method in ("dense", method)] for row in table]
        try:
            alone, _ = allocate(menu, 50.0, dense, target, by_seconds)
        except moee.ConfigError:
            continue
        assert _loss(mixed) <= _loss(alone) + 1e-12


def test_latency_budget_end_to_end_meets_the_target_on_the_timer(vit, images, tmp_path,
                                                                   monkeypatch):
    from moee import api

    monkeypatch.setattr(api, "Runtime", lambda engine: WeightTimer())
    batches = [images[i : i + 40] for i in range(0, 240, 40)]
    moe_model, report = moee.extract(vit, batches, _config(tmp_path, 0.9))
    b = report.budget
    assert b["engine"] == "weights" and b["batch"] == 16
    assert b["measured_fraction"] <= 0.9 * 1.05
    first = b["rounds"][0]
    assert first["predicted_fraction"] == pytest.approx(first["measured_fraction"])
    methods = [c["method"] for c in b["choice"]]
    assert [r["method"] for r in report.layers] == methods
    assert set(methods) <= {"dense", "static", "moee"} and methods != ["dense"] * 2
    for row, c in zip(report.layers, b["choice"], strict=True):
        if c["method"] == "static":
            assert row["experts"] >= 1 and len(row["expert_sizes"]) == 1
    timed = WeightTimer().time_models({"m": moe_model.model, "d": vit}, None)
    assert timed["m"] / timed["d"] == pytest.approx(b["measured_fraction"])
    assert "latency budget 0.9 of dense in weights at batch 16" in report.table()
    with torch.no_grad():
        assert moe_model(images[:4]).logits.shape == (4, 3)


@pytest.mark.parametrize("engine", ["torch", "onnxruntime"])
def test_the_real_timers_time_layers_and_models(vit, images, engine, monkeypatch):
    if engine != "torch":
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnxscript")
    from moee.export.runtimes import Runtime

    timer = Runtime(engine, threads=1, repeats=2)
    layer = torch.nn.Sequential(torch.nn.Linear(16, 48), torch.nn.GELU(),
                                torch.nn.Linear(48, 16)).eval()
    seconds = timer.time_layers({"a": layer, "b": layer}, torch.randn(3, 5, 16))
    assert set(seconds) == {"a", "b"} and all(s > 0 for s in seconds.values())
    times = timer.time_models({"dense": vit.eval()}, images[:4])
    assert times["dense"] > 0
    if engine != "torch":  # a model seen before is not exported again
        from moee.export import onnx

        def fail(*args, **kwargs):
            raise AssertionError("exported again")

        monkeypatch.setattr(onnx, "export_onnx", fail)
        assert timer.time_models({"again": vit}, images[:8])["again"] > 0


def test_an_unknown_engine_is_refused():
    from moee.export.runtimes import Runtime

    with pytest.raises(moee.ConfigError, match="engine"):
        Runtime("tensorrt")


class InSituTimer(WeightTimer):
    """A model whose layers cost twice inside it what they cost alone: the naive sum misses,
    the refitted line does not."""

    def time_models(self, models, batch):
        alone = super().time_models(models, batch)
        return {k: 2 * v - 1000.0 for k, v in alone.items()}


def test_the_choice_is_made_again_on_the_line_the_measured_models_give(vit, images, tmp_path,
                                                                      monkeypatch):
    from moee import api

    monkeypatch.setattr(api, "Runtime", lambda engine: InSituTimer())
    batches = [images[i : i + 40] for i in range(0, 240, 40)]
    _, report = moee.extract(vit, batches, _config(tmp_path, 0.8))
    rounds = report.budget["rounds"]
    assert rounds[0]["measured_fraction"] < rounds[0]["predicted_fraction"] - 0.05
    assert len(rounds) >= 2
    assert rounds[1]["predicted_fraction"] == pytest.approx(rounds[1]["measured_fraction"])
    assert report.budget["measured_fraction"] == rounds[-1]["measured_fraction"]


@pytest.mark.parametrize("method", ["static", "moee"])
def test_the_menu_can_be_one_method(vit, images, tmp_path, monkeypatch, method):
    from dataclasses import replace

    from moee import api

    monkeypatch.setattr(api, "Runtime", lambda engine: WeightTimer())
    batches = [images[i : i + 40] for i in range(0, 240, 40)]
    config = _config(tmp_path, 0.9)
    config = replace(config, budget=replace(config.budget, methods=(method,)))
    _, report = moee.extract(vit, batches, config)
    assert {c["method"] for c in report.budget["choice"]} <= {"dense", method}
    with pytest.raises(moee.ConfigError, match="budget.methods"):
        replace(config.budget, methods=("cmoe",))


class ThreeTimesInSituTimer(WeightTimer):
    """Layers cost three times inside the model what they cost alone: by the naive sum the
    target is out of reach, by the measured models it is not."""

    def time_models(self, models, batch):
        alone = super().time_models(models, batch)
        return {k: 3 * v - 2000.0 for k, v in alone.items()}


def test_a_target_the_naive_sum_puts_out_of_reach_measures_the_fastest_choice_first(
        vit, images, tmp_path, monkeypatch):
    from moee import api

    monkeypatch.setattr(api, "Runtime", lambda engine: ThreeTimesInSituTimer())
    batches = [images[i : i + 40] for i in range(0, 240, 40)]
    _, report = moee.extract(vit, batches, _config(tmp_path, 0.7))
    rounds = report.budget["rounds"]
    assert rounds[0]["predicted_fraction"] > 0.7  # the fastest choice, by the naive line
    assert rounds[0]["measured_fraction"] < 0.7
    assert len(rounds) >= 2 and report.budget["reached"]
    assert report.budget["measured_fraction"] <= 0.7 * 1.05
