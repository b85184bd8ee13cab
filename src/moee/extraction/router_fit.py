"""The error-driven router: label each recorded token with the expert whose output is closest to
the dense MLP's, and fit a bias-free linear router to those labels by regularised multinomial
logistic regression (scikit-learn), its strength chosen on held-out tokens by the output error
the router gives there. The result routes by argmax x·w_e, the engine's "dot" metric."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moee.extraction.output_error import relative_error


@dataclass
class FittedRouter:
    """`rows` (k', d): one row per kept expert; `experts` which of the candidate experts keep a
    row (the others were never the best on a fitted token and are dropped); `report`: held-out
    agreement with the best expert and relative output error, fitted and baseline router."""

    rows: np.ndarray
    experts: np.ndarray
    report: dict = field(default_factory=dict)


def _rows(model: Any, scale: np.ndarray) -> np.ndarray:
    coef = model.coef_ / scale  # undo the feature scaling: x·(w/s) = (x/s)·w
    if coef.shape[0] == 1:  # scikit-learn's binary case: one row w for class 1 against class 0
        coef = np.concatenate([-coef / 2, coef / 2])
    return coef.astype(np.float32)


def _fit(x: np.ndarray, labels: np.ndarray, c: float, seed: int) -> Any:
    # Imported here: loading and running a MoE model needs no scikit-learn.
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, fit_intercept=False, max_iter=200, tol=1e-3,
                              random_state=seed).fit(x, labels)


def labels_within(errors: np.ndarray, sizes: np.ndarray, budget: float) -> np.ndarray:
    """(N,) each token's expert minimising error + μ·size, with the smallest μ ≥ 0 at which the
    mean size of the chosen experts is at most `budget` (bisection): the best expert at a
    given cost, since the largest expert is nearly always the most exact."""
    def choose(mu: float) -> np.ndarray:
        return (errors + mu * sizes).argmin(1)

    if sizes[choose(0.0)].mean() <= budget:
        return choose(0.0)
    low, high = 0.0, 1.0
    while sizes[choose(high)].mean() > budget and high < 1e30:
        high *= 4
    for _ in range(40):
        mid = (low + high) / 2
        low, high = (low, mid) if sizes[choose(mid)].mean() <= budget else (mid, high)
    return choose(high)


def fit_router(inputs: np.ndarray, errors: np.ndarray, held_out: np.ndarray,
               baseline: np.ndarray, energy: np.ndarray, c_grid: tuple[float, ...],
               max_tokens: int, seed: int = 0,
               sizes: np.ndarray | None = None) -> FittedRouter | None:
    """The fitted router (its `rows` None when no strength in `c_grid` beats the `baseline`
    routing (N,) on the held-out rows), or None when every fitted token is best served by one
    expert or no token is held out.

    `inputs` (N, d) MLP inputs; `errors` (N, k) from `output_error.expert_errors`; `energy`
    (N,) |dense output|²; `max_tokens`: fit on at most this many tokens (a random subset);
    `sizes` (k,) the experts' neuron counts: labels then keep the baseline's mean expert size
    (the same MACs), else each token's label is its most exact expert."""
    labels = errors.argmin(1)
    if sizes is not None:
        labels = labels_within(errors, sizes, float(sizes[baseline].mean()))
    fit_rows = np.flatnonzero(~held_out)
    rng = np.random.default_rng(seed)
    if len(fit_rows) > max_tokens:
        fit_rows = np.sort(rng.choice(fit_rows, max_tokens, replace=False))
    present = np.unique(labels[fit_rows])
    if len(present) < 2 or not held_out.any():
        return None
    x = np.asarray(inputs, dtype=np.float32)
    scale = np.sqrt((x[fit_rows] ** 2).mean(0)) + 1e-6
    xs = x / scale
    ho = np.flatnonzero(held_out)
    errors_ho, energy_ho = errors[ho], energy[ho]
    base_error = relative_error(errors_ho, baseline[ho], energy_ho)
    report = {"baseline_error": base_error,
              "oracle_error": relative_error(errors_ho, labels[ho], energy_ho),
              "baseline_agreement": float((baseline[ho] == labels[ho]).mean())}
    if sizes is not None:
        report["baseline_size"] = float(sizes[baseline[ho]].mean())
    best = None
    for c in c_grid:
        model = _fit(xs[fit_rows], labels[fit_rows], c, seed)
        choice = model.predict(xs[ho])
        err = relative_error(errors_ho, choice, energy_ho)
        if best is None or err < best[0]:
            best = (err, c, model, choice)
    err, c, model, choice = best
    report.update(fitted_error=err, fitted_agreement=float((choice == labels[ho]).mean()), c=c,
                  used=err < base_error)
    if sizes is not None:
        report["fitted_size"] = float(sizes[choice].mean())
    if err >= base_error:
        return FittedRouter(None, np.zeros(0, int), report)
    return FittedRouter(_rows(model, scale), model.classes_.astype(int), report)
