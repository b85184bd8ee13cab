"""Execution paths: every one checked against the slow reference, and the calibrated fallback."""

import pytest
import torch
from conftest import tiny_moe_model, tiny_vit

import moee
from moee.bench import loop_style, mask_style, random_moe_block
from moee.build import LayerPlan, apply_plans
from moee.speed import calibrate_execution, set_execution


def test_baseline_styles_and_union_match_references():
    dense, moe = random_moe_block(16, 64, 4, 0.3)
    x = torch.randn(50, 16)
    with torch.no_grad():
        ref = moe.forward_reference(x)
        torch.testing.assert_close(moe(x), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mask_style(moe)(x), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loop_style(moe)(x), ref, rtol=1e-5, atol=1e-5)
        moe.execution = "union"  # pruned union run densely == fc2(act(fc1)) over kept neurons
        union_ref = moe.fc2(torch.nn.functional.gelu(moe.fc1(x)))
        torch.testing.assert_close(moe(x), union_ref)


def test_full_union_equals_dense_block():
    dense, moe = random_moe_block(16, 64, 3, 1.0)
    moe.execution = "union"
    x = torch.randn(20, 16)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), dense(x), rtol=1e-5, atol=1e-5)


def test_calibration_records_choice_and_survives_save_load(tmp_path):
    import numpy as np

    model = tiny_vit()
    sites = moee.find_mlp_sites(model)
    rng = np.random.default_rng(0)
    plans = [LayerPlan(s.name, [rng.choice(48, 12, replace=False) for _ in range(3)],
                       rng.normal(size=(3, 16))) for s in sites]
    apply_plans(sites, plans)
    moe_model = moee.MoEModel(model, plans)
    rows = calibrate_execution(moe_model, torch.randn(2, 1, 8, 8), repeats=3,
                               routed=("experts", "grouped"))
    assert {r["execution"] for r in rows} <= {"experts", "grouped", "union"}
    assert all(r["grouped_ms"] > 0 and r["union_ms"] > 0 for r in rows)
    for row, layer in zip(rows, moe_model.moe_layers().values(), strict=True):
        assert layer.small_batch_tokens == row["small_batch_tokens"] <= row["tokens"]
        assert row["masked_sweep"][0]["tokens"] == min(16, row["tokens"])
    moe_model.save_pretrained(tmp_path / "calibrated")
    thresholds = [p.small_batch_tokens for p in moee.load(tmp_path / "calibrated").plans]
    assert thresholds == [r["small_batch_tokens"] for r in rows]
    set_execution(moe_model, "union")
    moe_model.save_pretrained(tmp_path)
    again = moee.load(tmp_path)
    assert all(m.execution == "union" for m in again.moe_layers().values())
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(moe_model(x).logits, again(x).logits)


def test_whole_model_bench_reports_both_ideals():
    from moee.bench import bench_model, without_mlps

    dense = tiny_vit()
    rest = without_mlps(dense)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert rest(x).logits.shape == dense(x).logits.shape
    with pytest.raises(moee.NoMLPBlocksError):
        moee.find_mlp_sites(rest)  # every MLP block was swapped out
    row = bench_model(dense, tiny_moe_model(), x, torch.device("cpu"))
    assert row["ideal"] > 1 and 0 < row["mlp_mac_ratio"] < 1  # 12 of 48 neurons per token
    assert 1 <= row["amdahl_ideal"] <= 1 / row["mlp_mac_ratio"] + 1e-9
    assert row["non_mlp_ms"] > 0
    assert row["amdahl_efficiency"] == pytest.approx(row["speedup"] / row["amdahl_ideal"])


def test_peak_forward_memory_in_a_fresh_process(tmp_path):
    from moee.peak_memory import cpu_peak_bytes

    moe_model = tiny_moe_model()
    moe_model.save_pretrained(tmp_path)
    got = cpu_peak_bytes("moe", str(tmp_path), 4)
    if got is None:
        pytest.skip("no /proc/self/clear_refs on this system")
    assert got["peak"] >= got["resident"] > 0
    assert got["forward"] == got["peak"] - got["resident"]


def test_masked_threshold_sweep_leaves_the_layer_as_it_was():
    from moee.speed import masked_threshold

    _, moe = random_moe_block(16, 64, 4, 0.3)
    moe.execution, moe.small_batch_tokens = "grouped", 7
    with torch.inference_mode():
        threshold, rows = masked_threshold(moe, torch.randn(40, 16), repeats=2)
    assert (moe.execution, moe.small_batch_tokens) == ("grouped", 7)
    assert [r["tokens"] for r in rows][:1] == [16] and 0 <= threshold <= 40


def test_calibration_skips_an_execution_the_device_cannot_run(monkeypatch):
    from moee.moe import MoEMLP

    def no_kernel(self, tokens, cache):
        raise RuntimeError("Expected inputs of BF16 type but got float")

    monkeypatch.setattr(MoEMLP, "_forward_grouped", no_kernel)
    moe_model = tiny_moe_model()
    rows = calibrate_execution(moe_model, torch.randn(4, 1, 8, 8), repeats=3,
                               routed=("experts", "grouped"))
    for row, layer in zip(rows, moe_model.moe_layers().values(), strict=True):
        assert row["grouped_unsupported"].startswith("RuntimeError: Expected inputs of BF16")
        assert "grouped_ms" not in row and row["execution"] in ("experts", "union")
        assert layer.execution == row["execution"]
    rows = calibrate_execution(moe_model, torch.randn(4, 1, 8, 8), repeats=3, routed=("grouped",))
    assert all(r["execution"] in ("experts", "union") for r in rows)  # falls back to the loop


def test_block_bench_reports_a_style_the_device_cannot_run_instead_of_failing(monkeypatch):
    import math

    from moee.bench import bench_block
    from moee.moe import MoEMLP

    def no_kernel(self, tokens, cache):
        raise RuntimeError("Expected inputs of BF16 type but got float")

    monkeypatch.setattr(MoEMLP, "_forward_grouped", no_kernel)
    dense, moe = random_moe_block(16, 48, 4, 0.25)
    row = bench_block(dense, moe, 40, torch.device("cpu"))
    assert row["speedup"]["grouped"] is None and "grouped" not in row["ms"]
    assert row["unsupported"]["grouped"].startswith("RuntimeError: Expected inputs of BF16")
    others = [v for k, v in row["speedup"].items() if k != "grouped"]
    assert all(math.isfinite(v) and v > 0 for v in others) and row["efficiency"] > 0
