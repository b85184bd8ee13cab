"""Per layer: the clustering (cached on disk), each cluster's statistics and where the router
sends every calibration token. A `LayerFit` turns into a `LayerPlan` at any `p` in
milliseconds, so a uniform `p`, a p sweep and the MAC-budget mode all start from one fit."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from moee.adapters import MLPSite
from moee.config import ExtractConfig, SelectConfig
from moee.extraction.carve import carve_layer, moefication_layer
from moee.extraction.cluster import cluster_layer, unstable_remedy
from moee.extraction.cluster_cache import clustering_key, load_clustering, save_clustering
from moee.extraction.record import ActivationStore
from moee.extraction.reproduce import reproduce_output, route_tokens
from moee.extraction.select import ClusterStats, cluster_stats, select_experts
from moee.extraction.top_k import TopKRouter, top_k_router
from moee.moe_build import LayerPlan, left_out_mean_output
from moee.util.disk_space import ensure_room


@dataclass
class LayerFit:
    """One MLP block's clustering and statistics. `stats` is None when the clustering found no
    cluster: the layer stays dense whatever `p`."""

    index: int
    site: MLPSite
    row: dict[str, Any]  # report fields that do not depend on p
    stats: ClusterStats | None = None  # the statistics experts are selected from
    load: np.ndarray | None = None  # (k,) share of calibration tokens routed to each expert
    routed: np.ndarray | None = None  # (T,) each calibration token's expert (for the refit)
    metric: str = "cosine"
    carved: LayerPlan | None = None  # CMoE-style experts: the plan whatever p
    store: ActivationStore | None = None  # for the stages that refit to the dense output
    config: ExtractConfig = field(default_factory=ExtractConfig)
    _plans: dict = field(default_factory=dict, repr=False)  # by p: each built once
    _top_k: tuple[TopKRouter, np.ndarray, np.ndarray] | None = field(default=None, repr=False)

    @property
    def width(self) -> int:
        return self.row["hidden"]

    def plan(self, p: float) -> LayerPlan | None:
        """The layer's experts at variance share `p` (None when it stays dense); carved experts
        (the baselines) whatever `p`, given the same fitted router and refit as MoEE's. The
        other selection settings are the fit's `config.select`; its `p` is not read here (the
        MAC-budget mode chooses `p` per layer)."""
        if self.stats is None and self.carved is None:
            return None
        if p not in self._plans:
            select = self.config.select
            plan, routed = self.carved, self.routed
            if plan is None:
                norms = None
                if select.criterion == "output_variance":
                    norms = (self.site.weights().down.detach().double() ** 2).sum(0).cpu().numpy()
                experts = select_experts(self.stats, p, select, norms, self.config.seed)
                plan, routed = self._routed_plan(experts, select)
            c = self.config
            if select.refit_down or c.router.centres == "fitted":
                plan = reproduce_output(plan, self.site, self.store, self.index, select,
                                        c.router, c.held_out, c.seed, routed)
            self._plans[p] = plan
        return self._plans[p]

    def _routed_plan(self, experts: list[np.ndarray], select: SelectConfig
                     ) -> tuple[LayerPlan, np.ndarray]:
        """(the plan of the selected experts under the router, each calibration token's expert
        under it): top-1 over the experts, or, with `router.top_k` > 1, over the unions of
        every k of them (`moee.extraction.top_k`)."""
        stats, k = self.stats, self.config.router.top_k
        centres, metric, hidden_mean = stats.input_mean, self.metric, stats.hidden_mean
        load, routed = self.load, self.routed
        if k > 1 and len(experts) > 1:
            router, load, routed = self._top_k_router(k)
            experts = router.union_experts(experts)
            centres, metric, hidden_mean = router.rows, "dot", router.hidden_mean
        bias = (left_out_mean_output(self.site, experts, hidden_mean)
                if select.compensate_mean else None)
        return LayerPlan(self.site.name, experts, np.asarray(centres, np.float32), metric, bias,
                         load=load), routed

    def _top_k_router(self, k: int) -> tuple[TopKRouter, np.ndarray, np.ndarray]:
        """The layer's top-k router, the share of calibration tokens it sends to each subset
        and each token's subset, built and routed once for every p."""
        if self._top_k is None:
            s = self.stats
            router = top_k_router(s.input_mean, self.metric, s.hidden_mean, s.counts, k,
                                  self.site.name)
            routed = route_tokens(self.store.inputs(self.index), router.rows, "dot")
            load = np.bincount(routed, minlength=len(router.subsets)) / len(routed)
            self._top_k = router, load, routed
        return self._top_k

    def load_of(self, plan: LayerPlan) -> np.ndarray:
        """(k,) share of calibration tokens `plan`'s router sends to each of its experts."""
        return self.load if plan.load is None else plan.load

    def active_neurons(self, plan: LayerPlan | None) -> float:
        """Neurons a calibration token computes on average under `plan` (all when dense)."""
        if plan is None:
            return float(self.width)
        return float(np.dot(self.load_of(plan), [len(e) for e in plan.experts]))

    def report_row(self, plan: LayerPlan | None, p: float | None) -> dict[str, Any]:
        row = dict(self.row, p=p)
        if plan is not None:
            sizes = [len(e) for e in plan.experts]
            row.update(kept_neurons=len(plan.kept_neurons()), expert_sizes=sizes,
                       load_share=self.load_of(plan).tolist(),
                       active_neurons_per_token=self.active_neurons(plan))
            if plan.report:
                row["reproduction"] = plan.report
        return row


def fit_layer(store: ActivationStore, site: MLPSite, i: int, config: ExtractConfig,
              work: Path) -> tuple[LayerFit, bool]:
    """(the layer's fit, whether its clustering was reused from `work`)."""
    if config.carve is not None:
        return _carve(store, site, i, config), False
    hidden = store.hidden(i)
    key = clustering_key(store.origin, config, i)  # before any remedy: the remedies reuse it
    clustering = load_clustering(work, i, key, store.n_tokens)
    reused = clustering is not None
    if clustering is None:  # room for its labels (int64 per token) and manifest, checked first
        ensure_room(work, store.n_tokens * 8 + 4096, f"the clustering of layer {i} in {work}",
                    "free space or choose another work_dir (layers done so far are kept)")
        clustering = cluster_layer(hidden, config.cluster, config.seed)
        save_clustering(work, i, key, clustering)
    clustering = unstable_remedy(clustering, config.cluster)
    if clustering.n_clusters == 0 and config.select.width is not None:
        # every layer MoE: one expert for all its tokens (structured pruning of that layer)
        clustering = replace(clustering, labels=np.zeros_like(clustering.labels), n_clusters=1)
    row = layer_row(site.name, site.weights().hidden_size, clustering.n_clusters,
                    clustering.seconds, clustering.noise_fraction, clustering.stability)
    fit = LayerFit(i, site, row, metric=config.router.metric, store=store, config=config)
    if clustering.n_clusters == 0:
        return fit, reused
    stats = cluster_stats(hidden, store.inputs(i), clustering.labels, clustering.n_clusters)
    if config.router.centres == "random":
        rng = np.random.default_rng(config.seed + i)
        stats = replace(stats, input_mean=rng.standard_normal(stats.input_mean.shape))
    # Where the router sends every calibration token: the load report, the MAC estimate, and
    # the token sets of "routed" selection.
    routed = route_tokens(store.inputs(i), stats.input_mean, config.router.metric)
    fit.load = np.bincount(routed, minlength=clustering.n_clusters) / len(routed)
    fit.routed = routed
    if config.select.tokens == "routed":
        routed_stats = cluster_stats(hidden, store.inputs(i), routed, clustering.n_clusters)
        # Centres stay the cluster means: the router is the paper's either way.
        stats = replace(routed_stats, input_mean=stats.input_mean)
    fit.stats = stats
    fit.row["cluster_tokens"] = stats.counts.astype(int).tolist()
    return fit, reused


def layer_row(site: str, hidden: int, experts: int, seconds: float,
              noise_fraction: float = 0.0, stability: float | None = None, **extra) -> dict:
    """A layer's line of the extraction report, before its experts are selected (every
    neuron counted as kept until then)."""
    return {"site": site, "hidden": hidden, "experts": experts,
            "noise_fraction": noise_fraction, "stability": stability, **extra,
            "seconds": seconds, "kept_neurons": hidden}


def _carve(store: ActivationStore, site: MLPSite, i: int, config: ExtractConfig) -> LayerFit:
    """Experts from neuron groups (`moee.extraction.carve`): CMoE-style, each expert scored by its
    representative neuron's pre-activation, or MoEfication, by its groups' mean rows (gate
    rows when gated, else up rows; biases left out)."""
    t0 = time.perf_counter()
    w = site.weights()
    first = (w.gate if w.gate is not None else w.up).detach().float().cpu().numpy()
    shared = 0
    if config.carve.style == "moefication":
        experts, centres = moefication_layer(first, config.carve, config.seed)
    else:
        experts, reps, shared = carve_layer(store.hidden(i), w.hidden_size, config.carve,
                                            config.seed)
        centres = first[reps]
    plan = LayerPlan(site.name, experts, centres, "dot", None)
    routed = route_tokens(store.inputs(i), centres, "dot")
    row = layer_row(site.name, w.hidden_size, len(experts), time.perf_counter() - t0,
                    shared_neurons=shared)
    load = np.bincount(routed, minlength=len(experts)) / len(routed)
    return LayerFit(i, site, row, load=load, routed=routed, metric="dot", carved=plan,
                    store=store, config=config)


def fit_layers(store: ActivationStore, sites: list[MLPSite], chosen: list[int],
               config: ExtractConfig, work: Path) -> tuple[list[LayerFit], int]:
    """(one fit per chosen layer, how many clusterings were reused)."""
    fits, reused = [], 0
    for i in tqdm(chosen, desc="cluster + statistics", disable=not config.progress, leave=False):
        fit, was_reused = fit_layer(store, sites[i], i, config, work)
        fits.append(fit)
        reused += was_reused
    return fits, reused
