"""Validated settings for every stage. Each dataclass checks itself and names the bad field."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from moee.budget_config import LATENCY_ENGINES, BudgetConfig
from moee.carve_config import CarveConfig
from moee.engine.routing import ROUTER_METRICS
from moee.errors import ConfigError
from moee.training_config import DISTILL_LOSSES, DistillConfig, LocalDistillConfig
from moee.util.validation import check, check_types

CLUSTER_ALGORITHMS = ("hdbscan", "dbscan", "optics", "kmeans", "birch", "random")
SELECT_CRITERIA = ("variance", "magnitude", "random", "output_variance")
ROUTER_CENTRES = ("input_mean", "random", "fitted")
METHODS = ("moee", "random", "cmoe", "moefication", "static")
__all__ = ["CLUSTER_ALGORITHMS", "DISTILL_LOSSES", "LATENCY_ENGINES", "METHODS", "ROUTER_CENTRES",
           "ROUTER_METRICS", "SELECT_CRITERIA", "BudgetConfig", "CarveConfig", "ClusterConfig",
           "ConfigError", "DistillConfig", "ExtractConfig", "LocalDistillConfig", "RecordConfig",
           "RouterConfig", "SelectConfig"]


@dataclass(frozen=True)
class RecordConfig:
    """How many tokens to record and where the per-layer activation store goes."""

    n_tokens: int = 100_000
    dtype: str = "float16"  # storage dtype of the on-disk store

    def __post_init__(self) -> None:
        check_types(self, "record")
        check(self.n_tokens > 0, "record.n_tokens",
               f"must be an integer > 0, got {self.n_tokens!r}")
        check(self.dtype in ("float16", "float32"), "record.dtype",
               f"must be 'float16' or 'float32', got {self.dtype!r}")


@dataclass(frozen=True)
class ClusterConfig:
    """Per-layer clustering of post-activation hidden vectors.

    `reduce_dims`: PCA target before clustering (None = raw activations). fast_hdbscan switches
    to an approximate path above ~30 dimensions, so 30 is the default.
    `min_cluster_fraction`: HDBSCAN min cluster size as a share of the layer's tokens (paper: 0.6%).
    `n_clusters` / `eps` are only read by the algorithms that need them (k-means, BIRCH,
    random / DBSCAN). "random" puts each token in one of `n_clusters` clusters at random (the
    paper's ablation baseline).
    `max_clusters` (not in the paper; None = off): merge the closest clusters until at most this
    many remain. Fewer, larger experts cost more active neurons per token but make fewer kernel
    calls and fewer overlapping weight copies (a smaller model when experts overlap a lot).
    Remedies for unstable layers (not in the paper; None = off), read against the layer's
    `stability` score: below `dense_below_stability` the layer keeps no cluster (it stays
    dense); below `merge_below_stability` its clusters merge into one (a single expert: the
    layer is pruned to the neurons its tokens need, no routing).
    """

    algorithm: str = "hdbscan"
    min_cluster_fraction: float = 0.006
    min_samples: int | None = 10
    reduce_dims: int | None = 30
    max_tokens: int | None = None  # subsample the store before clustering (None = all)
    stability: bool = True  # cluster two disjoint halves and report their agreement
    n_clusters: int = 8
    eps: float = 0.5
    max_clusters: int | None = None
    dense_below_stability: float | None = None
    merge_below_stability: float | None = None

    def __post_init__(self) -> None:
        check_types(self, "cluster")
        for name in ("dense_below_stability", "merge_below_stability"):
            value = getattr(self, name)
            check(value is None or (-1 <= value <= 1 and self.stability), f"cluster.{name}",
                  f"must be None or in [-1, 1] with cluster.stability on, got {value}")
        check(self.algorithm in CLUSTER_ALGORITHMS, "cluster.algorithm",
               f"must be one of {CLUSTER_ALGORITHMS}, got {self.algorithm!r}")
        check(0 < self.min_cluster_fraction < 1, "cluster.min_cluster_fraction",
               f"must be in (0, 1), got {self.min_cluster_fraction}")
        check(self.min_samples is None or self.min_samples >= 1, "cluster.min_samples",
               f"must be >= 1 or None, got {self.min_samples}")
        check(self.reduce_dims is None or self.reduce_dims >= 1, "cluster.reduce_dims",
               f"must be >= 1 or None, got {self.reduce_dims}")
        check(self.max_tokens is None or self.max_tokens >= 2, "cluster.max_tokens",
               f"must be >= 2 or None, got {self.max_tokens}")
        check(self.n_clusters >= 1, "cluster.n_clusters", f"must be >= 1, got {self.n_clusters}")
        check(self.eps > 0, "cluster.eps", f"must be > 0, got {self.eps}")
        check(self.max_clusters is None or self.max_clusters >= 1, "cluster.max_clusters",
               f"must be >= 1 or None, got {self.max_clusters}")


@dataclass(frozen=True)
class SelectConfig:
    """Per-cluster neuron ranking; keep neurons until their cumulative share reaches `p`.
    "random" (the paper's ablation baseline) keeps as many neurons as "variance" would, drawn
    at random (`ExtractConfig.seed`)."""

    criterion: str = "variance"
    p: float = 0.8
    # Which tokens an expert's statistics come from: "cluster" = its cluster's members (the
    # paper; noise tokens ignored), "routed" = every token the router sends to it, noise
    # included, so each expert is chosen for the tokens it will actually see. "routed" is the
    # default because it measured far better (README, "Deviations from the paper").
    tokens: str = "routed"
    # Not in the paper: add each expert's left-out neurons' mean output back as a constant.
    compensate_mean: bool = True
    # Not in the paper: refit the down projection and the per-expert offsets by least squares
    # so that each expert reproduces the dense output on the tokens routed to it (ridge toward
    # the original weights, its strength, a multiple of the mean Gram diagonal, chosen from
    # `refit_strengths` on held-out tokens; the original is kept when none does better).
    refit_down: bool = True
    refit_strengths: tuple[float, ...] = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
    # Whether the refit also fits a constant per expert (False: the down projection alone, as
    # engines without expert biases, such as Mixtral's, can run).
    refit_offsets: bool = True
    # Every expert keeps this share of its layer's neurons, its top-ranked, instead of the
    # share `p` of the score; a layer without clusters then gets one expert (every layer MoE,
    # all experts one size: what a Mixtral export runs without padding).
    width: float | None = None

    @classmethod
    def paper(cls, p: float = 0.8, criterion: str = "variance") -> SelectConfig:
        """Exactly the paper's selection: cluster members only, no mean compensation."""
        return cls(criterion=criterion, p=p, tokens="cluster", compensate_mean=False,
                   refit_down=False)

    def __post_init__(self) -> None:
        check_types(self, "select")
        check(self.criterion in SELECT_CRITERIA, "select.criterion",
               f"must be one of {SELECT_CRITERIA}, got {self.criterion!r}")
        check(0 < self.p <= 1, "select.p", f"must be in (0, 1], got {self.p}")
        check(self.tokens in ("cluster", "routed"), "select.tokens",
               f"must be 'cluster' or 'routed', got {self.tokens!r}")
        check(len(self.refit_strengths) > 0 and all(v > 0 for v in self.refit_strengths),
              "select.refit_strengths", f"must be values > 0, got {self.refit_strengths}")
        check(self.width is None or 0 < self.width <= 1, "select.width",
              f"must be in (0, 1] or None, got {self.width}")

    @classmethod
    def export_ready(cls, width: float, **settings: Any) -> SelectConfig:
        """Experts a Mixtral export runs exactly and without padding: every layer MoE, every
        expert `width` of the layer's neurons, no per-expert offsets (refit of the down
        projection alone)."""
        return cls(width=width, compensate_mean=False, refit_offsets=False, **settings)


@dataclass(frozen=True)
class RouterConfig:
    """Top-1 routing to the expert whose centre is most similar: its cluster's mean MLP input
    (the paper), or a random direction (`centres="random"`, the paper's ablation baseline).
    `centres="fitted"` (not in the paper): label each calibration token with the expert whose
    output is closest to the dense output and fit a bias-free linear router to the labels
    (logistic regression on at most `fit_tokens` tokens, inverse strength from `fit_c` chosen
    by held-out output error); the layer then routes by dot product with the fitted rows, or
    keeps the `metric` router on its cluster means when that does as well on held-out tokens.
    `fit_same_macs`: each token's label is the most exact expert at the cluster-mean router's
    mean expert size (the same MACs); off, it is the most exact expert, nearly always the
    largest. `top_k` (not in the paper): each token computes the union of its `top_k` most
    similar experts' neurons (`moee.extraction.top_k`; metric "cosine" or "dot")."""

    metric: str = "cosine"
    centres: str = "input_mean"
    top_k: int = 1
    fit_c: tuple[float, ...] = (0.01, 0.1, 1.0)
    fit_same_macs: bool = True
    fit_tokens: int = 50_000

    def __post_init__(self) -> None:
        check_types(self, "router")
        check(self.metric in ROUTER_METRICS, "router.metric",
               f"must be one of {ROUTER_METRICS}, got {self.metric!r}")
        check(self.centres in ROUTER_CENTRES, "router.centres",
               f"must be one of {ROUTER_CENTRES}, got {self.centres!r}")
        check(len(self.fit_c) > 0 and all(c > 0 for c in self.fit_c), "router.fit_c",
              f"must be values > 0, got {self.fit_c}")
        check(self.fit_tokens >= 2, "router.fit_tokens", f"must be >= 2, got {self.fit_tokens}")
        check(self.top_k >= 1, "router.top_k", f"must be >= 1, got {self.top_k}")
        check(self.top_k == 1 or self.metric != "euclidean", "router.top_k",
              "top-k routing adds linear scores: use metric 'cosine' or 'dot', not 'euclidean'")


@dataclass(frozen=True)
class ExtractConfig:
    """Everything `moee.extract` needs. `work_dir` keeps each stage's results on disk."""

    record: RecordConfig = field(default_factory=RecordConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    carve: CarveConfig | None = None  # CMoE-style experts instead of clusters (a baseline)
    local: LocalDistillConfig | None = None  # layer-local distillation after building (None = off)
    layers: tuple[int, ...] | None = None  # MLP indices to convert (None = all)
    work_dir: str | os.PathLike | None = None
    progress: bool = True
    # Memory for clustering one layer; beyond it a subsample is clustered and the other
    # tokens assigned to its clusters (None = cluster every recorded token).
    max_memory_gib: float | None = None
    # Share of the recorded tokens (whole blocks of 256) the fitted router and the refit hold
    # out to choose their strengths and report their error.
    held_out: float = 0.2
    # The run's one seed: every random draw of the extraction comes from it (each stage seeds
    # its own generator with it, the random centres with it plus the layer): clustering's
    # PCA, subsamples and stability halves, the random baselines' clusters, neurons and
    # centres, the router fit's token sample, carving, layer-local distillation.
    seed: int = 0

    def __post_init__(self) -> None:
        check_types(self, "extract")
        check(self.max_memory_gib is None or self.max_memory_gib > 0, "extract.max_memory_gib",
               f"must be > 0 or None, got {self.max_memory_gib}")
        check(0 < self.held_out < 1, "extract.held_out", f"must be in (0, 1), got {self.held_out}")
        check(self.carve is None or not self.budget.active, "extract.carve",
               "carved experts have no p for the MAC budget to choose: set carve.active")
        check(self.select.width is None or not self.budget.active, "extract.select.width",
              "experts of one width have no p for the MAC budget to choose: set one or the other")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def with_method(self, method: str) -> ExtractConfig:
        """These settings under an extraction method: "moee" (unchanged), "random" (the
        paper's baseline: random clusters, random neurons, random routing centres) or "cmoe"
        (CMoE-style carving, top-1) or "moefication" (balanced neuron groups, top-k), see
        `CarveConfig`, or "static": one expert for every token, the neurons chosen by the
        same statistics and given the same refit (structured pruning: the test of whether
        routing adds anything)."""
        check(method in METHODS, "method", f"must be one of {METHODS}, got {method!r}")
        r = replace
        if method == "moee":
            return self
        if method == "static":
            return r(self, cluster=r(self.cluster, algorithm="random", n_clusters=1,
                                     stability=False, max_clusters=None),
                     router=r(self.router, centres="input_mean"))
        if method in ("cmoe", "moefication"):
            carve = r(self.carve or CarveConfig(), style=method)
            return r(self, carve=carve, router=r(self.router, metric="dot"))
        return r(self, cluster=r(self.cluster, algorithm="random", stability=False),
                 select=r(self.select, criterion="random"),
                 router=r(self.router, centres="random"))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExtractConfig:
        return cls(
            record=RecordConfig(**d.get("record", {})),
            cluster=ClusterConfig(**_unseeded(d.get("cluster"))),
            select=SelectConfig(**_unseeded(d.get("select"))),
            router=RouterConfig(**_unseeded(d.get("router"))),
            budget=BudgetConfig(**d.get("budget", {})),
            carve=CarveConfig(**_unseeded(d["carve"])) if d.get("carve") else None,
            local=LocalDistillConfig(**_unseeded(d["local"])) if d.get("local") else None,
            layers=tuple(d["layers"]) if d.get("layers") is not None else None,
            work_dir=d.get("work_dir"),
            progress=d.get("progress", True),
            max_memory_gib=d.get("max_memory_gib"),
            held_out=d.get("held_out", 0.2),
            # before one run seed, each stage had its own `seed` field (all set alike)
            seed=d.get("seed", d.get("cluster", {}).get("seed", 0)),
        )


def _unseeded(settings: dict[str, Any] | None) -> dict[str, Any]:
    """A stage's saved settings without the `seed` that checkpoints saved before the run had
    one seed (`ExtractConfig.seed`)."""
    return {k: v for k, v in (settings or {}).items() if k != "seed"}
