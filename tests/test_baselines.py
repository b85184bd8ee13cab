"""The random baseline (the paper's ablation rows) behind the same API and checkpoint."""

import dataclasses

import numpy as np
import pytest
import torch

import moee
from moee.extraction.cluster import cluster_layer
from moee.extraction.select import ClusterStats, select_experts


def _config(tmp_path, **changes):
    return moee.ExtractConfig(
        record=moee.RecordConfig(n_tokens=1000),
        cluster=moee.ClusterConfig(min_cluster_fraction=0.05, min_samples=5, reduce_dims=8,
                                   n_clusters=3),
        work_dir=str(tmp_path), progress=False, **changes)


def test_random_clusters_are_uniform_and_cover_every_token():
    hidden = np.random.default_rng(0).normal(size=(3000, 16)).astype(np.float32)
    c = cluster_layer(hidden, moee.ClusterConfig(algorithm="random", n_clusters=4))
    assert c.n_clusters == 4 and c.noise_fraction == 0.0
    counts = np.bincount(c.labels)
    assert counts.min() > 600  # about 750 each


def test_random_selection_keeps_as_many_neurons_as_variance_at_other_ids():
    rng = np.random.default_rng(1)
    var = rng.gamma(0.5, size=(3, 64))
    stats = ClusterStats(np.ones(3), np.zeros((3, 64)), var, np.zeros((3, 8)))
    by_variance = select_experts(stats, 0.7, moee.SelectConfig())
    at_random = select_experts(stats, 0.7, moee.SelectConfig(criterion="random"))
    assert [len(e) for e in at_random] == [len(e) for e in by_variance]
    assert all(len(np.unique(e)) == len(e) for e in at_random)
    assert any(not np.array_equal(a, b) for a, b in zip(at_random, by_variance, strict=True))


def test_random_method_extracts_saves_and_loads(vit, images, tmp_path):
    batches = [images[i : i + 40] for i in range(0, 240, 40)]
    config = _config(tmp_path).with_method("random")
    assert (config.cluster.algorithm, config.select.criterion, config.router.centres) == (
        "random", "random", "random")
    moe_model, report = moee.extract(vit, batches, config)
    moe_ref, _ = moee.extract(vit, batches, _config(tmp_path / "moee"))
    for layer, ref in zip(moe_model.moe_layers().values(), moe_ref.moe_layers().values(),
                          strict=True):
        assert layer.num_experts == 3
        # Random centres, not the clusters' mean inputs.
        assert not torch.allclose(layer.router_centres[:1], ref.router_centres[:1])
    assert all(r["experts"] == 3 for r in report.layers)
    loaded = moee.MoEModel.from_pretrained(moe_model.save_pretrained(tmp_path / "ckpt"))
    x = images[:8]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, moe_model(x).logits)


def test_the_run_seed_draws_every_random_stage(vit, images, tmp_path):
    """The random baseline draws clusters, neurons and centres: the same run seed gives the
    same model, another seed another draw at each of the three."""
    batches = [images[i : i + 40] for i in range(0, 240, 40)]

    def drawn(seed, folder):
        model, _ = moee.extract(vit, batches, _config(tmp_path / folder, seed=seed)
                                .with_method("random"))
        layer = next(iter(model.moe_layers().values()))
        return ([layer.expert_index(e).tolist() for e in range(layer.num_experts)],
                layer.router_centres.clone())

    (experts_a, centres_a), (experts_b, centres_b) = drawn(3, "a"), drawn(3, "b")
    experts_c, centres_c = drawn(4, "c")
    assert experts_a == experts_b and torch.equal(centres_a, centres_b)
    assert experts_a != experts_c and not torch.equal(centres_a, centres_c)


def test_unknown_method_and_centres_are_config_errors(tmp_path):
    with pytest.raises(moee.ConfigError, match="method"):
        _config(tmp_path).with_method("lora")
    with pytest.raises(moee.ConfigError, match="router.centres"):
        moee.RouterConfig(centres="median")
    assert dataclasses.asdict(_config(tmp_path).with_method("moee")) == dataclasses.asdict(
        _config(tmp_path))


def test_carving_shares_the_most_active_neurons_and_balances_the_rest():
    from moee.extraction.carve import carve_layer

    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(2000, 96)).astype(np.float32)
    hidden[:, :10] *= 5  # ten neurons active on almost every token
    config = moee.CarveConfig(active=0.4, experts=4, tokens=1000)
    experts, reps, shared_n = carve_layer(hidden, 96, config)
    assert shared_n == round(96 * (0.4 - 0.25) / 0.75)  # active = shared + routed / experts
    shared = set.intersection(*(set(e.tolist()) for e in experts))
    assert set(range(10)) <= shared and len(shared) == shared_n
    routed = [set(e.tolist()) - shared for e in experts]
    assert max(map(len, routed)) - min(map(len, routed)) <= 1  # balanced
    assert set().union(*routed, shared) == set(range(96))  # every neuron kept, none twice
    assert sum(map(len, routed)) == 96 - shared_n
    assert all(int(r) in g for r, g in zip(reps, routed, strict=True))  # its own expert's


def test_cmoe_method_extracts_with_dot_routing_saves_and_loads(vit, images, tmp_path):
    batches = [images[i : i + 40] for i in range(0, 240, 40)]
    config = _config(tmp_path).with_method("cmoe")
    assert config.router.metric == "dot" and config.carve == moee.CarveConfig()
    moe_model, report = moee.extract(vit, batches, config)
    for layer, row in zip(moe_model.moe_layers().values(), report.layers, strict=True):
        assert layer.metric == "dot" and layer.num_experts == 8
        assert layer.fc1.out_features == 48  # carving prunes nothing
        assert row["active_neurons_per_token"] == pytest.approx(0.4 * 48, abs=1.0)
        t = torch.randn(20, 16)
        with torch.no_grad():
            torch.testing.assert_close(layer(t), layer.forward_reference(t), atol=1e-5,
                                       rtol=1e-5)
    loaded = moee.MoEModel.from_pretrained(moe_model.save_pretrained(tmp_path / "ckpt"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(images[:4]).logits, moe_model(images[:4]).logits)
    with pytest.raises(moee.ConfigError, match="carve"):
        dataclasses.replace(config, budget=moee.BudgetConfig(target_macs=0.5))
    with pytest.raises(moee.ConfigError, match="carve.active"):
        moee.CarveConfig(active=0.1, experts=4)


def test_carved_experts_get_the_same_fitted_router_and_refit_as_moees(vit, images, tmp_path):
    """CMoE-style shared neurons measured with the new stages: the refit and the fitted
    router run on carved experts too, and the refit lowers the held-out output error."""
    batches = [images[i : i + 40] for i in range(0, 240, 40)]
    base = _config(tmp_path).with_method("cmoe")
    plain = dataclasses.replace(base, select=dataclasses.replace(base.select, refit_down=False))
    _, report = moee.extract(vit, batches, plain)
    assert all("reproduction" not in r for r in report.layers)
    fitted = dataclasses.replace(base, router=dataclasses.replace(base.router, centres="fitted"))
    _, report = moee.extract(vit, batches, fitted)
    for row in report.layers:
        refit = row["reproduction"]["refit"]
        assert refit["heldout_error_after"] <= refit["heldout_error_before"]
        assert "router" in row["reproduction"]


def test_moefication_subsets_route_exactly_as_top_k_groups():
    from moee.extraction.carve import moefication_layer

    rng = np.random.default_rng(2)
    rows = rng.normal(size=(64, 12))
    config = moee.CarveConfig(style="moefication", experts=4, top_k=2)
    experts, centres = moefication_layer(rows, config)
    assert len(experts) == 6 and centres.shape == (6, 12)  # C(4, 2) subsets
    groups = [set(e.tolist()) for e in experts[:3]]  # (0,1), (0,2), (0,3): group 0 in each
    group0 = set.intersection(*groups)
    assert len(group0) == 16  # balanced: 64 neurons in 4 groups of 16
    assert all(len(e) == 32 for e in experts)
    # top-1 over subsets scored by summed centres picks the top-2 groups of each token
    group_centres = np.linalg.lstsq(np.array([[1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1],
                                              [0, 1, 1, 0], [0, 1, 0, 1], [0, 0, 1, 1]]),
                                    centres, rcond=None)[0]  # (4, 12)
    x = rng.normal(size=(200, 12))
    top2 = np.sort(np.argsort(-(x @ group_centres.T), axis=1)[:, :2], axis=1)
    subsets = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    chosen = np.array(subsets)[(x @ centres.T).argmax(1)]
    np.testing.assert_array_equal(chosen, top2)


def test_moefication_method_extracts_top_k_of_groups(vit, images, tmp_path):
    batches = [images[i : i + 40] for i in range(0, 240, 40)]
    config = _config(tmp_path).with_method("moefication")
    moe_model, report = moee.extract(vit, batches, config)
    for layer, row in zip(moe_model.moe_layers().values(), report.layers, strict=True):
        assert layer.num_experts == 28  # C(8, 2)
        assert set(layer.expert_sizes()) == {12}  # 2 groups of 48 / 8 neurons
        assert row["active_neurons_per_token"] == pytest.approx(12)
        t = torch.randn(20, 16)
        with torch.no_grad():
            torch.testing.assert_close(layer(t), layer.forward_reference(t), atol=1e-5,
                                       rtol=1e-5)
