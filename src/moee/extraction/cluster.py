"""Per-layer clustering of token activation patterns, sklearn-style (`fit(X).labels_`).

HDBSCAN (fast_hdbscan) is the paper's choice; DBSCAN, OPTICS, k-means and BIRCH
(scikit-learn) are interchangeable behind `make_clusterer`. Noise is label -1.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np
import torch

from moee.config import ClusterConfig
from moee.errors import ConfigError, TooFewTokensError
from moee.util.child import run_in_child

# scikit-learn and fast_hdbscan are imported where they are used: loading and running a saved
# MoE (`moee.load`, `moee bench`) needs neither, e.g. on a GPU machine that has only torch.

# Clustering below this many tokens x neighbours (min_samples) takes seconds at most: it runs
# in this process, where a child's start (importing torch and numba, ~5 s) would cost more.
IN_PROCESS_WORK = 10_000_000
DENSITY = ("hdbscan", "dbscan", "optics")  # the algorithms that read min_samples


@dataclass
class LayerClustering:
    labels: np.ndarray  # (N,) cluster id per token, -1 = noise
    n_clusters: int
    noise_fraction: float
    stability: float | None  # adjusted Rand between clusterings of two disjoint halves
    seconds: float


def min_cluster_size(config: ClusterConfig, n_tokens: int) -> int:
    return max(2, round(config.min_cluster_fraction * n_tokens))


def make_clusterer(config: ClusterConfig, n_tokens: int, seed: int = 0):
    """A fresh estimator with `fit(X)` -> `labels_` for `n_tokens` points."""
    size = min_cluster_size(config, n_tokens)
    if config.algorithm == "hdbscan":
        threads = torch.get_num_threads()
        import fast_hdbscan  # imported here: numba compiles on first import

        torch.set_num_threads(threads)  # its import raises torch's thread count
        return fast_hdbscan.HDBSCAN(min_cluster_size=size, min_samples=config.min_samples)
    from sklearn.cluster import DBSCAN, OPTICS, Birch, KMeans

    if config.algorithm == "dbscan":
        return DBSCAN(eps=config.eps, min_samples=config.min_samples or size)
    if config.algorithm == "optics":
        return OPTICS(min_samples=config.min_samples or size, min_cluster_size=size)
    if config.algorithm == "kmeans":
        return KMeans(n_clusters=config.n_clusters, n_init=3, random_state=seed)
    return Birch(n_clusters=config.n_clusters)


def fit_reduction(features: np.ndarray, config: ClusterConfig, seed: int = 0):
    """(reduced float32 features, a function reducing more rows the same way): PCA to
    `reduce_dims`; density clustering in hundreds of dims is slow and fast_hdbscan needs
    <= ~30 dims for its exact path."""
    x = np.asarray(features, dtype=np.float32)
    if config.reduce_dims is None or config.reduce_dims >= x.shape[1]:
        return x, lambda rows: np.asarray(rows, dtype=np.float32)
    from sklearn.decomposition import PCA

    pca = PCA(n_components=config.reduce_dims, svd_solver="randomized",
              random_state=seed)
    z = pca.fit_transform(x).astype(np.float32)
    return z, lambda rows: pca.transform(np.asarray(rows, dtype=np.float32)).astype(np.float32)


def _fit_labels(z: np.ndarray, config: ClusterConfig, seed: int) -> np.ndarray:
    """Fit and return labels renumbered 0..k-1 (noise stays -1)."""
    raw = np.asarray(make_clusterer(config, len(z), seed).fit(z).labels_, dtype=np.int64)
    ids = np.unique(raw[raw >= 0])
    out = np.full_like(raw, -1)
    out[raw >= 0] = np.searchsorted(ids, raw[raw >= 0])
    return out


def merge_clusters(z: np.ndarray, labels: np.ndarray, max_clusters: int) -> np.ndarray:
    """Relabel so that at most `max_clusters` clusters remain: Ward agglomeration of the
    clusters' centroids (in the space they were found in), each group becoming one cluster,
    numbered by its smallest original id. Noise stays -1; fewer clusters come back unchanged."""
    k = int(labels.max()) + 1 if (labels >= 0).any() else 0
    if k <= max_clusters:
        return labels
    centroids = np.stack([z[labels == c].mean(0) for c in range(k)])
    from sklearn.cluster import AgglomerativeClustering

    group = AgglomerativeClustering(n_clusters=max_clusters, linkage="ward").fit(centroids).labels_
    # groups numbered in order of their smallest original cluster id
    number = {g: i for i, g in enumerate(dict.fromkeys(group.tolist()))}
    new_id = np.array([number[g] for g in group.tolist()])
    out = labels.copy()
    out[labels >= 0] = new_id[labels[labels >= 0]]
    return out


def _nearest_centroid(z: np.ndarray, labels: np.ndarray, points: np.ndarray) -> np.ndarray:
    ids = [c for c in np.unique(labels) if c >= 0]
    centroids = np.stack([z[labels == c].mean(0) for c in ids])  # (k, D)
    # |p - c|^2 = |c|^2 - 2 p.c (+ |p|^2, same for every c): no (n, k, D) temporary.
    dist = (centroids**2).sum(-1)[None] - 2.0 * points @ centroids.T  # (n, k)
    return np.asarray(ids)[dist.argmin(1)]


def stability_score(z: np.ndarray, config: ClusterConfig, seed: int = 0) -> float:
    """Cluster two disjoint random halves A and B; label B's points by A's nearest centroid;
    adjusted Rand index against B's own labels over B's non-noise points (1 = identical)."""
    perm = np.random.default_rng(seed).permutation(len(z))
    a, b = z[perm[: len(z) // 2]], z[perm[len(z) // 2 :]]
    la, lb = _fit_labels(a, config, seed), _fit_labels(b, config, seed)
    ka, kb = (la >= 0).any(), (lb >= 0).any()
    if not ka or not kb:
        return 1.0 if ka == kb else 0.0
    keep = lb >= 0
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(lb[keep], _nearest_centroid(a, la, b[keep])))


def cluster_layer(hidden: np.ndarray, config: ClusterConfig, seed: int = 0) -> LayerClustering:
    """Cluster one layer's (N, H) hidden activations (noise = -1). Beyond `max_tokens`, a
    random subsample is clustered and the other tokens are assigned to its clusters."""
    t0 = time.perf_counter()
    n = len(hidden)
    if n < min_cluster_size(config, n) or n < 2:
        raise TooFewTokensError(
            f"{n} tokens is fewer than the minimum cluster size {min_cluster_size(config, n)}; "
            "record more tokens (record.n_tokens) or lower cluster.min_cluster_fraction."
        )
    if config.reduce_dims is not None and n <= config.reduce_dims:
        raise TooFewTokensError(
            f"{n} tokens cannot be clustered in {config.reduce_dims} PCA dimensions; record "
            f"more tokens (record.n_tokens; thousands are typical) or lower cluster.reduce_dims.")
    if config.algorithm == "random":  # the ablation baseline: no structure at all
        labels = np.random.default_rng(seed).integers(0, config.n_clusters, n)
        k = len(np.unique(labels))
        labels = np.searchsorted(np.unique(labels), labels).astype(np.int64)
        return LayerClustering(labels, k, 0.0, None, time.perf_counter() - t0)
    rows = np.arange(n)
    if config.max_tokens is not None and n > config.max_tokens:
        rows = np.sort(np.random.default_rng(seed).choice(n, config.max_tokens, False))
    check_min_samples(config, len(rows))
    if len(rows) * _neighbours(config, len(rows)) <= IN_PROCESS_WORK:
        clustering = _cluster_rows(hidden, rows, config, seed)
    else:  # a child process, so that SIGTERM / Ctrl-C stop minutes of native code at once
        clustering = run_in_child(_cluster_rows, hidden, rows, config, seed)
    return replace(clustering, seconds=time.perf_counter() - t0)


def _neighbours(config: ClusterConfig, n: int) -> int:
    """The neighbours (or centres) per token the algorithm weighs: its work is ~ n times it."""
    if config.algorithm in ("kmeans", "birch"):
        return config.n_clusters
    return config.min_samples or min_cluster_size(config, n)


def check_min_samples(config: ClusterConfig, n: int) -> None:
    """Refuse a density clustering's `min_samples` that `n` clustered tokens (each half of
    them, for the stability score) cannot reach: every token would silently be noise."""
    if config.algorithm not in DENSITY or config.min_samples is None:
        return
    usable = n // 2 if config.stability else n
    if config.min_samples >= usable:
        halves = f" (halves of {usable} for the stability score)" if config.stability else ""
        raise ConfigError(
            f"cluster.min_samples (--min-samples) is {config.min_samples}, but a layer has "
            f"{n} tokens to cluster{halves}: every token would be noise; give a "
            f"min_samples below {usable}, or record more tokens (record.n_tokens, --tokens)")


def _cluster_rows(hidden: np.ndarray, rows: np.ndarray, config: ClusterConfig,
                  seed: int) -> LayerClustering:
    """Reduce, cluster, merge and score `hidden[rows]`; the other tokens join its clusters.
    Runs in this process or a child one (`hidden` then travels as a StoredArray's path)."""
    n = len(hidden)
    z, transform = fit_reduction(hidden[rows], config, seed)
    labels = np.full(n, -1, dtype=np.int64)
    labels[rows] = _fit_labels(z, config, seed)
    if config.max_clusters is not None:
        labels[rows] = merge_clusters(z, labels[rows], config.max_clusters)
    k = int(labels.max()) + 1 if (labels >= 0).any() else 0
    if len(rows) < n and k > 0:
        _assign_rest(hidden, labels, rows, z, transform)
    stability = stability_score(z, config, seed) if config.stability and len(z) >= 4 else None
    return LayerClustering(labels, k, float((labels < 0).mean()), stability, 0.0)


def unstable_remedy(c: LayerClustering, config: ClusterConfig) -> LayerClustering:
    """A layer whose clusters do not survive a split of the data: no cluster (the layer stays
    dense) below `dense_below_stability`, one cluster below `merge_below_stability`. Applied
    to a clustering after the cache, so trying a remedy re-clusters nothing."""
    s, dense, merge = c.stability, config.dense_below_stability, config.merge_below_stability
    if s is None or c.n_clusters == 0:
        return c
    if dense is not None and s < dense:
        return replace(c, labels=np.full_like(c.labels, -1), n_clusters=0)
    if merge is not None and s < merge:
        return replace(c, labels=np.where(c.labels >= 0, 0, -1), n_clusters=1)
    return c


def _assign_rest(hidden: np.ndarray, labels: np.ndarray, rows: np.ndarray, z: np.ndarray,
                 transform, chunk: int = 65536) -> None:
    """Tokens left out of the clustered subsample join their nearest cluster centroid (in the
    reduced space), or stay noise when farther from it than 95% of its clustered members:
    memory stays that of the subsample, read in chunks from the (memmapped) store."""
    sample = labels[rows]
    ids = np.arange(int(sample.max()) + 1)
    centroids = np.stack([z[sample == c].mean(0) for c in ids])
    radius = np.array([np.quantile(np.linalg.norm(z[sample == c] - centroids[c], axis=1), 0.95)
                       for c in ids])
    rest = np.setdiff1d(np.arange(len(labels)), rows)
    for start in range(0, len(rest), chunk):
        idx = rest[start : start + chunk]
        zr = transform(hidden[idx])
        dist = np.sqrt(np.maximum((zr**2).sum(1)[:, None] - 2.0 * zr @ centroids.T
                                  + (centroids**2).sum(1)[None], 0.0))
        nearest = dist.argmin(1)
        near_enough = dist[np.arange(len(idx)), nearest] <= radius[nearest]
        labels[idx] = np.where(near_enough, nearest, -1)
