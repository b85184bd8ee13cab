"""The "grouped" execution: `grouped_mm` over padded expert weights, no host synchronisation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moee.engine.weights import InferenceWeights, padded

# Public from torch 2.10 (or so); earlier releases with the kernel have the private name.
_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def run_grouped(tokens: torch.Tensor, expert: torch.Tensor, w: InferenceWeights) -> torch.Tensor:
    """(N, d), (N,) -> (N, d_out); token counts stay on the device (for GPUs, CUDA graphs)."""
    if _GROUPED_MM is None:
        raise NotImplementedError("'grouped' needs torch.nn.functional.grouped_mm "
                                  f"(not in torch {torch.__version__})")
    pw1, pb1, pw2 = padded(w)
    n, d, d_out = tokens.shape[0], w.w1.shape[1], w.w2.shape[0]
    # Counted into a fixed-size vector: bincount's output size depends on the data, which
    # torch.compile cannot capture in one graph.
    counts = expert.new_zeros(len(w.indices)).index_add_(0, expert, torch.ones_like(expert))
    order = torch.argsort(expert)
    sorted_expert = expert.index_select(0, order)
    offs = counts.cumsum(0).to(torch.int32)
    x = tokens.new_zeros(n, pw1.shape[1])  # (N, d_pad)
    x[:, :d] = tokens.index_select(0, order)
    h = w.activate(_GROUPED_MM(x, pw1, offs=offs) + pb1.index_select(0, sorted_expert),
                   pw2.shape[1]).contiguous()  # (N, m_max)
    y = _GROUPED_MM(h, pw2, offs=offs)[:, :d_out] + w.out_bias.index_select(0, sorted_expert)
    return torch.empty_like(y).index_copy_(0, order, y)
