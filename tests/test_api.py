"""End to end on a tiny ViT, and the bad-input paths of moee.extract."""

import logging

import numpy as np
import pytest
import torch

import moee
from moee.evaluate import count_macs


def small_config(tmp_path, **cluster):
    defaults = dict(min_cluster_fraction=0.05, min_samples=5, reduce_dims=8)
    return moee.ExtractConfig(record=moee.RecordConfig(n_tokens=1000),
                              cluster=moee.ClusterConfig(**{**defaults, **cluster}),
                              select=moee.SelectConfig(p=0.8), work_dir=str(tmp_path),
                              progress=False)


def test_extract_end_to_end(vit, images, tmp_path):
    batches = [images[i : i + 40] for i in range(0, 240, 40)]
    moe_model, report = moee.extract(vit, batches, small_config(tmp_path))
    assert report.n_tokens == 1000
    assert all(r["experts"] >= 2 for r in report.layers), report.table()
    layers = moe_model.moe_layers()
    assert len(layers) == 2
    for row in report.layers:
        assert abs(sum(row["load_share"]) - 1) < 1e-6
        assert row["kept_neurons"] <= 48
    x = images[:8]
    with torch.no_grad():
        for layer in layers.values():  # grouped forward equals the per-token reference
            t = torch.randn(30, 16)
            torch.testing.assert_close(layer(t), layer.forward_reference(t), atol=1e-5, rtol=1e-5)
        assert moe_model(x).logits.shape == (8, 3)
    assert count_macs(moe_model, x) < count_macs(vit, x)
    assert not any(isinstance(m, moee.MoEMLP) for m in vit.modules())  # input model untouched
    for stage in ("activations/store.json", "layer_0.*.labels.npy", "report.json", "plans.json"):
        assert list(tmp_path.glob(stage)), stage
    assert not moe_model.training and report.activations.startswith("recorded")
    # A second call with the same model and data reuses the recorded activations.
    again, report2 = moee.extract(vit, batches, small_config(tmp_path))
    assert report2.activations.startswith("reused")
    for a, b in zip(moe_model.moe_layers().values(), again.moe_layers().values(), strict=True):
        assert a.dense_experts() == b.dense_experts()


def test_stability_remedies_reuse_the_cached_clusterings(vit, images, tmp_path):
    batches = [images[i : i + 40] for i in range(0, 240, 40)]
    _, plain = moee.extract(vit, batches, small_config(tmp_path))
    stability = [r["stability"] for r in plain.layers]
    assert min(stability) < max(stability), stability  # the two layers differ
    threshold = (min(stability) + max(stability)) / 2
    _, merged = moee.extract(vit, batches,
                             small_config(tmp_path, merge_below_stability=threshold))
    assert "clusterings of 2 of 2 layers reused" in merged.activations
    assert [r["experts"] for r in merged.layers] == [
        1 if s < threshold else r["experts"] for s, r in zip(stability, plain.layers, strict=True)]
    _, dense = moee.extract(vit, batches, small_config(tmp_path, dense_below_stability=threshold))
    assert [r["experts"] == 0 for r in dense.layers] == [s < threshold for s in stability]


def test_stale_activations_are_recorded_anew_and_the_reason_is_given(vit, images, tmp_path):
    batches = [images[i : i + 40] for i in range(0, 240, 40)]
    moee.extract(vit, batches, small_config(tmp_path))
    other_data = [b.flip(-1) for b in batches]
    _, report = moee.extract(vit, other_data, small_config(tmp_path))
    assert report.activations == "recorded 1000 tokens (the calibration data changed)"
    with torch.no_grad():
        vit.vit.layers[0].mlp.fc1.weight.mul_(1.01)  # as fine-tuning would
    _, report = moee.extract(vit, other_data, small_config(tmp_path))
    assert report.activations == "recorded 1000 tokens (the model's weights changed)"
    config = small_config(tmp_path)
    config = moee.ExtractConfig(**{**config.__dict__, "record": moee.RecordConfig(n_tokens=900)})
    _, report = moee.extract(vit, other_data, config)
    assert report.activations == "recorded 900 tokens (the record settings changed)"
    _, report = moee.extract(vit, iter(other_data), config)  # a one-shot iterator works too
    assert report.activations.startswith("reused 900")


def test_without_work_dir_the_temporary_store_is_removed(vit, images, tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    batches = [images[i : i + 40] for i in range(0, 240, 40)]
    config = moee.ExtractConfig(**{**small_config(tmp_path).__dict__, "work_dir": None})
    moe_model, report = moee.extract(vit, batches, config)
    assert report.work_dir is None and len(moe_model.moe_layers()) == 2
    assert list(tmp_path.iterdir()) == []


def test_no_clusters_is_a_clear_error_that_keeps_the_store(vit, tmp_path):
    flat = [torch.zeros(40, 1, 8, 8)] * 6  # every token identical per position
    with pytest.raises(moee.NoClustersError, match="kept in"):
        moee.extract(vit, flat, small_config(tmp_path, min_cluster_fraction=0.9))
    assert (tmp_path / "activations" / "store.json").exists()


def test_data_smaller_than_min_cluster_size(vit, images, tmp_path):
    config = small_config(tmp_path, min_cluster_fraction=0.5)
    config = moee.ExtractConfig(**{**config.__dict__, "record": moee.RecordConfig(n_tokens=1)})
    with pytest.raises(moee.TooFewTokensError, match="minimum cluster size"):
        moee.extract(vit, [images[:1]], config)


def test_config_errors_name_the_field():
    with pytest.raises(moee.ConfigError, match="select.p"):
        moee.SelectConfig(p=1.5)
    with pytest.raises(moee.ConfigError, match="cluster.algorithm"):
        moee.ClusterConfig(algorithm="spectral")
    for bad in (2.5, "100", True):
        with pytest.raises(moee.ConfigError, match="record.n_tokens"):
            moee.RecordConfig(n_tokens=bad)


def test_every_deliberate_error_is_a_moee_error():
    errors = [getattr(moee, n) for n in moee.__all__ if n.endswith("Error")]
    assert len(errors) >= 8
    assert all(issubclass(e, moee.MoeeError) for e in errors)


@pytest.mark.parametrize("select", [moee.SelectConfig.paper(p=0.8),
                                    moee.SelectConfig(p=0.8, tokens="routed")])
def test_selection_token_sets(vit, images, tmp_path, select):
    """'routed' statistics count every token the router sends to an expert (noise too);
    'cluster' statistics count cluster members only."""
    config = moee.ExtractConfig(**{**small_config(tmp_path).__dict__, "select": select})
    batches = [images[i : i + 40] for i in range(0, 240, 40)]
    _, report = moee.extract(vit, batches, config)
    for row in report.layers:
        total = sum(row["cluster_tokens"])
        if select.tokens == "routed":
            assert total == report.n_tokens
        else:
            assert total == round(report.n_tokens * (1 - row["noise_fraction"]))


def test_memory_budget_clusters_a_subsample_and_assigns_every_token(vit, images, tmp_path,
                                                                     caplog):
    budget = 200 * 48 * 4 * 3 / 2**30  # room for 200 tokens of the 48-neuron layers
    config = moee.ExtractConfig(**{**small_config(tmp_path).__dict__, "max_memory_gib": budget,
                                   "progress": True})
    batches = [images[i : i + 40] for i in range(0, 240, 40)]
    with caplog.at_level(logging.INFO, logger="moee"):
        moe_model, report = moee.extract(vit, batches, config)
    assert report.config["cluster"]["max_tokens"] == 200
    assert "clustering 200 of 1000 tokens a layer" in caplog.text
    (labels_file,) = tmp_path.glob("layer_0.*.labels.npy")
    labels = np.load(labels_file)
    assert len(labels) == 1000 and (labels >= 0).sum() > 200  # beyond the clustered sample
