"""Make a layer's experts reproduce the dense layer (not in the paper): after the experts' neurons
are selected, fit the router to the expert that serves each token best (`router_fit`) and refit
the down projection and offsets by least squares on the tokens it routes (`down_refit`). Both
choose their strength on held-out calibration tokens and keep what they replace when they do
not beat it there."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from moee.adapters import MLPSite
from moee.config import RouterConfig, SelectConfig
from moee.engine import route, router_weights
from moee.extraction.down_refit import refit_down
from moee.extraction.output_error import expert_errors, held_out_rows, output_energy
from moee.extraction.record import ActivationStore
from moee.extraction.router_fit import fit_router
from moee.moe_build import LayerPlan


@torch.no_grad()
def route_tokens(inputs: np.ndarray, centres: np.ndarray, metric: str,
                 chunk: int = 65536) -> np.ndarray:
    """Expert id MoEMLP's router picks for each recorded MLP input, streamed in chunks."""
    router = router_weights(torch.as_tensor(np.asarray(centres), dtype=torch.float32), metric)
    out = []
    for start in range(0, len(inputs), chunk):
        x = torch.tensor(np.asarray(inputs[start : start + chunk]), dtype=torch.float32)  # a copy
        out.append(route(x, router).numpy())
    return np.concatenate(out)


def reproduce_output(plan: LayerPlan, site: MLPSite, store: ActivationStore, layer: int,
                     select: SelectConfig, router: RouterConfig, held_out: float,
                     seed: int = 0, routed: np.ndarray | None = None) -> LayerPlan:
    """`plan` with a fitted router (`router.centres == "fitted"`) and a refit down projection
    (`select.refit_down`) where each does better on held-out tokens; its `load` and `report`
    filled either way. `seed`: the run's, for the router fit's token sample; `routed`: each
    recorded token's expert under `plan`'s router, when the caller has it (else routed here)."""
    hidden, inputs = store.hidden(layer), store.inputs(layer)
    down = site.weights().down.detach().float().cpu().numpy()  # (d_out, H)
    k = len(plan.experts)
    offsets = (np.zeros((k, down.shape[0]), np.float32) if plan.expert_bias is None
               else plan.expert_bias)
    held = held_out_rows(len(hidden), held_out)
    if routed is None:
        routed = route_tokens(inputs, plan.centres, plan.metric)
    report: dict = {}
    if router.centres == "fitted" and k > 1:
        errors = expert_errors(hidden, down, plan.experts, offsets)
        sizes = np.array([len(e) for e in plan.experts]) if router.fit_same_macs else None
        fitted = fit_router(inputs, errors, held, routed, output_energy(hidden, down),
                            router.fit_c, router.fit_tokens, seed, sizes)
        if fitted is not None:
            report["router"] = fitted.report
        if fitted is not None and fitted.rows is not None:
            keep = fitted.experts
            plan = replace(plan, experts=[plan.experts[e] for e in keep], centres=fitted.rows,
                           metric="dot",
                           expert_bias=None if plan.expert_bias is None else offsets[keep])
            offsets = offsets[keep]
            routed = route_tokens(inputs, fitted.rows, "dot")  # positions among the kept
    if select.refit_down:
        refit = refit_down(hidden, down, plan.experts, plan.kept_neurons(), offsets, routed,
                           held, select.refit_strengths, select.refit_offsets)
        report["refit"] = refit.report
        bias = refit.offsets if select.refit_offsets or plan.expert_bias is not None else None
        plan = replace(plan, down=refit.down, expert_bias=bias)
    load = np.bincount(routed, minlength=len(plan.experts)) / len(routed)
    return replace(plan, load=load, report=report)
