"""SmolLM2-135M-shaped decode on a GPU, dense vs MoE: generate() and a CUDA-graphed decode loop.

    python benchmarks/gpu_decode.py --out runs/gpu-decode     (on a CUDA machine)

The GPU machines this runs on cannot hold the real weights (no network; the GGUF file is over
the transfer limit), so both models are stand-ins of the real shapes: SmolLM2-135M's
LlamaConfig with random weights (bf16), and a MoE copy whose layers have the expert sizes of
the real MAC-budget-0.7 extraction (benchmarks/assets/smollm2-budget0.7-experts.json) with
random neurons and router centres. Speed depends on shapes and on how many neurons each token's
expert has, not on the weights' values; the routing of random weights is not the real one.

Measured, dense vs MoE, round-robin in one process: (1) `generate()` greedy tokens/s at each
batch, the MoE on its default execution and on "grouped"; (2) a hand-written greedy loop over a
static KV cache with each decode step replayed from a CUDA graph (the MoE's layers on
"grouped"); (3) prefill of a 512-token prompt. Writes decode.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from moee.engine.cuda_graph import capture, make_capturable
from moee.engine.timing import first_error, time_interleaved
from moee_lab.bench.models import random_moe_copy

ASSET = Path(__file__).parent / "assets" / "smollm2-budget0.7-experts.json"


def stand_ins(dtype: torch.dtype, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = json.loads(ASSET.read_text())
    torch.manual_seed(0)
    config = LlamaConfig(**spec["llama_config"], attn_implementation="sdpa")
    dense = LlamaForCausalLM(config).eval()
    moe = random_moe_copy(dense, spec["experts"]).model  # the HF model, MoE layers installed
    return dense.to(device, dtype), moe.to(device, dtype).eval()


def tokens_per_second(models: dict, batch: int, prompt_len: int, new: int, device) -> dict:
    prompt = torch.randint(3, 49152, (batch, prompt_len), device=device)

    def run(m):
        m.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                   max_new_tokens=new, min_new_tokens=new, do_sample=False)

    secs = time_interleaved({k: (lambda m=m: run(m)) for k, m in models.items()}, device,
                            repeats=3, min_seconds=0)
    return {k: batch * new / s for k, s in secs.items()}


class GraphedDecode:
    """Greedy decoding over a static KV cache, each one-token step replayed from a CUDA graph."""

    def __init__(self, model, batch: int, prompt_len: int, new: int) -> None:
        from transformers import StaticCache

        self.model, self.batch, self.prompt_len, self.new = model, batch, prompt_len, new
        self.device = next(model.parameters()).device
        self.cache = StaticCache(config=model.config, max_cache_len=prompt_len + new)
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        self.position = torch.zeros(1, dtype=torch.long, device=self.device)
        # A ready 4D mask (True: attend) is used as is: no mask built from host values
        # inside the captured step.
        self.mask = torch.zeros(batch, 1, 1, prompt_len + new, dtype=torch.bool,
                                device=self.device)
        self.graph = None

    def _step(self) -> torch.Tensor:
        out = self.model(input_ids=self.token, past_key_values=self.cache,
                         cache_position=self.position, attention_mask=self.mask,
                         position_ids=self.position.expand(self.batch, 1), use_cache=True)
        return out.logits[:, -1].argmax(-1, keepdim=True)

    def _prefill(self, prompt: torch.Tensor) -> None:
        """Empty the cache (its write position too: the cache keeps it on the device), run the
        prompt, and set the first decode step's token, position and mask."""
        self.cache.reset()
        positions = torch.arange(self.prompt_len, device=self.device)
        logits = self.model(input_ids=prompt, past_key_values=self.cache,
                            cache_position=positions, use_cache=True).logits
        self.token.copy_(logits[:, -1].argmax(-1, keepdim=True))
        self.position.fill_(self.prompt_len)
        self.mask.zero_()
        self.mask[..., : self.prompt_len + 1] = True

    def _capture(self) -> None:
        self.graph, self.next_token = capture(self._step, warmup=2)

    @torch.inference_mode()
    def __call__(self, prompt: torch.Tensor) -> torch.Tensor:
        if self.graph is None:  # warm-up and capture write into the cache: prefill again
            self._prefill(prompt)
            self._capture()
        self._prefill(prompt)
        out = [self.token.clone()]
        for _ in range(self.new - 1):
            self.graph.replay()
            self.token.copy_(self.next_token)
            self.position.add_(1)
            self.mask.index_fill_(-1, self.position, True)
            out.append(self.token.clone())
        return torch.cat(out, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", default="runs/gpu-decode")
    ap.add_argument("--device", default="cuda", help="cuda (cpu: generate() rows only)")
    args = ap.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    dense, moe = stand_ins(dtype, device)
    grouped = copy.deepcopy(moe)
    make_capturable(grouped)
    results = {"gpu": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "torch": torch.__version__,
               "dtype": args.dtype, "prompt": args.prompt, "new_tokens": args.new,
               "generate": [], "graphed": [], "prefill": {}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save = lambda: (out / "decode.json").write_text(json.dumps(results, indent=1))  # noqa: E731
    models = {"dense": dense, "moe": moe, "moe grouped": grouped}
    for b in map(int, args.batches.split(",")):
        tps = tokens_per_second(models, b, args.prompt, args.new, device)
        results["generate"].append({"batch": b, "tokens_per_s": tps})
        print(f"generate() batch {b}: " + ", ".join(f"{k} {v:.0f} tok/s" for k, v in tps.items())
              + f"; MoE/dense {tps['moe'] / tps['dense']:.2f}x, "
                f"grouped/dense {tps['moe grouped'] / tps['dense']:.2f}x", flush=True)
        save()
    for b in map(int, args.batches.split(",")) if device.type == "cuda" else []:
        prompt = torch.randint(3, 49152, (b, args.prompt), device=device)
        loops = {k: GraphedDecode(m, b, args.prompt, args.new)
                 for k, m in (("dense", dense), ("moe", grouped))}
        why = first_error(lambda loops=loops, p=prompt: [lp(p) for lp in loops.values()])
        if why is not None:
            results["graphed"].append({"batch": b, "error": why})
            print(f"graphed decode batch {b} failed: {why}", flush=True)
            continue
        t0 = time.perf_counter()
        secs = time_interleaved({k: (lambda lp=lp, p=prompt: lp(p)) for k, lp in loops.items()},
                                device, repeats=5, min_seconds=0)
        tps = {k: b * args.new / s for k, s in secs.items()}
        results["graphed"].append({"batch": b, "tokens_per_s": tps})
        print(f"CUDA-graphed decode batch {b}: dense {tps['dense']:.0f}, MoE {tps['moe']:.0f} "
              f"tok/s; MoE/dense {tps['moe'] / tps['dense']:.2f}x "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        save()
    with torch.inference_mode():
        x = torch.randint(3, 49152, (1, 512), device=device)
        secs = time_interleaved({k: (lambda m=m: m(input_ids=x)) for k, m in models.items()},
                                device)
    results["prefill"] = {k: s * 1e3 for k, s in secs.items()}
    print("prefill 512 tokens (ms): " + ", ".join(f"{k} {v * 1e3:.2f}" for k, v in secs.items()))
    save()


if __name__ == "__main__":
    main()
