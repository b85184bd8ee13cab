"""MAC-budget mode: the allocation over measured per-layer options, and end to end on a tiny
ViT (the predicted MAC fraction is what the flop counter then counts)."""

import itertools

import pytest
import torch

import moee
from moee.evaluate import count_macs, dense_mlp_macs
from moee.extraction import budget
from moee.extraction.budget import Option, _hull, allocate, by_macs


def _table():
    # Two layers: layer 0 is cheap to compress (loss grows slowly), layer 1 is sensitive.
    return [[Option(None, 100, 0.0), Option(0.9, 80, 0.01), Option(0.7, 60, 0.02),
             Option(0.5, 40, 0.04)],
            [Option(None, 100, 0.0), Option(0.9, 80, 0.5), Option(0.7, 60, 1.0),
             Option(0.5, 40, 2.0)]]


def _brute_force(table, fixed, dense, target):
    best = None
    for combo in itertools.product(*table):
        total = fixed + sum(o.macs for o in combo)
        loss = sum(o.divergence for o in combo)
        if total <= target * dense and (best is None or loss < best[0]):
            best = (loss, combo)
    return best


@pytest.mark.parametrize("target", [0.95, 0.85, 0.75, 0.65, 0.6])
def test_allocation_meets_the_budget_with_the_least_loss(target):
    table, fixed = _table(), 100.0  # the part of the model that is never converted
    choice, fraction = allocate(table, fixed, 300.0, target)
    assert fraction <= target
    assert fraction == pytest.approx((fixed + sum(o.macs for o in choice)) / 300.0)
    best_loss, _ = _brute_force(table, fixed, 300.0, target)
    assert sum(o.divergence for o in choice) == pytest.approx(best_loss)
    # The insensitive layer is compressed first.
    assert choice[0].macs <= choice[1].macs


def test_an_unreachable_budget_is_a_clear_error():
    with pytest.raises(moee.ConfigError, match="cheapest choice of the grid costs 0.600"):
        allocate(_table(), 100.0, 300.0, 0.5)


def test_the_hull_skips_options_dominated_by_a_cheaper_one():
    options = [Option(None, 100, 0.0), Option(0.9, 90, 0.5), Option(0.8, 80, 0.2),
               Option(0.99, 120, 0.0)]  # dearer than dense: never worth it
    assert [o.p for o in _hull(options, by_macs)] == [None, 0.8]


def test_budget_config_is_validated():
    for bad in ({"target_macs": 1.5}, {"target_macs": 0.0}, {"scope": "attention"},
                {"p_grid": ()}, {"p_grid": (0.9, 1.2)}, {"probe_batches": 0}):
        with pytest.raises(moee.ConfigError, match="budget"):
            moee.BudgetConfig(**bad)


def _config(tmp_path, target, scope):
    return moee.ExtractConfig(
        record=moee.RecordConfig(n_tokens=1000),
        cluster=moee.ClusterConfig(min_cluster_fraction=0.05, min_samples=5, reduce_dims=8),
        budget=moee.BudgetConfig(target_macs=target, scope=scope), work_dir=str(tmp_path),
        progress=False)


@pytest.mark.parametrize("scope", ["mlp", "model"])
def test_budget_mode_end_to_end_predicts_the_counted_macs(vit, images, tmp_path, scope,
                                                          monkeypatch):
    batches = [images[i : i + 40] for i in range(0, 240, 40)]
    target = 0.8 if scope == "mlp" else 0.9
    moe_model, report = moee.extract(vit, batches, _config(tmp_path, target, scope))
    probe = batches[:2]
    dense = sum(count_macs(vit, b) for b in probe)
    moe = sum(count_macs(moe_model, b) for b in probe)
    mlp = sum(dense_mlp_macs(vit, b.shape[0] * 5) for b in probe)  # 4 patches + CLS
    measured = (mlp - (dense - moe)) / mlp if scope == "mlp" else moe / dense
    assert report.budget["predicted_fraction"] == pytest.approx(measured, rel=1e-4)
    assert measured <= target
    ps = report.budget["p_per_layer"]
    assert [r["p"] for r in report.layers] == ps
    assert moe < dense
    # The measured options are kept: another target reuses them without measuring again.
    def fail(*args, **kwargs):
        raise AssertionError("options measured again")

    monkeypatch.setattr(budget, "measure_options", fail)
    _, again = moee.extract(vit, batches, _config(tmp_path, target - 0.1, scope))
    assert again.budget["predicted_fraction"] <= target - 0.1
    with torch.no_grad():
        assert moe_model(images[:4]).logits.shape == (4, 3)


def test_another_seed_measures_the_options_again(vit, images, tmp_path, monkeypatch):
    from dataclasses import replace

    batches = [images[i : i + 40] for i in range(0, 240, 40)]
    moee.extract(vit, batches, _config(tmp_path, 0.8, "mlp"))
    calls, real = [], budget.measure_options
    monkeypatch.setattr(budget, "measure_options",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    moee.extract(vit, batches, _config(tmp_path, 0.8, "mlp"))
    assert not calls  # the same seed reuses them
    moee.extract(vit, batches, replace(_config(tmp_path, 0.8, "mlp"), seed=1))
    assert calls == [1]


def test_extraction_leaves_the_global_rng_alone(vit, images, tmp_path):
    batches = [images[i : i + 40] for i in range(0, 240, 40)]
    config = moee.ExtractConfig(record=moee.RecordConfig(n_tokens=1000),
                                cluster=moee.ClusterConfig(min_cluster_fraction=0.05,
                                                           min_samples=5, reduce_dims=8),
                                work_dir=str(tmp_path), progress=False)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    moee.extract(vit, batches, config)
    assert torch.equal(torch.rand(3), expected)
