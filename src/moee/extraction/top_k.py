"""Top-k routing (not in the paper): each token computes the union of the neurons of its k
most similar experts. The router's scores are linear in the token, so the k best experts are
the k-subset with the largest summed score; each k-subset becomes one expert (the union of its
members' neurons, each neuron computed once) scored by the sum of its members' router rows, and
moee's top-1 engine runs top-k routing exactly, in every execution path and in the MAC count
(MoEfication's groups take the same route, `moee.extraction.carve`). The price is C(E, k)
expert copies where the engine keeps pre-sliced copies."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from math import comb

import numpy as np

from moee.errors import ConfigError

MAX_SUBSETS = 256  # beyond this the expert copies outgrow the dense layer many times over


def router_rows(centres: np.ndarray, metric: str) -> np.ndarray:
    """(E, d) rows whose dot product with a token is the router's score, up to a positive
    factor per token (cosine drops |x|, which does not change the ranking)."""
    if metric == "cosine":
        norms = np.linalg.norm(centres, axis=1, keepdims=True)
        return centres / np.maximum(norms, 1e-12)
    if metric == "dot":
        return centres
    raise ConfigError(f"router.top_k > 1 needs a linear router score (metric 'cosine' or "
                      f"'dot'), got {metric!r}: Euclidean scores carry a constant per expert "
                      "the engine's bias-free router cannot add up")


def subsets(n_experts: int, k: int, site: str = "") -> list[tuple[int, ...]]:
    """Every k-subset of the experts (one subset of all when there are at most k)."""
    k = min(k, n_experts)
    count = comb(n_experts, k)
    if count > MAX_SUBSETS:
        where = f" in {site}" if site else ""
        raise ConfigError(f"router.top_k = {k} of {n_experts} experts{where} makes {count} "
                          f"expert combinations (at most {MAX_SUBSETS}): set "
                          "cluster.max_clusters (--max-experts) or a smaller top_k")
    return list(itertools.combinations(range(n_experts), k))


@dataclass(frozen=True)
class TopKRouter:
    """Top-`k` routing over a layer's clusters as top-1 over their k-subsets: `subsets` (S of
    them), their (S, d) "dot" router rows and (S, H) hidden means (a subset's members' means
    weighted by their token counts, for the left-out neurons' offset). None of it depends on
    which neurons each expert keeps, so one serves every p."""

    subsets: list[tuple[int, ...]]
    rows: np.ndarray
    hidden_mean: np.ndarray

    def union_experts(self, experts: list[np.ndarray]) -> list[np.ndarray]:
        """Each subset's expert: the union of its members' neurons, each neuron once."""
        return [np.unique(np.concatenate([experts[e] for e in s])) for s in self.subsets]


def top_k_router(centres: np.ndarray, metric: str, hidden_mean: np.ndarray, counts: np.ndarray,
                 k: int, site: str = "") -> TopKRouter:
    """The `TopKRouter` for top-`k` routing with router `centres` under `metric`."""
    rows = router_rows(np.asarray(centres, dtype=np.float64), metric)
    chosen = subsets(len(centres), k, site)
    weights = np.maximum(np.asarray(counts, dtype=np.float64), 1e-12)
    summed = np.stack([rows[list(s)].sum(0) for s in chosen]).astype(np.float32)
    means = np.stack([np.average(hidden_mean[list(s)], axis=0, weights=weights[list(s)])
                      for s in chosen])
    return TopKRouter(chosen, summed, means)
