"""CMoE-style carving (Pei et al., "CMoE: Converting Mixture-of-Experts from Dense to
Accelerate LLM Inference", 2025), the top-1 variant moee's engine runs: neurons activated on
most tokens become a shared part of every expert; the others are split into equal-size routed
experts by balanced assignment of their activation patterns; each expert is routed to by its
representative neuron. Pure statistics on recorded activations, like `moee.select`."""

from __future__ import annotations

import numpy as np

from moee.config import CarveConfig


def activation_profile(hidden: np.ndarray, config: CarveConfig) -> np.ndarray:
    """(T, H) bool: a neuron is activated on a token when it is among the token's
    `top_fraction` largest |values| (CMoE's K_a), over a seeded subsample of tokens."""
    n = len(hidden)
    rows = np.sort(np.random.default_rng(config.seed).choice(n, min(n, config.tokens), False))
    h = np.abs(np.asarray(hidden[rows], dtype=np.float32))
    ka = max(1, round(config.top_fraction * h.shape[1]))
    top = np.argpartition(-h, ka - 1, axis=1)[:, :ka]
    active = np.zeros(h.shape, dtype=bool)
    active[np.arange(len(h))[:, None], top] = True
    return active


def balanced_groups(features: np.ndarray, k: int, iterations: int, seed: int
                    ) -> tuple[list[np.ndarray], np.ndarray]:
    """Split the rows of `features` (R, T) into k groups of equal size (±1): k-means whose
    assignment step is a linear assignment of rows to k x (R/k) slots (scipy). Returns the
    groups (row ids) and each group's centroid (k, T)."""
    from scipy.optimize import linear_sum_assignment

    r = len(features)
    sizes = np.full(k, r // k) + (np.arange(k) < r % k)
    owner = np.repeat(np.arange(k), sizes)  # slot -> group
    centroids = features[np.random.default_rng(seed).choice(r, k, replace=False)]
    assign = np.zeros(r, dtype=np.int64)
    sq = (features**2).sum(1)[:, None]
    for _ in range(iterations):
        cost = sq - 2.0 * features @ centroids.T + (centroids**2).sum(1)[None]  # (R, k)
        rows, slots = linear_sum_assignment(cost[:, owner])
        new = np.empty(r, dtype=np.int64)
        new[rows] = owner[slots]
        centroids = np.stack([features[new == g].mean(0) for g in range(k)])
        if np.array_equal(new, assign):
            break
        assign = new
    return [np.flatnonzero(assign == g) for g in range(k)], centroids


def carve_layer(hidden: np.ndarray, width: int, config: CarveConfig
                ) -> tuple[list[np.ndarray], np.ndarray, int]:
    """(experts as dense neuron ids, each expert's representative neuron, shared neurons):
    every expert is the shared neurons plus its routed group; together they keep every neuron,
    and a token computes `config.active` of them."""
    active = activation_profile(hidden, config)
    rate = active.mean(0)
    k = config.experts
    shared_n = int(np.clip(round(width * (config.active - 1 / k) / (1 - 1 / k)), 0, width - k))
    order = np.argsort(-rate, kind="stable")
    shared, rest = np.sort(order[:shared_n]), order[shared_n:]
    features = active[:, rest].T.astype(np.float32)  # (R, T): each neuron's pattern
    groups, centroids = balanced_groups(features, k, config.iterations, config.seed)
    reps = np.array([rest[g[np.argmin(((features[g] - c) ** 2).sum(1))]]
                     for g, c in zip(groups, centroids, strict=True)])
    experts = [np.sort(np.concatenate([shared, rest[g]])) for g in groups]
    return experts, reps, shared_n
