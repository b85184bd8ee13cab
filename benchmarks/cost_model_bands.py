"""The token bands and sizes of the engine's CPU cost model that `fit_cost_model.py` fits from
side-by-side timings: where "masked" reads (in, out) union copies, where the expert loop reads
oneDNN-blocked expert copies and from which expert size, and (on AMX) from how many tokens
per expert the loop beats "masked". Each returns its constants and prints what it measured."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from moee.engine.blocked import _LINEAR, _REORDER, blocked_supported
from moee.engine.weights import gemm_layout

TOKENS = [2**i for i in range(11)]  # 1 .. 1024
CLEARLY = 0.03  # faster by at least this share to count as faster
D, UNION, EXPERT = 768, 2304, 384  # a DeiT-base-sized MLP at 75% of its neurons; one expert


def _weights(rows: int, cols: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, cols, generator=g) / cols**0.5).to(dtype)


def _pair(n: int, w1: torch.Tensor, w2t: torch.Tensor) -> Callable[[], object]:
    """Both matmuls of an MLP on n tokens: addmm(b1, x, W1ᵀ) then addmm(b2, h, W2ᵀ)."""
    x = torch.randn(n, w1.shape[1], dtype=w1.dtype)
    b1, b2 = torch.zeros(w1.shape[0], dtype=w1.dtype), torch.zeros(w2t.shape[1], dtype=w1.dtype)
    h = torch.empty(n, w1.shape[0], dtype=w1.dtype)
    y = torch.empty(n, w2t.shape[1], dtype=w1.dtype)
    return lambda: (torch.addmm(b1, x, w1.T, out=h), torch.addmm(b2, h, w2t, out=y))


def faster_band(plain: dict[int, float], other: dict[int, float]) -> tuple[int, int] | None:
    """The longest run of consecutive token counts where `other` is clearly faster than
    `plain` (seconds by token count), as (first, last); None when it never is."""
    runs = _runs([n for n in TOKENS if other[n] < plain[n] * (1 - CLEARLY)])
    if not runs:
        return None
    longest = max(runs, key=len)
    return longest[0], longest[-1]


def _runs(ns: list[int]) -> list[list[int]]:
    """Consecutive members of TOKENS among `ns`, grouped."""
    runs: list[list[int]] = []
    for n in ns:
        if runs and TOKENS.index(n) == TOKENS.index(runs[-1][-1]) + 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    return runs


def _print_ratios(label: str, plain: dict[int, float], other: dict[int, float]) -> None:
    print(f"  {label}, plain / other time: "
          + " ".join(f"{n}:{plain[n] / other[n]:.2f}" for n in TOKENS))


def fit_in_out_band(median_seconds, repeats: int) -> tuple[int, int] | None:
    """Token counts at which "masked"'s two union matmuls run faster with (in, out) weight
    copies (`gemm_layout`) than with nn.Linear's (out, in) storage (fp32, CPU)."""
    w1, w2 = _weights(UNION, D, 1), _weights(D, UNION, 2)
    io1, io2t = gemm_layout(w1), gemm_layout(w2).T
    fns = {}
    for n in TOKENS:
        fns[f"plain{n}"] = _pair(n, w1, w2.T)
        fns[f"io{n}"] = _pair(n, io1, io2t)
    secs = median_seconds(fns, repeats)
    plain = {n: secs[f"plain{n}"] for n in TOKENS}
    io = {n: secs[f"io{n}"] for n in TOKENS}
    _print_ratios(f"masked's union {D} -> {UNION} -> {D}, (in, out) copies", plain, io)
    return faster_band(plain, io)


def _blocked_pair(n: int, w1: torch.Tensor, w2: torch.Tensor) -> Callable[[], object]:
    """An expert's two matmuls on n tokens through oneDNN-blocked copies."""
    hint = max(n, 8)
    b1, b2 = torch.zeros(w1.shape[0]), torch.zeros(w2.shape[0])
    r1, r2 = _REORDER(w1.contiguous(), hint), _REORDER(w2.contiguous(), hint)
    x = torch.randn(n, w1.shape[1])
    return lambda: _LINEAR(_LINEAR(x, r1, b1, "none", [], ""), r2, b2, "none", [], "")


def _expert_times(median_seconds, repeats: int, width: int, tokens: list[int]
                  ) -> tuple[dict[int, float], dict[int, float]]:
    """(plain, blocked) seconds of an expert of `width` neurons at each token count."""
    w1, w2 = _weights(width, D, 3), _weights(D, width, 4)
    io1, io2t = gemm_layout(w1), gemm_layout(w2).T  # the loop's plain copies
    fns = {}
    for n in tokens:
        fns[f"plain{n}"] = _pair(n, io1, io2t)
        fns[f"blocked{n}"] = _blocked_pair(n, w1, w2)
    secs = median_seconds(fns, repeats)
    return ({n: secs[f"plain{n}"] for n in tokens}, {n: secs[f"blocked{n}"] for n in tokens})


def fit_blocked(median_seconds, repeats: int) -> dict[str, int] | None:
    """blocked_min_tokens / blocked_max_tokens: the band where an expert of EXPERT neurons runs
    clearly faster on oneDNN-blocked copies; blocked_min_elements: the smallest W1_e (neurons
    x D) from which it still does at the band's middle, and at every larger size tried. None
    without oneDNN's linear (the copies are never built there)."""
    if not blocked_supported(torch.zeros(1)):
        return None
    plain, blocked = _expert_times(median_seconds, repeats, EXPERT, TOKENS)
    _print_ratios(f"an expert {D} -> {EXPERT} -> {D}, blocked copies", plain, blocked)
    band = faster_band(plain, blocked)
    if band is None:
        return None
    middle = 2 ** round((math.log2(band[0]) + math.log2(band[1])) / 2)
    widths = (64, 128, 192, 256, 384, 512, 768)
    wins = {}
    for width in widths:
        p, b = _expert_times(median_seconds, repeats, width, [middle])
        wins[width] = b[middle] < p[middle] * (1 - CLEARLY)
    print(f"  at {middle} tokens, blocked clearly faster by expert width: "
          + " ".join(f"{w}:{'yes' if v else 'no'}" for w, v in wins.items()))
    smallest = widths[-1]
    for width in reversed(widths):
        if not wins[width]:
            break
        smallest = width
    return {"blocked_min_tokens": band[0], "blocked_max_tokens": band[1],
            "blocked_min_elements": smallest * D}


def fit_loop_min_tokens(median_seconds, repeats: int, dtype: torch.dtype, experts: int = 8
                        ) -> int | None:
    """The fewest tokens per expert from which the expert loop (`experts` experts of EXPERT
    neurons, each its own two matmuls) beats "masked" (every token through the union of
    UNION neurons, in one pair of matmuls): the AMX rule's amx_min_tokens_per_expert."""
    w1, w2 = _weights(UNION, D, 5, dtype), _weights(D, UNION, 6, dtype)
    e1, e2 = _weights(EXPERT, D, 7, dtype), _weights(D, EXPERT, 8, dtype)
    fns = {}
    per_expert = [t for t in TOKENS if t >= 4]
    for t in per_expert:
        one = _pair(t, e1, e2.T)
        fns[f"loop{t}"] = lambda one=one: [one() for _ in range(experts)]
        fns[f"masked{t}"] = _pair(t * experts, w1, w2.T)
    secs = median_seconds(fns, repeats)
    print(f"  {experts} experts of {EXPERT} vs masked over {UNION}, {dtype}, masked / loop time "
          "by tokens per expert: "
          + " ".join(f"{t}:{secs[f'masked{t}'] / secs[f'loop{t}']:.2f}" for t in per_expert))
    winning = [t for t in per_expert if secs[f"loop{t}"] < secs[f"masked{t}"]]
    last_losing = max((t for t in per_expert if t not in winning), default=None)
    later = [t for t in winning if last_losing is None or t > last_losing]
    return later[0] if later else None
