"""Module surgery: turn expert index sets into `MoEMLP`s and swap them into the model. The
extraction builds its plans here, and loading a checkpoint its saved ones."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.utils import skip_init

from moee.adapters import MLPSite, find_mlp_sites
from moee.engine import ExecutionConfig
from moee.errors import AdapterMismatchError
from moee.moe import MoEMLP
from moee.util.batches import call_model, output_tensor
from moee.util.modes import eval_mode


@dataclass
class LayerPlan:
    """What one MLP becomes: expert neuron sets (ids in the dense MLP) and router centres.
    Only a hand-over from extraction (or a checkpoint's JSON) to `build_moe_mlp`: once built,
    the module is the one source of truth."""

    site: str
    experts: list[np.ndarray]
    centres: np.ndarray  # (k, d)
    metric: str = "cosine"
    expert_bias: np.ndarray | None = None  # (k, d_out) mean output of left-out neurons
    execution_config: ExecutionConfig | None = None
    down: np.ndarray | None = None  # (d_out, U) refit down projection (None = the dense slice)
    load: np.ndarray | None = None  # (k,) share of calibration tokens this router sends each
    report: dict | None = None  # the router fit's and the refit's held-out errors

    def kept_neurons(self) -> np.ndarray:
        """Union of all experts' neurons; every other neuron is pruned."""
        return np.unique(np.concatenate(self.experts))

    def to_json(self) -> dict:
        return {"site": self.site, "metric": self.metric,
                "experts": [np.asarray(e).tolist() for e in self.experts]}


def _linear_from(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    # skip_init: no default initialisation drawn from the caller's global RNG, then overwritten
    lin = skip_init(nn.Linear, weight.shape[1], weight.shape[0], bias=bias is not None,
                    device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin



def build_moe_mlp(site: MLPSite, plan: LayerPlan) -> MoEMLP:
    """Slice the dense MLP to the union of kept neurons and index each expert into it."""
    w = site.weights()
    kept = torch.as_tensor(plan.kept_neurons(), dtype=torch.long)
    position = torch.full((w.hidden_size,), -1, dtype=torch.long)
    position[kept] = torch.arange(len(kept))  # dense id -> union position
    experts = [position[torch.as_tensor(np.asarray(e), dtype=torch.long)] for e in plan.experts]
    with torch.no_grad():
        def rows(weight, bias) -> nn.Linear:
            return _linear_from(weight[kept], bias[kept] if bias is not None else None)

        fc1 = rows(w.up, w.up_bias)
        gate = None if w.gate is None else rows(w.gate, w.gate_bias)
        # fc2 keeps its full bias: it is added once per token whatever the expert.
        down = (w.down[:, kept] if plan.down is None
                else torch.as_tensor(np.asarray(plan.down)).to(w.down))
        fc2 = _linear_from(down, w.down_bias)
    centres = torch.as_tensor(np.asarray(plan.centres), dtype=torch.float32)
    bias = None if plan.expert_bias is None else torch.as_tensor(plan.expert_bias).float()
    moe = MoEMLP(fc1, fc2, site.activation, experts, centres, kept, plan.metric, bias, site.name,
                 plan.execution_config, gate)
    return moe.to(w.up.device).train(site.entry.training)  # buffers follow the weights' device


def left_out_mean_output(site: MLPSite, experts: list[np.ndarray],
                         hidden_mean: np.ndarray) -> np.ndarray:
    """(k, d_out): W2[:, not in expert] @ cluster-mean hidden[not in expert], per expert.

    Dropping a neuron also drops its average contribution; adding that average back as a
    per-expert constant removes the systematic shift without computing the neuron.
    """
    w2 = site.weights().down.detach().double().cpu().numpy()  # (d_out, H)
    out = np.zeros((len(experts), w2.shape[0]))
    for c, neurons in enumerate(experts):
        dropped = np.ones(w2.shape[1], dtype=bool)
        dropped[neurons] = False
        out[c] = w2[:, dropped] @ hidden_mean[c, dropped]
    return out.astype(np.float32)


def apply_plans(sites: list[MLPSite], plans: list[LayerPlan]) -> dict[str, MoEMLP]:
    """Install one MoEMLP per plan (in place). Sites without a plan stay dense."""
    by_name = {s.name: s for s in sites}
    installed = {}
    for plan in plans:
        if plan.site not in by_name:
            raise KeyError(f"no MLP block named {plan.site!r}; the model has {list(by_name)}")
        moe = build_moe_mlp(by_name[plan.site], plan)
        by_name[plan.site].install(moe)
        installed[plan.site] = moe
    return installed


@torch.no_grad()
def check_full_width(model: nn.Module, adapter: str, batch) -> None:
    """A user adapter's proof: on a copy of `model`, every MLP the adapter finds becomes a
    one-expert MoE layer of all its neurons (p = 1), which must give the model's own output
    on `batch`. A wrong `weights()` or `install`, or a `reference` repeating the adapter's
    own mistake, shows here as a different output."""
    import copy

    twin = copy.deepcopy(model).eval()  # the MoE layers follow its flag (build_moe_mlp)
    sites = find_mlp_sites(twin, adapter, validate=False)
    plans = [LayerPlan(s.name, [np.arange(s.weights().hidden_size)],
                       np.ones((1, s.weights().d_in), np.float32)) for s in sites]
    apply_plans(sites, plans)
    with eval_mode(model):
        expected = output_tensor(call_model(model, batch))
    got = output_tensor(call_model(twin, batch))
    diff = float((expected.float() - got.float()).abs().max())
    scale = float(expected.float().abs().max()) + 1e-6
    if diff > 1e-3 * scale:
        raise AdapterMismatchError(
            f"adapter {adapter!r}: with every MLP it finds replaced by all of its own neurons "
            f"(p = 1) the model's output changes by {diff:.3g} (of {scale:.3g}); its weights() "
            "or install() do not describe the model's MLP blocks")
