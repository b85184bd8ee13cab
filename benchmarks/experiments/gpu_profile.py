"""Where the time of a DeiT-base-sized MoE forward goes on a GPU: a profiler summary.

    python benchmarks/experiments/gpu_profile.py --checkpoint runs/demo/moe --batches 8,64 \
        --out runs/prof

The same stand-in as `moee bench` part (3) (random weights, expert sizes from the checkpoint),
bf16, eager and on "grouped". Prints the operators that take the most GPU time and the count of
kernel launches per forward, dense vs MoE, and the grouped dispatch's sort of one layer's
expert ids with int64 keys against the narrow key it uses; writes profile.txt.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.benchmark import Timer

from moee.engine.grouped import sort_key_dtype
from moee_lab.bench.models import deit_base_sized_moe, fractions_from_checkpoint


def summary(model, x, label: str, rows: int) -> str:
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                model(x)
            torch.cuda.synchronize()
    events = prof.key_averages()
    gpu = [e for e in events if e.device_type.name == "CUDA"]  # kernels and copies
    kernels = sum(e.count for e in gpu) / 5
    gpu_us = sum(e.self_device_time_total for e in gpu) / 5
    table = events.table(sort_by="self_device_time_total", row_limit=rows)
    return (f"== {label}: {kernels:.0f} kernels and {gpu_us / 1e3:.2f} ms of GPU time per "
            f"forward ==\n{table}\n")


def sort_keys(n: int, k: int, device: torch.device) -> str:
    """One layer's stable sort of n expert ids (k experts): int64 keys vs the narrow key."""
    expert = torch.randint(0, k, (n,), device=device)
    narrow = expert.to(sort_key_dtype(k))
    us = {str(key.dtype): Timer("torch.argsort(key, stable=True)",
                                globals={"key": key, "torch": torch})
          .blocked_autorange(min_run_time=0.5).median * 1e6 for key in (expert, narrow)}
    return f"sort of {n} expert ids ({k} experts): " + ", ".join(
        f"{dtype} keys {t:.1f} us" for dtype, t in us.items()) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="runs/demo/moe")
    ap.add_argument("--batches", default="8,64")
    ap.add_argument("--rows", type=int, default=12)
    ap.add_argument("--out", default="runs/gpu-profile")
    args = ap.parse_args()
    device = torch.device("cuda")
    dense, moe = deit_base_sized_moe(fractions_from_checkpoint(args.checkpoint), device,
                                     torch.bfloat16)
    grouped = copy.deepcopy(moe)
    grouped.configure(execution="grouped")
    text = f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16\n"
    for b in map(int, args.batches.split(",")):
        x = torch.randn(b, 3, 224, 224, device=device, dtype=torch.bfloat16)
        for label, m in (("dense", dense), ("moe experts", moe), ("moe grouped", grouped)):
            part = summary(m, x, f"{label}, batch {b}", args.rows)
            print(part, flush=True)
            text += part
        part = sort_keys(b * 197, 8, device)
        print(part, flush=True)
        text += part
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.txt").write_text(text)


if __name__ == "__main__":
    main()
