"""The expert loop with and without oneDNN-blocked expert copies (moee.engine.blocked), on the
same MoE block, timed round-robin in one process, beside the dense block.

    python benchmarks/experiments/blocked_copies.py      # DeiT-base-sized, 25% and 50%
    python benchmarks/experiments/blocked_copies.py --tokens 197,394 --repeats 21

Prints, per share of active neurons and token count, the dense block's time and the speedup
over it of the loop reading blocked copies (within the cost model's band) and of the loop
reading plain copies only, and the ratio of the two loop times (< 1: blocked faster).
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

import moee.engine.blocked as blocked
from moee.engine.timing import time_interleaved
from moee_lab.bench.blocks import random_moe_block


def time_block(dense, moe, x: torch.Tensor, band, never, repeats: int) -> dict[str, float]:
    """Median seconds of the dense block and of the loop with and without blocked copies."""
    def loop(costs) -> torch.Tensor:
        blocked.COSTS = costs  # the module global the loop reads
        return moe(x)

    try:
        with torch.inference_mode():
            torch.testing.assert_close(loop(band), loop(never), rtol=1e-4, atol=1e-4)
            return time_interleaved({"dense": lambda: dense(x), "blocked": lambda: loop(band),
                                     "plain": lambda: loop(never)},
                                    torch.device("cpu"), repeats=repeats)
    finally:
        blocked.COSTS = band


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="197,394,1576,6304")
    ap.add_argument("--active", default="0.25,0.5")
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    band = blocked.COSTS
    never = dataclasses.replace(band, blocked_min_tokens=10**9, blocked_max_tokens=10**9)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32; band "
          f"{band.blocked_min_tokens}-{band.blocked_max_tokens} tokens per expert")
    print(f"{'active':>6} {'tokens':>6} {'dense ms':>9} {'blocked':>8} {'plain':>6} "
          f"{'blocked/plain time':>18}")
    for active in map(float, args.active.split(",")):
        dense, moe = random_moe_block(768, 3072, 8, active)
        moe.configure(small_batch_tokens=0)  # the loop at every size: what is compared
        for n in map(int, args.tokens.split(",")):
            s = time_block(dense, moe, torch.randn(n, 768), band, never, args.repeats)
            print(f"{active:6.0%} {n:6d} {s['dense'] * 1e3:9.2f} "
                  f"{s['dense'] / s['blocked']:7.2f}x {s['dense'] / s['plain']:5.2f}x "
                  f"{s['blocked'] / s['plain']:18.2f}", flush=True)


if __name__ == "__main__":
    main()
