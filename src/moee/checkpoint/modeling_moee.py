"""moee's MoE layers for transformers' `trust_remote_code`: copied verbatim next to a moee
checkpoint's weights, so that `AutoModel….from_pretrained(dir, trust_remote_code=True)` runs
the MoE model with torch and transformers alone (moee need not be installed).

Kept free of any moee import on purpose. The checkpoint's config.json is the base model's with
two additions: `moee_layers` (where each MoE layer sits, its shapes, where its activation
lives, which modules became identities) and `auto_map`, naming `MoEE<BaseClass>`, a
subclass of the transformers class that installs the layers before the weights load.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import transformers
from torch import nn


class MoEMLP(nn.Module):
    """Top-1 routed experts over a union of kept neurons, each expert an index set into it:
    the same tensors, names and arithmetic as moee's `MoEMLP` (one reference path)."""

    def __init__(self, spec: dict, activation: nn.Module) -> None:
        super().__init__()
        d_in, d_out, union, k = spec["d_in"], spec["d_out"], spec["union"], spec["experts"]
        self.fc1 = nn.Linear(d_in, union, bias=spec["up_bias"])
        self.gate = nn.Linear(d_in, union, bias=spec["gate_bias"]) if spec["gated"] else None
        self.fc2 = nn.Linear(union, d_out, bias=spec["down_bias"])
        self.activation, self.metric = activation, spec["metric"]
        self.register_buffer("expert_indices", torch.zeros(spec["indices"], dtype=torch.long))
        self.register_buffer("expert_offsets", torch.zeros(k + 1, dtype=torch.long))
        self.register_buffer("router_centres", torch.zeros(k, d_in))
        self.register_buffer("kept_neurons", torch.zeros(union, dtype=torch.long))
        self.register_buffer("expert_bias", torch.zeros(k, d_out))

    def route(self, x: torch.Tensor) -> torch.Tensor:
        c = self.router_centres.float()
        if self.metric == "cosine":
            return F.linear(x.float(), F.normalize(c, dim=-1)).argmax(-1)
        if self.metric == "dot":
            return F.linear(x.float(), c).argmax(-1)
        return (F.linear(x.float(), c) - 0.5 * (c * c).sum(-1)).argmax(-1)  # euclidean

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        tokens = x.reshape(-1, x.shape[-1])
        expert = self.route(tokens)
        y = tokens.new_zeros(tokens.shape[0], self.fc2.out_features)
        for e in range(self.router_centres.shape[0]):
            rows = (expert == e).nonzero().squeeze(-1)
            if rows.numel() == 0:
                continue
            idx = self.expert_indices[self.expert_offsets[e] : self.expert_offsets[e + 1]]
            xe = tokens[rows]
            b1 = None if self.fc1.bias is None else self.fc1.bias[idx]
            up = F.linear(xe, self.fc1.weight[idx], b1)
            if self.gate is None:
                h = self.activation(up)
            else:
                gb = None if self.gate.bias is None else self.gate.bias[idx]
                h = self.activation(F.linear(xe, self.gate.weight[idx], gb)) * up
            y[rows] = F.linear(h, self.fc2.weight[:, idx]) + self.expert_bias[e].to(y.dtype)
        if self.fc2.bias is not None:
            y = y + self.fc2.bias
        return y.reshape(*lead, -1)


def install_moe_layers(model: nn.Module, spec: dict) -> None:
    """Put each MoE layer where moee put it and make identities of the modules whose work it
    took over; activations are taken from the freshly built model before anything changes."""
    layers = spec["layers"]
    activations = [model.get_submodule(layer["activation"]) for layer in layers]
    for path in spec["identities"]:
        _set(model, path, nn.Identity())
    for layer, activation in zip(layers, activations, strict=True):
        _set(model, layer["path"], MoEMLP(layer, activation))


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def _moe_class(base: type) -> type:
    class MoEE(base):
        def __init__(self, config, *args, **kwargs) -> None:
            super().__init__(config, *args, **kwargs)
            install_moe_layers(self, config.moee_layers)

    MoEE.__name__ = MoEE.__qualname__ = "MoEE" + base.__name__
    return MoEE


def __getattr__(name: str) -> type:
    """`MoEE<BaseClass>` for any transformers model class (what `auto_map` names)."""
    base = getattr(transformers, name[4:], None) if name.startswith("MoEE") else None
    if base is None:
        raise AttributeError(name)
    return _moe_class(base)
