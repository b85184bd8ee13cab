"""The forward an exporter traces (`torch.export`, `torch.onnx.export`, `torch.jit.trace`).

The eager executions decide on the host (token counts, sorting, cached copies), so a traced
graph would bake one batch's routing into the file. This one keeps every decision in the
graph with operators ONNX Runtime and OpenVINO both run: a MatMul + ArgMax router, then per
expert NonZero -> Gather -> two MatMuls -> ScatterND ("gather"), or every kept neuron with the
other experts' neurons zeroed ("masked"). Expert weights are `index_select`s of the union
weights by constant indices, which the exporter folds into each expert's own weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moee.engine.routing import Router

GRAPH_FORMS = ("gather", "masked")
Span = tuple[int, int]  # (first position in the concatenated index sets, expert size)


def is_exporting() -> bool:
    """Whether the current call is traced for an exported graph, not run."""
    return (torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export()
            or torch.jit.is_tracing())


def traced_route(tokens: torch.Tensor, router: Router) -> torch.Tensor:
    """(N, d) -> (N,) expert ids, scored in fp32 like `moee.engine.route` (ArgMax takes the
    first of equal scores, as torch's argmax does). A MatMul, not a Gemm: ONNX Runtime's
    quantizer rewrites a Gemm under a new name, where it could not be told to keep it fp32."""
    weight, offset = router
    scores = tokens.to(weight.dtype) @ weight.T
    return (scores if offset is None else scores + offset).argmax(-1)


def _hidden(tokens: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None,
            activation: nn.Module, gated: bool) -> torch.Tensor:
    h = F.linear(tokens, w1, b1)
    if not gated:
        return activation(h)
    g, u = h.chunk(2, dim=-1)
    return activation(g) * u


def _expert(tokens: torch.Tensor, index: torch.Tensor, w1: torch.Tensor,
            b1: torch.Tensor | None, w2: torch.Tensor, bias: torch.Tensor,
            activation: nn.Module, gated: bool) -> torch.Tensor:
    """`tokens` through the neurons `index` (positions in the union) and the output `bias`."""
    rows = torch.cat([index, index + w2.shape[1]]) if gated else index  # gate rows, up rows
    h = _hidden(tokens, w1.index_select(0, rows),
                None if b1 is None else b1.index_select(0, rows), activation, gated)
    return F.linear(h, w2.index_select(1, index), bias)


def run_traced(tokens: torch.Tensor, expert: torch.Tensor | None, w1: torch.Tensor,
               b1: torch.Tensor | None, w2: torch.Tensor, out_bias: torch.Tensor,
               indices: torch.Tensor, spans: list[Span], activation: nn.Module, gated: bool,
               form: str = "gather") -> torch.Tensor:
    """(N, d) tokens, (N,) expert ids (None with one expert) -> (N, d_out).

    `w1` (U, d) union first matrix (gated: (2U, d)), `w2` (d_out, U), `out_bias` (k, d_out)
    each expert's output bias, `indices` the concatenated index sets, `spans` where each lies.
    One expert is a plain thin MLP (no routing in the graph)."""
    if form not in GRAPH_FORMS:
        raise ValueError(f"graph form must be one of {GRAPH_FORMS}, got {form!r}")
    union = w2.shape[1]
    if expert is None or len(spans) == 1:
        start, size = spans[0]
        return _expert(tokens, indices[start : start + size], w1, b1, w2, out_bias[0],
                       activation, gated)
    if form == "masked":
        masks = torch.zeros(len(spans), union, dtype=tokens.dtype, device=tokens.device)
        for e, (start, size) in enumerate(spans):
            masks[e].index_fill_(0, indices[start : start + size], 1.0)
        h = _hidden(tokens, w1, b1, activation, gated) * masks.index_select(0, expert)
        return F.linear(h, w2) + out_bias.index_select(0, expert)
    picks, outs = [], []
    for e, (start, size) in enumerate(spans):
        picked = torch.nonzero(expert == e).squeeze(1)
        picks.append(picked)
        outs.append(_expert(tokens.index_select(0, picked), indices[start : start + size], w1,
                            b1, w2, out_bias[e], activation, gated))
    # One scatter of every expert's rows: a scatter per expert would copy the whole output
    # once per expert (the exported op is not in place).
    y = tokens.new_zeros(tokens.shape[0], w2.shape[0])
    return y.index_copy(0, torch.cat(picks), torch.cat(outs))
