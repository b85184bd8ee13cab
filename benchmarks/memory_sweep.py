"""Peak memory and time of extraction as the model gets deeper and the calibration set larger.

    python benchmarks/memory_sweep.py --out runs/memory-sweep

Each point runs `moee.extract` in a fresh process (so its peak resident memory is its own) on a
randomly initialised LLaMA-style model (width 256, MLP 1024, no LM head: the sweep measures
resources, not quality) with random token ids, clustering under a memory budget
(`max_memory_gib`: a subsample clustered, every other token assigned; k-means with 8
clusters, since HDBSCAN finds no cluster in some layers of a random model; no stability
score). Layer sweep at 100k tokens, token sweep at 6 layers; then, at 100k tokens and 6
layers, the budgeted clustering against clustering every token (adjusted Rand index of the
labels per layer). Writes results.json in --out.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

POINT = """
import json, resource, sys, time
import torch
from transformers import LlamaConfig, LlamaModel
import moee
layers, tokens, budget, work = {layers}, {tokens}, {budget}, {work!r}
torch.manual_seed(0)
model = LlamaModel(LlamaConfig(vocab_size=2000, hidden_size=256, intermediate_size=1024,
                                     num_hidden_layers=layers, num_attention_heads=4,
                                     num_key_value_heads=2)).eval()
g = torch.Generator().manual_seed(0)
batches = [{{"input_ids": torch.randint(0, 2000, (16, 512), generator=g)}}
           for _ in range(-(-tokens // 8192))]
config = moee.ExtractConfig(record=moee.RecordConfig(n_tokens=tokens),
                            cluster=moee.ClusterConfig(algorithm="kmeans", stability=False),
                            max_memory_gib=budget, work_dir=work, progress=False)
t0 = time.perf_counter()
moe_model, report = moee.extract(model, batches, config)
seconds = time.perf_counter() - t0
print(json.dumps({{"layers": layers, "tokens": report.n_tokens, "budget_gib": budget,
                  "seconds": seconds, "us_per_token": seconds / report.n_tokens * 1e6,
                  "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                  "clustered_tokens": report.config["cluster"]["max_tokens"]}}))
"""


def run_point(layers: int, tokens: int, budget: float | None, work: Path) -> dict:
    code = POINT.format(layers=layers, tokens=tokens, budget=budget, work=str(work))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    row = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{layers:>3} layers {row['tokens']:>8} tokens: {row['seconds']:7.1f} s "
          f"({row['us_per_token']:.0f} us/token), peak {row['peak_rss_gib']:.2f} GiB, "
          f"clustered {row['clustered_tokens'] or row['tokens']} tokens a layer", flush=True)
    return row


def label_agreement(full: Path, budgeted: Path, layers: int) -> list[float]:
    import numpy as np
    from sklearn.metrics import adjusted_rand_score

    return [float(adjusted_rand_score(np.load(full / f"layer_{i}.labels.npy"),
                                      np.load(budgeted / f"layer_{i}.labels.npy")))
            for i in range(layers)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/memory-sweep")
    ap.add_argument("--budget", type=float, default=0.5, help="GiB for clustering a layer")
    ap.add_argument("--layers", default="6,12,24")
    ap.add_argument("--tokens", default="100000,300000,1000000")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    depths = [int(v) for v in args.layers.split(",")]
    sizes = [int(v) for v in args.tokens.split(",")]
    layer_sweep = [run_point(n, sizes[0], args.budget, out / f"l{n}") for n in depths]
    token_sweep = layer_sweep[:1] + [run_point(depths[0], t, args.budget, out / f"t{t}")
                                     for t in sizes[1:]]
    full = run_point(depths[0], sizes[0], None, out / "full")
    ari = label_agreement(out / "full", out / f"l{depths[0]}", depths[0])
    print(f"budgeted vs full clustering at {sizes[0]} tokens, adjusted Rand per layer: "
          f"{[round(a, 3) for a in ari]}")
    (out / "results.json").write_text(json.dumps(
        {"budget_gib": args.budget, "layer_sweep": layer_sweep, "token_sweep": token_sweep,
         "full_clustering": full, "budgeted_vs_full_ari": ari}, indent=1))


if __name__ == "__main__":
    main()
