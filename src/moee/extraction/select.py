"""Per-cluster neuron ranking -> expert index sets (pure statistics; no module surgery)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moee.config import SelectConfig


@dataclass
class ClusterStats:
    """Per-cluster token count, hidden mean/variance (k, H) and MLP-input mean (k, d)."""

    counts: np.ndarray
    hidden_mean: np.ndarray
    hidden_var: np.ndarray
    input_mean: np.ndarray


def cluster_stats(
    hidden: np.ndarray, inputs: np.ndarray, labels: np.ndarray, n_clusters: int,
    chunk: int = 16384,
) -> ClusterStats:
    """Stream over (possibly memmapped) arrays in chunks, accumulating in float64."""
    h_dim, d_dim = hidden.shape[1], inputs.shape[1]
    counts = np.zeros(n_clusters)
    s1, s2 = np.zeros((n_clusters, h_dim)), np.zeros((n_clusters, h_dim))
    si = np.zeros((n_clusters, d_dim))
    for start in range(0, len(labels), chunk):
        lab = labels[start : start + chunk]
        keep = lab >= 0
        if not keep.any():
            continue
        lab = lab[keep]
        h = np.asarray(hidden[start : start + chunk], dtype=np.float64)[keep]
        x = np.asarray(inputs[start : start + chunk], dtype=np.float64)[keep]
        onehot = np.zeros((len(lab), n_clusters))  # (n, k): sums per cluster as one matmul
        onehot[np.arange(len(lab)), lab] = 1.0
        counts += onehot.sum(0)
        s1 += onehot.T @ h
        s2 += onehot.T @ (h * h)
        si += onehot.T @ x
    n = np.maximum(counts, 1)[:, None]
    mean = s1 / n
    var = np.maximum(s2 / n - mean * mean, 0.0)
    return ClusterStats(counts, mean, var, si / n)


def select_neurons(scores: np.ndarray, p: float) -> np.ndarray:
    """Smallest top-scoring neuron set whose cumulative score share reaches `p` (sorted ids)."""
    order = np.argsort(-scores, kind="stable")
    total = scores.sum()
    if total <= 0:
        return np.sort(order[:1])
    cumulative = np.cumsum(scores[order]) / total
    m = int(np.searchsorted(cumulative, p - 1e-12)) + 1
    return np.sort(order[: min(m, len(order))])


def select_experts(stats: ClusterStats, p: float, config: SelectConfig,
                   down_norms: np.ndarray | None = None, seed: int = 0) -> list[np.ndarray]:
    """One neuron index set per cluster, ranked by within-cluster variance or |mean| (the top
    share `p` of the score, or `config.width` of the neurons), or as many as variance would
    keep drawn at random; "output_variance" ranks by the variance each neuron puts into the
    MLP output, var(h_j)·|W2[:, j]|² (`down_norms` (H,) = |W2[:, j]|²). `p` is an argument,
    not `config.p`: the MAC-budget mode chooses one per layer. `seed`: the run's, for the
    random draw."""
    scores = stats.hidden_var if config.criterion != "magnitude" else np.abs(stats.hidden_mean)
    if config.criterion == "output_variance":
        if down_norms is None:
            raise ValueError("output_variance needs the down projection's column norms")
        scores = stats.hidden_var * down_norms
    if config.width is None:
        experts = [select_neurons(s, p) for s in scores]
    else:  # every expert the same size: its top-ranked neurons
        m = max(1, round(config.width * scores.shape[1]))
        experts = [np.sort(np.argsort(-s, kind="stable")[:m]) for s in scores]
    if config.criterion == "random":
        rng = np.random.default_rng(seed)
        width = scores.shape[1]
        experts = [np.sort(rng.choice(width, len(e), replace=False)) for e in experts]
    return experts
