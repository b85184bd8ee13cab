"""The baselines that group neurons instead of tokens, as plain statistics like
`moee.extraction.select`.

CMoE-style carving (Pei et al., "CMoE: Converting Mixture-of-Experts from Dense to Accelerate
LLM Inference", 2025), the top-1 variant: neurons activated on most tokens become a shared
part of every expert; the others are split into equal-size routed experts by balanced
assignment of their activation patterns; each expert is routed to by its representative
neuron.

MoEfication (Zhang et al., "MoEfication: Transformer Feed-forward Layers are Mixtures of
Experts", 2022): balanced clustering of the neurons' input weights into groups, each group
scored by the mean of its neurons' weight rows (its similarity router), the top-k groups run
per token. Top-k of linear scores is top-1 over every k-subset of groups scored by the sum of
their centres, so each subset becomes one expert (the union of its groups) and moee's top-1
engine runs MoEfication's routing exactly."""

from __future__ import annotations

import itertools

import numpy as np

from moee.config import CarveConfig


def activation_profile(hidden: np.ndarray, config: CarveConfig, seed: int = 0) -> np.ndarray:
    """(T, H) bool: a neuron is activated on a token when it is among the token's
    `top_fraction` largest |values| (CMoE's K_a), over a seeded subsample of tokens."""
    n = len(hidden)
    rows = np.sort(np.random.default_rng(seed).choice(n, min(n, config.tokens), False))
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


def carve_layer(hidden: np.ndarray, width: int, config: CarveConfig, seed: int = 0
                ) -> tuple[list[np.ndarray], np.ndarray, int]:
    """(experts as dense neuron ids, each expert's representative neuron, shared neurons):
    every expert is the shared neurons plus its routed group; together they keep every neuron,
    and a token computes `config.active` of them."""
    active = activation_profile(hidden, config, seed)
    rate = active.mean(0)
    k = config.experts
    shared_n = int(np.clip(round(width * (config.active - 1 / k) / (1 - 1 / k)), 0, width - k))
    order = np.argsort(-rate, kind="stable")
    shared, rest = np.sort(order[:shared_n]), order[shared_n:]
    features = active[:, rest].T.astype(np.float32)  # (R, T): each neuron's pattern
    groups, centroids = balanced_groups(features, k, config.iterations, seed)
    reps = np.array([rest[g[np.argmin(((features[g] - c) ** 2).sum(1))]]
                     for g, c in zip(groups, centroids, strict=True)])
    experts = [np.sort(np.concatenate([shared, rest[g]])) for g in groups]
    return experts, reps, shared_n


def moefication_layer(rows: np.ndarray, config: CarveConfig, seed: int = 0
                      ) -> tuple[list[np.ndarray], np.ndarray]:
    """(experts as dense neuron ids, (subsets, d) router centres) from the neurons' input
    weight rows (H, d): `config.experts` balanced groups of rows, every `config.top_k`-subset
    of them one expert scored by the sum of its groups' mean rows (metric "dot")."""
    unit = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
    groups, _ = balanced_groups(unit.astype(np.float32), config.experts, config.iterations,
                                seed)
    centres = np.stack([rows[g].mean(0) for g in groups])  # the similarity router
    subsets = list(itertools.combinations(range(config.experts), config.top_k))
    experts = [np.sort(np.concatenate([groups[g] for g in s])) for s in subsets]
    return experts, np.stack([centres[list(s)].sum(0) for s in subsets])
