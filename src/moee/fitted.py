"""`moee.fit`: record, cluster and gather each layer's statistics once; the fitted extraction
then plans experts at any `p` or budget in memory and builds MoE models from the plans.

    fitted = moee.fit(model, data, config)
    plans = fitted.plan(p=0.8)              # or target_macs=0.5, or target_latency=0.7
    moe_model, report = fitted.build(plans)
"""

from __future__ import annotations

import copy
import itertools
import logging
import shutil
import tempfile
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

from torch import nn

from moee.adapters import BUILTIN_ADAPTERS, MLPSite, adapter_of, find_mlp_sites
from moee.config import ExtractConfig
from moee.errors import ConfigError, MoeeError, NoClustersError
from moee.extraction.fit import LayerFit, fit_layers
from moee.extraction.latency_budget import LatencyTimer
from moee.extraction.local_distill import distill_layers
from moee.extraction.record import (
    ActivationStore,
    merge_stores,
    record_activations,
    reuse_or_why_not,
)
from moee.extraction.resources import check_disk, plan_memory
from moee.extraction_report import ExtractionReport
from moee.moe_build import apply_plans, check_full_width
from moee.moe_model import MoEModel
from moee.plans import ExtractionPlans, plan_config, plan_layers
from moee.util.atomic import write_json
from moee.util.distributed import barrier, rank_and_world, shard, shard_tokens
from moee.util.fingerprint import model_fingerprint
from moee.util.modes import cleanup_on_terminate

log = logging.getLogger(__name__)

T = TypeVar("T")


class FittedExtraction:
    """A model's recorded activations, clusterings and per-layer statistics (`fits`), from
    which `plan` chooses experts at any `p` or budget without recording or clustering again,
    and `build` makes the MoE model. The dense `model` is kept by reference and left
    untouched: do not change its weights between `fit` and `build`. Without
    `config.work_dir` the activation store lives in a temporary directory, removed by
    `close()`, at the end of a `with` block or when the object is garbage-collected."""

    def __init__(self, model: nn.Module, adapter: str | None, sites: list[MLPSite],
                 chosen: list[int], probe: list, config: ExtractConfig, work: Path,
                 store: ActivationStore, note: str) -> None:
        self.model, self.adapter, self.sites, self.chosen = model, adapter, sites, chosen
        self.probe, self.config, self.work, self.store = probe, config, work, store
        self.activations = note  # "recorded" or "reused", and why
        self.fits: list[LayerFit] = []
        self.reused = 0  # layers whose clustering was found in the work dir
        self.seconds = 0.0  # spent fitting
        self._cleanup: weakref.finalize | None = None
        self._closed = False

    def plan(self, p: float | None = None, *, target_macs: float | None = None,
             target_latency: float | None = None, engine: str | None = None,
             batch: int | None = None, timer: LatencyTimer | None = None) -> ExtractionPlans:
        """Each fitted layer's experts at one variance share `p`, for a MAC budget
        (`target_macs`, a fraction of the dense MACs) or for a latency budget
        (`target_latency`, a fraction of the dense latency in `engine` at `batch` rows,
        timed by `timer`, default a `moee.export.runtimes.Runtime` of that engine); the other
        budget settings are `config.budget`'s. With none of the three, what the config says.
        Plans at a `p` seen before come from memory; the budgets' measurements are kept in the
        work dir like `extract`'s."""
        self._check_open()
        config = plan_config(self.config, p, target_macs, target_latency, engine, batch)
        t0 = time.perf_counter()
        layer_plans, rows, summary = _rank_0_first(lambda: plan_layers(
            self.model, self.sites, self.fits, self.adapter, self.probe, self.store, config,
            self.work, timer))
        return ExtractionPlans(layer_plans, rows, summary, config, time.perf_counter() - t0)

    def build(self, plans: ExtractionPlans) -> tuple[MoEModel, ExtractionReport]:
        """The MoE model (a copy of the dense model with `plans` installed, distilled layer
        by layer if `config.local` says so; in eval mode) and its report, which `work_dir`
        also keeps (`report.json`, `plans.json`)."""
        self._check_open()
        t0, config = time.perf_counter(), plans.config
        if not plans.layer_plans:
            raise NoClustersError(
                f"no clusters in any of layers {self.chosen} ({self.store.n_tokens} tokens): "
                "every layer would stay dense. Try a smaller cluster.min_cluster_fraction or "
                "cluster.min_samples, or more tokens."
                + (f" Recorded activations are kept in {self.store.root} and are reused when "
                   "you call extract again with the same work_dir and data."
                   if config.work_dir else ""))
        student = copy.deepcopy(self.model)
        installed = apply_plans(find_mlp_sites(student, self.adapter, validate=False),
                                plans.layer_plans)
        rows = copy.deepcopy(plans.rows)
        if config.local is not None:
            index = {s.name: i for i, s in enumerate(self.sites)}
            local = distill_layers({index[n]: m for n, m in installed.items()}, self.sites,
                                   self.store, config.held_out, config.local, self.work,
                                   config.progress, config.seed)
            for row in rows:
                if row["site"] in local:
                    row.setdefault("reproduction", {})["local"] = local[row["site"]]
        moe_model = MoEModel(student, config.as_dict(), self.adapter).eval()
        note = self.activations
        if self.reused:
            note += f"; clusterings of {self.reused} of {len(self.chosen)} layers reused"
        seconds = self.seconds + plans.seconds + time.perf_counter() - t0
        report = ExtractionReport(rows, self.store.n_tokens, seconds,
                                  config.work_dir and str(self.work), config.as_dict(), note,
                                  plans.budget)
        if rank_and_world()[0] == 0:
            write_json(self.work / "report.json", report.as_dict())
            write_json(self.work / "plans.json", [p.to_json() for p in plans.layer_plans])
        return moe_model, report

    def close(self) -> None:
        """Remove the temporary activation store (none with a `work_dir`); `plan` and `build`
        refuse afterwards."""
        self._closed = True
        if self._cleanup is not None:
            self._cleanup()

    def __enter__(self) -> FittedExtraction:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise MoeeError("this fitted extraction was closed (its activation store is "
                            "gone): call moee.fit again")


def fit(model: nn.Module, data: Iterable, config: ExtractConfig | None = None,
        adapter: str | None = None) -> FittedExtraction:
    """Record `model`'s MLP activations on `data`, cluster each chosen layer and gather its
    statistics: what every plan of `moee.extract` starts from. `data` yields model inputs:
    tensors, (x, label) pairs or kwargs dicts; the first `config.budget.probe_batches` are also
    kept for the budgets. `model` is left untouched. Under torchrun every rank calls `fit`,
    `plan` and `build` alike (rank 0 clusters and measures first, the others read its results
    from the shared `work_dir`)."""
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
    it = iter(data)  # the leading batches, also recorded: a budget measures on them
    probe = list(itertools.islice(it, config.budget.probe_batches))
    data = itertools.chain(probe, it)
    if config.work_dir is not None:
        return _fit(model, data, config, adapter, sites, chosen, Path(config.work_dir), probe)
    if rank_and_world()[1] > 1:
        raise ConfigError("under torchrun, extract needs a work_dir every rank can read (the "
                          "ranks share the recorded activations and clusterings through it)")
    tmp = tempfile.mkdtemp(prefix="moee-")
    try:
        with cleanup_on_terminate():
            fitted = _fit(model, data, config, adapter, sites, chosen, Path(tmp), probe)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fitted._cleanup = weakref.finalize(fitted, shutil.rmtree, tmp, ignore_errors=True)
    return fitted


def _fit(model, data, config: ExtractConfig, adapter, sites, chosen: list[int], work: Path,
         probe: list) -> FittedExtraction:
    t0 = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    if rank_and_world()[0] != 0:
        config = replace(config, progress=False)  # one progress display: rank 0's
    store, note = _open_or_record(model, sites, data, config, work)
    config = plan_memory(store.n_tokens, sites, config)
    fitted = FittedExtraction(model, adapter, sites, chosen, probe, config, work, store, note)
    fitted.fits, fitted.reused = _rank_0_first(
        lambda: fit_layers(store, sites, chosen, config, work))
    fitted.seconds = time.perf_counter() - t0
    return fitted


def _rank_0_first(run: Callable[[], T]) -> T:
    """`run()` on rank 0, then on the other ranks (under torchrun), which find rank 0's
    clusterings and measurements in the shared work dir."""
    if rank_and_world()[0] == 0:
        out = run()
    barrier()
    if rank_and_world()[0] != 0:
        out = run()
    return out


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
