import numpy as np
import pytest

from moee.config import SelectConfig
from moee.errors import ConfigError
from moee.extraction.select import cluster_stats, select_experts, select_neurons


def test_select_neurons_smallest_set_reaching_p():
    scores = np.array([1.0, 5.0, 3.0, 1.0])  # total 10: top-2 = 8 = 80%
    assert select_neurons(scores, 0.8).tolist() == [1, 2]
    assert select_neurons(scores, 0.81).tolist() == [0, 1, 2]  # stable order on ties
    assert select_neurons(scores, 1.0).tolist() == [0, 1, 2, 3]


def test_cluster_stats_match_numpy_and_ignore_noise():
    rng = np.random.default_rng(0)
    hidden, inputs = rng.normal(size=(100, 6)), rng.normal(size=(100, 4))
    labels = rng.integers(-1, 3, size=100)
    stats = cluster_stats(hidden, inputs, labels, 3, chunk=17)
    for c in range(3):
        m = labels == c
        assert stats.counts[c] == m.sum()
        np.testing.assert_allclose(stats.hidden_var[c], hidden[m].var(0), atol=1e-10)
        np.testing.assert_allclose(stats.input_mean[c], inputs[m].mean(0), atol=1e-12)


@pytest.mark.parametrize("criterion", ["variance", "magnitude"])
def test_select_experts_criteria(criterion):
    rng = np.random.default_rng(1)
    hidden = rng.normal(size=(300, 8)) * np.array([5, 1, 1, 1, 1, 1, 1, 0.1])
    hidden[:, 3] += 10  # large mean, small variance
    stats = cluster_stats(hidden, hidden[:, :2], np.zeros(300, dtype=int), 1)
    (expert,) = select_experts(stats, 0.5, SelectConfig(criterion=criterion))
    assert expert.tolist() == ([0] if criterion == "variance" else [3])


def test_left_out_mean_output_restores_constant_clusters_exactly():
    """Tokens whose hidden vector is constant: a tiny compensated expert equals dense."""
    import torch
    from torch import nn

    from moee.adapters import MLPSite, linear_weights
    from moee.moe_build import LayerPlan, build_moe_mlp, left_out_mean_output

    torch.manual_seed(0)
    fc1, fc2 = nn.Linear(6, 20), nn.Linear(20, 6)
    x = torch.randn(1, 6).repeat(5, 1)  # one cluster of identical tokens
    hidden = torch.nn.functional.gelu(fc1(x)).detach().double().numpy()
    site = MLPSite("mlp", linear_weights(fc1, fc2), nn.GELU(), fc1, lambda m: None,
                   lambda x: fc2(torch.nn.functional.gelu(fc1(x))))
    experts = [np.array([2, 7])]
    bias = left_out_mean_output(site, experts, hidden.mean(0, keepdims=True))
    moe = build_moe_mlp(site, LayerPlan("mlp", experts, x[:1].numpy(), expert_bias=bias))
    with torch.no_grad():
        torch.testing.assert_close(moe(x), fc2(torch.nn.functional.gelu(fc1(x))),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(moe(x), moe.forward_reference(x), rtol=1e-5, atol=1e-5)


def test_output_variance_ranks_neurons_by_what_they_put_into_the_output():
    from moee.extraction.select import ClusterStats

    var = np.array([[1.0, 1.0, 1.0, 1.0]])
    stats = ClusterStats(np.array([10.0]), np.zeros((1, 4)), var, np.zeros((1, 3)))
    norms = np.array([0.1, 5.0, 0.1, 3.0])  # |W2[:, j]|²: neurons 1 and 3 dominate the output
    config = SelectConfig(p=0.9, criterion="output_variance")
    assert select_experts(stats, config.p, config, norms)[0].tolist() == [1, 3]
    with pytest.raises(ValueError, match="column norms"):
        select_experts(stats, config.p, config)


def test_width_keeps_each_experts_top_ranked_neurons_at_one_size():
    from moee.extraction.select import ClusterStats, select_experts

    var = np.array([[5.0, 1.0, 4.0, 3.0, 0.5, 2.0], [0.1, 0.2, 0.3, 6.0, 5.0, 4.0]])
    stats = ClusterStats(np.ones(2), np.zeros_like(var), var, np.zeros((2, 3)))
    experts = select_experts(stats, 1.0, SelectConfig(width=0.5))
    assert [e.tolist() for e in experts] == [[0, 2, 3], [3, 4, 5]]
    with pytest.raises(ConfigError, match="width"):
        SelectConfig(width=1.5)
