"""Dense vs MoE whole models, side by side (`moee bench`, parts 2 and 3)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from moee.adapters import find_mlp_sites
from moee.engine.cuda_graph import GraphedForward
from moee.engine.timing import first_error, time_interleaved
from moee.evaluate import count_macs
from moee.moe_build import LayerPlan, apply_plans
from moee.moe_model import MoEModel


class _NoMLP(nn.Module):
    """Stands in for an MLP block when timing the rest of a model: returns zeros."""

    def __init__(self, d_out: int) -> None:
        super().__init__()
        self.d_out = d_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.d_out)


def without_mlps(dense: nn.Module) -> nn.Module:
    """A copy of `dense` whose MLP blocks do nothing: what neither model can speed up."""
    rest = copy.deepcopy(dense)
    for site in find_mlp_sites(rest):
        site.install(_NoMLP(site.weights().d_out))
    return rest


@torch.inference_mode()
def bench_model(dense: nn.Module, moe_model: nn.Module, batch: torch.Tensor,
                device: torch.device) -> dict:
    """Whole-model latency of dense vs MoE on one batch, with two ideal ratios: MACs, and
    Amdahl (the dense model's measured non-MLP time stays, its MLP time shrinks by the MLP
    MAC ratio)."""
    x = batch.to(device, next(dense.parameters()).dtype)  # images in the models' dtype
    rest = without_mlps(dense)
    secs = time_interleaved({"dense": lambda: dense(x), "moe": lambda: moe_model(x),
                             "rest": lambda: rest(x)}, device)
    t_d, t_m, t_r = secs["dense"], secs["moe"], secs["rest"]
    macs_d, macs_m, macs_r = count_macs(dense, x), count_macs(moe_model, x), count_macs(rest, x)
    mlp_ratio = (macs_m - macs_r) / (macs_d - macs_r)
    mlp_share = min(max((t_d - t_r) / t_d, 0.0), 1.0)  # noise can put t_r above t_d
    amdahl = 1 / ((1 - mlp_share) + mlp_share * mlp_ratio)
    row = {"batch": x.shape[0], "dtype": str(x.dtype).removeprefix("torch."),
           "dense_ms": t_d * 1e3, "moe_ms": t_m * 1e3,
           "non_mlp_ms": t_r * 1e3, "mlp_time_share": mlp_share, "mlp_mac_ratio": mlp_ratio,
           "speedup": t_d / t_m, "ideal": macs_d / macs_m,
           "efficiency": t_d / t_m / (macs_d / macs_m), "amdahl_ideal": amdahl,
           "amdahl_efficiency": t_d / t_m / amdahl}
    if x.is_cuda:
        row["graphed"] = graphed_times(dense, moe_model, x)
    return row


def graphed_times(dense: nn.Module, moe_model: nn.Module, x: torch.Tensor) -> dict:
    """Dense and MoE each replayed from a CUDA graph (`GraphedForward`; the MoE's "experts"
    layers on "grouped" in bf16, "masked" otherwise), timed side by side; or the reason
    capture failed."""
    graphed_dense = GraphedForward(dense)
    graphed_moe = GraphedForward(copy.deepcopy(moe_model))
    why = first_error(lambda: (graphed_dense(x), graphed_moe(x)))
    if why is not None:
        return {"error": why}
    secs = time_interleaved({"dense": lambda: graphed_dense(x), "moe": lambda: graphed_moe(x)},
                            x.device)
    return {"dense_ms": secs["dense"] * 1e3, "moe_ms": secs["moe"] * 1e3,
            "speedup": secs["dense"] / secs["moe"]}


def param_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def deit_base_sized_moe(fractions: list[list[float]], device, dtype=torch.float32,
                        seed: int = 0):
    """A DeiT-base-sized HF ViT (random weights) and a MoE copy whose layer i has experts of
    the given neuron fractions (e.g. taken from a real extraction's expert sizes)."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    config = ViTConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                       intermediate_size=3072, image_size=224, patch_size=16, num_labels=1000,
                       attn_implementation="sdpa")
    dense = ViTForImageClassification(config).eval()
    moe = random_moe_copy(dense, fractions, seed)
    return dense.to(device, dtype), moe.to(device, dtype).eval()


def random_moe_copy(dense: nn.Module, fractions: list[list[float]] | dict[str, list[float]],
                    seed: int = 0) -> MoEModel:
    """A MoE copy of `dense` for timing: layer i gets experts of neuron fractions
    `fractions[i * len(fractions) // layers]` (or `fractions[site name]`, sites not named
    staying dense), random neurons and random router centres (a timing stand-in: its routing
    is not a real extraction's)."""
    student = copy.deepcopy(dense)
    sites = find_mlp_sites(student)
    rng = np.random.default_rng(seed)
    plans = []
    for i, site in enumerate(sites):
        if isinstance(fractions, dict) and site.name not in fractions:
            continue
        w = site.weights()
        hidden, d_in = w.hidden_size, w.d_in
        fr = (fractions[site.name] if isinstance(fractions, dict)
              else fractions[i * len(fractions) // len(sites)])
        experts = [np.sort(rng.choice(hidden, max(1, round(f * hidden)), replace=False))
                   for f in fr]
        plans.append(LayerPlan(site.name, experts, rng.normal(size=(len(fr), d_in))))
    apply_plans(sites, plans)
    return MoEModel(student).eval()


def fractions_from_checkpoint(path) -> list[list[float]]:
    """Per-layer expert sizes as fractions of the dense hidden width, from moee_config.json."""
    cfg = json.loads((Path(path) / "moee_config.json").read_text())
    hidden = cfg["base_model"]["config"]["intermediate_size"]
    return [[len(e) / hidden for e in layer["experts"]] for layer in cfg["layers"]]
