"""Side-by-side speed of dense vs MoE execution styles (`moee bench`, benchmarks/).

Styles timed in one run on the same weights and the same routing:
  dense       the original MLP
  moee        MoEMLP's default (execution="experts"): grouped per-expert matmuls on pre-sliced
              weights, the exact masked path at or below `small_batch_tokens`
  gather      the same with `presliced=False`: expert weights index-gathered from the shared
              union each call (no extra weight memory)
  grouped     MoEMLP execution="grouped": torch grouped_mm over padded expert weights
  union       MoEMLP's fallback: the pruned union run densely
  mask        MoEfication-style: full MLP, hidden masked to the expert's neurons
  loop        CMoE-style: Python loop over every expert, tokens picked by boolean mask,
              weights indexed from the shared matrices on every call
Ideal speedup = dense MACs / MoE MACs (torch.utils.flop_counter); efficiency = speedup / ideal.
For whole models the MAC ideal also credits attention time the MoE does not touch, so a second
ideal follows Amdahl: only the MLP share of the dense model's measured time shrinks, by the
MLP MAC ratio.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from moee.evaluate import count_macs
from moee.moe import MoEMLP
from moee.timing import first_error, time_interleaved


def random_moe_block(d: int, hidden: int, n_experts: int, active: float, seed: int = 0,
                     dtype=torch.float32, device="cpu") -> tuple[nn.Module, MoEMLP]:
    """A dense `fc2(gelu(fc1))` and a MoEMLP over it whose experts each hold `active` of the
    hidden neurons (random subsets; their union is close to all neurons)."""
    g = torch.Generator().manual_seed(seed)
    dense = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))
    m = max(1, round(active * hidden))
    experts = [torch.randperm(hidden, generator=g)[:m].sort().values for _ in range(n_experts)]
    kept = torch.unique(torch.cat(experts))
    pos = torch.full((hidden,), -1, dtype=torch.long)
    pos[kept] = torch.arange(len(kept))
    fc1 = nn.Linear(d, len(kept))
    fc2 = nn.Linear(len(kept), d)
    with torch.no_grad():
        fc1.weight.copy_(dense[0].weight[kept])
        fc1.bias.copy_(dense[0].bias[kept])
        fc2.weight.copy_(dense[2].weight[:, kept])
        fc2.bias.copy_(dense[2].bias)
    moe = MoEMLP(fc1, fc2, nn.GELU(), [pos[e] for e in experts],
                 torch.randn(n_experts, d, generator=g), kept)
    return dense.to(device, dtype).eval(), moe.to(device, dtype).eval()


def mask_style(moe: MoEMLP) -> Callable[[torch.Tensor], torch.Tensor]:
    """MoEfication's execution: every neuron computed, then multiplied by the expert mask."""
    mask = torch.zeros(moe.num_experts, moe.fc1.out_features, device=moe.fc1.weight.device,
                       dtype=moe.fc1.weight.dtype)
    for e in range(moe.num_experts):
        mask[e, moe.expert_index(e)] = 1

    def run(x: torch.Tensor) -> torch.Tensor:
        expert = moe.route(x)
        return moe.fc2(moe.activation(moe.fc1(x)) * mask[expert])

    return run


def loop_style(moe: MoEMLP) -> Callable[[torch.Tensor], torch.Tensor]:
    """CMoE-style execution: loop over all experts, boolean-mask tokens, index weights."""

    def run(x: torch.Tensor) -> torch.Tensor:
        expert = moe.route(x)
        y = torch.zeros(x.shape[0], moe.fc2.out_features, dtype=x.dtype, device=x.device)
        for e in range(moe.num_experts):
            sel = expert == e
            idx = moe.expert_index(e)
            h = moe.activation(F.linear(x[sel], moe.fc1.weight[idx], moe.fc1.bias[idx]))
            y[sel] = F.linear(h, moe.fc2.weight[:, idx])
        return y + moe.fc2.bias

    return run


@torch.inference_mode()
def bench_block(dense: nn.Module, moe: MoEMLP, tokens: int, device: torch.device,
                dtype=torch.float32, seed: int = 0) -> dict:
    """Time every style on one (tokens, d) input; returns ms per style and ratios."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, moe.fc1.in_features, generator=g).to(device, dtype)
    gather, grouped, union = (copy.deepcopy(moe) for _ in range(3))
    gather.presliced, grouped.execution, union.execution = False, "grouped", "union"
    styles = {"dense": dense, "moee": moe, "gather": gather, "grouped": grouped, "union": union,
              "mask": mask_style(moe), "loop": loop_style(moe)}
    unsupported = {name: why for name in ("gather", "grouped", "union", "mask", "loop")
                   if (why := first_error(lambda f=styles[name]: f(x))) is not None}
    for name in unsupported:
        del styles[name]
    secs = time_interleaved({name: (lambda f=f: f(x)) for name, f in styles.items()}, device)
    ms = {name: t * 1e3 for name, t in secs.items()}
    ideal = count_macs(dense, x) / count_macs(moe, x)
    row = {"tokens": tokens, "dtype": str(dtype).replace("torch.", ""), "ideal": ideal,
           "ms": ms, "presliced_extra_bytes": moe.presliced_bytes(), "unsupported": unsupported}
    row["speedup"] = {k: ms["dense"] / v for k, v in ms.items() if k != "dense"}
    row["speedup"].update({k: None for k in unsupported})
    row["efficiency"] = row["speedup"]["moee"] / ideal
    return row


class _NoMLP(nn.Module):
    """Stands in for an MLP block when timing the rest of a model: returns zeros."""

    def __init__(self, d_out: int) -> None:
        super().__init__()
        self.d_out = d_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.d_out)


def without_mlps(dense: nn.Module) -> nn.Module:
    """A copy of `dense` whose MLP blocks do nothing: what neither model can speed up."""
    from moee.adapters import find_mlp_sites

    rest = copy.deepcopy(dense)
    for site in find_mlp_sites(rest):
        site.install(_NoMLP(site.fc2.out_features))
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
    return {"batch": x.shape[0], "dtype": str(x.dtype).removeprefix("torch."),
            "dense_ms": t_d * 1e3, "moe_ms": t_m * 1e3,
            "non_mlp_ms": t_r * 1e3, "mlp_time_share": mlp_share, "mlp_mac_ratio": mlp_ratio,
            "speedup": t_d / t_m, "ideal": macs_d / macs_m,
            "efficiency": t_d / t_m / (macs_d / macs_m), "amdahl_ideal": amdahl,
            "amdahl_efficiency": t_d / t_m / amdahl}


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
    import numpy as np
    from transformers import ViTConfig, ViTForImageClassification

    from moee.adapters import find_mlp_sites
    from moee.build import LayerPlan, apply_plans
    from moee.moe_model import MoEModel

    torch.manual_seed(seed)
    config = ViTConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                       intermediate_size=3072, image_size=224, patch_size=16, num_labels=1000,
                       attn_implementation="sdpa")
    dense = ViTForImageClassification(config).eval()
    student = copy.deepcopy(dense)
    sites = find_mlp_sites(student)
    rng = np.random.default_rng(seed)
    plans = []
    for i, site in enumerate(sites):
        fr = fractions[i * len(fractions) // len(sites)]
        experts = [np.sort(rng.choice(3072, max(1, round(f * 3072)), replace=False)) for f in fr]
        plans.append(LayerPlan(site.name, experts, rng.normal(size=(len(fr), 768))))
    apply_plans(sites, plans)
    moe = MoEModel(student, plans)
    return dense.to(device, dtype), moe.to(device, dtype).eval()


def fractions_from_checkpoint(path) -> list[list[float]]:
    """Per-layer expert sizes as fractions of the dense hidden width, from moee_config.json."""
    import json
    from pathlib import Path

    cfg = json.loads((Path(path) / "moee_config.json").read_text())
    hidden = cfg["base_model"]["config"]["intermediate_size"]
    return [[len(e) / hidden for e in layer["experts"]] for layer in cfg["layers"]]
