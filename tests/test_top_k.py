"""Top-k routing (each token computes the union of its k most similar experts) against a
per-token reference built from the experts before they are combined."""

import dataclasses
from math import comb

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moee
from moee.extraction.top_k import top_k_router
from moee.moe import MoEMLP

D, H, E = 16, 48, 5


def _experts_and_centres(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    experts = [np.sort(torch.randperm(H, generator=g)[: 6 + 5 * i].numpy()) for i in range(E)]
    return experts, torch.randn(E, D, generator=g).double().numpy()


def _reference(fc1, fc2, experts, centres, metric, k, x):
    """Per token: score every expert, take the k best, run the dense MLP on the union of
    their neurons (every other hidden unit zero)."""
    c = torch.as_tensor(centres, dtype=torch.float32)
    scores = F.normalize(x, dim=-1) @ F.normalize(c, dim=-1).T if metric == "cosine" else x @ c.T
    best = scores.topk(k, dim=-1).indices
    hidden = F.gelu(fc1(x))
    mask = torch.zeros_like(hidden)
    for t, chosen in enumerate(best.tolist()):
        mask[t, np.unique(np.concatenate([experts[e] for e in chosen]))] = 1
    return fc2(hidden * mask), mask.sum(-1)


def _top_k_moe(metric: str, k: int):
    torch.manual_seed(1)
    fc1, fc2 = nn.Linear(D, H), nn.Linear(H, D)
    experts, centres = _experts_and_centres()
    counts = np.ones(E)
    router = top_k_router(centres, metric, np.zeros((E, H)), counts, k)
    union, rows = router.union_experts(experts), router.rows
    moe = MoEMLP(fc1, fc2, nn.GELU(), [torch.as_tensor(u) for u in union],
                 torch.as_tensor(rows), torch.arange(H), "dot").eval()
    return moe, fc1, fc2, experts, centres


@pytest.mark.parametrize("execution", ["experts", "masked", "grouped"])
@pytest.mark.parametrize("presliced", [True, False])
@pytest.mark.parametrize("metric", ["cosine", "dot"])
@pytest.mark.parametrize("k", [2, 3])
def test_top_k_equals_per_token_reference_in_every_execution(execution, presliced, metric, k):
    moe, fc1, fc2, experts, centres = _top_k_moe(metric, k)
    assert moe.num_experts == comb(E, k)
    moe.configure(execution=execution, presliced=presliced, small_batch_tokens=0)
    x = torch.randn(300, D, generator=torch.Generator().manual_seed(4))
    expected, _ = _reference(fc1, fc2, experts, centres, metric, k, x)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), expected, rtol=1e-5, atol=1e-5)
    moe.train()  # the differentiable path too
    torch.testing.assert_close(moe(x), expected, rtol=1e-5, atol=1e-5)


def test_top_k_macs_count_each_tokens_union_once():
    moe, fc1, fc2, experts, centres = _top_k_moe("cosine", 2)
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(5))
    _, neurons = _reference(fc1, fc2, experts, centres, "cosine", 2, x)
    # two projections per computed neuron, plus the router's score for every combination
    expected = int(neurons.sum()) * 2 * D + len(x) * moe.num_experts * D
    assert moee.count_macs(moe, x) == expected


def test_euclidean_top_k_and_too_many_combinations_are_clear_errors():
    with pytest.raises(moee.ConfigError, match="router.top_k"):
        moee.RouterConfig(metric="euclidean", top_k=2)
    with pytest.raises(moee.ConfigError, match="router.top_k"):
        moee.RouterConfig(top_k=0)
    with pytest.raises(moee.ConfigError, match="max-experts"):
        top_k_router(np.ones((20, 4)), "cosine", np.zeros((20, 8)), np.ones(20), 5)


def _config(tmp_path, **select):
    return moee.ExtractConfig(
        record=moee.RecordConfig(n_tokens=1000),
        cluster=moee.ClusterConfig(min_cluster_fraction=0.05, min_samples=5, reduce_dims=8,
                                   max_clusters=4),
        select=moee.SelectConfig(**select), router=moee.RouterConfig(top_k=2),
        work_dir=str(tmp_path), progress=False)


def test_top_k_extraction_is_exact_at_full_width(vit, images, tmp_path):
    batches = [images[i : i + 40] for i in range(0, 240, 40)]
    config = _config(tmp_path, width=1.0, compensate_mean=False, refit_down=False)
    moe_model, report = moee.extract(vit, batches, config)
    assert any(r["experts"] >= 2 for r in report.layers)
    for row in report.layers:
        if row["experts"]:
            assert len(row["expert_sizes"]) == comb(row["experts"], 2)  # of the clusters
            assert sum(row["load_share"]) == pytest.approx(1.0)
    with torch.no_grad():
        torch.testing.assert_close(moe_model(images[:8]).logits, vit(images[:8]).logits,
                                   rtol=1e-4, atol=1e-4)


def test_top_k_extraction_unions_cost_more_than_top_1_and_save(vit, images, tmp_path):
    batches = [images[i : i + 40] for i in range(0, 240, 40)]
    config = _config(tmp_path, p=0.7)
    top2, report2 = moee.extract(vit, batches, config)
    top1_config = dataclasses.replace(config, router=moee.RouterConfig())
    _, report1 = moee.extract(vit, batches, top1_config)
    for r1, r2 in zip(report1.layers, report2.layers, strict=True):
        if r1["experts"] >= 2:
            assert r2["active_neurons_per_token"] > r1["active_neurons_per_token"]
    loaded = moee.MoEModel.from_pretrained(top2.save_pretrained(tmp_path / "ckpt"))
    assert loaded.extract_config["router"]["top_k"] == 2
    with torch.no_grad():
        torch.testing.assert_close(loaded(images[:4]).logits, top2(images[:4]).logits)
