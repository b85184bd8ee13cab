"""Property-based invariants (hypothesis) of selection, routing and save/load."""

import numpy as np
import torch
import torch.nn.functional as F
from conftest import tiny_vit
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import moee
from moee.adapters import find_mlp_sites
from moee.engine import route, router_weights
from moee.extraction.select import select_neurons
from moee.moe_build import LayerPlan, apply_plans
from moee.moe_model import MoEModel

scores = arrays(np.float64, st.integers(1, 60),
                elements=st.floats(0, 1e3, allow_nan=False, allow_subnormal=False))


@given(scores, st.floats(0.01, 1.0))
def test_selection_is_the_smallest_top_set_reaching_p(s, p):
    kept = select_neurons(s, p)
    assert len(kept) >= 1 and len(np.unique(kept)) == len(kept)
    assert np.all(np.diff(kept) > 0) and kept.min() >= 0 and kept.max() < len(s)
    total = s.sum()
    if total > 0:
        share = s[kept].sum() / total
        assert share >= p - 1e-9
        # dropping the weakest kept neuron falls short of p: nothing is kept that is not needed
        weakest = kept[np.argmin(s[kept])]
        assert len(kept) == 1 or (share - s[weakest] / total) < p - 1e-12
        # every kept neuron scores at least as high as every dropped one
        dropped = np.setdiff1d(np.arange(len(s)), kept)
        assert dropped.size == 0 or s[kept].min() >= s[dropped].max()


@given(st.integers(1, 6), st.integers(2, 8), st.integers(1, 20), st.sampled_from(
    ["cosine", "euclidean", "dot"]), st.integers(0, 2**31 - 1))
def test_route_is_the_most_similar_centre(k, d, n, metric, seed):
    g = torch.Generator().manual_seed(seed)
    centres, x = torch.randn(k, d, generator=g), torch.randn(n, d, generator=g)
    got = route(x, router_weights(centres, metric))
    if metric == "cosine":
        sim = F.cosine_similarity(x[:, None], centres[None], dim=-1)
    elif metric == "dot":
        sim = x @ centres.T
    else:
        sim = -torch.cdist(x, centres) ** 2
    best = sim.max(-1).values
    # the chosen centre is as similar as the best (up to float rounding on near-ties)
    assert torch.all(sim[torch.arange(n), got] >= best - 1e-4 * (1 + best.abs()))
    if metric == "cosine":  # a token's scale never changes its route
        assert torch.equal(route(x * 7.5, router_weights(centres, metric)), got)


@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.lists(st.integers(0, 47), min_size=1, max_size=48, unique=True),
                min_size=1, max_size=5), st.integers(0, 2**31 - 1))
def test_any_expert_sets_survive_save_and_load(tmp_path_factory, experts, seed):
    model = tiny_vit()
    sites = find_mlp_sites(model)
    rng = np.random.default_rng(seed)
    apply_plans(sites, [LayerPlan(s.name, [np.array(e) for e in experts],
                                  rng.normal(size=(len(experts), 16))) for s in sites])
    saved = MoEModel(model, {}, None)
    path = saved.save_pretrained(tmp_path_factory.mktemp("ckpt"))
    again = moee.load(path)
    for name, layer in again.moe_layers().items():
        assert layer.dense_experts() == saved.moe_layers()[name].dense_experts()
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(again(x).logits, saved(x).logits)
