"""`moee.extract`: record -> cluster -> select -> build, each stage's results kept on disk."""

from __future__ import annotations

import copy
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from moee.adapters import find_mlp_sites
from moee.atomic import write_json
from moee.batches import Batch
from moee.build import LayerPlan, apply_plans, left_out_mean_output
from moee.cluster import cluster_layer
from moee.cluster_cache import clustering_key, load_clustering, save_clustering
from moee.config import ExtractConfig
from moee.engine import route, router_weights
from moee.engine.calibrate import calibrate_layers
from moee.errors import ConfigError, NoClustersError, ResourceError
from moee.fingerprint import model_fingerprint
from moee.moe_model import MoEModel
from moee.record import ActivationStore, record_activations, reuse_or_why_not
from moee.select import ClusterStats, cluster_stats, select_experts


@dataclass
class ExtractionReport:
    """What extraction found per layer and how long it took; `work_dir` holds every stage."""

    layers: list[dict[str, Any]]
    n_tokens: int
    seconds: float
    work_dir: str | None  # None: a temporary store, removed once extraction finished
    config: dict[str, Any] = field(default_factory=dict)
    activations: str = ""  # "recorded" or "reused", and why

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        head = (f"{'layer':<22}{'experts':>8}{'noise':>7}{'stab.':>7}{'kept':>6}"
                f"{'sizes (min/mean/max)':>22}{'top load':>9}{'act/tok':>8}{'sec':>6}")
        lines = [head]
        for r in self.layers:
            stab = "-" if r["stability"] is None else f"{r['stability']:.2f}"
            if r["experts"] == 0:
                sizes, top, act = "dense", "-", str(r["hidden"])
            else:
                s = r["expert_sizes"]
                sizes = f"{min(s)}/{sum(s) / len(s):.0f}/{max(s)}"
                top, act = f"{max(r['load_share']):.0%}", f"{r['active_neurons_per_token']:.0f}"
            lines.append(f"{r['site']:<22}{r['experts']:>8}{r['noise_fraction']:>7.0%}{stab:>7}"
                         f"{r['kept_neurons']:>6}{sizes:>22}{top:>9}{act:>8}{r['seconds']:>6.1f}")
        return "\n".join(lines)


def _check_disk(n_tokens: int, sites, config: ExtractConfig, work: Path) -> None:
    """Say what the activation store will take, and fail before recording if it won't fit."""
    per_token = sum(s.weights().d_in + s.weights().hidden_size for s in sites)
    need_disk = n_tokens * per_token * np.dtype(config.record.dtype).itemsize
    free_disk = shutil.disk_usage(work).free
    if config.progress:
        print(f"moee: recording {n_tokens} tokens x {len(sites)} layers: an activation store "
              f"of {need_disk / 2**30:.2f} GiB in {work}", file=sys.stderr)
    if need_disk > free_disk * 0.9:
        raise ResourceError(
            f"the activation store needs {need_disk / 2**30:.1f} GiB but {work} has "
            f"{free_disk / 2**30:.1f} GiB free: lower record.n_tokens or use another work_dir")


def _plan_memory(n_tokens: int, sites, config: ExtractConfig) -> ExtractConfig:
    """Fit clustering into `config.max_memory_gib` (a subsample is clustered, the rest
    assigned) and fail before clustering when one layer would not fit in free memory.
    Returns the config to cluster with."""
    per_row = max(s.weights().hidden_size for s in sites) * 4 * 3  # float32 copy + PCA work
    rows = min(n_tokens, config.cluster.max_tokens or n_tokens)
    if config.max_memory_gib is not None and rows * per_row > config.max_memory_gib * 2**30:
        rows = max(2, int(config.max_memory_gib * 2**30 // per_row))
        config = replace(config, cluster=replace(config.cluster, max_tokens=rows))
    if config.progress:
        print(f"moee: clustering {rows} of {n_tokens} tokens a layer: about "
              f"{rows * per_row / 2**30:.2f} GiB of memory", file=sys.stderr)
    try:
        free_mem = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return config
    if rows * per_row > free_mem * 0.8:
        raise ResourceError(
            f"clustering one layer needs about {rows * per_row / 2**30:.1f} GiB of memory but "
            f"{free_mem / 2**30:.1f} GiB is free: set max_memory_gib (CLI: --max-memory) or "
            "cluster.max_tokens to cluster a subsample")
    return config


def _open_or_record(model, sites, data, config: ExtractConfig, work: Path
                    ) -> tuple[ActivationStore, str]:
    """Reuse the store in `work` only when the model's weights, the calibration data and the
    record settings all match what it was recorded from; else record anew and say why."""
    store_dir = work / "activations"
    digest = model_fingerprint(model)
    store, why, data = reuse_or_why_not(store_dir, sites, config.record, digest, data)
    if store is not None:
        note = f"reused {store.n_tokens} recorded tokens from {store_dir} ({why})"
    else:
        _check_disk(config.record.n_tokens, sites, config, work)
        store = record_activations(model, sites, data, config.record, store_dir,
                                   config.progress, digest)
        note = f"recorded {store.n_tokens} tokens ({why})"
    if config.progress:
        print(f"moee: {note}", file=sys.stderr)
    return store, note


@torch.no_grad()
def route_tokens(inputs: np.ndarray, centres: np.ndarray, metric: str,
                 chunk: int = 65536) -> np.ndarray:
    """Expert id MoEMLP's router picks for each recorded MLP input, streamed in chunks."""
    router = router_weights(torch.as_tensor(centres, dtype=torch.float32), metric)
    out = []
    for start in range(0, len(inputs), chunk):
        x = torch.tensor(np.asarray(inputs[start : start + chunk]), dtype=torch.float32)  # a copy
        out.append(route(x, router).numpy())
    return np.concatenate(out)


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
    sites = find_mlp_sites(model, adapter)
    chosen = list(range(len(sites))) if config.layers is None else list(config.layers)
    bad = [i for i in chosen if not 0 <= i < len(sites)]
    if bad:
        raise ConfigError(f"layers: {bad} out of range: the model has {len(sites)} MLP blocks")
    if config.work_dir is not None:
        return _extract(model, data, config, adapter, sites, chosen, Path(config.work_dir))
    with tempfile.TemporaryDirectory(prefix="moee-") as tmp:
        return _extract(model, data, config, adapter, sites, chosen, Path(tmp))


def _extract(model, data, config: ExtractConfig, adapter, sites, chosen: list[int],
             work: Path) -> tuple[MoEModel, ExtractionReport]:
    t0 = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    store, note = _open_or_record(model, sites, data, config, work)
    config = _plan_memory(store.n_tokens, sites, config)

    plans, rows, reused = [], [], 0
    for i in tqdm(chosen, desc="cluster + select", disable=not config.progress, leave=False):
        hidden = store.hidden(i)
        key = clustering_key(store.origin, config.cluster, i)
        clustering = load_clustering(work, i, key, store.n_tokens)
        reused += clustering is not None
        if clustering is None:
            clustering = cluster_layer(hidden, config.cluster)
            save_clustering(work, i, key, clustering)
        width = sites[i].weights().hidden_size
        row = {"site": sites[i].name, "hidden": width,
               "experts": clustering.n_clusters, "noise_fraction": clustering.noise_fraction,
               "stability": clustering.stability, "seconds": clustering.seconds,
               "kept_neurons": width}
        if clustering.n_clusters > 0:
            stats = cluster_stats(hidden, store.inputs(i), clustering.labels,
                                  clustering.n_clusters)
            # Where the router sends every calibration token: the load report, and the token
            # sets of "routed" selection.
            routed = route_tokens(store.inputs(i), stats.input_mean, config.router.metric)
            load = np.bincount(routed, minlength=clustering.n_clusters) / len(routed)
            if config.select.tokens == "routed":
                routed_stats = cluster_stats(hidden, store.inputs(i), routed,
                                             clustering.n_clusters)
                # Centres stay the cluster means: the router is the paper's either way.
                stats = ClusterStats(routed_stats.counts, routed_stats.hidden_mean,
                                     routed_stats.hidden_var, stats.input_mean)
            experts = select_experts(stats, config.select)
            bias = (left_out_mean_output(sites[i], experts, stats.hidden_mean)
                    if config.select.compensate_mean else None)
            plan = LayerPlan(sites[i].name, experts, stats.input_mean.astype(np.float32),
                             config.router.metric, bias)
            plans.append(plan)
            sizes = [len(e) for e in experts]
            row.update(kept_neurons=len(plan.kept_neurons()), expert_sizes=sizes,
                       cluster_tokens=stats.counts.astype(int).tolist(),
                       load_share=load.tolist(),
                       active_neurons_per_token=float(np.dot(load, sizes)))
        rows.append(row)
    if not plans:
        raise NoClustersError(
            f"no clusters in any of layers {chosen} ({store.n_tokens} tokens): every layer would "
            "stay dense. Try a smaller cluster.min_cluster_fraction or cluster.min_samples, or "
            "more tokens."
            + (f" Recorded activations are kept in {store.root} and are reused when you call "
               "extract again with the same work_dir and data." if config.work_dir else ""))

    student = copy.deepcopy(model)
    apply_plans(find_mlp_sites(student, adapter, validate=False), plans)
    moe_model = MoEModel(student, config.as_dict(), adapter).eval()
    if reused:
        note += f"; clusterings of {reused} of {len(chosen)} layers reused"
    report = ExtractionReport(rows, store.n_tokens, time.perf_counter() - t0,
                              config.work_dir and str(work), config.as_dict(), note)
    write_json(work / "report.json", report.as_dict())
    write_json(work / "plans.json", [p.to_json() for p in plans])
    return moe_model, report


def calibrate(moe_model: MoEModel, example: Batch, repeats: int = 20, margin: float = 0.02,
              routed: tuple[str, ...] | None = None) -> list[dict]:
    """Time each MoE layer's executions on `example` (one batch at the size you will serve)
    and keep the fastest on the layer; `save_pretrained` then writes the choice. Returns one
    row of timings per layer (see `moee.engine.calibrate.calibrate_layers`)."""
    return calibrate_layers(moe_model, moe_model.moe_layers(), example, repeats, margin, routed)
