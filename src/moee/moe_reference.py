"""The MoE layer's oracle: a slow per-token forward written from the definition (route to
the most similar centre, run that expert's neurons), kept apart from the engine it checks."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moee.engine import routing_dtype


@torch.no_grad()
def reference_forward(layer, x: torch.Tensor) -> torch.Tensor:
    """(..., d) -> (..., d_out) through `layer` (a `MoEMLP`), one token at a time."""
    lead, d = x.shape[:-1], x.shape[-1]
    b1 = layer.fc1.bias
    out = []
    for t in x.reshape(-1, d):
        r = t.to(routing_dtype(t.dtype))
        centres = layer.router_centres.to(r.dtype)
        if layer.metric == "cosine":
            sim = F.cosine_similarity(r[None], centres, dim=-1)
        elif layer.metric == "dot":
            sim = centres @ r
        else:
            sim = -((r[None] - centres) ** 2).sum(-1)
        e = int(sim.argmax())
        idx = layer.expert_index(e)
        up = layer.fc1.weight[idx] @ t + (b1[idx] if b1 is not None else 0)
        if layer.gate is None:
            h = layer.activation(up)
        else:  # act(gate) * up
            gb = layer.gate.bias
            h = layer.activation(layer.gate.weight[idx] @ t + (gb[idx] if gb is not None else 0))
            h = h * up
        y = layer.fc2.weight[:, idx] @ h + layer.expert_bias[e].to(t.dtype)
        out.append(y + layer.fc2.bias if layer.fc2.bias is not None else y)
    return torch.stack(out).reshape(*lead, -1)
