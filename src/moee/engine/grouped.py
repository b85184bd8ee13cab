"""The "grouped" execution: `grouped_mm` over padded expert weights, no host synchronisation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moee.engine.weights import InferenceWeights

# Public from torch 2.10 (or so); earlier releases with the kernel have the private name.
_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def sort_key_dtype(k: int) -> torch.dtype:
    """The narrowest integer dtype that holds the ids 0..k-1."""
    return torch.uint8 if k <= 256 else torch.int16 if k <= 2**15 else torch.int32


def dispatch(expert: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) expert ids -> each token's row in expert order (N,) and the int32 end offsets of
    the k groups, all on the device. Token counts come from index_add_ into a fixed-size
    vector: bincount's output size depends on the data (a host sync, and torch.compile cannot
    capture it). A sort, not a per-expert running count over an (N, k) one-hot: PyTorch scans
    a non-innermost dim slowly on a GPU (docs/gpu.md). The sort key is the narrowest integer
    that holds k ids: a GPU radix sort makes one pass per key byte, and int64 ids need eight."""
    n = expert.shape[0]
    counts = expert.new_zeros(k).index_add_(0, expert, torch.ones_like(expert))
    order = torch.argsort(expert.to(sort_key_dtype(k)), stable=True)
    row = torch.empty_like(order).scatter_(0, order, torch.arange(n, device=expert.device))
    return row, counts.cumsum(0).to(torch.int32)


def run_grouped(tokens: torch.Tensor, expert: torch.Tensor, w: InferenceWeights) -> torch.Tensor:
    """(N, d), (N,) -> (N, d_out); token counts stay on the device (for GPUs, CUDA graphs).
    Biases ride in the matmuls (`padded`): one scatter in, two grouped matmuls, the
    activation, one gather out."""
    if _GROUPED_MM is None:
        raise NotImplementedError("'grouped' needs torch.nn.functional.grouped_mm "
                                  f"(not in torch {torch.__version__})")
    pw1, pw2, unit, m_max = w.read("padded")
    n, d, d_out = tokens.shape[0], tokens.shape[1], w.w2.shape[0]
    if n == 0:
        return tokens.new_zeros(0, d_out)
    row, offs = dispatch(expert, len(w.indices))
    x = tokens.new_empty(n, pw1.shape[1])  # (N, d_pad) in expert order, then [1, 0, ...]
    x[:, d:] = unit
    x[:, :d].index_copy_(0, row, tokens)
    h = w.activate(_GROUPED_MM(x, pw1, offs=offs), pw2.shape[1])  # (N, m_pad)
    h = h.contiguous()  # gated: a view into gate|up (a no-op otherwise)
    h[:, m_max] = 1
    y = _GROUPED_MM(h, pw2, offs=offs)  # (N, d_out_pad), biases added
    return y.index_select(0, row)[:, :d_out]
