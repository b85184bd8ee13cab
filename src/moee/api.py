"""`moee.extract`: record -> cluster -> select -> build, each stage's results kept on disk."""

from __future__ import annotations

import copy
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
from moee.distributed import barrier, merge_stores, rank_and_world, shard, shard_tokens
from moee.engine import route, router_weights
from moee.engine.calibrate import calibrate_layers
from moee.errors import ConfigError, NoClustersError
from moee.fingerprint import model_fingerprint
from moee.moe_model import MoEModel
from moee.record import ActivationStore, record_activations, reuse_or_why_not
from moee.resources import check_disk, plan_memory
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
        print(f"moee: {note}", file=sys.stderr)
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
    if rank_and_world()[1] > 1:
        raise ConfigError("under torchrun, extract needs a work_dir every rank can read (the "
                          "ranks share the recorded activations and clusterings through it)")
    with tempfile.TemporaryDirectory(prefix="moee-") as tmp:
        return _extract(model, data, config, adapter, sites, chosen, Path(tmp))


def _cluster_and_select(store: ActivationStore, sites, chosen: list[int], config: ExtractConfig,
                        work: Path) -> tuple[list[LayerPlan], list[dict], int]:
    """Per layer: the clustering (reused from `work` when its key matches), expert statistics,
    selection and the layer's plan; (plans, report rows, clusterings reused)."""
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
    return plans, rows, reused


def _extract(model, data, config: ExtractConfig, adapter, sites, chosen: list[int],
             work: Path) -> tuple[MoEModel, ExtractionReport]:
    t0 = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    if rank_and_world()[0] != 0:
        config = replace(config, progress=False)  # one progress display: rank 0's
    store, note = _open_or_record(model, sites, data, config, work)
    config = plan_memory(store.n_tokens, sites, config)

    # Under torchrun rank 0 clusters; the other ranks then find every clustering in `work`.
    rank, _ = rank_and_world()
    if rank == 0:
        plans, rows, reused = _cluster_and_select(store, sites, chosen, config, work)
    barrier()
    if rank != 0:
        plans, rows, reused = _cluster_and_select(store, sites, chosen, config, work)
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
    if rank == 0:
        write_json(work / "report.json", report.as_dict())
        write_json(work / "plans.json", [p.to_json() for p in plans])
    return moe_model, report


def calibrate(moe_model: MoEModel, example: Batch, repeats: int = 20, margin: float = 0.02,
              routed: tuple[str, ...] | None = None) -> list[dict]:
    """Time each MoE layer's executions on `example` (one batch at the size you will serve)
    and keep the fastest on the layer; `save_pretrained` then writes the choice. Returns one
    row of timings per layer (see `moee.engine.calibrate.calibrate_layers`)."""
    return calibrate_layers(moe_model, moe_model.moe_layers(), example, repeats, margin, routed)
