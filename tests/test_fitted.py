"""`moee.fit`: record and cluster once, then plan any p or budget in memory and build; the
same models as `moee.extract` at each point."""

import gc
import tempfile
from dataclasses import replace

import pytest
import torch

import moee
from moee import fitted as fitted_module
from moee.extraction import fit as fit_module


def _config(work, p=0.8, **budget):
    return moee.ExtractConfig(
        record=moee.RecordConfig(n_tokens=1000),
        cluster=moee.ClusterConfig(min_cluster_fraction=0.05, min_samples=5, reduce_dims=8),
        select=moee.SelectConfig(p=p), budget=moee.BudgetConfig(p_grid=(0.95, 0.8, 0.6),
                                                                **budget),
        work_dir=None if work is None else str(work), progress=False)


def _batches(images):
    return [images[i : i + 40] for i in range(0, 240, 40)]


def _assert_same_model(a, b, x):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert {k: m.dense_experts() for k, m in a.moe_layers().items()} == {
        k: m.dense_experts() for k, m in b.moe_layers().items()}
    with torch.no_grad():
        assert torch.equal(a(x).logits, b(x).logits)


def _untimed(rows):
    """Report rows without the seconds each stage took."""
    if isinstance(rows, dict):
        return {k: _untimed(v) for k, v in rows.items() if "seconds" not in k}
    if isinstance(rows, list):
        return [_untimed(v) for v in rows]
    return rows


def test_plans_at_two_p_build_the_models_two_extracts_build(vit, images, tmp_path):
    fitted = moee.fit(vit, _batches(images), _config(tmp_path / "fit"))
    for p in (0.8, 0.6):
        plans = fitted.plan(p=p)
        assert plans.p_per_layer == [p, p] and plans.config.select.p == p
        moe_model, report = fitted.build(plans)
        expected, expected_report = moee.extract(vit, _batches(images),
                                                 _config(tmp_path / f"p{p}", p))
        _assert_same_model(moe_model, expected, images[:8])
        assert _untimed(report.layers) == _untimed(expected_report.layers)
        assert {**report.config, "work_dir": None} == {**expected_report.config,
                                                        "work_dir": None}
        assert (tmp_path / "fit" / "report.json").is_file()
        assert (tmp_path / "fit" / "plans.json").is_file()
    again, _ = fitted.build(fitted.plan(p=0.8))  # a p seen before: its plans from memory
    first, _ = moee.extract(vit, _batches(images), _config(tmp_path / "p0.8"))
    _assert_same_model(again, first, images[:8])
    assert not any(isinstance(m, moee.MoEMLP) for m in vit.modules())  # dense untouched


def test_plan_neither_records_nor_clusters_again(vit, images, tmp_path, monkeypatch):
    calls = {"record": 0, "cluster": 0}

    def counting(name, real):
        def call(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)
        return call

    monkeypatch.setattr(fitted_module, "record_activations",
                        counting("record", fitted_module.record_activations))
    monkeypatch.setattr(fit_module, "cluster_layer", counting("cluster", fit_module.cluster_layer))
    fitted = moee.fit(vit, _batches(images), _config(tmp_path))
    assert calls == {"record": 1, "cluster": 2}
    for p in (0.9, 0.7, 0.5):
        fitted.build(fitted.plan(p=p))
    fitted.plan(target_macs=0.8)
    assert calls == {"record": 1, "cluster": 2}


def test_the_plan_of_a_mac_budget_is_extract_s(vit, images, tmp_path):
    fitted = moee.fit(vit, _batches(images), _config(tmp_path / "fit"))
    plans = fitted.plan(target_macs=0.8)
    assert plans.budget["target_macs"] == 0.8 and plans.budget["predicted_fraction"] <= 0.8
    assert plans.p_per_layer == plans.budget["p_per_layer"]
    moe_model, report = fitted.build(plans)
    expected, expected_report = moee.extract(vit, _batches(images),
                                             _config(tmp_path / "extract", target_macs=0.8))
    assert report.budget == expected_report.budget
    _assert_same_model(moe_model, expected, images[:8])
    assert "MAC budget 0.8 of dense" in report.table()
    # the config's own budget when plan is asked for nothing, and one p overrides it
    budgeted = moee.fit(vit, _batches(images), _config(tmp_path / "fit", target_macs=0.8))
    assert budgeted.plan().budget == plans.budget
    assert budgeted.plan(p=0.9).budget == {}


def test_a_latency_budget_is_planned_with_the_engine_and_batch_asked_for(vit, images,
                                                                         tmp_path):
    from test_latency_budget import WeightTimer

    fitted = moee.fit(vit, _batches(images), _config(tmp_path))
    plans = fitted.plan(target_latency=0.9, batch=16, timer=WeightTimer())
    assert plans.budget["target_latency"] == 0.9 and plans.budget["batch"] == 16
    assert plans.budget["measured_fraction"] <= 0.9 * 1.05
    assert [r["method"] for r in plans.rows] == [c["method"] for c in plans.budget["choice"]]


def test_the_temporary_store_lives_as_long_as_the_fitted_extraction(vit, images, tmp_path,
                                                                   monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    fitted = moee.fit(vit, _batches(images), _config(None))
    (store,) = tmp_path.iterdir()
    assert (store / "activations" / "store.json").is_file()
    moe_model, report = fitted.build(fitted.plan(p=0.7))
    assert report.work_dir is None and len(moe_model.moe_layers()) == 2
    fitted.close()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(moee.MoeeError, match="closed"):
        fitted.plan(p=0.8)

    dropped = moee.fit(vit, _batches(images), _config(None))
    assert len(list(tmp_path.iterdir())) == 1
    del dropped
    gc.collect()
    assert list(tmp_path.iterdir()) == []

    with moee.fit(vit, _batches(images), _config(None)) as fitted:
        fitted.plan(p=0.8)
        assert len(list(tmp_path.iterdir())) == 1
    assert list(tmp_path.iterdir()) == []


def test_plan_takes_one_target(vit, images, tmp_path):
    fitted = moee.fit(vit, _batches(images), _config(tmp_path))
    with pytest.raises(moee.ConfigError, match="one of p, target_macs and target_latency"):
        fitted.plan(p=0.8, target_macs=0.5)
    with pytest.raises(moee.ConfigError, match="select.p"):
        fitted.plan(p=1.5)
    carved = moee.fit(vit, _batches(images),
                      replace(_config(tmp_path), carve=moee.CarveConfig(active=0.5))
                      .with_method("cmoe"))
    with pytest.raises(moee.ConfigError, match="carve"):
        carved.plan(target_macs=0.5)


def test_plan_arguments_and_fitting_settings_follow_the_config():
    from dataclasses import replace

    from moee.budget_config import BudgetConfig
    from moee.config import ExtractConfig
    from moee.plans import fitting_settings, plan_arguments

    base = ExtractConfig()
    at_p = replace(base, select=replace(base.select, p=0.7))
    macs = replace(base, budget=BudgetConfig(target_macs=0.5))
    latency = replace(base, budget=BudgetConfig(target_latency=0.6))
    assert plan_arguments(at_p) == {"p": 0.7}
    assert plan_arguments(macs) == {"target_macs": 0.5}
    assert plan_arguments(latency) == {"target_latency": 0.6}
    # what a plan chooses is left out of the fitting settings; what fitting reads is not
    assert fitting_settings(at_p) == fitting_settings(macs) == fitting_settings(latency)
    assert fitting_settings(replace(base, seed=1)) != fitting_settings(base)


def test_a_sweep_fits_once_per_fitting_setting_and_gives_extracts_models(vit, images, tmp_path,
                                                                        monkeypatch):
    from moee import sweep as sweep_module

    fits, data_made = [], []
    real_fit = sweep_module.fit
    monkeypatch.setattr(sweep_module, "fit", lambda *a, **k: fits.append(1) or real_fit(*a, **k))

    def data():  # a generator each time: one fit uses it up
        data_made.append(1)
        return iter(_batches(images))

    other = _config(None)
    other = replace(other, cluster=replace(other.cluster, min_samples=4))
    with moee.Sweep(vit, data, keep=1) as sweep:
        for config in (_config(None, 0.8), _config(None, 0.6), other, _config(None, 0.8)):
            before = len(fits)
            moe_model, _, seconds = sweep.extract(config)
            expected, _ = moee.extract(vit, _batches(images), config)
            _assert_same_model(moe_model, expected, images[:8])
            assert ("fit_seconds" in seconds) == (len(fits) > before)
        # p 0.8 and 0.6 share one fit; min_samples 4 needs another, which pushed the first
        # out (keep=1), so p 0.8 fits again
        assert len(fits) == len(data_made) == 3
        assert len(sweep.fits) == 1
        kept = next(iter(sweep.fits.values()))
    with pytest.raises(moee.MoeeError):
        kept.plan(p=0.8)  # closed with the sweep
