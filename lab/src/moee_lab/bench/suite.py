"""Dense vs MoE speed, side by side in one run: MLP blocks and whole models.

    moee bench --checkpoint runs/demo/moe --out runs/bench
    moee bench --device cuda --dtypes float32,bfloat16 --out runs/bench-gpu

Parts: (1) DeiT-base-sized MLP blocks (768 -> 3072) at 25% / 50% active neurons per token,
(2) the embedded default (a saved demo checkpoint) as a whole model, with and without the
calibrated per-layer fallback, (3) a DeiT-base-sized whole model with expert sizes taken from
the checkpoint's real extraction, likewise with and without calibration (on CUDA also both
models replayed from CUDA graphs, `moee.engine.GraphedForward`). Prints tables;
writes bench.json (and bench.png if matplotlib is installed).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import subprocess
from pathlib import Path

import torch

from moee.api import calibrate
from moee.moe_model import load
from moee_lab.bench.blocks import bench_block, random_moe_block
from moee_lab.bench.models import (
    bench_model,
    deit_base_sized_moe,
    fractions_from_checkpoint,
    param_bytes,
)
from moee_lab.bench.peak_memory import cpu_peak_bytes, cuda_peak_bytes, test_images
from moee_lab.demo.default_model import load_default_model


def part_blocks(device, dtypes, batches, token_counts, results):
    print("\n(1) DeiT-base-sized MLP block (768 -> 3072 -> 768), 8 experts, 197 tokens/image;"
          " speedup over dense per style")
    styles = ("moee", "gather", "grouped", "union", "mask", "loop")
    print(f"{'active':>7}{'dtype':>9}{'images':>7}{'tokens':>7}{'dense ms':>10}"
          + "".join(f"{s:>8}" for s in styles) + f"{'ideal':>7}{'eff.':>6}"
          + (f"{'graphed':>9}{'eff.':>6}" if device.type == "cuda" else ""))
    sizes = [(b, b * 197) for b in batches] + [(None, t) for t in token_counts]
    for active in (0.25, 0.5):
        built = 0  # the most memory the engine's copies took in any run at this share
        for dtype in dtypes:
            dense, moe = random_moe_block(768, 3072, 8, active, dtype=dtype, device=device)
            for images, tokens in sizes:
                row = bench_block(dense, moe, tokens, device, dtype)
                row.update(active=active, images=images)
                results["blocks"].append(row)
                built = max(built, row["cache_bytes"])
                s = row["speedup"]
                print(f"{active:>7.0%}{row['dtype']:>9}{images or '-':>7}{tokens:>7}"
                      f"{row['ms']['dense']:>10.2f}"
                      + "".join(f"{'n/a':>8}" if s[k] is None else f"{s[k]:>7.2f}x"
                                for k in styles)
                      + f"{row['ideal']:>7.2f}{row['efficiency']:>6.0%}"
                      + graphed_block_cells(row.get("graphed")))
                for style, why in row["unsupported"].items():
                    print(f"{'':>7}{style} cannot run here: {why}")
        print(f"{'':>7}pre-sliced expert copies: +{moe.presliced_bytes() / 2**20:.1f} MiB over the "
              f"union's {param_bytes(moe) / 2**20:.1f} MiB ('gather' needs none); all engine "
              f"copies at most (with oneDNN-blocked, union): +{built / 2**20:.1f} MiB")


MODEL_HEADER = (f"{'dtype':>9}{'images':>7}{'dense ms':>10}{'non-MLP':>9}{'MoE ms':>9}"
                f"{'speedup':>9}{'ideal':>7}{'eff.':>6}{'amdahl':>8}{'eff.':>6}{'calibrated':>12}"
                f"{'on union':>10}{'graphed':>9}")


def model_row(dense, moe_model, x, device, decimals: int) -> dict:
    """Dense vs MoE on batch `x`, then vs a copy calibrated on it with the union fallback
    allowed (what it buys in speed; it changes outputs); prints one row of MODEL_HEADER and
    returns the measurements."""
    row = bench_model(dense, moe_model, x, device)
    tuned = copy.deepcopy(moe_model)
    choice = calibrate(tuned, x.to(device, next(moe_model.parameters()).dtype),
                       allow_approximate=True)
    row["calibrated"] = bench_model(dense, tuned, x, device)
    row["union_layers"] = sum(c["execution"] == "union" for c in choice)
    ms = lambda v, width: f"{v:>{width}.{decimals}f}"  # noqa: E731
    print(f"{row['dtype']:>9}{row['batch']:>7}{ms(row['dense_ms'], 10)}"
          f"{ms(row['non_mlp_ms'], 9)}{ms(row['moe_ms'], 9)}"
          f"{row['speedup']:>8.2f}x{row['ideal']:>7.2f}{row['efficiency']:>6.0%}"
          f"{row['amdahl_ideal']:>8.2f}{row['amdahl_efficiency']:>6.0%}"
          f"{row['calibrated']['speedup']:>11.2f}x{row['union_layers']:>8}/{len(choice)}"
          f"{graphed_cell(row.get('graphed')):>9}")
    if row.get("graphed", {}).get("error"):
        print(f"{'':>9}CUDA graphs failed: {row['graphed']['error']}")
    return row


def graphed_block_cells(graphed: dict | None) -> str:
    """Graphed speedup and its efficiency (share of the ideal), or why capture failed."""
    if graphed is None:
        return ""
    if "error" in graphed:
        return f"  graphs failed: {graphed['error']}"
    return f"{graphed['speedup']:>8.2f}x{graphed['efficiency']:>6.0%}"


def graphed_cell(graphed: dict | None) -> str:
    """Speedup of the MoE over dense, both replayed from CUDA graphs ('-' off CUDA)."""
    if graphed is None:
        return "-"
    return "failed" if "error" in graphed else f"{graphed['speedup']:.2f}x"


def part_default(device, dtypes, checkpoint, batches, results):
    print(f"\n(2) Embedded default, whole model ({checkpoint}), 17 tokens/image")
    images = test_images()
    print("input: " + ("Fashion-MNIST test images (real routing)" if images is not None
                       else "random images: Fashion-MNIST not found, routing is not realistic"))
    dense = load_default_model().to(device)
    moe_model = load(checkpoint).to(device)
    presliced = sum(m.presliced_bytes() for m in moe_model.moe_layers().values())
    print(f"params: dense {param_bytes(dense) / 2**20:.2f} MiB, "
          f"MoE {param_bytes(moe_model) / 2**20:.2f} MiB (+{presliced / 2**20:.2f} MiB of "
          "pre-sliced expert copies built at first inference)")
    results["default_params_bytes"] = {"dense": param_bytes(dense),
                                       "moe": param_bytes(moe_model),
                                       "moe_presliced_extra": presliced}
    print("ideal: MAC ratio; amdahl: only the MLP share of dense time shrinks (by MLP MACs)")
    print(MODEL_HEADER)
    for dtype in dtypes:
        dense_t, moe_t = copy.deepcopy(dense).to(dtype), copy.deepcopy(moe_model).to(dtype)
        for b in batches:
            x = (torch.randn(b, 1, 28, 28) if images is None else images[:b]).to(device, dtype)
            results["default"].append(model_row(dense_t, moe_t, x, device, decimals=2))
    memory_rows(device, dense, moe_model, checkpoint, images, results)


def memory_rows(device, dense, moe_model, checkpoint, images, results, batches=(1, 64, 256)):
    """Peak memory of one forward, dense vs MoE (fresh process per model on CPU)."""
    print("\npeak memory of one forward (MiB, float32): resident before it (CPU: the process;"
          " CUDA: the model's tensors), and what the forward adds")
    print(f"{'images':>7}{'dense resident':>16}{'MoE resident':>14}{'dense forward':>15}"
          f"{'MoE forward':>13}")
    for b in batches:
        if device.type == "cuda":
            x = (torch.randn(b, 1, 28, 28) if images is None else images[:b]).to(device)
            d, m = cuda_peak_bytes(dense, x), cuda_peak_bytes(moe_model, x)
        else:
            d, m = cpu_peak_bytes("dense", checkpoint, b), cpu_peak_bytes("moe", checkpoint, b)
            if d is None or m is None:
                print("  (needs Linux /proc/self/clear_refs; skipped)")
                return
        results["default_memory"].append({"images": b, "dense": d, "moe": m})
        mib = lambda v: v / 2**20  # noqa: E731
        print(f"{b:>7}{mib(d['resident']):>16.1f}{mib(m['resident']):>14.1f}"
              f"{mib(d['forward']):>15.2f}{mib(m['forward']):>13.2f}")


def part_deit_base(device, dtypes, fractions, batches, results):
    print("\n(3) DeiT-base-sized whole model (random weights, expert sizes from the checkpoint)")
    print(MODEL_HEADER)
    for dtype in dtypes:
        dense, moe_model = deit_base_sized_moe(fractions, device, dtype)
        results.setdefault("deit_base_params_bytes", {})[str(dtype).removeprefix("torch.")] = {
            "dense": param_bytes(dense), "moe": param_bytes(moe_model)}
        for b in batches:
            x = torch.randn(b, 3, 224, 224, generator=torch.Generator().manual_seed(b))
            results["deit_base"].append(model_row(dense, moe_model, x, device, decimals=1))
        del dense, moe_model


def plot(results, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not any(r["images"] for r in results["blocks"]):  # token-count rows only: no x axis
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for active in (0.25, 0.5):
        rows = [r for r in results["blocks"]
                if r["active"] == active and r["dtype"] == "float32" and r["images"]]
        for style in ("moee", "mask", "loop"):
            ax.plot([r["images"] for r in rows],
                    [float("nan") if r["speedup"][style] is None else r["speedup"][style]
                     for r in rows],
                    marker="o", label=f"{style}, {active:.0%} active")
    ax.axhline(1, color="grey", lw=0.8)
    ax.set(xscale="log", xlabel="images per batch", ylabel="speedup over dense MLP",
           title="DeiT-base-sized MLP block, fp32")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def nvidia_driver() -> str | None:
    """The NVIDIA driver's version (nvidia-smi), None where it cannot be read."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="moee bench", description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtypes", default="float32")
    ap.add_argument("--checkpoint", default="runs/demo/moe", help="a saved demo MoE checkpoint")
    ap.add_argument("--block-batches", default="1,8,32,128")
    ap.add_argument("--block-tokens", default="16,256,4096", help="extra rows by token count")
    ap.add_argument("--default-batches", default="1,8,32,64,128,256")
    ap.add_argument("--deit-batches", default="1,8")
    ap.add_argument("--parts", default="blocks,default,deit")
    ap.add_argument("--out", default="runs/bench")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    ints = lambda s: [int(v) for v in s.split(",") if v]  # noqa: E731
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"{platform.processor() or platform.machine()}, "
                    f"{torch.get_num_threads()} threads")
    print(f"device: {machine}; torch {torch.__version__}")
    results = {"machine": machine, "torch": torch.__version__, "blocks": [], "default": [],
               "default_memory": [], "deit_base": []}
    if device.type == "cuda":
        results.update(cuda=torch.version.cuda, driver=nvidia_driver())
    parts = args.parts.split(",")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save = lambda: (out / "bench.json").write_text(json.dumps(results, indent=1))  # noqa: E731
    if "blocks" in parts:
        part_blocks(device, dtypes, ints(args.block_batches), ints(args.block_tokens), results)
        save()  # after every part: a later part that fails or is killed loses nothing before
    if "default" in parts:
        part_default(device, dtypes, args.checkpoint, ints(args.default_batches), results)
        save()
    if "deit" in parts:
        part_deit_base(device, dtypes, fractions_from_checkpoint(args.checkpoint),
                       ints(args.deit_batches), results)
    save()
    png = plot(results, out / "bench.png")
    print(f"\nwrote {out / 'bench.json'}" + (f" and {png}" if png else ""))


if __name__ == "__main__":
    main()
