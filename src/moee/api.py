"""`moee.extract`: record -> cluster -> select -> build, each stage's results kept on disk."""

from __future__ import annotations

import copy
import itertools
import logging
import tempfile
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from moee.adapters import BUILTIN_ADAPTERS, adapter_of, find_mlp_sites
from moee.config import ExtractConfig
from moee.engine.calibrate import calibrate_layers
from moee.errors import ConfigError, NoClustersError
from moee.export.runtimes import Runtime
from moee.extraction.budget import allocate_budget
from moee.extraction.fit import LayerFit, fit_layers
from moee.extraction.latency_budget import allocate_latency
from moee.extraction.local_distill import distill_layers
from moee.extraction.record import (
    ActivationStore,
    merge_stores,
    record_activations,
    reuse_or_why_not,
)
from moee.extraction.resources import check_disk, plan_memory
from moee.moe_build import LayerPlan, apply_plans, check_full_width
from moee.moe_model import MoEModel
from moee.util.atomic import write_json
from moee.util.batches import Batch
from moee.util.distributed import barrier, rank_and_world, shard, shard_tokens
from moee.util.fingerprint import model_fingerprint
from moee.util.modes import cleanup_on_terminate

log = logging.getLogger(__name__)


@dataclass
class ExtractionReport:
    """What extraction found per layer and how long it took; `work_dir` holds every stage."""

    layers: list[dict[str, Any]]
    n_tokens: int
    seconds: float
    work_dir: str | None  # None: a temporary store, removed once extraction finished
    config: dict[str, Any] = field(default_factory=dict)
    activations: str = ""  # "recorded" or "reused", and why
    budget: dict[str, Any] = field(default_factory=dict)  # budget mode's choice, if used

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        head = (f"{'layer':<22}{'p':>6}{'experts':>8}{'noise':>7}{'stab.':>7}{'kept':>6}"
                f"{'sizes (min/mean/max)':>22}{'top load':>9}{'act/tok':>8}{'sec':>6}")
        lines = [head]
        for r in self.layers:
            stab = "-" if r["stability"] is None else f"{r['stability']:.2f}"
            if r["experts"] == 0 or "expert_sizes" not in r:  # no cluster, or kept dense
                sizes, top, act = "dense", "-", str(r["hidden"])
            else:
                s = r["expert_sizes"]
                sizes = f"{min(s)}/{sum(s) / len(s):.0f}/{max(s)}"
                top, act = f"{max(r['load_share']):.0%}", f"{r['active_neurons_per_token']:.0f}"
            p = "dense" if r.get("p") is None else f"{r['p']:g}"
            lines.append(f"{r['site']:<22}{p:>6}{r['experts']:>8}{r['noise_fraction']:>7.0%}{stab:>7}"
                         f"{r['kept_neurons']:>6}{sizes:>22}{top:>9}{act:>8}{r['seconds']:>6.1f}")
        if self.budget.get("target_latency") is not None:
            lines.append(_latency_line(self.budget))
        elif self.budget:
            lines.append(f"MAC budget {self.budget['target_macs']:g} of dense "
                         f"({self.budget['scope']}): {self.budget['predicted_fraction']:.3f} "
                         "predicted on the probe batches")
        return "\n".join(lines)


def _latency_line(budget: dict[str, Any]) -> str:
    methods = [c["method"] for c in budget["choice"]]
    mix = ", ".join(f"{methods.count(m)} {m}" for m in ("dense", "static", "moee")
                    if m in methods)
    missed = ("" if budget.get("reached", True) else "; not reached: the fastest choice "
              "measured is kept")
    return (f"latency budget {budget['target_latency']:g} of dense in {budget['engine']} at "
            f"batch {budget['batch']}: measured {budget['measured_fraction']:.3f} ({mix}"
            f"{missed})")


def _record_or_reuse(model, sites, data, config: ExtractConfig, work: Path, store_dir: Path
                     ) -> tuple[ActivationStore, str]:
    """Reuse the store in `store_dir` only when the model's weights, the calibration data and
    the record settings all match what it was recorded from; else record anew and say why."""
    digest = model_fingerprint(model)
    store, why, data = reuse_or_why_not(store_dir, sites, config.record, digest, data)
    if store is not None:
        note = f"reused {store.n_tokens} recorded tokens from {store_dir} ({why})"
    else:
        check_disk(config.record.n_tokens, sites, config, work)
        store = record_activations(model, sites, data, config.record, store_dir,
                                   config.progress, digest)
        note = f"recorded {store.n_tokens} tokens ({why})"
    if config.progress:
        log.info(note)
    return store, note


def _open_or_record(model, sites, data, config: ExtractConfig, work: Path
                    ) -> tuple[ActivationStore, str]:
    """The activation store; under torchrun each rank records its shard of the batches and
    rank 0 merges the shards (in rank order) into the store every rank then reads."""
    rank, world = rank_and_world()
    if world == 1:
        return _record_or_reuse(model, sites, data, config, work, work / "activations")
    n = shard_tokens(config.record.n_tokens, rank, world)
    shard_config = replace(config, record=replace(config.record, n_tokens=n))
    _, note = _record_or_reuse(model, sites, shard(data, rank, world), shard_config, work,
                               work / "activations" / f"rank{rank}")
    barrier()
    merged = work / "activations" / "merged"
    if rank == 0:
        merge_stores([work / "activations" / f"rank{r}" for r in range(world)], merged)
    barrier()
    return ActivationStore.open(merged), f"{note} on rank {rank} of {world}, merged"


def extract(
    model: nn.Module, data: Iterable, config: ExtractConfig | None = None,
    adapter: str | None = None,
) -> tuple[MoEModel, ExtractionReport]:
    """Turn `model`'s MLPs into data-driven MoE layers (MoEE). `model` is left untouched.

    `data` yields model inputs: tensors, (x, label) pairs or kwargs dicts. Returns the MoE
    model (in eval mode) and a report of experts, noise, stability and calibration routing per
    layer. Without `config.work_dir` the activation store lives in a temporary directory that
    is removed before returning.
    """
    config = config or ExtractConfig()
    name = adapter_of(model, adapter)
    sites = find_mlp_sites(model, name)  # the adapter found above, run once more
    if name not in BUILTIN_ADAPTERS:  # a user's adapter proves itself on the first batch
        it = iter(data)
        first = next(it, None)
        if first is not None:
            check_full_width(model, name, first)
            data = itertools.chain([first], it)
    chosen = list(range(len(sites))) if config.layers is None else list(config.layers)
    bad = [i for i in chosen if not 0 <= i < len(sites)]
    if bad:
        raise ConfigError(f"layers: {bad} out of range: the model has {len(sites)} MLP blocks")
    probe: list = []
    if config.budget.active:  # the leading batches, also recorded
        it = iter(data)
        probe = list(itertools.islice(it, config.budget.probe_batches))
        data = itertools.chain(probe, it)
    if config.work_dir is not None:
        return _extract(model, data, config, adapter, sites, chosen, Path(config.work_dir),
                        probe)
    if rank_and_world()[1] > 1:
        raise ConfigError("under torchrun, extract needs a work_dir every rank can read (the "
                          "ranks share the recorded activations and clusterings through it)")
    with cleanup_on_terminate(), tempfile.TemporaryDirectory(prefix="moee-") as tmp:
        return _extract(model, data, config, adapter, sites, chosen, Path(tmp), probe)


def _plans(model, sites, fits: list[LayerFit], student: nn.Module, adapter, probe: list,
           store: ActivationStore, config: ExtractConfig, work: Path
           ) -> tuple[list[LayerPlan], list[dict], dict[str, Any]]:
    """(plans, report rows, budget summary): every layer at `select.p`, or in budget mode at
    the p per layer that meets `budget.target_macs` with the least measured loss."""
    p, target_macs = config.select.p, config.budget.target_macs
    ps: list[float | None] = [p] * len(fits)
    summary: dict[str, Any] = {}
    if config.budget.target_latency is not None:
        return _latency_plans(model, sites, fits, student, adapter, probe, store, config,
                              work)
    if target_macs is not None:
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


def _latency_plans(model, sites, fits: list[LayerFit], student: nn.Module, adapter,
                   probe: list, store: ActivationStore, config: ExtractConfig, work: Path
                   ) -> tuple[list[LayerPlan], list[dict], dict[str, Any]]:
    """(plans, report rows, budget summary) of the latency budget: per layer dense, static or
    routed, timed in `config.budget.engine` (`moee.extraction.latency_budget`)."""
    static, _ = fit_layers(store, sites, [f.index for f in fits], config.with_method("static"),
                           work)
    allocation = allocate_latency(
        model, student, find_mlp_sites(student, adapter, validate=False),
        lambda m: find_mlp_sites(m, adapter, validate=False), fits, static, probe, config,
        Runtime(config.budget.engine))
    plans, rows = [], []
    for c in allocation.choice:
        if c.plan is not None:
            plans.append(c.plan)
        rows.append(dict(c.fit.report_row(c.plan, c.option.p), method=c.option.method))
    return plans, rows, allocation.summary


def _extract(model, data, config: ExtractConfig, adapter, sites, chosen: list[int],
             work: Path, probe: list) -> tuple[MoEModel, ExtractionReport]:
    t0 = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    if rank_and_world()[0] != 0:
        config = replace(config, progress=False)  # one progress display: rank 0's
    store, note = _open_or_record(model, sites, data, config, work)
    config = plan_memory(store.n_tokens, sites, config)

    # Under torchrun rank 0 clusters (and measures the budget's options) first; the other
    # ranks then find every result in `work`.
    rank, _ = rank_and_world()
    student = copy.deepcopy(model)

    def fit_and_plan():
        fits, reused = fit_layers(store, sites, chosen, config, work)
        return (*_plans(model, sites, fits, student, adapter, probe, store, config, work),
                reused)

    if rank == 0:
        plans, rows, summary, reused = fit_and_plan()
    barrier()
    if rank != 0:
        plans, rows, summary, reused = fit_and_plan()
    if not plans:
        raise NoClustersError(
            f"no clusters in any of layers {chosen} ({store.n_tokens} tokens): every layer would "
            "stay dense. Try a smaller cluster.min_cluster_fraction or cluster.min_samples, or "
            "more tokens."
            + (f" Recorded activations are kept in {store.root} and are reused when you call "
               "extract again with the same work_dir and data." if config.work_dir else ""))
    if summary:  # measuring the budget's options left dense-equivalent MoEs in `student`
        del student
        student = copy.deepcopy(model)
    installed = apply_plans(find_mlp_sites(student, adapter, validate=False), plans)
    if config.local is not None:
        index = {s.name: i for i, s in enumerate(sites)}
        local = distill_layers({index[n]: m for n, m in installed.items()}, sites, store,
                               config.held_out, config.local, work, config.progress,
                               config.seed)
        for row in rows:
            if row["site"] in local:
                row.setdefault("reproduction", {})["local"] = local[row["site"]]
    moe_model = MoEModel(student, config.as_dict(), adapter).eval()
    if reused:
        note += f"; clusterings of {reused} of {len(chosen)} layers reused"
    report = ExtractionReport(rows, store.n_tokens, time.perf_counter() - t0,
                              config.work_dir and str(work), config.as_dict(), note, summary)
    if rank == 0:
        write_json(work / "report.json", report.as_dict())
        write_json(work / "plans.json", [p.to_json() for p in plans])
    return moe_model, report


def calibrate(moe_model: MoEModel, example: Batch, repeats: int = 20, margin: float = 0.02,
              routed: tuple[str, ...] | None = None,
              allow_approximate: bool = False) -> list[dict]:
    """Time each MoE layer's executions on `example` (one batch at the size you will serve)
    and keep the fastest on the layer; `save_pretrained` then writes the choice. The outputs
    stay the model's own; `allow_approximate` also lets a layer run its pruned union without
    routing where that is faster (it changes the outputs). Returns one row of timings per
    layer (see `moee.engine.calibrate.calibrate_layers`)."""
    return calibrate_layers(moe_model, moe_model.moe_layers(), example, repeats, margin, routed,
                            allow_approximate)
