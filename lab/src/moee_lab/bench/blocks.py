"""Dense vs MoE execution styles on one MLP block, side by side (`moee bench`, part 1).

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
On CUDA also dense and MoE each replayed from a CUDA graph ("graphed").
Ideal speedup = dense MACs / MoE MACs (torch.utils.flop_counter); efficiency = speedup / ideal.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from moee.engine.timing import first_error, time_interleaved
from moee.evaluate import count_macs
from moee.moe import MoEMLP
from moee_lab.bench.models import graphed_times


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
                 torch.randn(n_experts, d, generator=g), kept, site="block")
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
    gather.configure(presliced=False)
    grouped.configure(execution="grouped")
    union.configure(execution="union")
    styles = {"dense": dense, "moee": moe, "gather": gather, "grouped": grouped, "union": union,
              "mask": mask_style(moe), "loop": loop_style(moe)}
    unsupported = {name: why for name in ("gather", "grouped", "union", "mask", "loop")
                   if (why := first_error(lambda f=styles[name]: f(x))) is not None}
    for name in unsupported:
        del styles[name]
    secs = time_interleaved({name: (lambda f=f: f(x)) for name, f in styles.items()}, device)
    cache_bytes = moe.cache_bytes()  # what the timed runs built (count_macs rebuilds it)
    ms = {name: t * 1e3 for name, t in secs.items()}
    ideal = count_macs(dense, x) / count_macs(moe, x)
    row = {"tokens": tokens, "dtype": str(dtype).replace("torch.", ""), "ideal": ideal,
           "ms": ms, "presliced_extra_bytes": moe.presliced_bytes(),
           "cache_bytes": cache_bytes, "unsupported": unsupported}
    row["speedup"] = {k: ms["dense"] / v for k, v in ms.items() if k != "dense"}
    row["speedup"].update({k: None for k in unsupported})
    row["efficiency"] = row["speedup"]["moee"] / ideal
    if x.is_cuda:  # both replayed from CUDA graphs: the MoE on "grouped" (bf16) / "masked"
        row["graphed"] = graphed_times(dense, moe, x)
        if "speedup" in row["graphed"]:
            row["graphed"]["efficiency"] = row["graphed"]["speedup"] / ideal
    return row


