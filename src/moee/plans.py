"""A fitted extraction's experts per layer, chosen in memory from the per-layer fits: at one
`p`, for a MAC budget (`moee.extraction.budget`) or for a latency budget
(`moee.extraction.latency_budget`). `moee.FittedExtraction.plan` returns them."""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from moee.adapters import MLPSite, find_mlp_sites
from moee.config import ExtractConfig
from moee.errors import ConfigError
from moee.export.runtimes import Runtime
from moee.extraction.budget import allocate_budget
from moee.extraction.fit import LayerFit, fit_layers
from moee.extraction.latency_budget import LatencyTimer, allocate_latency
from moee.extraction.record import ActivationStore
from moee.moe_build import LayerPlan


@dataclass
class ExtractionPlans:
    """The experts `FittedExtraction.build` installs: one `LayerPlan` per layer that becomes
    MoE (`layer_plans`; a layer without one stays dense), the report's row of every fitted
    layer, the budget's summary (empty at one p) and the settings they were chosen with
    (`config.select.p` or `config.budget` as planned)."""

    layer_plans: list[LayerPlan]
    rows: list[dict[str, Any]]
    budget: dict[str, Any]
    config: ExtractConfig
    seconds: float = 0.0  # spent choosing them

    @property
    def p_per_layer(self) -> list[float | None]:
        """Each fitted layer's p (None: dense)."""
        return [r.get("p") for r in self.rows]


def plan_config(config: ExtractConfig, p: float | None, target_macs: float | None,
                target_latency: float | None, engine: str | None, batch: int | None
                ) -> ExtractConfig:
    """`config` with what `plan` was asked for: one `p`, a MAC target or a latency target (at
    most one of them; none: what `config` says), the latency budget's engine and batch."""
    if sum(v is not None for v in (p, target_macs, target_latency)) > 1:
        raise ConfigError("plan: one of p, target_macs and target_latency, not several")
    budget = config.budget
    if engine is not None or batch is not None:
        budget = replace(budget, engine=engine or budget.engine, batch=batch or budget.batch)
    if p is not None:
        return replace(config, select=replace(config.select, p=p),
                       budget=replace(budget, target_macs=None, target_latency=None))
    if target_macs is not None or target_latency is not None:
        budget = replace(budget, target_macs=target_macs, target_latency=target_latency)
    return replace(config, budget=budget)


def fitting_settings(config: ExtractConfig) -> ExtractConfig:
    """`config` less what a plan chooses (`select.p` and the budgets' targets): configs equal
    here can plan from one `moee.fit` (the sweeps' key)."""
    return replace(config, select=replace(config.select, p=1.0),
                   budget=replace(config.budget, target_macs=None, target_latency=None))


def plan_arguments(config: ExtractConfig) -> dict[str, float]:
    """The `FittedExtraction.plan` arguments that ask for what `config` asks for: its latency
    target, else its MAC target, else its `select.p`."""
    if config.budget.target_latency is not None:
        return {"target_latency": config.budget.target_latency}
    if config.budget.target_macs is not None:
        return {"target_macs": config.budget.target_macs}
    return {"p": config.select.p}


def plan_layers(model: nn.Module, sites: list[MLPSite], fits: list[LayerFit], adapter,
                probe: list, store: ActivationStore, config: ExtractConfig, work: Path,
                timer: LatencyTimer | None = None
                ) -> tuple[list[LayerPlan], list[dict], dict[str, Any]]:
    """(plans, report rows, budget summary): every layer at `select.p`, or in budget mode at
    the p per layer that meets `budget.target_macs` with the least measured loss, or the
    latency budget's choice (timed by `timer`, default `Runtime(config.budget.engine)`).
    `model` is left untouched: the budgets measure their options on a copy."""
    p, target_macs = config.select.p, config.budget.target_macs
    ps: list[float | None] = [p] * len(fits)
    summary: dict[str, Any] = {}
    if config.budget.target_latency is not None:
        return _latency_plans(model, sites, fits, adapter, probe, store, config, work,
                              timer or Runtime(config.budget.engine))
    if target_macs is not None:
        student = copy.deepcopy(model)  # left with dense-equivalent MoEs by the measuring
        allocation = allocate_budget(model, sites, student,
                                     find_mlp_sites(student, adapter, validate=False), fits,
                                     probe, config, store.origin, work, target_macs)
        ps = [o.p for o in allocation.choice]
        summary = {"target_macs": target_macs, "scope": config.budget.scope,
                   "predicted_fraction": allocation.fraction, "p_per_layer": ps}
    plans, rows = [], []
    slow = config.select.refit_down or config.router.centres == "fitted"
    for fit, layer_p in tqdm(list(zip(fits, ps, strict=True)), desc="fit router + refit",
                             leave=False, disable=not (config.progress and slow)):
        plan = None if layer_p is None else fit.plan(layer_p)
        if plan is not None:
            plans.append(plan)
        rows.append(fit.report_row(plan, layer_p if plan is not None else None))
    return plans, rows, summary


def _latency_plans(model, sites, fits: list[LayerFit], adapter, probe: list,
                   store: ActivationStore, config: ExtractConfig, work: Path,
                   timer: LatencyTimer) -> tuple[list[LayerPlan], list[dict], dict[str, Any]]:
    """(plans, report rows, budget summary) of the latency budget: per layer dense, static or
    routed, timed in `config.budget.engine` (`moee.extraction.latency_budget`)."""
    static, _ = fit_layers(store, sites, [f.index for f in fits], config.with_method("static"),
                           work)
    student = copy.deepcopy(model)
    allocation = allocate_latency(
        model, student, find_mlp_sites(student, adapter, validate=False),
        lambda m: find_mlp_sites(m, adapter, validate=False), fits, static, probe, config,
        timer)
    plans, rows = [], []
    for c in allocation.choice:
        if c.plan is not None:
            plans.append(c.plan)
        rows.append(dict(c.fit.report_row(c.plan, c.option.p), method=c.option.method))
    return plans, rows, allocation.summary
