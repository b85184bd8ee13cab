"""The numbers behind the figures, from a MoE model's layers (and labelled batches)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from moee.moe import MoEMLP, moe_layers
from moee.util.batches import Batch, call_model
from moee.util.modes import eval_mode


@dataclass
class LayerAnalysis:
    """One MoE layer: expert sizes, kept and pruned neurons of the dense width, cosine
    similarity of the router centres (k, k) and Jaccard overlap of the experts' neurons (k, k)."""

    site: str
    dense_width: int
    kept: int
    expert_sizes: list[int]
    centre_similarity: np.ndarray
    neuron_overlap: np.ndarray

    @property
    def pruned(self) -> int:
        return self.dense_width - self.kept


def _overlap(experts: list[set[int]]) -> np.ndarray:
    k = len(experts)
    out = np.eye(k)
    for i in range(k):
        for j in range(i + 1, k):
            out[i, j] = out[j, i] = len(experts[i] & experts[j]) / len(experts[i] | experts[j])
    return out


def analyse_layers(model: torch.nn.Module, dense_widths: dict[str, int]) -> list[LayerAnalysis]:
    """Every MoE layer of `model`; `dense_widths` maps a layer's site to its dense MLP width."""
    rows = []
    for layer in moe_layers(model).values():
        centres = F.normalize(layer.router_centres.float(), dim=-1)
        experts = [set(e) for e in layer.dense_experts()]
        rows.append(LayerAnalysis(layer.site, dense_widths.get(layer.site, layer.fc1.out_features),
                                  layer.fc1.out_features, layer.expert_sizes(),
                                  (centres @ centres.T).numpy(), _overlap(experts)))
    return rows


@torch.inference_mode()
def routing_by_class(model: torch.nn.Module, batches: Iterable[Batch], n_classes: int
                     ) -> dict[str, np.ndarray]:
    """Per MoE layer, (classes, experts) share of each class's tokens routed to each expert,
    from (inputs, labels) batches."""
    layers = moe_layers(model)
    counts = {m.site: np.zeros((n_classes, m.num_experts)) for m in layers.values()}
    labels: list[torch.Tensor] = []

    def hook(layer: MoEMLP):
        def record(_m, args):
            x = args[0]
            expert = layer.route(x.reshape(-1, x.shape[-1])).reshape(x.shape[:-1])
            per_row = expert.reshape(expert.shape[0], -1)  # (B, tokens)
            for label, row in zip(labels[0].tolist(), per_row, strict=True):
                counts[layer.site][label] += np.bincount(row.cpu().numpy(),
                                                         minlength=layer.num_experts)
        return record

    handles = [m.register_forward_pre_hook(hook(m)) for m in layers.values()]
    try:
        with eval_mode(model):
            for batch in batches:
                labels[:] = [batch[1]]
                call_model(model, batch)
    finally:
        for h in handles:
            h.remove()
    return {site: c / np.maximum(c.sum(1, keepdims=True), 1) for site, c in counts.items()}
