"""MoEMLP numerics against exact references."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moee.moe import MoEMLP

torch.manual_seed(0)
D, H = 16, 48


def dense_mlp() -> tuple[nn.Linear, nn.Linear]:
    torch.manual_seed(1)
    return nn.Linear(D, H), nn.Linear(H, D)


def make_moe(experts, centres, metric="cosine") -> MoEMLP:
    fc1, fc2 = dense_mlp()
    return MoEMLP(fc1, fc2, nn.GELU(), [torch.tensor(e) for e in experts], centres,
                  torch.arange(H), metric)


def test_one_full_expert_equals_dense_mlp():
    fc1, fc2 = dense_mlp()
    moe = make_moe([list(range(H))], torch.randn(1, D))
    x = torch.randn(5, 7, D)
    torch.testing.assert_close(moe(x), fc2(F.gelu(fc1(x))), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_routing_equals_argmax_similarity(metric):
    centres = torch.randn(4, D)
    moe = make_moe([[0], [1], [2], [3]], centres, metric)
    x = torch.randn(200, D)
    if metric == "cosine":
        expected = F.cosine_similarity(x[:, None], centres[None], dim=-1).argmax(-1)
    else:
        expected = torch.cdist(x, centres).argmin(-1)
    assert torch.equal(moe.route(x), expected)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_forward_equals_per_token_reference(metric):
    g = torch.Generator().manual_seed(3)
    experts = [torch.randperm(H, generator=g)[: 5 + 7 * i].tolist() for i in range(4)]
    moe = make_moe(experts, torch.randn(4, D, generator=g), metric)
    x = torch.randn(3, 11, D, generator=g)
    torch.testing.assert_close(moe(x), moe.forward_reference(x), rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # cached pre-sliced inference weights give the same result
        torch.testing.assert_close(moe(x), moe.forward_reference(x), rtol=1e-5, atol=1e-6)


def test_expert_computes_only_its_neurons():
    fc1, fc2 = dense_mlp()
    expert = [3, 10, 20]
    moe = make_moe([expert], torch.randn(1, D))
    x = torch.randn(4, D)
    h = F.gelu(fc1(x))
    mask = torch.zeros(H)
    mask[expert] = 1
    torch.testing.assert_close(moe(x), fc2(h * mask), rtol=1e-5, atol=1e-6)


def test_gradients_reach_shared_weights_and_cache_refreshes():
    moe = make_moe([[0, 1, 2], [2, 3]], torch.randn(2, D))
    x = torch.randn(64, D)
    moe(x).pow(2).sum().backward()
    assert moe.fc1.weight.grad[:4].abs().sum() > 0
    assert moe.fc1.weight.grad[4:].abs().sum() == 0  # neurons in no expert get no gradient
    with torch.no_grad():
        before = moe(x)
        moe.fc2.weight.add_(1.0)
        after = moe(x)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, moe.forward_reference(x), rtol=1e-5, atol=1e-5)


def test_empty_experts_and_bad_indices_rejected():
    fc1, fc2 = dense_mlp()
    with pytest.raises(ValueError, match="outside"):
        MoEMLP(fc1, fc2, nn.GELU(), [torch.tensor([H])], torch.randn(1, D), torch.arange(H))
    with pytest.raises(ValueError, match="centres"):
        MoEMLP(fc1, fc2, nn.GELU(), [torch.tensor([0])], torch.randn(2, D), torch.arange(H))


def test_unused_expert_gets_no_tokens_and_output_is_still_right():
    centres = torch.randn(3, D)
    centres[2] = -centres[0]  # never wins against expert 0 for tokens near centre 0
    moe = make_moe([[0, 1], [2, 3], [4]], centres)
    x = centres[0].repeat(5, 1) + 0.01 * torch.randn(5, D)
    torch.testing.assert_close(moe(x), moe.forward_reference(x), rtol=1e-5, atol=1e-6)


def test_cached_router_follows_centre_changes():
    moe = make_moe([[0], [1]], torch.randn(2, D))
    x = torch.randn(40, D)
    with torch.no_grad():
        moe(x)  # builds the inference cache
        moe.router_centres.mul_(-1)  # in place, as load_state_dict does
        expected = F.cosine_similarity(x[:, None], moe.router_centres[None], dim=-1).argmax(-1)
        assert torch.equal(moe.route(x), expected)


def test_single_expert_batch_shortcut_matches_reference():
    centres = torch.randn(3, D)
    moe = make_moe([[0, 1, 2], [3, 4], [5, 6, 7, 8]], centres)
    x = centres[1].repeat(6, 1) + 0.01 * torch.randn(6, D)  # all tokens -> expert 1
    with torch.no_grad():
        assert moe.route(x).unique().tolist() == [1]
        torch.testing.assert_close(moe(x), moe.forward_reference(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_route_tokens_on_recorded_inputs_matches_the_module(metric):
    from moee.api import route_tokens

    centres = torch.randn(5, D)
    moe = make_moe([[0], [1], [2], [3], [4]], centres, metric)
    x = torch.randn(300, D)
    got = route_tokens(x.numpy(), centres.numpy(), metric, chunk=64)
    assert got.tolist() == moe.route(x).tolist()
