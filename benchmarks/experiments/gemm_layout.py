"""A small GEMM against nn.Linear's (out, in) weight layout vs the same matrix stored (in, out),
the choice behind moee.engine.weights.gemm_layout, and (fp32, MKL builds) MKL's packed GEMM,
the weight packed for the exact token count (what inductor's freezing uses), and oneDNN's
blocked layout (`torch.ops.mkldnn._linear_pointwise` on a weight reordered once, valid for any
token count; what moee.engine.blocked uses). All timed side by side in one process.

    python benchmarks/experiments/gemm_layout.py     # fp32, SmolLM2 and DeiT-base shapes
    python benchmarks/experiments/gemm_layout.py --dtype bfloat16

Prints, per weight shape and token count, the median time of `torch.addmm(b, x, W.T)` with W
stored (out, in) and with W stored (in, out), and their ratio (< 1: (in, out) faster); then
`torch.ops.mkl._mkl_linear` on W packed for that token count, its ratio to (out, in), and
the packed weight's size over W's (it is one more copy, valid for that token count only);
then the oneDNN-blocked weight's time and its ratio to (in, out).
"""

from __future__ import annotations

import argparse
import statistics
import timeit

import torch

SHAPES = {"SmolLM2 gate+up 576->3072": (3072, 576), "SmolLM2 up 576->1536": (1536, 576),
          "SmolLM2 down 1536->576": (576, 1536), "DeiT-base fc1 768->3072": (3072, 768),
          "DeiT-base fc2 3072->768": (768, 3072)}


def median_us(fn, number: int, repeat: int) -> float:
    return statistics.median(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


def gemm_calls(w: torch.Tensor, w_in_out: torch.Tensor, b: torch.Tensor, x: torch.Tensor,
               packs: bool) -> tuple[dict, float]:
    """The GEMMs to time, by layout (the packed one checked against the plain one), and the
    packed weight's size over the weight's."""
    calls = {"out_in": lambda: torch.addmm(b, x, w.T),
             "in_out": lambda: torch.addmm(b, x, w_in_out.T)}
    if packs:
        n, packed = x.shape[0], torch.ops.mkl._mkl_reorder_linear_weight(w, x.shape[0])
        calls["packed"] = lambda: torch.ops.mkl._mkl_linear(x, packed, w, b, n)
        # fp32 sums of K products in another order: error grows with K
        torch.testing.assert_close(calls["packed"](), calls["out_in"](), rtol=1e-4,
                                   atol=1e-6 * x.shape[1])
        blocked = torch.ops.mkldnn._reorder_linear_weight(w, 32)
        calls["onednn"] = lambda: torch.ops.mkldnn._linear_pointwise(x, blocked, b, "none", [],
                                                                     "")
        torch.testing.assert_close(calls["onednn"](), calls["out_in"](), rtol=1e-4,
                                   atol=1e-6 * x.shape[1])
        return calls, packed.numel() / w.numel()
    return calls, 1.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--tokens", default="1,2,4,8,16,32,64,256,1024")
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}")
    packs = (dtype == torch.float32 and hasattr(torch.ops.mkl, "_mkl_linear")
             and hasattr(torch.ops.mkldnn, "_linear_pointwise"))
    head = ("weight", "tokens", "(out, in) us", "(in, out) us", "ratio") + (
        ("packed us", "ratio", "size", "oneDNN us", "/(in,out)") if packs else ())
    print(f"{head[0]:28s} {head[1]:>6s} {head[2]:>13s} {head[3]:>13s} {head[4]:>6s}"
          + (f" {head[5]:>10s} {head[6]:>6s} {head[7]:>5s} {head[8]:>10s} {head[9]:>9s}"
             if packs else ""))
    with torch.inference_mode():
        for name, (out_f, in_f) in SHAPES.items():
            w = torch.randn(out_f, in_f, dtype=dtype)
            w_in_out = w.T.contiguous().T  # same shape and values, transposed storage
            b = torch.randn(out_f, dtype=dtype)
            for n in map(int, args.tokens.split(",")):
                x = torch.randn(n, in_f, dtype=dtype)
                number = max(3, int(2e5 // (n * out_f * in_f / 1e3 + 1e3)))
                calls, packed_size = gemm_calls(w, w_in_out, b, x, packs)
                times = {}
                for _ in range(2):  # alternate: drift on a shared machine hits all alike
                    for layout, call in calls.items():
                        t = median_us(call, number, args.repeat)
                        times[layout] = min(times.get(layout, t), t)
                line = (f"{name:28s} {n:6d} {times['out_in']:13.1f} {times['in_out']:13.1f} "
                        f"{times['in_out'] / times['out_in']:6.2f}")
                if packs:
                    line += (f" {times['packed']:10.1f} {times['packed'] / times['out_in']:6.2f}"
                             f" {packed_size:5.2f} {times['onednn']:10.1f}"
                             f" {times['onednn'] / times['in_out']:9.2f}")
                print(line)


if __name__ == "__main__":
    main()
