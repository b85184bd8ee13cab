"""Latency-budget mode: per layer dense, statically pruned (one expert) or routed experts, each
at a p of the grid, chosen by measured latency in the engine the model will be served with.

Every candidate of a layer is timed on that layer's real input at the serving batch, in that
engine, and its sensitivity measured as in the MAC budget (the distillation loss with only
that layer converted). The MAC budget's allocation then runs on seconds: the rest of the
model costs the dense model's measured time less its MLPs'. A layer timed alone does not
cost what it costs inside the model (caches, threads, an engine's fusions), so the chosen
model is built and timed beside dense, and the line from summed layer seconds to the model's
measured fraction is refitted on every model measured so far before choosing again, until
one lands within `TOLERANCE` of the target (at most `ROUNDS` choices). Static and routed
candidates compete on the same footing (and alone: `best_allocation`), so the result is never
worse, by the measured sensitivity, than static pruning alone at the same predicted latency.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from moee.adapters import MLPSite
from moee.config import ExtractConfig
from moee.errors import ConfigError
from moee.extraction.budget import (
    Option,
    allocate,
    dense_references,
    divergence,
    each_entry_input,
    same_experts,
    whole_plan,
)
from moee.extraction.fit import LayerFit
from moee.moe_build import LayerPlan, apply_plans, build_moe_mlp
from moee.util.batches import Batch
from moee.util.modes import eval_mode

TOLERANCE = 0.05  # a measured fraction this far from the target sends the choice round again
ROUNDS = 4


class LatencyTimer(Protocol):
    """What the budget times with (`moee.export.runtimes.Runtime`)."""

    engine: str

    def time_layers(self, modules: dict[str, nn.Module], x: torch.Tensor) -> dict[str, float]: ...

    def time_models(self, models: dict[str, nn.Module], batch: Batch) -> dict[str, float]: ...


@dataclass
class Candidate:
    option: Option
    plan: LayerPlan | None  # None: the layer stays dense
    fit: LayerFit


@dataclass
class LatencyAllocation:
    """The chosen candidate per fitted layer and what the choice measured."""

    choice: list[Candidate]
    summary: dict[str, Any] = field(default_factory=dict)


def timing_batch(probe: list[Batch], rows: int) -> Batch:
    """`rows` rows cut from the probe batches (repeated when they hold fewer)."""
    def cat(parts):
        first = parts[0]
        if torch.is_tensor(first):
            whole = torch.cat(parts)
            reps = -(-rows // whole.shape[0])
            return whole.repeat(reps, *([1] * (whole.dim() - 1)))[:rows]
        if isinstance(first, dict):
            return {k: cat([p[k] for p in parts]) for k in first}
        if isinstance(first, (tuple, list)):
            return type(first)(cat([p[i] for p in parts]) for i in range(len(first)))
        return first
    return cat(list(probe))


def layer_inputs(model: nn.Module, sites: list[MLPSite], batch: Batch) -> list[torch.Tensor]:
    """Each site's MLP input when `model` runs `batch`."""
    seen: dict[int, torch.Tensor] = {}

    def keep(i: int, x: torch.Tensor) -> None:
        seen[i] = x.detach().clone()

    each_entry_input(model, sites, [batch], keep)
    return [seen[i] for i in range(len(sites))]


def _candidates(fit: LayerFit, static: LayerFit, grid: list[float], methods: tuple[str, ...]
                ) -> list[tuple[str, float, LayerPlan]]:
    """(method, p, plan) of each distinct routed and static plan of the layer, of `methods`."""
    out: list[tuple[str, float, LayerPlan]] = []
    for method, f in (("moee", fit), ("static", static)):
        if method not in methods:
            continue
        previous = None
        for p in grid if f.stats is not None else ():
            plan = f.plan(p)
            if plan is not None and not same_experts(plan, previous):
                out.append((method, p, plan))
            previous = plan
    return out


@torch.inference_mode()
def measure_candidates(dense: nn.Module, student: nn.Module, student_sites: dict[str, MLPSite],
                       fits: list[LayerFit], static: list[LayerFit], probe: list[Batch],
                       inputs: list[torch.Tensor], timer: LatencyTimer, config: ExtractConfig
                       ) -> list[list[Candidate]]:
    """Per fitted layer: dense and each routed and static candidate, with its loss against
    `dense` (only that layer converted in `student`) and its measured seconds on the layer's
    input."""
    references, kind = dense_references(dense, probe)
    grid = sorted(set(config.budget.p_grid), reverse=True)
    table = []
    with eval_mode(student):
        for fit, fixed, x in tqdm(list(zip(fits, static, inputs, strict=True)),
                                  desc=f"layer sensitivity + latency ({timer.engine})",
                                  leave=False, disable=not config.progress):
            site = student_sites[fit.site.name]
            reference = fit if fit.stats is not None else fixed
            if reference.stats is None:
                table.append([Candidate(Option(None, 0.0, 0.0, "dense"), None, fit)])
                continue
            found = [Candidate(Option(None, 0.0, 0.0, "dense"), None, fit)]
            modules = {0: build_moe_mlp(site, whole_plan(reference)).eval()}
            for method, p, plan in _candidates(fit, fixed, grid, config.budget.methods):
                loss = divergence(student, site, plan, probe, references, kind)
                found.append(Candidate(Option(p, 0.0, loss, method), plan,
                                       fit if method == "moee" else fixed))
                modules[len(modules)] = build_moe_mlp(site, plan).eval()
            site.install(modules[0])  # back to dense-equivalent for the next layers
            seconds = timer.time_layers({str(k): m for k, m in modules.items()}, x)
            for k, c in enumerate(found):
                c.option.seconds = seconds[str(k)]
            table.append(found)
    return table


def by_seconds(option: Option) -> float:
    return float(option.seconds)


def best_allocation(options: list[list[Option]], fixed: float, dense: float, target: float
                    ) -> tuple[list[Option], float]:
    """The allocation by seconds with the least summed loss among: every candidate, static
    and dense only, routed and dense only. The greedy walk over convex hulls is not exact on
    a discrete grid; trying the single-method menus too makes the mix never worse (by the
    measured loss) than static pruning or routing alone at the same predicted latency."""
    found, error = [], None
    for menu in (None, ("dense", "static"), ("dense", "moee")):
        table = [[o for o in row if menu is None or o.method in menu] for row in options]
        try:
            found.append(allocate(table, fixed, dense, target, by_seconds,
                                  "budget.target_latency"))
        except ConfigError as e:
            error = error or e
    if not found:
        raise error
    return min(found, key=lambda f: (sum(o.divergence for o in f[0]), f[1]))


def _built(dense: nn.Module, sites_of, choice: list[Candidate]) -> nn.Module:
    """A copy of `dense` with the chosen plans installed."""
    model = copy.deepcopy(dense).eval()
    apply_plans(sites_of(model), [c.plan for c in choice if c.plan is not None])
    return model.eval()


def _line(points: list[tuple[float, float]], naive: tuple[float, float]) -> tuple[float, float]:
    """(a, b) of measured fraction = a + b * summed layer seconds, least squares over the
    measured (seconds, fraction) points; `naive` until two distinct points give a rising
    line."""
    xs, ys = np.array(points, dtype=np.float64).T
    if len(points) < 2 or np.ptp(xs) <= 0:
        return naive
    b, a = np.polyfit(xs, ys, 1)
    return (float(a), float(b)) if b > 0 else naive


def _choose(table: list[list[Candidate]], line: tuple[float, float], target: float
            ) -> tuple[list[Candidate], float, float]:
    """(the choice, its summed layer seconds, its predicted fraction) under `line`."""
    a, b = line
    options = [[c.option for c in row] for row in table]
    chosen, predicted = best_allocation(options, a / b, 1 / b, target)
    choice = [next(c for c in row if c.option is o) for row, o in zip(table, chosen,
                                                                      strict=True)]
    return choice, sum(by_seconds(c.option) for c in choice), predicted


def allocate_latency(dense: nn.Module, student: nn.Module, student_sites: list[MLPSite],
                     sites_of, fits: list[LayerFit], static: list[LayerFit], probe: list[Batch],
                     config: ExtractConfig, timer: LatencyTimer) -> LatencyAllocation:
    """Measure every layer's candidates (dense, static and routed at each p of the grid) in
    `timer`'s engine at `config.budget.batch` rows and choose one per layer meeting
    `config.budget.target_latency` of the dense model's measured latency; `sites_of(model)`
    finds a copy's MLP sites. Each chosen model is timed beside dense and the choice made
    again on the refitted seconds-to-fraction line while it misses by more than
    `TOLERANCE` (at most `ROUNDS` choices); the closest feasible choice is kept."""
    if not probe:
        raise ConfigError("the latency budget needs calibration batches to measure on")
    b = config.budget
    batch = timing_batch(probe, b.batch)
    inputs = layer_inputs(dense, [f.site for f in fits], batch)
    table = measure_candidates(dense, student, {s.name: s for s in student_sites}, fits, static,
                               probe, inputs, timer, config)
    dense_seconds = timer.time_models({"dense": dense}, batch)["dense"]
    fitted = sum(by_seconds(row[0].option) for row in table)
    naive = (max(dense_seconds - fitted, 0.0) / dense_seconds, 1 / dense_seconds)
    points, rounds, tried, fastest_tried = [(fitted, 1.0)], [], [], False
    for _ in range(ROUNDS):
        line = _line(points, naive)
        try:
            choice, summed, predicted = _choose(table, line, b.target_latency)
        except ConfigError:
            if fastest_tried:
                break  # the line puts the target past the fastest choice, measured already
            # Out of reach by the line: measure the fastest choice, a point that corrects it.
            choice = [min(row, key=lambda c: by_seconds(c.option)) for row in table]
            summed = sum(by_seconds(c.option) for c in choice)
            predicted, fastest_tried = line[0] + line[1] * summed, True
        times = timer.time_models({"dense": dense, "model": _built(dense, sites_of, choice)},
                                  batch)
        measured = times["model"] / times["dense"]
        points.append((summed, measured))
        rounds.append({"predicted_fraction": predicted, "measured_fraction": measured,
                       "dense_seconds": times["dense"], "model_seconds": times["model"]})
        tried.append((choice, measured))
        if abs(measured - b.target_latency) <= TOLERANCE * b.target_latency:
            break
    choice, measured = _closest(tried, b.target_latency)
    summary = {"target_latency": b.target_latency, "engine": timer.engine, "batch": b.batch,
               "measured_fraction": measured, "rounds": rounds,
               "reached": measured <= b.target_latency * (1 + TOLERANCE),
               "choice": [{"site": c.fit.site.name, "method": c.option.method, "p": c.option.p}
                          for c in choice]}
    return LatencyAllocation(choice, summary)


def _closest(tried: list[tuple[list[Candidate], float]], target: float
             ) -> tuple[list[Candidate], float]:
    """The last choice within `TOLERANCE` of the target; else the slowest one not over it
    (it keeps the most); else the fastest."""
    within = [t for t in tried if abs(t[1] - target) <= TOLERANCE * target]
    if within:
        return within[-1]
    under = [t for t in tried if t[1] <= target * (1 + TOLERANCE)]
    return max(under, key=lambda t: t[1]) if under else min(tried, key=lambda t: t[1])
