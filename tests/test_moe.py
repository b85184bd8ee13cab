"""MoEMLP numerics against exact references."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moee
import moee.engine.cost_model as cost_model
from moee.engine import ExecutionConfig
from moee.moe import MoEMLP

torch.manual_seed(0)
D, H = 16, 48


def dense_mlp() -> tuple[nn.Linear, nn.Linear]:
    torch.manual_seed(1)
    return nn.Linear(D, H), nn.Linear(H, D)


def make_moe(experts, centres, metric="cosine") -> MoEMLP:
    fc1, fc2 = dense_mlp()
    return MoEMLP(fc1, fc2, nn.GELU(), [torch.tensor(e) for e in experts], centres,
                  torch.arange(H), metric).eval()


def test_one_full_expert_equals_dense_mlp():
    fc1, fc2 = dense_mlp()
    moe = make_moe([list(range(H))], torch.randn(1, D))
    x = torch.randn(5, 7, D)
    torch.testing.assert_close(moe(x), fc2(F.gelu(fc1(x))), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("metric", ["cosine", "euclidean", "dot"])
def test_routing_equals_argmax_similarity(metric):
    centres = torch.randn(4, D)
    moe = make_moe([[0], [1], [2], [3]], centres, metric)
    x = torch.randn(200, D)
    if metric == "cosine":
        expected = F.cosine_similarity(x[:, None], centres[None], dim=-1).argmax(-1)
    elif metric == "dot":
        expected = (x @ centres.T).argmax(-1)
    else:
        expected = torch.cdist(x, centres).argmin(-1)
    assert torch.equal(moe.route(x), expected)


@pytest.mark.parametrize("metric", ["cosine", "euclidean", "dot"])
def test_forward_equals_per_token_reference(metric):
    g = torch.Generator().manual_seed(3)
    experts = [torch.randperm(H, generator=g)[: 5 + 7 * i].tolist() for i in range(4)]
    moe = make_moe(experts, torch.randn(4, D, generator=g), metric)
    x = torch.randn(3, 11, D, generator=g)
    torch.testing.assert_close(moe(x), moe.forward_reference(x), rtol=1e-5, atol=1e-6)
    moe.train()  # the differentiable path computes the same function
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
    moe.train()  # train mode: the differentiable path
    moe(x).pow(2).sum().backward()
    moe.eval()
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


@pytest.mark.parametrize("metric", ["cosine", "euclidean", "dot"])
def test_route_tokens_on_recorded_inputs_matches_the_module(metric):
    from moee.extraction.reproduce import route_tokens

    centres = torch.randn(5, D)
    moe = make_moe([[0], [1], [2], [3], [4]], centres, metric)
    x = torch.randn(300, D)
    got = route_tokens(x.numpy(), centres.numpy(), metric, chunk=64)
    assert got.tolist() == moe.route(x).tolist()


def _random_moe(metric="cosine", activation=None):
    g = torch.Generator().manual_seed(5)
    experts = [torch.randperm(H, generator=g)[: 3 + 6 * i].tolist() for i in range(5)]
    moe = make_moe(experts, torch.randn(5, D, generator=g), metric)
    moe.expert_bias.normal_(generator=g)  # a left-out-neuron offset per expert
    if activation is not None:
        moe.activation = activation
    return moe


@pytest.mark.parametrize("execution", ["experts", "masked", "grouped"])
@pytest.mark.parametrize("presliced", [True, False])
@pytest.mark.parametrize("metric", ["cosine", "euclidean", "dot"])
def test_every_exact_execution_equals_per_token_reference(execution, presliced, metric):
    moe = _random_moe(metric)
    moe.configure(execution=execution, presliced=presliced, small_batch_tokens=0)  # real loop
    x = torch.randn(4, 13, D)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), moe.forward_reference(x), rtol=1e-5, atol=1e-5)


def test_small_batches_switch_to_masked_path_with_same_output(monkeypatch):
    import moee.moe

    moe = _random_moe()
    x = torch.randn(30, D)
    with torch.no_grad():
        moe.configure(small_batch_tokens=0)
        loop = moe(x)
        moe.configure(small_batch_tokens=30)
        calls, masked_path = [], moee.moe._RUN["masked"]
        monkeypatch.setitem(moee.moe._RUN, "masked", lambda *a: calls.append(1) or masked_path(*a))
        masked = moe(x)
        moe.configure(small_batch_tokens=29)
        moe(x)
    assert calls == [1]
    torch.testing.assert_close(loop, masked, rtol=1e-5, atol=1e-5)


def test_non_elementwise_activation_is_applied_per_expert():
    class RowCentred(nn.Module):  # depends on the whole row: must not see a flattened buffer
        def forward(self, h):
            return h - h.mean(-1, keepdim=True)

    moe = _random_moe(activation=RowCentred())
    moe.configure(small_batch_tokens=0)
    x = torch.randn(40, D)
    with torch.no_grad():
        out = moe(x)
        assert not moe.inference_weights().elementwise_activation
        assert moe.inference_weights().widths == moe.expert_sizes()  # zero padding would shift rows
        torch.testing.assert_close(out, moe.forward_reference(x), rtol=1e-5, atol=1e-5)


def test_presliced_copies_cost_memory_and_gather_mode_does_not():
    from moee.engine.weights import round_up

    moe = _random_moe()
    widths = sum(round_up(m, 16) for m in moe.expert_sizes())  # zero-padded copies
    assert widths > sum(moe.expert_sizes())
    assert moe.presliced_bytes() == widths * (D + 1 + D) * 4
    moe.configure(presliced=False)
    assert moe.presliced_bytes() == 0
    with torch.no_grad():
        moe(torch.randn(3, D))
        assert moe.inference_weights().experts is None


def test_unknown_execution_is_a_clear_error():
    moe = _random_moe()
    with pytest.raises(moee.ConfigError, match="execution: must be one of"):
        moe.configure(execution="fast")
    with pytest.raises(moee.ConfigError, match="small_batch_tokens"):
        ExecutionConfig(small_batch_tokens=2.5)
    assert moe.execution_config == ExecutionConfig()  # a refused change leaves the layer as it was


def test_module_copied_under_inference_mode_still_runs():
    moe = _random_moe()
    x = torch.randn(20, D)
    with torch.inference_mode():
        twin = copy.deepcopy(moe)  # parameters become inference tensors (no version counter)
        torch.testing.assert_close(twin(x), moe.forward_reference(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("flat_limit", [0, 2**20])
def test_activation_per_expert_or_over_all_experts_gives_same_output(monkeypatch, flat_limit):
    import dataclasses

    import moee.engine.experts

    monkeypatch.setattr(moee.engine.experts, "COSTS", dataclasses.replace(
        cost_model.COSTS, flat_activation_max_elements=flat_limit))
    moe = _random_moe()
    moe.configure(small_batch_tokens=0)
    x = torch.randn(50, D)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), moe.forward_reference(x), rtol=1e-5, atol=1e-5)


def test_default_small_batch_threshold_follows_the_cost_model(monkeypatch):
    from functools import partial

    from moee.engine.cost_model import CostModel

    # The formula on fixed constants (the machine-fitted ones are refitted per machine).
    costs = CostModel(half_speed_tokens_fp32=32, half_speed_tokens_amx=64, amx_reference_width=768,
                      amx_width_exponent=1.5, amx_min_tokens_per_expert=48,
                      half_speed_tokens_low_precision=8, flat_activation_max_elements=2**20,
                      expert_width_multiple=16, in_out_min_tokens=8, in_out_max_tokens=64,
                      blocked_min_tokens=24, blocked_max_tokens=512,
                      blocked_min_elements=2**19)
    default_small_batch_tokens = partial(cost_model.default_small_batch_tokens, costs=costs)
    assert default_small_batch_tokens(48, [48]) == 0  # one expert: the loop is a plain MLP
    narrow = default_small_batch_tokens(400, [100] * 8)  # masked computes 4x the neurons
    wide = default_small_batch_tokens(400, [300] * 8)  # masked computes 1.33x
    assert 0 < narrow < wide
    monkeypatch.setattr(cost_model, "cpu_has_amx", lambda dtype: False)
    assert default_small_batch_tokens(400, [300] * 8, torch.bfloat16) < wide  # slow bf16 kernels
    monkeypatch.setattr(cost_model, "cpu_has_amx", lambda dtype: True)
    amx = default_small_batch_tokens(400, [300] * 8, torch.bfloat16)
    assert amx > wide  # AMX: a fixed cost per call
    narrow_model = default_small_batch_tokens(400, [300] * 8, torch.bfloat16, width=192)
    assert narrow_model == 8 * amx  # the fixed costs weigh more against narrower GEMMs
    many_small = default_small_batch_tokens(4000, [300] * 8, torch.bfloat16)  # spread 12
    assert many_small == 48 * 8 - 1  # AMX: the loop needs ~48 tokens per expert at least
    assert default_small_batch_tokens(400, [300] * 8, width=192) == wide  # fp32: no such cost
    assert default_small_batch_tokens(400, [300] * 8, torch.bfloat16, "cuda") < wide
    moe = _random_moe()
    assert moe.execution_config.small_batch_tokens is None  # resolved per dtype at inference
    with torch.no_grad():
        moe(torch.randn(2, D))
    assert moe.inference_weights().default_small_batch_tokens == \
        cost_model.default_small_batch_tokens(H, moe.expert_sizes(), width=D)


def test_top1_matches_argmax_on_both_sides_of_its_switch_ties_included():
    from moee.engine.routing import top1

    for rows, k in [(5, 3), (17, 29), (300, 29), (1000, 2)]:
        scores = torch.randint(0, 3, (rows, k)).float()  # many ties
        assert torch.equal(top1(scores), scores.argmax(-1))


def test_expert_loop_reuses_its_scratch_buffers_safely():
    from moee.engine.workspace import clear_workspace, scratch, workspace_bytes

    clear_workspace()
    moe, other = _random_moe(), _random_moe(metric="euclidean")
    moe.configure(small_batch_tokens=0)
    other.configure(small_batch_tokens=0)
    x = torch.randn(40, D)
    with torch.no_grad():
        first = moe(x)
        kept = workspace_bytes()
        assert kept > 0  # buffers stay between calls...
        other(torch.randn(30, D))  # ...and another layer reuses them
        assert workspace_bytes() == kept
        again = moe(x)
    assert again.data_ptr() != first.data_ptr()  # outputs are fresh tensors
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    torch.testing.assert_close(first, moe.forward_reference(x), rtol=1e-5, atol=1e-5)
    with torch.inference_mode():  # inference-mode buffers are kept apart from no_grad ones
        torch.testing.assert_close(moe(x), first, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), first, rtol=0, atol=0)
    clear_workspace()
    assert workspace_bytes() == 0
    assert scratch("t", 4, torch.zeros(1, device="meta")).device.type == "meta"


@pytest.mark.parametrize("multiple", [1, 8, 16, 64])
def test_zero_padded_expert_copies_change_nothing_and_macs_ignore_them(multiple):
    from moee.engine.weights import round_up
    from moee.evaluate import count_macs

    moe = _random_moe(activation=nn.Sigmoid())  # act(0) != 0: the zero fc2 columns cancel it
    moe.configure(small_batch_tokens=0)
    x = torch.randn(60, D)
    macs = count_macs(moe, x)
    moe.configure(width_multiple=multiple)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), moe.forward_reference(x), rtol=1e-5, atol=1e-5)
        assert moe.inference_weights().widths == [round_up(m, multiple) for m in moe.expert_sizes()]
        moe.configure(presliced=False)  # the gather path pads the same way
        torch.testing.assert_close(moe(x), moe.forward_reference(x), rtol=1e-5, atol=1e-5)
    assert count_macs(moe, x) == macs and moe.execution_config.width_multiple == multiple


def _gelu_activation():
    from transformers.activations import GELUActivation
    return GELUActivation()


@pytest.mark.parametrize("make_act", [nn.ReLU, nn.SiLU, nn.GELU, lambda: nn.GELU("tanh"),
                                      _gelu_activation])
def test_inplace_activation_is_exact_and_every_execution_uses_it_correctly(make_act):
    from moee.engine.activation import inplace_activation

    act = make_act()
    fn = inplace_activation(act)
    h = torch.randn(7, 9)
    expected = act(h)
    out = fn(h)
    assert out.data_ptr() == h.data_ptr()  # really in place
    assert torch.equal(out, expected)
    moe = _random_moe(activation=act)
    x = torch.randn(3, 17, D)
    with torch.no_grad():
        ref = moe.forward_reference(x)
        for execution in ("experts", "masked", "grouped"):
            moe.configure(execution=execution, small_batch_tokens=0)
            torch.testing.assert_close(moe(x), ref, rtol=1e-5, atol=1e-5)
        moe.configure(execution="union")
        dense = moe.fc2(act(moe.fc1(x)))
        torch.testing.assert_close(moe(x), dense, rtol=0, atol=0)


def test_unknown_or_altered_activation_runs_out_of_place():
    from moee.engine.activation import inplace_activation

    class ScaledGELU(nn.GELU):  # a subclass that changes the function must not be replaced
        def forward(self, h):
            return 2 * super().forward(h)

    assert inplace_activation(nn.Tanh()) is None
    assert inplace_activation(ScaledGELU()) is None
    moe = _random_moe(activation=ScaledGELU())
    moe.configure(small_batch_tokens=0)
    x = torch.randn(40, D)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), moe.forward_reference(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("execution", ["experts", "masked", "grouped"])
def test_bf16_model_routes_in_fp32_like_extraction(execution):
    """Two centres 0.1% apart: their bf16 scores tie (bf16 steps by 0.8% near 1), so a bf16
    router would send every token to expert 0; in fp32 the tokens leaning to expert 1 go there,
    as `route_tokens` (extraction's fp32 routing) sends them."""
    from moee.extraction.reproduce import route_tokens

    centres = torch.zeros(2, D)
    centres[0, 0] = centres[1, 0] = 1.0
    centres[1, 1] = 1e-3
    moe = make_moe([[0, 1], [2, 3]], centres).to(torch.bfloat16)
    x = torch.zeros(6, D, dtype=torch.bfloat16)
    x[:, 0] = 1.0
    x[:, 1] = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0])
    expected = route_tokens(x.float().numpy(), moe.router_centres.float().numpy(), "cosine")
    assert expected.tolist() == [1, 0, 1, 0, 1, 0]
    moe.configure(execution=execution, small_batch_tokens=0)
    moe.track_load = True
    with torch.no_grad():
        assert moe.route(x).tolist() == expected.tolist()
        out = moe(x)  # every inference path routes on the same fp32 scores
        torch.testing.assert_close(out.float(), moe.forward_reference(x).float(),
                                   rtol=2e-2, atol=2e-2)
    assert moe.load_counts.tolist() == [3, 3]


@pytest.mark.parametrize("execution,dtype", [("masked", torch.float32), ("union", torch.float32),
                                             ("grouped", torch.bfloat16)])
def test_device_side_executions_compile_to_one_graph(execution, dtype):
    """No graph break, no host sync: what CUDA graphs and torch.compile need. (grouped_mm's
    shape check in torch 2.13 wants bf16, so "grouped" is traced in bf16.)"""
    moe = _random_moe().to(dtype)
    moe.configure(execution=execution)
    x = torch.randn(60, D, dtype=dtype)
    torch._dynamo.reset()
    compiled = torch.compile(moe, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        if execution != "union":
            with pytest.raises(RuntimeError, match="run the model once"):
                compiled(x)  # nothing built yet: a clear error, not a silent rebuild
            torch._dynamo.reset()
        eager = moe(x)
        torch.testing.assert_close(compiled(x), eager, rtol=0, atol=0)


def test_copies_rebuild_the_inference_cache_instead_of_copying_it():
    moe = _random_moe()
    moe.presliced_bytes()  # builds the cache outside no_grad, from grad-tracking parameters
    assert moe._cache is not None
    twin = copy.deepcopy(moe)
    assert twin._cache is None
    x = torch.randn(30, D)
    with torch.no_grad():
        twin.fc1.weight.mul_(2)  # the copy's weights are its own
        torch.testing.assert_close(twin(x), twin.forward_reference(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(moe(x), moe.forward_reference(x), rtol=1e-5, atol=1e-5)


def test_expert_loop_runs_eagerly_inside_a_compiled_model():
    moe = _random_moe()
    moe.configure(small_batch_tokens=0)  # the loop, not the masked path
    x = torch.randn(60, D)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch.no_grad():
        eager = moe(x)
        compiled = torch.compile(moe, backend="aot_eager")(x)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    breaks = " ".join(torch._dynamo.utils.counters["graph_break"])
    assert "ata dependent" not in breaks and "ynamic shape" not in breaks  # loop not traced


def test_inference_draws_nothing_from_the_global_rng():
    """Building the inference cache must not shift a seeded user's random stream."""
    moe = _random_moe()
    x = torch.randn(40, D)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    with torch.no_grad():
        moe(x)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("make_act,how", [(nn.GELU, "bias"), (nn.ReLU, "bias"),
                                          (nn.SiLU, "bias"), (nn.Tanh, "mul")])
def test_masked_path_silences_neurons_by_bias_where_the_activation_allows(make_act, how):
    moe = _random_moe(activation=make_act())
    moe.configure(execution="masked")
    x = torch.randn(3, 11, D)
    with torch.no_grad():
        out = moe(x)

        assert moe.inference_weights().masking[0] == how  # tanh(-3e4) = -1: must multiply
        torch.testing.assert_close(out, moe.forward_reference(x), rtol=1e-5, atol=1e-5)


def test_inference_runs_the_engine_unless_autograd_needs_the_layer():
    """eval() under no_grad runs the engine (cache built once, reused); eval() with autograd
    on runs the differentiable path (the engine would drop gradients); train() runs the
    differentiable path even under no_grad."""
    moe = _random_moe()
    x = torch.randn(40, D, requires_grad=True)
    with torch.no_grad():
        moe(x)
    cache = moe._cache
    assert cache is not None
    with torch.inference_mode():
        moe(x)
    assert moe._cache is cache  # not rebuilt per call
    out = moe(x)  # grad mode on, eval mode
    assert out.requires_grad
    moe.train()
    assert moe(x).requires_grad
    with torch.no_grad():
        torch.testing.assert_close(moe(x), moe.forward_reference(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("execution", ["experts", "masked", "grouped", "train"])
def test_bias_free_fc1_through_every_path_and_the_reference(execution):
    g = torch.Generator().manual_seed(7)
    experts = [torch.randperm(H, generator=g)[: 4 + 5 * i] for i in range(4)]
    fc1, fc2 = nn.Linear(D, H, bias=False), nn.Linear(H, D)
    moe = MoEMLP(fc1, fc2, nn.GELU(), experts, torch.randn(4, D, generator=g), torch.arange(H))
    x = torch.randn(3, 9, D, generator=g)
    expected = []  # independent of forward_reference: the dense MLP with the expert's mask
    for t in x.reshape(-1, D):
        e = int(F.cosine_similarity(t[None], moe.router_centres, dim=-1).argmax())
        mask = torch.zeros(H)
        mask[experts[e]] = 1
        expected.append(fc2(F.gelu(fc1(t)) * mask))
    expected = torch.stack(expected).reshape(3, 9, D).detach()
    if execution == "train":
        moe.train()
    else:
        moe.eval().configure(execution=execution, small_batch_tokens=0)
    torch.testing.assert_close(moe(x).detach(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(moe.forward_reference(x), expected, rtol=1e-5, atol=1e-5)


def _gated_moe(bias: bool = False, act: nn.Module | None = None, experts=None):
    """A SwiGLU-style MoE (act(gate(x)) * up(x)) over a dense gated MLP of width H."""
    g = torch.Generator().manual_seed(11)
    torch.manual_seed(11)
    up, gate, down = nn.Linear(D, H, bias=bias), nn.Linear(D, H, bias=bias), nn.Linear(H, D)
    experts = experts or [torch.randperm(H, generator=g)[: 5 + 7 * i] for i in range(4)]
    moe = MoEMLP(up, down, act or nn.SiLU(), experts, torch.randn(len(experts), D, generator=g),
                 torch.arange(H), gate=gate).eval()
    return moe, (gate, up, down, act or nn.SiLU())


@pytest.mark.parametrize("execution", ["experts", "masked", "grouped", "union", "train"])
@pytest.mark.parametrize("presliced", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_gated_experts_slice_gate_up_and_down_together(execution, presliced, bias):
    moe, (gate, up, down, act) = _gated_moe(bias)
    x = torch.randn(3, 13, D)
    expected = []  # the dense gated MLP with the routed expert's mask on the hidden values
    for t in x.reshape(-1, D):
        e = int(F.cosine_similarity(t[None], moe.router_centres, dim=-1).argmax())
        mask = torch.zeros(H)
        mask[moe.expert_index(e)] = 1
        expected.append(down(act(gate(t)) * up(t) * mask))
    expected = torch.stack(expected).reshape(3, 13, D).detach()
    if execution == "union":
        expected = down(act(gate(x)) * up(x)).detach()
    if execution == "train":
        moe.train()
    else:
        moe.configure(execution=execution, presliced=presliced, small_batch_tokens=0)
    torch.testing.assert_close(moe(x).detach(), expected, rtol=1e-5, atol=1e-5)
    if execution != "union":
        torch.testing.assert_close(moe.forward_reference(x), expected, rtol=1e-5, atol=1e-5)


def test_gated_masked_path_silences_by_the_gate_offset_and_one_full_expert_is_dense():
    moe, (gate, up, down, act) = _gated_moe(bias=True, experts=[torch.arange(H)])
    x = torch.randn(20, D)
    moe.configure(execution="masked")
    with torch.no_grad():
        torch.testing.assert_close(moe(x), down(act(gate(x)) * up(x)), rtol=1e-5, atol=1e-5)
        assert moe.inference_weights().masking[0] == "bias"  # SiLU(-3e4) is exactly 0
    gelu_moe, _ = _gated_moe(act=nn.Tanh())
    gelu_moe.configure(execution="masked")
    y = torch.randn(20, D)
    with torch.no_grad():
        torch.testing.assert_close(gelu_moe(y), gelu_moe.forward_reference(y), rtol=1e-5,
                                   atol=1e-5)
        assert gelu_moe.inference_weights().masking[0] == "mul"  # tanh(-3e4) = -1


def test_gated_gradients_reach_gate_up_and_down():
    moe, _ = _gated_moe(bias=True)
    moe.train()
    moe(torch.randn(50, D)).pow(2).sum().backward()
    used = moe.expert_indices.unique()
    for lin in (moe.gate, moe.fc1):
        assert lin.weight.grad[used].abs().sum() > 0
    assert moe.fc2.weight.grad[:, used].abs().sum() > 0


def test_a_single_token_reads_only_its_experts_weights(monkeypatch):
    """Decoding one token: the one-token path on its expert's copies, not the masked path
    (which reads every kept neuron), whatever the small-batch threshold."""
    import moee.moe

    moe = _random_moe()
    moe.configure(small_batch_tokens=100)
    calls = []
    for name in ("masked", "experts"):
        real = moee.moe._RUN[name]
        monkeypatch.setitem(moee.moe._RUN, name,
                            lambda *a, real=real, name=name: calls.append(name) or real(*a))
    one_expert = moee.moe.run_one_expert
    monkeypatch.setattr(moee.moe, "run_one_expert",
                        lambda t, e, w: calls.append(f"one:{e}") or one_expert(t, e, w))
    x = torch.randn(1, 1, D)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), moe.forward_reference(x), rtol=1e-5, atol=1e-5)
        moe(torch.randn(5, D))
    expected = int(moe.route(x.reshape(1, D)))
    assert calls == [f"one:{expected}", "masked"]


def test_engine_copies_are_stored_for_small_gemms_and_counted():
    """On CPU in fp32 the expert copies, and "masked"'s union copies within its token band,
    keep their (out, in) shapes but (in, out) storage, so `x @ w.T` reads a contiguous matrix;
    `cache_bytes` counts them."""
    moe = _random_moe()
    assert moe.cache_bytes() == 0
    with torch.no_grad():
        moe(torch.randn(1, D))
        moe.configure(execution="masked")
        moe(torch.randn(3, D))  # below the (in, out) band: the union as it is
        assert moe.inference_weights().built("union") is None
        moe(torch.randn(8, D))
    w = moe.inference_weights()
    for w1e, _, w2e in w.experts:
        assert w1e.T.is_contiguous() and w2e.T.is_contiguous()
    w1, w2t = w.union
    assert w1.shape == w.w1.shape and w1.T.is_contiguous() and w2t.is_contiguous()
    torch.testing.assert_close(w2t, w.w2t, rtol=0, atol=0)
    copies = sum(t.numel() for e in w.experts for t in e) + w1.numel() + w2t.numel()
    assert moe.cache_bytes() == copies * 4


@pytest.mark.parametrize("k", [1, 5, 256, 300, 40_000])
def test_grouped_dispatch_narrow_sort_key_gives_the_int64_stable_order(k):
    from moee.engine.grouped import dispatch, sort_key_dtype

    expert = torch.randint(0, k, (500,), generator=torch.Generator().manual_seed(k))
    row, ends = dispatch(expert, k)
    order = torch.argsort(expert, stable=True)  # the reference: int64 keys
    assert row[order].tolist() == list(range(500))  # row[t]: token t's place in expert order
    assert ends.tolist() == torch.bincount(expert, minlength=k).cumsum(0).tolist()
    assert torch.iinfo(sort_key_dtype(k)).max >= k - 1


def test_the_union_of_one_expert_is_that_expert_with_its_offset():
    g = torch.Generator().manual_seed(8)
    moe = make_moe([torch.randperm(H, generator=g).tolist()], torch.randn(1, D, generator=g))
    moe.expert_bias.normal_(generator=g)  # static pruning's left-out-neuron offset
    x = torch.randn(3, 5, D, generator=g)
    with torch.no_grad():
        ref = moe.forward_reference(x)
        moe.configure(execution="union")
        torch.testing.assert_close(moe(x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["fc1.bias", "fc2.bias", "router_centres", "expert_bias"])
def test_a_tensor_given_new_data_rebuilds_the_inference_cache(name):
    moe = _random_moe()
    x = torch.randn(4, 9, D)
    with torch.no_grad():
        moe(x)  # the cache is built
        owner, attr = (moe, name) if "." not in name else (getattr(moe, name.split(".")[0]),
                                                         name.split(".")[1])
        tensor = getattr(owner, attr)
        tensor.data = tensor.data + torch.randn_like(tensor.data)  # new storage, same tensor
        torch.testing.assert_close(moe(x), moe.forward_reference(x), rtol=1e-5, atol=1e-5)


def test_gradients_reach_the_weights_and_input_in_eval_mode():
    moe = _random_moe()
    x = torch.randn(3, 5, D, requires_grad=True)
    moe(x).square().sum().backward()
    assert x.grad is not None and moe.fc1.weight.grad is not None
    reference = x.detach().clone().requires_grad_()
    moe.zero_grad()
    with torch.no_grad():
        torch.testing.assert_close(moe(x), moe.forward_reference(x), rtol=1e-5, atol=1e-5)
    moe.train()  # the layer has no dropout: train mode computes the same function
    moe(reference).square().sum().backward()
    torch.testing.assert_close(x.grad, reference.grad, rtol=1e-4, atol=1e-5)
