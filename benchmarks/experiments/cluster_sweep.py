"""Effect of the clustering settings (PCA dims, HDBSCAN min_samples) on what is found.

    python benchmarks/experiments/cluster_sweep.py --store runs/demo/work/activations

Reads an activation store written by `moee demo` / `moee extract --work-dir` and, per layer
and setting, prints clusters found, noise share, half-split stability and seconds.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from moee.config import ClusterConfig
from moee.extraction.cluster import cluster_layer
from moee.extraction.record import ActivationStore


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default="runs/demo/work/activations")
    ap.add_argument("--dims", default="10,30")
    ap.add_argument("--min-samples", default="5,10,25")
    ap.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = ap.parse_args()
    store = ActivationStore.open(args.store)
    base = ClusterConfig()
    rows = []
    print(f"{store.n_tokens} tokens per layer; min cluster size "
          f"{base.min_cluster_fraction:.1%} of tokens")
    print(f"{'dims':>5}{'min_s':>6}  " + "  ".join(f"layer {i}: k/noise/stab/s"
                                                   for i in range(len(store.site_names))))
    for dims in (int(d) for d in args.dims.split(",")):
        for ms in (int(m) for m in args.min_samples.split(",")):
            config = replace(base, reduce_dims=dims, min_samples=ms)
            cells = []
            for layer in range(len(store.site_names)):
                r = cluster_layer(store.hidden(layer), config)
                rows.append({"dims": dims, "min_samples": ms, "layer": layer,
                             "clusters": r.n_clusters, "noise": r.noise_fraction,
                             "stability": r.stability, "seconds": r.seconds})
                stab = "-" if r.stability is None else f"{r.stability:.2f}"
                cells.append(f"{r.n_clusters:>3}/{r.noise_fraction:.0%}/{stab}/{r.seconds:.0f}")
            print(f"{dims:>5}{ms:>6}  " + "  ".join(f"{c:>22}" for c in cells), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
