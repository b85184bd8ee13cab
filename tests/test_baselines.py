"""The random baseline (the paper's ablation rows) behind the same API and checkpoint."""

import dataclasses

import numpy as np
import pytest
import torch

import moee
from moee.cluster import cluster_layer
from moee.select import ClusterStats, select_experts


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
    by_variance = select_experts(stats, moee.SelectConfig(p=0.7))
    at_random = select_experts(stats, moee.SelectConfig(p=0.7, criterion="random"))
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


def test_unknown_method_and_centres_are_config_errors(tmp_path):
    with pytest.raises(moee.ConfigError, match="method"):
        _config(tmp_path).with_method("moefication")
    with pytest.raises(moee.ConfigError, match="router.centres"):
        moee.RouterConfig(centres="median")
    assert dataclasses.asdict(_config(tmp_path).with_method("moee")) == dataclasses.asdict(
        _config(tmp_path))
