"""Execution paths: every one checked against the slow reference, and the calibrated fallback."""

import pytest
import torch
from conftest import tiny_moe_model, tiny_vit

import moee
from moee.moe_build import LayerPlan, apply_plans
from moee_lab.bench.blocks import loop_style, mask_style, random_moe_block


def test_baseline_styles_and_union_match_references():
    dense, moe = random_moe_block(16, 64, 4, 0.3)
    x = torch.randn(50, 16)
    with torch.no_grad():
        ref = moe.forward_reference(x)
        torch.testing.assert_close(moe(x), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mask_style(moe)(x), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loop_style(moe)(x), ref, rtol=1e-5, atol=1e-5)
        moe.configure(execution="union")  # the pruned union densely: fc2(act(fc1)), kept neurons
        union_ref = moe.fc2(torch.nn.functional.gelu(moe.fc1(x)))
        torch.testing.assert_close(moe(x), union_ref)


def test_full_union_equals_dense_block():
    dense, moe = random_moe_block(16, 64, 3, 1.0)
    moe.configure(execution="union")
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
    moe_model = moee.MoEModel(model)
    rows = moee.calibrate(moe_model, torch.randn(2, 1, 8, 8), repeats=3,
                          routed=("experts", "grouped"))
    assert all(r["grouped_ms"] > 0 and r["union_ms"] > 0 for r in rows)
    for row, layer in zip(rows, moe_model.moe_layers().values(), strict=True):
        assert layer.execution_config.execution == row["execution"]
        assert layer.execution_config.small_batch_tokens == row["small_batch_tokens"]
        assert row["small_batch_tokens"] <= row["tokens"]
        assert row["masked_sweep"][0]["tokens"] == min(16, row["tokens"])
    moe_model.save_pretrained(tmp_path / "calibrated")
    loaded = moee.load(tmp_path / "calibrated").moe_layers().values()
    assert [m.execution_config for m in loaded] == [
        m.execution_config for m in moe_model.moe_layers().values()]
    moe_model.configure(execution="union")
    moe_model.save_pretrained(tmp_path)
    again = moee.load(tmp_path)
    assert all(m.execution_config.execution == "union" for m in again.moe_layers().values())
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(moe_model(x).logits, again(x).logits)


def test_whole_model_bench_reports_both_ideals():
    from moee_lab.bench.models import bench_model, without_mlps

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
    from moee_lab.bench.peak_memory import cpu_peak_bytes

    moe_model = tiny_moe_model()
    moe_model.save_pretrained(tmp_path)
    got = cpu_peak_bytes("moe", str(tmp_path), 4)
    if got is None:
        pytest.skip("no /proc/self/clear_refs on this system")
    assert got["peak"] >= got["resident"] > 0


def test_masked_threshold_sweep_leaves_the_layer_as_it_was():
    from moee.engine.calibrate import masked_threshold

    _, moe = random_moe_block(16, 64, 4, 0.3)
    moe.configure(execution="grouped", small_batch_tokens=7)
    with torch.inference_mode():
        threshold, rows = masked_threshold(moe, torch.randn(40, 16), repeats=2)
    assert moe.execution_config.execution == "grouped"
    assert moe.execution_config.small_batch_tokens == 7
    assert [r["tokens"] for r in rows] == [16, 32, 40][: len(rows)]
    won = [r["masked_ms"] * 1.02 < r["loop_ms"] for r in rows]
    assert all(won[:-1])  # the sweep stops at the first size where the loop wins
    assert threshold == (rows[-1]["tokens"] if won[-1] else
                         rows[-2]["tokens"] if len(rows) > 1 else 0)


def fake_timer(per_setting):
    """A `time_interleaved` stand-in: seconds from the setting the layer runs under."""
    def timer(fns, device, repeats, min_seconds=0.0):
        return {name: per_setting(name) for name in fns}
    return timer


def test_calibration_picks_the_faster_path_from_fixed_timings(monkeypatch):
    import moee.engine.calibrate
    from moee.engine.calibrate import masked_threshold

    _, moe = random_moe_block(16, 64, 4, 0.3)
    tokens = torch.randn(100, 16)
    # masked faster at 16 and 32 tokens, the loop from 64 on
    sweep = iter([1, 2, 1, 2, 3, 2])  # (masked, loop) per size
    threshold, rows = masked_threshold(moe, tokens, timer=lambda fns, *a, **k: {
        name: next(sweep) for name in fns})
    assert threshold == 32 and [r["tokens"] for r in rows] == [16, 32, 64]
    model = tiny_moe_model()
    # the union (another function) only when allowed, however fast it is
    for union_s, allowed, expected in ((0.5, True, "union"), (0.5, False, "experts"),
                                       (2.0, True, "experts")):
        times = {"masked": 1.0, "loop": 0.5, "experts": 1.0, "union": union_s}
        monkeypatch.setattr(moee.engine.calibrate, "time_interleaved", fake_timer(times.get))
        rows = moee.calibrate(model, torch.randn(2, 1, 8, 8), allow_approximate=allowed)
        assert {r["execution"] for r in rows} == {expected}
        assert all(r["small_batch_tokens"] == 0 for r in rows)  # the loop won at once


def test_calibration_by_default_never_changes_outputs():
    model = tiny_moe_model()
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(x).logits
    moee.calibrate(model, x, repeats=2)
    with torch.no_grad():
        after = model(x).logits
    assert all(m.execution_config.execution != "union" for m in model.moe_layers().values())
    assert (after - before).abs().max() <= 1e-5


def test_calibration_skips_an_execution_the_device_cannot_run(monkeypatch):
    import moee.moe

    def no_kernel(tokens, expert, weights):
        raise RuntimeError("Expected inputs of BF16 type but got float")

    monkeypatch.setitem(moee.moe._RUN, "grouped", no_kernel)
    moe_model = tiny_moe_model()
    rows = moee.calibrate(moe_model, torch.randn(4, 1, 8, 8), repeats=3,
                          routed=("experts", "grouped"))
    for row, layer in zip(rows, moe_model.moe_layers().values(), strict=True):
        assert row["grouped_unsupported"].startswith("RuntimeError: Expected inputs of BF16")
        assert "grouped_ms" not in row and "experts_ms" in row
        assert layer.execution_config.execution == row["execution"]
    rows = moee.calibrate(moe_model, torch.randn(4, 1, 8, 8), repeats=3, routed=("grouped",))
    assert all("experts_ms" in r and "grouped_ms" not in r for r in rows)  # falls back


def test_block_bench_reports_a_style_the_device_cannot_run_instead_of_failing(monkeypatch):
    import math

    import moee.moe
    from moee_lab.bench.blocks import bench_block

    def no_kernel(tokens, expert, weights):
        raise RuntimeError("Expected inputs of BF16 type but got float")

    monkeypatch.setitem(moee.moe._RUN, "grouped", no_kernel)
    dense, moe = random_moe_block(16, 48, 4, 0.25)
    row = bench_block(dense, moe, 40, torch.device("cpu"))
    assert row["speedup"]["grouped"] is None and "grouped" not in row["ms"]
    assert row["unsupported"]["grouped"].startswith("RuntimeError: Expected inputs of BF16")
    others = [v for k, v in row["speedup"].items() if k != "grouped"]
    assert all(math.isfinite(v) and v > 0 for v in others) and row["efficiency"] > 0
