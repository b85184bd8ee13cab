"""How far each expert's output is from the dense MLP's, per recorded token: the quantity the
fitted router and the down-projection refit minimise (pure numpy over the activation store).

An expert e computes the neurons S_e and adds its offset b_e, so on a token with hidden vector
h its output misses the dense output W2·h by W2[:, not S_e]·h[not S_e] − b_e.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

CHUNK = 8192


def held_out_rows(n: int, fraction: float, block: int = 256) -> np.ndarray:
    """(n,) bool: every ⌈1/fraction⌉-th block of `block` consecutive tokens, so held-out
    tokens come from other passages of the text than the fitted ones (neighbouring tokens of
    one passage are near copies of each other); blocks shrink so that a few tokens still give
    at least four held-out blocks."""
    mask = np.zeros(n, dtype=bool)
    if fraction <= 0:
        return mask
    step = max(2, round(1 / fraction))
    block = max(1, min(block, n // (4 * step)))
    for start in range(step - 1, n // block + 1, step):
        mask[start * block : (start + 1) * block] = True
    return mask


def chunks(n: int, chunk: int = CHUNK) -> Iterator[slice]:
    for start in range(0, n, chunk):
        yield slice(start, min(start + chunk, n))


def expert_errors(hidden, down: np.ndarray, experts: list[np.ndarray],
                  offsets: np.ndarray | None) -> np.ndarray:
    """(N, k) squared output error of every expert on every token: |W2[:, ~S_e] h[~S_e] − b_e|².

    `hidden` (N, H) may be a memmapped store array (read in chunks); `down` is the dense
    (d_out, H) down projection; `offsets` (k, d_out) or None for plain slices."""
    n, width = len(hidden), down.shape[1]
    dropped = []
    for neurons in experts:
        mask = np.ones(width, dtype=bool)
        mask[neurons] = False
        dropped.append(np.flatnonzero(mask))
    out = np.empty((n, len(experts)))
    for rows in chunks(n):
        h = np.asarray(hidden[rows], dtype=np.float32)
        for e, gone in enumerate(dropped):
            miss = h[:, gone] @ down[:, gone].T  # (n, d_out), the part the expert leaves out
            if offsets is not None:
                miss -= offsets[e]
            out[rows, e] = np.einsum("nd,nd->n", miss, miss, dtype=np.float64)
    return out


def output_energy(hidden, down: np.ndarray) -> np.ndarray:
    """(N,) |W2·h|² per token: the scale the errors are reported against."""
    out = np.empty(len(hidden))
    for rows in chunks(len(hidden)):
        y = np.asarray(hidden[rows], dtype=np.float32) @ down.T
        out[rows] = np.einsum("nd,nd->n", y, y, dtype=np.float64)
    return out


def relative_error(errors: np.ndarray, choice: np.ndarray, energy: np.ndarray) -> float:
    """Σ error of each token's chosen expert / Σ |dense output|²."""
    picked = errors[np.arange(len(choice)), choice]
    return float(picked.sum() / max(energy.sum(), 1e-30))
