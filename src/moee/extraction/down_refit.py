"""Least-squares refit of a MoE layer's down projection and per-expert offsets, so that every
token's expert reproduces the dense MLP output W2·h on the tokens the router sends it.

The experts share one union down projection (overlapping experts share its columns), so the
refit is one ridge regression over the union: a token routed to expert e has the features
[h ⊙ mask_e, onehot_e] (its kept neurons' values, and a one for its expert's offset) and the
target W2·h. The union columns are shrunk toward the original slice (ridge toward W0, closed
form (G + λP)Θ = C + λPΘ0); the offsets are unpenalised. λ is chosen on held-out tokens from
the same Gram statistics, so one pass over the store fits and scores every λ. Written by hand
because no library solves ridge toward a prior from streamed, per-token-masked statistics.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.linalg

from moee.extraction.output_error import chunks


@dataclass
class Refit:
    """`down` (d_out, U): the union's new down projection (columns in `kept` order);
    `offsets` (k, d_out); `report`: held-out relative error before and after, and λ."""

    down: np.ndarray
    offsets: np.ndarray
    report: dict = field(default_factory=dict)


@dataclass
class _Moments:
    gram: np.ndarray  # (U + k, U + k)
    cross: np.ndarray  # (U + k, d_out)
    energy: float  # Σ |W2·h|²


def _moments(hidden, masks: list[np.ndarray], down: np.ndarray, experts: list[np.ndarray],
             position: np.ndarray, routed: np.ndarray) -> list[_Moments]:
    """One `_Moments` per (N,) bool mask of tokens, all from a single pass over the store."""
    union, k, d_out = int(position.max()) + 1, len(experts), down.shape[0]
    out = [_Moments(np.zeros((union + k, union + k)), np.zeros((union + k, d_out)), 0.0)
           for _ in masks]
    for part in chunks(len(hidden)):
        h_all = np.asarray(hidden[part], dtype=np.float64)
        for m, mask in zip(out, masks, strict=True):
            take = mask[part]
            if not take.any():
                continue
            h, route = h_all[take], routed[part][take]
            y = h @ down.T  # (n, d_out) the dense output
            m.energy += float(np.einsum("nd,nd->", y, y))
            for e, neurons in enumerate(experts):
                mine = route == e
                if not mine.any():
                    continue
                he, ye, pos = h[mine][:, neurons], y[mine], position[neurons]
                m.gram[np.ix_(pos, pos)] += he.T @ he
                sums = he.sum(0)
                m.gram[pos, union + e] += sums
                m.gram[union + e, pos] += sums
                m.gram[union + e, union + e] += mine.sum()
                m.cross[pos] += he.T @ ye
                m.cross[union + e] += ye.sum(0)
    return out


def _error(theta: np.ndarray, m: _Moments) -> float:
    """Σ_t |y_t − Θᵀz_t|² from the moments: |y|² − 2⟨Θ, C⟩ + ⟨Θ, GΘ⟩."""
    return m.energy - 2 * float((theta * m.cross).sum()) + float((theta * (m.gram @ theta)).sum())


def _solve(m: _Moments, prior: np.ndarray, penalty: np.ndarray, free: int) -> np.ndarray:
    """Θ minimising the error + Σ penalty·|Θ − prior|² over its first `free` rows, the rest
    held at the prior (the offsets, when they are not fitted)."""
    a = m.gram[:free, :free] + np.diag(penalty[:free])
    b = (m.cross[:free] - m.gram[:free, free:] @ prior[free:]
         + penalty[:free, None] * prior[:free])
    theta = prior.copy()
    theta[:free] = scipy.linalg.solve(a, b, assume_a="pos")
    return theta


def refit_down(hidden, down: np.ndarray, experts: list[np.ndarray], kept: np.ndarray,
               offsets: np.ndarray, routed: np.ndarray, held_out: np.ndarray,
               strengths: tuple[float, ...], fit_offsets: bool = True) -> Refit:
    """Refit the union down projection and the offsets; keep the original (slice + `offsets`)
    when no strength does better on the `held_out` tokens.

    `hidden` (N, H) recorded hidden vectors; `down` (d_out, H) the dense down projection;
    `experts` dense neuron ids per expert; `kept` the union's dense ids (sorted); `routed` (N,)
    the expert each token is sent to; `strengths`: λ as multiples of the mean Gram diagonal;
    `fit_offsets`: False holds the offsets at `offsets` and refits the down projection alone."""
    position = np.full(down.shape[1], -1)
    position[kept] = np.arange(len(kept))
    union, k = len(kept), len(experts)
    free = union + k if fit_offsets else union
    prior = np.concatenate([down[:, kept].T, offsets]).astype(np.float64)
    fit, test = _moments(hidden, [~held_out, held_out], down, experts, position, routed)

    def penalty(strength: float, m: _Moments) -> np.ndarray:
        """λ (a multiple of the mean Gram diagonal, so it grows with the tokens) on the union
        columns; the offsets get a token's worth of pull toward the old value, so an expert
        no fitted token reaches keeps it instead of making the system singular."""
        scale = float(np.mean(np.diag(m.gram)[:union])) or 1.0
        return np.concatenate([np.full(union, strength * scale), np.full(k, 1e-6)])

    before = _error(prior, test)
    report = {"heldout_error_before": before / max(test.energy, 1e-30), "strength": None}
    best = (before, None)
    for s in strengths:
        err = _error(_solve(fit, prior, penalty(s, fit), free), test)
        if err < best[0]:
            best = (err, s)
    report.update(heldout_error_after=best[0] / max(test.energy, 1e-30), strength=best[1])
    if best[1] is None:
        return Refit(prior[:union].T.astype(np.float32), offsets.astype(np.float32), report)
    both = _Moments(fit.gram + test.gram, fit.cross + test.cross, fit.energy + test.energy)
    theta = _solve(both, prior, penalty(best[1], both), free)
    return Refit(theta[:union].T.astype(np.float32), theta[union:].astype(np.float32), report)
