"""Each layer's clustering kept in the work dir, keyed by what produced it (the recorded
activations and the clustering settings), so a rerun, or a sweep of selection settings,
reuses exactly the clusterings whose inputs and settings match and redoes the rest."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from moee.config import ExtractConfig
from moee.extraction.cluster import LayerClustering
from moee.util.atomic import save_npy, write_json
from moee.util.cache_key import stage_key


def clustering_key(store_origin: dict[str, Any], config: ExtractConfig, layer: int) -> str:
    """The key of a layer's clustering: the recorded activations (their model, data and record
    settings) and the layer, under the settings a clustering reads (the clustering settings,
    before any remedy for instability, and the run's seed)."""
    return stage_key("clustering", {"store": store_origin, "layer": layer}, config)


def _paths(work: Path, layer: int, key: str) -> tuple[Path, Path]:
    """One pair of files per layer and key: a sweep over methods (say, clusters and one static
    expert) keeps every clustering instead of overwriting one slot per layer."""
    stem = f"layer_{layer}.{key[:12]}"
    return work / f"{stem}.labels.npy", work / f"{stem}.clustering.json"


def save_clustering(work: Path, layer: int, key: str, clustering: LayerClustering) -> None:
    """Labels first, then the manifest that vouches for them: a manifest exists only beside
    the complete labels it describes."""
    labels, manifest = _paths(work, layer, key)
    save_npy(labels, clustering.labels)
    write_json(manifest, {"key": key, "n_clusters": clustering.n_clusters,
                          "noise_fraction": clustering.noise_fraction,
                          "stability": clustering.stability, "seconds": clustering.seconds})


def load_clustering(work: Path, layer: int, key: str, n_tokens: int) -> LayerClustering | None:
    """The saved clustering of `layer` if it was made under `key`, else None."""
    labels_path, manifest_path = _paths(work, layer, key)
    try:
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("key") != key:
            return None
        labels = np.load(labels_path)
    except (OSError, ValueError, json.JSONDecodeError):
        return None
    if labels.shape != (n_tokens,) or labels.max(initial=-1) + 1 != manifest["n_clusters"]:
        return None
    return LayerClustering(labels, manifest["n_clusters"], manifest["noise_fraction"],
                           manifest["stability"], manifest["seconds"])
