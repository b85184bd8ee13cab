"""oneDNN-blocked copies of the expert weights, for the expert loop's mid-sized groups on CPU.

Why: on CPU in fp32 a GEMM of a few tens of rows ran up to 2x faster against a weight
reordered once into oneDNN's blocked layout than against either plain layout, for any row
count (MKL's packed GEMM was as fast but is packed for one row count, at 2-4x the memory);
at a few rows, and on small matrices at any row count, it was slower (a fixed cost per call;
`benchmarks/experiments/gemm_layout.py`, docs/engine.md). So a layer whose experts are large
enough has these copies, and the loop reads them for groups within the cost model's band.
"""

from __future__ import annotations

import torch

from moee.engine.cost_model import COSTS

# The operator inductor's CPU freezing uses for fp32 linears; absent from builds without oneDNN.
_LINEAR = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
_REORDER = getattr(torch.ops.mkldnn, "_reorder_linear_weight", None)


def blocked_supported(t: torch.Tensor) -> bool:
    """Whether `t`'s weights can have blocked copies: fp32 on a CPU with oneDNN."""
    return (_LINEAR is not None and _REORDER is not None and t.device.type == "cpu"
            and t.dtype == torch.float32 and torch.backends.mkldnn.is_available())


def in_blocked_band(rows: int) -> bool:
    """Whether a GEMM of `rows` rows reads the blocked copies (cost model's band)."""
    return COSTS.blocked_min_tokens <= rows <= COSTS.blocked_max_tokens


@torch.no_grad()
def blocked_copies(experts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None,
                   w1: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Each expert's (W1_e, W2_e) reordered for oneDNN; None without pre-sliced copies
    (`experts`), where `blocked_supported(w1)` is false, or where the experts' mean W1_e is
    smaller than the cost model's `blocked_min_elements`."""
    mean_w1 = (sum(e[0].numel() for e in experts) / len(experts)) if experts else 0
    if not blocked_supported(w1) or mean_w1 < COSTS.blocked_min_elements:
        return None
    hint = COSTS.blocked_min_tokens  # the reorder's row-count hint; any count runs
    return [(_REORDER(w1e.contiguous(), hint), _REORDER(w2e.contiguous(), hint))
            for w1e, _, w2e in experts]


def blocked_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x @ W.T + b for a blocked W (a new tensor: the operator has no `out=`)."""
    return _LINEAR(x, weight, bias, "none", [], "")

