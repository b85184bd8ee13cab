"""matplotlib figures of a `LayerAnalysis` list: one PNG per view, a panel per layer."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from moee_lab.analysis.collect import LayerAnalysis


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grid(n: int, size: float = 2.6):
    plt = _plt()
    cols = min(n, 6)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    return plt, fig, axes.flat


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def sizes_figure(layers: list[LayerAnalysis], path: Path) -> Path:
    """Per layer: dense width, kept neurons, and each expert's size."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(layers) + 3), 4))
    x = np.arange(len(layers))
    ax.bar(x, [la.dense_width for la in layers], color="#dddddd", label="dense width")
    ax.bar(x, [la.kept for la in layers], color="#9ecae1", label="kept (union of experts)")
    for i, la in enumerate(layers):
        ax.scatter([i] * len(la.expert_sizes), la.expert_sizes, color="#08519c", s=12,
                   zorder=3, label="an expert" if i == 0 else None)
    ax.set_xticks(x, [str(i) for i in x])
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("neurons")
    ax.legend()
    return _save(plt, fig, path)


def matrix_figure(mats: list[np.ndarray], titles: list[str], path: Path, vmin: float,
                  xlabel: str, ylabel: str) -> Path:
    """One heatmap per layer, e.g. centre similarity or neuron overlap (k x k)."""
    plt, fig, axes = _grid(len(mats))
    from matplotlib.ticker import MaxNLocator
    for ax, m, title in zip(axes, mats, titles, strict=False):
        im = ax.imshow(m, vmin=vmin, vmax=1.0, cmap="viridis", aspect="auto")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.046)
    return _save(plt, fig, path)
