"""MAC-budget mode: one p per layer, chosen from each layer's measured sensitivity, so that
the model meets a MAC target with the least output divergence from the dense model.

Every layer's options (dense, or each p of the grid) are measured one layer at a time on a
few calibration batches: the executed MLP MACs (from where the router sent the calibration
tokens) and the distillation loss against the dense model. Treating the layers' losses as
additive, the allocation walks down each layer's lower convex hull of (MACs, loss), always
taking the cheapest loss per MAC saved, until the target is met, then spends the slack left
by the last step on the upgrades that cut the loss most.
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from moee.adapters import MLPSite, entry_input
from moee.config import DistillConfig, ExtractConfig
from moee.errors import ConfigError
from moee.evaluate import count_macs
from moee.extraction.fit import LayerFit
from moee.losses import loss_kind, output_loss
from moee.moe_build import LayerPlan, build_moe_mlp
from moee.util.atomic import write_json
from moee.util.batches import Batch, call_model, output_tensor
from moee.util.cache_key import stage_key
from moee.util.fingerprint import new_digest, update_batch_digest
from moee.util.modes import eval_mode


@dataclass
class Option:
    """One way to run a layer: `p` None = dense. `macs` over the probe batches' tokens;
    `method` "moee" (routed experts) or "static" (one expert: pruning); `seconds` the layer's
    measured latency where a latency budget timed it."""

    p: float | None
    macs: float
    divergence: float
    method: str = "moee"
    seconds: float | None = None


def by_macs(option: Option) -> float:
    return option.macs


@dataclass
class Allocation:
    """The chosen option per fitted layer and what the whole choice costs (probe batches)."""

    choice: list[Option]
    fraction: float  # predicted MACs / dense MACs in the budget's scope


@torch.inference_mode()
def each_entry_input(model: nn.Module, sites: Sequence[MLPSite], batches: list[Batch],
                     see: Callable[[int, torch.Tensor], None]) -> None:
    """Run `batches` through `model` in eval mode, calling `see(i, x)` with site i's MLP
    input each time that MLP runs."""
    def hook(i):
        def call(_m, args, kwargs):
            see(i, entry_input(args, kwargs))  # and return None: the input is left as it is
        return call

    handles = [s.entry.register_forward_pre_hook(hook(i), with_kwargs=True)
               for i, s in enumerate(sites)]
    try:
        with eval_mode(model):
            for batch in batches:
                call_model(model, batch)
    finally:
        for h in handles:
            h.remove()


def _tokens_per_layer(model: nn.Module, sites: Sequence[MLPSite], probe: list[Batch]
                      ) -> list[int]:
    """Positions each MLP computes over the probe batches (stages of Swin or ConvNeXt differ)."""
    counts = [0] * len(sites)

    def count(i: int, x: torch.Tensor) -> None:
        counts[i] += x.numel() // x.shape[-1]

    each_entry_input(model, sites, probe, count)
    return counts


def option_macs(fit: LayerFit, plan: LayerPlan | None, tokens: int) -> float:
    w = fit.site.weights()
    per_token = fit.active_neurons(plan) * w.params_per_neuron
    if plan is not None:
        per_token += len(plan.experts) * w.d_in  # the router's similarity to every centre
    return per_token * tokens


def same_experts(a: LayerPlan, b: LayerPlan | None) -> bool:
    return b is not None and len(a.experts) == len(b.experts) and all(
        np.array_equal(x, y) for x, y in zip(a.experts, b.experts, strict=True))


@torch.inference_mode()
def dense_references(dense: nn.Module, probe: list[Batch]) -> tuple[list[torch.Tensor], str]:
    """The dense model's outputs on the probe batches and the distillation loss they call for."""
    references, kind = [], "kl"
    with eval_mode(dense):
        for batch in probe:
            out = call_model(dense, batch)
            kind = loss_kind(out, DistillConfig())
            references.append(output_tensor(out).detach().clone())
    return references, kind


@torch.inference_mode()
def divergence(student: nn.Module, site: MLPSite, plan: LayerPlan, probe: list[Batch],
               references: list[torch.Tensor], kind: str) -> float:
    """Install `plan` at `site` of `student` (eval mode) and return the mean distillation loss
    of `student` against the dense references over the probe batches."""
    site.install(build_moe_mlp(site, plan).eval())
    return sum(float(output_loss(output_tensor(call_model(student, b)), ref, b, kind))
               for b, ref in zip(probe, references, strict=True)) / len(probe)


def whole_plan(fit: LayerFit) -> LayerPlan:
    """Every neuron in one expert: the layer's dense-equivalent MoE."""
    return LayerPlan(fit.site.name, [np.arange(fit.width)],
                     fit.stats.input_mean[:1].astype(np.float32), fit.metric)


@torch.inference_mode()
def measure_options(dense: nn.Module, student: nn.Module, student_sites: dict[str, MLPSite],
                    fits: list[LayerFit], probe: list[Batch], config: ExtractConfig,
                    tokens: list[int]) -> list[list[Option]]:
    """Per fitted layer, each option's MACs and loss against `dense` with only that layer
    converted in `student` (a copy of `dense`; its converted layers are left dense-equivalent,
    all neurons in one expert)."""
    references, kind = dense_references(dense, probe)
    grid = sorted(set(config.budget.p_grid), reverse=True)
    table = []
    bar = tqdm(total=len(fits) * len(grid), desc="layer sensitivity", leave=False,
               disable=not config.progress)
    with eval_mode(student):
        for fit, n in zip(fits, tokens, strict=True):
            options = [Option(None, option_macs(fit, None, n), 0.0)]
            site, previous = student_sites[fit.site.name], None
            for p in grid if fit.stats is not None else ():
                plan = fit.plan(p)
                if same_experts(plan, previous):
                    options.append(replace(options[-1], p=p))
                else:
                    loss = divergence(student, site, plan, probe, references, kind)
                    options.append(Option(p, option_macs(fit, plan, n), loss))
                previous = plan
                bar.update(1)
            if fit.stats is None:  # no cluster: only the dense option
                bar.update(len(grid))
            else:  # back to dense-equivalent: all neurons, one expert
                site.install(build_moe_mlp(site, whole_plan(fit)).eval())
            table.append(options)
    bar.close()
    return table


def _hull(options: list[Option], cost: Callable[[Option], float]) -> list[Option]:
    """The lower convex hull of (cost, loss) from the dense option down to the cheapest: the
    options worth stepping through, in order."""
    path = [options[0]]
    rest = sorted(options[1:], key=lambda o: (-cost(o), o.divergence))
    while True:
        cur = path[-1]
        cheaper = [o for o in rest if cost(o) < cost(cur)]
        if not cheaper:
            return path
        path.append(min(cheaper, key=lambda o: ((o.divergence - cur.divergence)
                                                / (cost(cur) - cost(o)), cost(o))))


def allocate(table: list[list[Option]], fixed: float, dense: float, target: float,
             cost: Callable[[Option], float] = by_macs, what: str = "budget.target_macs"
             ) -> tuple[list[Option], float]:
    """(one option per layer, predicted cost fraction) meeting `target` * `dense`, where
    `fixed` is what the unconverted part of the model costs; `cost` reads an option's cost
    (MACs by default, or measured seconds)."""
    budget = target * dense
    hulls = [_hull(options, cost) for options in table]
    at = [0] * len(table)
    total = fixed + sum(cost(h[0]) for h in hulls)

    def step(i: int):
        a, b = hulls[i][at[i]], hulls[i][at[i] + 1]
        return ((b.divergence - a.divergence) / (cost(a) - cost(b)), i)

    heap = [step(i) for i, h in enumerate(hulls) if len(h) > 1]
    heapq.heapify(heap)
    while total > budget and heap:
        _, i = heapq.heappop(heap)
        total -= cost(hulls[i][at[i]]) - cost(hulls[i][at[i] + 1])
        at[i] += 1
        if at[i] + 1 < len(hulls[i]):
            heapq.heappush(heap, step(i))
    if total > budget:
        raise ConfigError(
            f"{what}={target}: the cheapest choice of the grid costs "
            f"{total / dense:.3f} of dense; add lower p values to budget.p_grid or "
            "convert more layers")
    choice = [h[k] for h, k in zip(hulls, at, strict=True)]
    # The last step may undershoot: spend the slack on the upgrades that cut the loss most
    # (or, at equal loss, use the most of it). Each move raises the total: it terminates.
    while True:
        moves = [(c.divergence - o.divergence, cost(o) - cost(c), i, o) for i, (c, options)
                 in enumerate(zip(choice, table, strict=True)) for o in options
                 if o.divergence <= c.divergence and cost(o) > cost(c)
                 and total - cost(c) + cost(o) <= budget]
        if not moves:
            break
        *_, i, o = max(moves, key=lambda m: m[:2])
        total += cost(o) - cost(choice[i])
        choice[i] = o
    return choice, total / dense


def options_key(origin: dict[str, Any], config: ExtractConfig, probe: list[Batch],
                layers: list[int]) -> str:
    """The key of the table of every layer's options: the activation store's origin, the
    probe batches and the fitted layers, under every setting the table reads (cluster,
    select, router, `p_grid`, `held_out`, `seed`...)."""
    h = new_digest()
    for batch in probe:
        update_batch_digest(h, batch)
    return stage_key("budget", {"store": origin, "probe": h.hexdigest(), "layers": layers},
                     config)


def allocate_budget(dense: nn.Module, dense_sites: list[MLPSite], student: nn.Module,
                    student_sites: list[MLPSite], fits: list[LayerFit], probe: list[Batch],
                    config: ExtractConfig, origin: dict[str, Any], work: Path,
                    target_macs: float) -> Allocation:
    """Measure (or reuse from `work/budget_options.json`) every layer's options, one per p
    of `config.budget.p_grid`, and choose one per layer meeting `target_macs` of the dense
    MACs (counted as `config.budget.scope` says)."""
    if not probe:
        raise ConfigError("budget mode needs calibration batches to measure sensitivity on")
    by_name = {s.name: s for s in student_sites}
    tokens_all = _tokens_per_layer(dense, dense_sites, probe)
    index = {s.name: i for i, s in enumerate(dense_sites)}
    tokens = [tokens_all[index[f.site.name]] for f in fits]
    key = options_key(origin, config, probe, [f.index for f in fits])
    path = work / "budget_options.json"
    table = None
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            table = [[Option(**o) for o in row] for row in saved["table"]]
    if table is None:
        table = measure_options(dense, student, by_name, fits, probe, config, tokens)
        write_json(path, {"key": key, "table": [[asdict(o) for o in row] for row in table]})
    if config.budget.scope == "model":
        dense_macs = float(sum(count_macs(dense, b) for b in probe))
    else:
        dense_macs = float(sum(n * w.hidden_size * w.params_per_neuron for n, w in
                               zip(tokens_all, (s.weights() for s in dense_sites), strict=True)))
    fitted_dense = sum(row[0].macs for row in table)
    choice, fraction = allocate(table, dense_macs - fitted_dense, dense_macs, target_macs)
    return Allocation(choice, fraction)
