"""The study's tables (Markdown) and its accuracy-vs-MACs plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _cells(row: dict, stage: str, dense: dict) -> str:
    m = row.get(stage)
    if m is None:
        return " | | "
    return (f" {m['top1']:.2%} ({(m['top1'] - dense['top1']) * 100:+.2f}p) |"
            f" {m['macs_per_image'] / dense['macs_per_image'] - 1:+.1%} |"
            f" {m['executed_macs_per_image'] / dense['executed_macs_per_image'] - 1:+.1%}")


def study_tables(results: dict[str, Any]) -> str:
    """One Markdown table per group: top-1 and MACs against dense, before and after KD."""
    dense, kd = results["dense"], results["kd_epochs"]
    head = "| point | top-1 before KD | Δ MACs | Δ exec MACs |"
    if kd > 0:
        head += f" top-1 after {kd:g} epoch KD | Δ MACs | Δ exec MACs |"
    head += "\n|" + "---|" * head.count(" |")
    lines = [f"Dense: {dense['top1']:.2%} top-1 on {results['test_images']:,} test images, "
             f"{dense['macs_per_image'] / 1e6:.2f} M MACs per image. Δ MACs: the model's "
             "routed MACs; Δ exec MACs: what the engine runs at a batch of 64 images."]
    groups = dict.fromkeys(r["group"] for r in results["rows"])
    for group in groups:
        lines += ["", f"**{group}**", "", head]
        for r in results["rows"]:
            if r["group"] == group:
                after = f"{_cells(r, 'after_kd', dense)} |" if kd > 0 else ""
                lines.append(f"| {r['name']} |{_cells(r, 'before_kd', dense)} |{after}")
    return "\n".join(lines)


def write_plot(results: dict[str, Any], path: Path) -> Path | None:
    """Top-1 against the fraction of dense MACs, one line per series (None without
    matplotlib, an optional dependency)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    dense = results["dense"]
    stages = ["before_kd"] + (["after_kd"] if results["kd_epochs"] > 0 else [])
    fig, axes = plt.subplots(1, len(stages), figsize=(6 * len(stages), 4.5), squeeze=False)
    for ax, stage in zip(axes[0], stages, strict=True):
        series = dict.fromkeys(r["series"] for r in results["rows"] if r["series"] not in
                               ("ablation", "variants", "calibration", "remedies"))
        for s in series:
            pts = sorted((r[stage]["macs_per_image"] / dense["macs_per_image"],
                          r[stage]["top1"]) for r in results["rows"] if r["series"] == s)
            ax.plot(*zip(*pts, strict=True), marker="o", label=s)
        ax.axhline(dense["top1"], color="grey", linestyle="--", label="dense")
        ax.set_xlabel("MACs / dense MACs (model's routed MACs)")
        ax.set_ylabel("top-1")
        ax.set_title(stage.replace("_", " ").replace("kd", "KD"))
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
