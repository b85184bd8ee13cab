import pytest
import torch
from torch import nn

from moee.evaluate import count_macs, count_params
from moee.moe import MoEMLP


def test_macs_equal_analytic_count_for_known_routing():
    d, h = 16, 48
    experts = [torch.arange(0, 10), torch.arange(5, 30)]  # sizes 10 and 25, union 30
    centres = torch.zeros(2, d)
    centres[0, 0], centres[1, 1] = 1.0, 1.0
    moe = MoEMLP(nn.Linear(d, 30), nn.Linear(30, d), nn.GELU(), experts, centres, torch.arange(30))
    x = torch.zeros(7, d)
    x[:3, 0], x[3:, 1] = 1.0, 1.0  # 3 tokens -> expert 0, 4 tokens -> expert 1
    router = 7 * d * 2
    experts_macs = 3 * (2 * d * 10) + 4 * (2 * d * 25)
    assert count_macs(moe, x) == router + experts_macs
    dense = nn.Sequential(nn.Linear(d, h), nn.GELU(), nn.Linear(h, d))
    assert count_macs(dense, x) == 7 * 2 * d * h
    # weights + router centres (k, d) + per-expert output offsets (k, d)
    assert count_params(moe) == (d * 30 + 30) + (30 * d + d) + 2 * d + 2 * d


def test_macs_count_fused_cpu_attention_like_eager():
    from conftest import tiny_vit

    model, x = tiny_vit(), torch.randn(3, 1, 8, 8)
    eager = count_macs(model, x)
    model.set_attn_implementation("sdpa")
    assert count_macs(model, x) == eager  # the fused kernel's two matmuls are counted
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as plain:  # torch alone misses them on CPU
        model(x)
    assert plain.get_total_flops() // 2 < eager


def test_side_by_side_latency_fills_every_row():
    import math

    from conftest import tiny_moe_model, tiny_vit

    from moee_lab.demo.report import comparison_table, measure, time_side_by_side

    images, labels = torch.randn(40, 1, 8, 8), torch.randint(0, 3, (40,))
    models = {"dense": tiny_vit(), "moe": tiny_moe_model()}
    rows = {n: measure(m, images, labels, latency_batch=8) for n, m in models.items()}
    assert all(math.isnan(r.latency_ms) for r in rows.values())
    grad_modes = []
    models["moe"].register_forward_hook(lambda *a: grad_modes.append(torch.is_grad_enabled()))
    time_side_by_side(models, rows, images, latency_batch=8, repeats=3)
    assert grad_modes and not any(grad_modes)  # timed as inference, not as training
    assert all(r.latency_ms > 0 and r.latency_batch == 8 for r in rows.values())
    table = comparison_table(rows).splitlines()
    assert [line.split()[0] for line in table[1:3]] == ["dense", "moe"]


def test_executed_macs_count_what_the_engine_runs():
    """Model MACs: each token through its expert's neurons. Executed: the masked path computes
    every kept neuron for every token; the loop computes the zero-padded expert copies."""
    d = 16
    experts = [torch.arange(0, 10), torch.arange(5, 30)]  # sizes 10 and 25, union 30
    centres = torch.zeros(2, d)
    centres[0, 0], centres[1, 1] = 1.0, 1.0
    moe = MoEMLP(nn.Linear(d, 30), nn.Linear(30, d), nn.GELU(), experts, centres,
                 torch.arange(30)).eval()
    x = torch.zeros(7, d)
    x[:3, 0], x[3:, 1] = 1.0, 1.0
    router = 7 * d * 2
    model_macs = router + 3 * (2 * d * 10) + 4 * (2 * d * 25)
    moe.configure(small_batch_tokens=7)  # 7 tokens: the masked path
    assert count_macs(moe, x) == model_macs
    assert count_macs(moe, x, executed=True) == router + 7 * 2 * d * 30
    moe.configure(small_batch_tokens=0)  # the loop on copies padded to 16 and 32 neurons
    assert count_macs(moe, x, executed=True) == router + 3 * (2 * d * 16) + 4 * (2 * d * 32)
    moe.configure(execution="union")  # the union for every token, no router
    assert count_macs(moe, x) == count_macs(moe, x, executed=True) == 7 * 2 * d * 30
    assert moe.execution_config.small_batch_tokens == 0  # settings left as they were


def test_evaluate_with_any_metric_and_clear_error_on_no_data():
    from conftest import tiny_vit

    import moee

    model = tiny_vit()
    x, y = torch.randn(10, 1, 8, 8), torch.randint(0, 3, (10,))
    with torch.no_grad():
        pred = model(x).logits.argmax(-1)
    assert moee.evaluate(model, [(x[:6], y[:6]), (x[6:], y[6:])]) == float((pred == y).sum()) / 10
    assert moee.evaluate(model, [x], lambda out, b: (float(out.shape[0]), 2)) == 5.0
    with pytest.raises(moee.EmptyDataError):
        moee.evaluate(model, [])


def test_macs_are_counted_as_inference_not_training():
    from conftest import tiny_moe_model

    moe = tiny_moe_model()
    grad_modes = []
    moe.register_forward_hook(lambda *a: grad_modes.append(torch.is_grad_enabled()))
    count_macs(moe, torch.randn(2, 1, 8, 8))
    assert grad_modes == [False]


def test_dense_mlp_macs_count_two_or_three_projections():
    from tiny_models import FAMILIES

    import moee
    from moee.evaluate import dense_mlp_macs

    vit, llama = FAMILIES["hf-vit"][0](), FAMILIES["hf-llama"][0]()
    assert dense_mlp_macs(vit, 10) == 10 * 2 * 48 * (16 + 16)
    assert dense_mlp_macs(llama, 10) == 10 * 2 * 48 * (2 * 16 + 16)
    x = torch.randint(1, 50, (1, 10))  # and it is the MLP part of a full count
    sites = moee.find_mlp_sites(llama)
    for site in sites:
        site.install(torch.nn.Identity())  # an MLP-less copy (residual adds the input back)
    assert count_macs(FAMILIES["hf-llama"][0](), x) - count_macs(llama, x) == \
        dense_mlp_macs(FAMILIES["hf-llama"][0](), 10)
