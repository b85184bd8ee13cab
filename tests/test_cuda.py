"""The CUDA paths: every execution, CUDA-graph replay and calibration on a GPU.

Skipped where CUDA is absent (CI runs on CPU); a GPU machine runs them
(`benchmarks/gpu_bench.sh`). The first two tests run everywhere.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_moe_model

import moee
from moee.engine.cuda_graph import GraphedForward, make_capturable

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_make_capturable_moves_only_host_syncing_layers():
    model = tiny_moe_model()
    layers = list(model.moe_layers().values())
    layers[1].configure(execution="union")
    assert make_capturable(model) == 1  # fp32: grouped_mm's CUDA kernels are bf16 only
    assert [m.execution_config.execution for m in layers] == ["masked", "union"]
    layers[0].configure(execution="experts")
    assert make_capturable(model.to(torch.bfloat16)) == 1
    assert layers[0].execution_config.execution == "grouped"
    with pytest.raises(ValueError, match="one of"):
        make_capturable(model, "experts")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_graphed_forward_says_it_needs_cuda():
    with pytest.raises(RuntimeError, match="needs CUDA"):
        GraphedForward(tiny_moe_model())


def _reference(model, x):
    """Per-token oracle of every MoE layer, the rest of the model as is."""
    saved = {}
    for name, m in model.moe_layers().items():
        saved[name] = m.forward
        m.forward = m.forward_reference
    try:
        with torch.no_grad():
            return model(x).logits
    finally:
        for name, m in model.moe_layers().items():
            m.forward = saved[name]


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("execution", ["experts", "masked", "grouped", "union"])
def test_every_execution_on_cuda_matches_the_cpu_model(execution, dtype):
    model = tiny_moe_model()
    x = torch.randn(5, 1, 8, 8)
    model.configure(execution=execution, small_batch_tokens=0)
    with torch.no_grad():  # union is another function: its CPU run is the reference
        expected = model(x).logits if execution == "union" else _reference(model, x)
    model = model.to("cuda", dtype)
    try:
        with torch.no_grad():
            got = model(x.to("cuda", dtype)).logits
    except (RuntimeError, NotImplementedError) as e:
        if execution == "grouped" and dtype == torch.float32:
            pytest.skip(f"grouped_mm has no fp32 kernel here: {e}")
        raise
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(got.float().cpu(), expected, rtol=tol, atol=tol)


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graphed_forward_replays_the_eager_model_at_each_shape(dtype):
    model = tiny_moe_model(attn="sdpa")  # eager attention builds its mask from the host
    model.configure(execution="masked")  # capturable in every dtype
    model = model.to("cuda", dtype)
    graphed = GraphedForward(model)
    for batch in (3, 3, 7):
        x = torch.randn(batch, 1, 8, 8, device="cuda", dtype=dtype)
        with torch.no_grad():
            eager = model(x).logits
        # a graph may run other kernels than the eager call (cuBLAS picks per stream)
        tol = 1e-5 if dtype == torch.float32 else 5e-2
        torch.testing.assert_close(graphed(x).logits, eager, rtol=tol, atol=tol)
    assert len(graphed._graphs) == 2


@cuda
def test_graphed_forward_on_grouped_bfloat16():
    model = tiny_moe_model(attn="sdpa").to("cuda", torch.bfloat16)
    graphed = GraphedForward(model)
    assert graphed.switched == 2
    x = torch.randn(16, 1, 8, 8, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        eager = model(x).logits
    torch.testing.assert_close(graphed(x).logits, eager, rtol=5e-2, atol=5e-2)


@cuda
def test_graphed_forward_names_what_cannot_be_captured():
    class ReadsOnTheHost(torch.nn.Module):
        def forward(self, x):
            return x * float(x.sum())  # a host sync: not capturable

    with pytest.raises(RuntimeError, match="CUDA-graph capture of ReadsOnTheHost failed"):
        GraphedForward(ReadsOnTheHost())(torch.randn(2, 3, device="cuda"))


@cuda
def test_calibrate_on_cuda_chooses_a_valid_execution_and_keeps_outputs():
    model = tiny_moe_model().to("cuda", torch.bfloat16)
    x = torch.randn(32, 1, 8, 8, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        before = model(x).logits
    rows = moee.calibrate(model, x, repeats=3)
    assert {r["execution"] for r in rows} <= {"experts", "grouped", "union"}
    assert all("grouped_ms" in r or "grouped_unsupported" in r for r in rows)
    if all(r["execution"] != "union" for r in rows):  # routed executions: the same function
        with torch.no_grad():
            torch.testing.assert_close(model(x).logits, before, rtol=5e-2, atol=5e-2)
    model.configure(execution="experts")
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, before, rtol=0, atol=0)


@cuda
@pytest.mark.parametrize("k", [8, 300])
def test_grouped_dispatch_on_cuda_matches_the_cpu_order(k):
    from moee.engine.grouped import dispatch

    expert = torch.randint(0, k, (5000,), generator=torch.Generator().manual_seed(k))
    row, ends = dispatch(expert.cuda(), k)
    want_row, want_ends = dispatch(expert, k)
    assert row.cpu().tolist() == want_row.tolist() and ends.cpu().tolist() == want_ends.tolist()
