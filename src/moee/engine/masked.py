"""The "masked" execution: every kept neuron for every token, the others' outputs silenced."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moee.engine.weights import InferenceWeights, union_weights


def run_masked(tokens: torch.Tensor, expert: torch.Tensor, w: InferenceWeights) -> torch.Tensor:
    """(N, d), (N,) -> (N, d_out) in a handful of kernel calls whatever the number of experts:
    fast for a few tokens. Same function as the expert loop."""
    how, table = w.read("masking")
    w1, w2t = union_weights(w, tokens.shape[0])
    union = w2t.shape[0]
    if how == "bias":  # the mask rides in fc1's bias: no multiply over (N, U) values
        h = w.activate(torch.addmm(table.index_select(0, expert), tokens, w1.T), union)
    else:
        h = w.activate(F.linear(tokens, w1, w.b1), union).mul_(table.index_select(0, expert))
    return torch.addmm(w.out_bias.index_select(0, expert), h, w2t)  # (N, d_out)
