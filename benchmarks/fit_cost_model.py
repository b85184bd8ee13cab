"""Refit the engine's machine-fitted CPU cost model (src/moee/engine/cost_model.json) here.

    python benchmarks/fit_cost_model.py            # measure and print current vs fitted
    python benchmarks/fit_cost_model.py --quick    # fewer repeats (rougher, ~3x faster)
    python benchmarks/fit_cost_model.py --write    # also write the fitted values into the JSON

Run it on an idle machine with the thread count you serve with (`--threads`): the constants
move a lot with both (it warns when the load average says other processes are running).

What is fitted (torch only, `torch.inference_mode`, `time.perf_counter`, warm-ups, medians of
repeated samples timed round-robin; the constants are read by src/moee/engine/cost_model.py):

- half_speed_tokens_fp32: an expert-sized GEMM (addmm, input width 768, 384 neurons, fp32) at
  n = 1, 2, 4, ..., 1024 tokens against 4096 tokens; the smallest n whose time per token is at
  most twice the large-batch time per token (the GEMM runs at half speed or better), and stays
  so at every larger n tried (a lone fast small size followed by a slow one does not count).
- the same in bf16: half_speed_tokens_amx when the CPU has AMX-bf16, else
  half_speed_tokens_low_precision. With AMX, also at input width 192 to fit
  amx_width_exponent = log(n_half(192) / n_half(768)) / log(768 / 192).
- flat_activation_max_elements: the engine's in-place GELU over one flat buffer of 2^16 .. 2^24
  elements, just written chunk by chunk as the expert loop writes it, against 8 calls, one per
  chunk right after it was written; the largest size up to which the one flat call is not
  slower (a power of two).
- expert_width_multiple: an expert's two addmm (544 tokens, input 192) at widths 239 / 240 /
  256, and the mean cost over raw widths 225..256 padded to multiples of 8, 16 and 32; 16 is
  kept unless 8 or 32 is clearly (>3%) faster.

- in_out_min_tokens / in_out_max_tokens: "masked"'s two union matmuls (768 -> 2304 -> 768)
  with (in, out) weight copies against nn.Linear's (out, in) storage, n = 1 .. 1024; the
  longest run of n where the copies are clearly (>3%) faster (cost_model_bands.py).
- blocked_min_tokens / blocked_max_tokens: an expert's two matmuls (768 -> 384 -> 768) on
  oneDNN-blocked copies against the loop's plain copies, the same way; blocked_min_elements:
  the smallest W1_e (width x 768, widths 64 .. 768) from which blocked is clearly faster at
  the band's middle (oneDNN builds only).
- With AMX: amx_reference_width (768, the width the bf16 half speed is measured at) and
  amx_min_tokens_per_expert: the fewest tokens per expert from which a loop over 8 experts of
  384 beats "masked" over their 2304-neuron union in bf16.

Every constant is refit where the machine allows it (the AMX ones only with AMX; the note
column says why one is kept), and `--write` records the machine, threads, torch, commit, date
and the refit constants in the JSON's `fitted_on`. Takes about a minute on 2 idle cores
(--quick: fewer repeats). Constants fitted on one machine can be wrong for another: refit
where you serve.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from cost_model_bands import (  # TOKENS: 1 .. 1024; CLEARLY: faster by 3% to count
    CLEARLY,
    TOKENS,
    fit_blocked,
    fit_in_out_band,
    fit_loop_min_tokens,
)
from save_result import cpu_model, git
from torch import nn

from moee.engine.activation import inplace_activation
from moee.engine.cost_model import CostModel

COST_JSON = Path(__file__).resolve().parents[1] / "src" / "moee" / "engine" / "cost_model.json"
LARGE_BATCH = 4096
GELU_SIZES = [2**i for i in range(16, 25)]  # 2^16 .. 2^24 elements
GELU_CHUNKS = 8
WIDTHS = list(range(225, 257))  # one full period of the widest multiple tried (32)
MULTIPLES = (8, 16, 32)


def median_seconds(fns: dict[str, Callable[[], object]], repeats: int,
                   min_sample_s: float = 3e-3) -> dict[str, float]:
    """Median seconds per call of each function. Each sample runs the call enough times to
    last `min_sample_s`; the functions are sampled round-robin so machine load hits all."""
    loops = {}
    for name, fn in fns.items():
        for _ in range(3):  # warm-up: allocations, oneDNN primitive caches
            fn()
        t0 = time.perf_counter()
        fn()
        once = max(time.perf_counter() - t0, 1e-7)
        loops[name] = max(1, min(1000, round(min_sample_s / once)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(loops[name]):
                fn()
            samples[name].append((time.perf_counter() - t0) / loops[name])
    return {name: statistics.median(v) for name, v in samples.items()}


def cpu_busy(seconds: float = 0.5) -> float | None:
    """Share of all CPUs' time spent busy over `seconds` (Linux /proc/stat), else None."""

    def sample() -> tuple[int, int]:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(values), values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return 1 - (idle1 - idle0) / max(total1 - total0, 1)


def gemm(tokens: int, d_in: int, d_out: int, dtype: torch.dtype) -> Callable[[], object]:
    """One expert's first matmul as the engine runs it: addmm(bias, x, W.T, out=h)."""
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, d_in, generator=g).to(dtype)
    w = torch.randn(d_out, d_in, generator=g).to(dtype) / d_in**0.5
    b, out = torch.zeros(d_out, dtype=dtype), torch.empty(tokens, d_out, dtype=dtype)
    return lambda: torch.addmm(b, x, w.T, out=out)


def fit_half_speed(dtype: torch.dtype, d_in: int, repeats: int, d_out: int = 384
                   ) -> tuple[int | None, dict[int, float]]:
    """(n_half, speed per n relative to LARGE_BATCH tokens). n_half: the smallest n with time
    per token <= 2x that at LARGE_BATCH for n and every larger n tried (None if 1024 misses):
    small GEMMs can dip below half speed again past a lucky size (kernel switches), and the
    cost model assumes speed grows with n."""
    secs = median_seconds({str(n): gemm(n, d_in, d_out, dtype) for n in [*TOKENS, LARGE_BATCH]},
                          repeats)
    per_token = {n: secs[str(n)] / n for n in [*TOKENS, LARGE_BATCH]}
    speed = {n: per_token[LARGE_BATCH] / per_token[n] for n in TOKENS}
    n_half = None
    for n in reversed(TOKENS):
        if speed[n] < 0.5:
            break
        n_half = n
    return n_half, speed


def print_speeds(label: str, speed: dict[int, float], n_half: int | None) -> None:
    first = next((n for n, s in speed.items() if s >= 0.5), None)
    print(f"  {label}: speed vs {LARGE_BATCH} tokens  "
          + " ".join(f"{n}:{s:.2f}" for n, s in speed.items())
          + f"  -> half speed from {n_half if n_half else f'>{TOKENS[-1]}'} tokens on"
          + (f" (first reached at {first}, then lost)" if first and first != n_half else ""))


def gelu_times(size: int, repeats: int) -> tuple[float, float]:
    """Median seconds of (one flat GELU over `size` elements, GELU_CHUNKS calls on its chunks),
    each on values just written chunk by chunk, as the expert loop leaves them; only the
    activation calls are timed."""
    act = inplace_activation(nn.GELU()) or (lambda t: t.copy_(nn.functional.gelu(t)))
    src = torch.randn(size, generator=torch.Generator().manual_seed(size))
    buf = torch.empty(size)
    bounds = [size * i // GELU_CHUNKS for i in range(GELU_CHUNKS + 1)]
    chunks = [(buf[a:b], src[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)]

    def flat() -> float:
        for dst, s in chunks:
            dst.copy_(s)
        t0 = time.perf_counter()
        act(buf)
        return time.perf_counter() - t0

    def chunked() -> float:
        total = 0.0
        for dst, s in chunks:
            dst.copy_(s)
            t0 = time.perf_counter()
            act(dst)
            total += time.perf_counter() - t0
        return total

    rounds = max(1, round(2e-3 / max(flat(), 1e-7)))  # ~2 ms of activation per sample
    for fn in (flat, chunked, flat, chunked):  # warm-up
        fn()
    samples: dict[str, list[float]] = {"flat": [], "chunked": []}
    for _ in range(repeats):
        for name, fn in (("flat", flat), ("chunked", chunked)):
            samples[name].append(sum(fn() for _ in range(rounds)) / rounds)
    return statistics.median(samples["flat"]), statistics.median(samples["chunked"])


def fit_flat_activation(repeats: int) -> int:
    """Largest size (a power of two) up to which one flat GELU call is not slower than
    GELU_CHUNKS chunked calls (2% tolerance for timing noise)."""
    print(f"  GELU, one flat call vs {GELU_CHUNKS} chunked calls (fp32, µs):")
    fitted, failed = GELU_SIZES[0], False
    for size in GELU_SIZES:
        flat, chunked = gelu_times(size, repeats)
        ok = flat <= chunked * 1.02
        print(f"    2^{int(math.log2(size)):<3}{flat * 1e6:>10.1f}{chunked * 1e6:>10.1f}"
              f"   flat/chunked {flat / chunked:.2f}" + ("" if ok else "  (flat slower)"))
        if ok and not failed:
            fitted = size
        failed = failed or not ok
    return fitted


def expert_pair(width: int, tokens: int = 544, d: int = 192) -> Callable[[], object]:
    """An expert of `width` neurons: addmm into (tokens, width), then back to (tokens, d)."""
    first = gemm(tokens, d, width, torch.float32)
    g = torch.Generator().manual_seed(width)
    h = torch.randn(tokens, width, generator=g)
    w2, b2, y = torch.randn(d, width, generator=g), torch.zeros(d), torch.empty(tokens, d)
    return lambda: (first(), torch.addmm(b2, h, w2.T, out=y))


def fit_width_multiple(current: int, repeats: int) -> int:
    """Multiple (of 8, 16, 32) whose padding costs least over raw widths WIDTHS; `current`
    unless another is clearly faster."""
    first = median_seconds({str(w): gemm(544, 192, w, torch.float32) for w in (239, 240, 256)},
                           repeats)
    print("  addmm (544 tokens, input 192) by output width, µs: "
          + "  ".join(f"{w}: {s * 1e6:.1f}" for w, s in first.items()))
    padded = lambda w, m: -(-w // m) * m  # noqa: E731
    multiples = sorted({1, current, *MULTIPLES})
    needed = sorted({padded(w, m) for w in WIDTHS for m in multiples})
    secs = {int(w): s for w, s in median_seconds({str(w): expert_pair(w) for w in needed},
                                                 repeats).items()}
    cost = {m: statistics.mean(secs[padded(w, m)] for w in WIDTHS)
            for m in multiples}
    print(f"  both addmm of an expert, mean over raw widths {WIDTHS[0]}..{WIDTHS[-1]} padded to "
          "a multiple of m, µs: "
          + "  ".join(f"m={m}: {c * 1e6:.1f}" for m, c in cost.items()))
    best = min(MULTIPLES, key=cost.__getitem__)
    if best != current and cost[best] < cost[current] * (1 - CLEARLY):
        return best
    return current


def fit_all(current: CostModel, repeats: int, amx: bool
            ) -> tuple[dict[str, object], dict[str, str]]:
    """(fitted constants, a note per constant) from every measurement this machine allows."""
    fitted: dict[str, object] = {}
    notes: dict[str, str] = {}
    print("GEMM 768 -> 384 (addmm):")
    for dtype, key in ((torch.float32, "half_speed_tokens_fp32"),
                       (torch.bfloat16, "half_speed_tokens_amx" if amx
                        else "half_speed_tokens_low_precision")):
        n_half, speed = fit_half_speed(dtype, 768, repeats)
        print_speeds(str(dtype).removeprefix("torch."), speed, n_half)
        fitted[key] = n_half or TOKENS[-1]
        if n_half is None:
            notes[key] = f"never reached half speed up to {TOKENS[-1]} tokens: capped"
    if amx:
        fitted.update(fit_amx(repeats, fitted["half_speed_tokens_amx"], notes))
    else:
        for key in ("half_speed_tokens_amx", "amx_width_exponent", "amx_reference_width",
                    "amx_min_tokens_per_expert"):
            notes[key] = "kept: no AMX here"
    flat = fitted["flat_activation_max_elements"] = fit_flat_activation(repeats)
    if flat == GELU_SIZES[-1]:
        notes["flat_activation_max_elements"] = "flat never slower: largest size tried"
    elif flat == GELU_SIZES[0]:
        notes["flat_activation_max_elements"] = "flat slower already: smallest size tried"
    print("expert width multiple (fp32):")
    multiple = fitted["expert_width_multiple"] = fit_width_multiple(
        current.expert_width_multiple, repeats)
    notes["expert_width_multiple"] = ("kept: no other multiple clearly faster"
                                      if multiple == current.expert_width_multiple else
                                      f"{multiple} clearly faster")
    fitted.update(fit_layout_bands(repeats, notes))
    return fitted, notes


def fit_amx(repeats: int, n_half: int, notes: dict[str, str]) -> dict[str, object]:
    """The AMX rules: the half-speed width exponent (from input widths 192 and 768, the latter
    the reference width) and the tokens per expert from which the loop beats "masked"."""
    fitted: dict[str, object] = {"amx_reference_width": 768}
    n_small, speed = fit_half_speed(torch.bfloat16, 192, repeats)
    print_speeds("bfloat16, input width 192", speed, n_small)
    if n_small:
        fitted["amx_width_exponent"] = round(math.log(n_small / n_half) / math.log(768 / 192), 2)
    min_tokens = fit_loop_min_tokens(median_seconds, repeats, torch.bfloat16)
    if min_tokens is None:
        notes["amx_min_tokens_per_expert"] = "kept: the loop never beat masked"
    else:
        fitted["amx_min_tokens_per_expert"] = min_tokens
    return fitted


def fit_layout_bands(repeats: int, notes: dict[str, str]) -> dict[str, object]:
    """Where "masked" reads (in, out) union copies and the loop oneDNN-blocked ones (fp32)."""
    fitted: dict[str, object] = {}
    print("weight layouts (fp32):")
    band = fit_in_out_band(median_seconds, repeats)
    if band is None:  # never clearly faster: an empty band
        fitted.update(in_out_min_tokens=TOKENS[-1] + 1, in_out_max_tokens=TOKENS[-1])
        notes["in_out_min_tokens"] = "(in, out) never clearly faster: empty band"
    else:
        fitted.update(in_out_min_tokens=band[0], in_out_max_tokens=band[1])
    blocked = fit_blocked(median_seconds, repeats)
    if blocked is None:
        for key in ("blocked_min_tokens", "blocked_max_tokens", "blocked_min_elements"):
            notes[key] = "kept: no oneDNN linear, or blocked never clearly faster"
    else:
        fitted.update(blocked)
    return fitted


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats (rougher)")
    ap.add_argument("--write", action="store_true", help="write the fitted values into --json")
    ap.add_argument("--json", type=Path, default=COST_JSON, help="the cost model file")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads to fit with (default: torch's, as the engine runs)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = 9 if args.quick else 25
    text = args.json.read_text()
    stored = json.loads(text)
    current = CostModel.from_json(text)
    amx = bool(torch.cpu.get_capabilities().get("amx_bf16")) \
        if hasattr(torch.cpu, "get_capabilities") else False
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, AMX-bf16: "
          f"{'yes' if amx else 'no'}; {repeats} repeats per median")
    busy = cpu_busy()
    if busy is not None and busy > 0.2:
        print(f"warning: the CPUs are {busy:.0%} busy before we start: other processes compete "
              "for the cores and skew the timings; refit on an idle machine")
    t0 = time.perf_counter()
    with torch.inference_mode():
        fitted, notes = fit_all(current, repeats, amx)
    print(f"\nmeasured in {time.perf_counter() - t0:.0f} s\n")
    merged = {**stored, **fitted}
    CostModel.from_json(json.dumps(merged))  # every field still there and accepted
    dirty = "+dirty" if git("status", "--porcelain", "--untracked-files=no") else ""
    merged["fitted_on"] = {  # where and from what the refit constants were measured
        "machine": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "commit": (git("rev-parse", "--short=7", "HEAD") or "unknown") + dirty,
        "date": time.strftime("%Y-%m-%d"), "refit": sorted(fitted)}
    print(f"{'constant':<34}{'current':>10}{'fitted':>10}  note")
    for name in (k for k in stored if k not in ("about", "fitted_on")):
        print(f"{name:<34}{stored[name]!s:>10}{merged[name]!s:>10}  "
              + notes.get(name, "" if name in fitted else "kept"))
    if args.write:
        args.json.write_text(json.dumps(merged, indent=1) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
