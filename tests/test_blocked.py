"""The expert loop's oneDNN-blocked copies (CPU, fp32): same numbers as the per-token
reference, built only when a group falls in the cost model's band, counted in cache_bytes."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import moee.engine.blocked as blocked
from moee.moe import MoEMLP

D, H = 16, 64
pytestmark = pytest.mark.skipif(not blocked.blocked_supported(torch.zeros(1)),
                                reason="this torch build has no oneDNN linear")


def _moe(gated: bool) -> MoEMLP:
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    fc1, fc2 = nn.Linear(D, H), nn.Linear(H, D)
    gate = nn.Linear(D, H) if gated else None
    experts = [torch.randperm(H, generator=g)[: 9 + 8 * i] for i in range(4)]
    act = nn.SiLU() if gated else nn.GELU()
    return MoEMLP(fc1, fc2, act, experts, torch.randn(4, D, generator=g), torch.arange(H),
                  gate=gate).eval()


def _band(monkeypatch, lo: int, hi: int, min_elements: int = 1) -> None:
    costs = dataclasses.replace(blocked.COSTS, blocked_min_tokens=lo, blocked_max_tokens=hi,
                                blocked_min_elements=min_elements)
    monkeypatch.setattr(blocked, "COSTS", costs)


@pytest.mark.parametrize("gated", [False, True])
def test_blocked_copies_give_the_reference_output(monkeypatch, gated):
    _band(monkeypatch, 1, 10**6)  # every group, and the one-token path, read blocked copies
    moe = _moe(gated)
    moe.configure(execution="experts", small_batch_tokens=0)
    x = torch.randn(5, 11, D)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), moe.forward_reference(x), rtol=1e-5, atol=1e-5)
        one = x[:1, :1]
        torch.testing.assert_close(moe(one), moe.forward_reference(one), rtol=1e-5, atol=1e-5)
        same = x[0, :1].expand(7, D)  # every token to one expert: the loop's shortcut
        torch.testing.assert_close(moe(same), moe.forward_reference(same), rtol=1e-5,
                                   atol=1e-5)
    w = moe.inference_weights()
    assert len(w.blocked) == moe.num_experts


def test_blocked_copies_are_built_only_in_band_and_counted(monkeypatch):
    _band(monkeypatch, 20, 30)
    moe = _moe(False)
    moe.configure(execution="experts", small_batch_tokens=0)
    with torch.no_grad():
        moe(torch.randn(1, D))
        moe(torch.randn(12, D))  # 4 experts: no group reaches 20 tokens
        plain_bytes = moe.cache_bytes()
        assert moe.inference_weights().built("blocked") is None  # not built
        x = torch.randn(1, D).expand(24, D)  # one group of 24: in the band
        y = moe(x)
    w = moe.inference_weights()
    assert w.built("blocked") is not None
    widths = sum(w.widths) * (D + D)  # W1_e (w_e, D) and W2_e (D, w_e), fp32
    assert moe.cache_bytes() == plain_bytes + 4 * widths
    torch.testing.assert_close(y, moe.forward_reference(x), rtol=1e-5, atol=1e-5)


def test_no_blocked_copies_without_presliced_experts_or_off_cpu_fp32(monkeypatch):
    _band(monkeypatch, 1, 10**6)
    moe = _moe(False)
    moe.configure(execution="experts", presliced=False, small_batch_tokens=0)
    x = torch.randn(30, D)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), moe.forward_reference(x), rtol=1e-5, atol=1e-5)
    assert moe.inference_weights().blocked is None
    assert not blocked.blocked_supported(torch.zeros(1, dtype=torch.bfloat16))


def test_macs_count_the_blocked_matmuls(monkeypatch):
    from moee.evaluate import count_macs

    moe = _moe(True)
    moe.configure(execution="experts", small_batch_tokens=0)
    x = torch.randn(40, D)
    _band(monkeypatch, 10**6, 10**6)  # no group reads blocked copies
    plain = count_macs(moe, x, executed=True)
    _band(monkeypatch, 1, 10**6)
    moe.configure(width_multiple=moe.execution_config.width_multiple)  # same cache, kept
    assert count_macs(moe, x, executed=True) == plain
    assert moe.inference_weights().blocked


def test_layers_with_small_experts_keep_plain_copies(monkeypatch):
    moe = _moe(False)
    moe.configure(execution="experts", small_batch_tokens=0)
    mean = sum(e[0].numel() for e in moe.inference_weights().experts) / moe.num_experts
    _band(monkeypatch, 1, 10**6, min_elements=int(mean) + 1)
    with torch.no_grad():
        moe(torch.randn(30, D))
    assert moe.inference_weights().blocked is None
