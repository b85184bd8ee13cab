"""Accuracy against measured latency, per engine: the Pareto figure of an onnx-engines result.

    python benchmarks/pareto_engines.py benchmarks/results/<...>-onnx-engines.json \
        --out docs/figures/pareto-engines.png

Reads a `benchmarks/onnx_engines.py` result (the JSON it writes, or its copy under
benchmarks/results/) and draws, for each batch size asked, top-1 against the median latency
of a batch (the best round), one marker per (model, engine): the dense model, static pruning,
routed experts and any other model the run timed, in PyTorch eager, ONNX Runtime fp32 and
int8 and OpenVINO. Points up and to the left are better; the line joins each engine's
Pareto front. Needs matplotlib (installed with moee-lab).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

MARKERS = {"torch": "o", "onnxruntime": "s", "onnxruntime-int8": "D", "openvino-f32": "^",
           "openvino-default": "v", "openvino-int8": "P"}


def load(path: Path) -> dict:
    data = json.loads(path.read_text())
    return data.get("result", data)


def front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats in both latency (lower) and accuracy (higher)."""
    best, out = float("-inf"), []
    for ms, acc in sorted(points):
        if acc > best:
            out.append((ms, acc))
            best = acc
    return out


def draw(result: dict, batches: list[str], out: Path, engines: list[str] | None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if "ms" in r and r.get("quality") is not None
            and (engines is None or r["engine"] in engines)]
    models = sorted({r["model"] for r in rows}, key=lambda m: (m != "dense", m))
    colours = dict(zip(models, plt.get_cmap("tab10").colors, strict=False))
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4.5), squeeze=False)
    for ax, b in zip(axes[0], batches, strict=True):
        for engine in sorted({r["engine"] for r in rows}):
            mine = [r for r in rows if r["engine"] == engine and b in r["ms"]]
            for r in mine:
                ax.scatter(r["ms"][b], 100 * r["quality"], color=colours[r["model"]],
                           marker=MARKERS.get(engine, "x"), s=45)
            line = front([(r["ms"][b], 100 * r["quality"]) for r in mine])
            ax.plot(*zip(*line, strict=True), color="grey", lw=0.8, alpha=0.6)
        ax.set_xscale("log")
        ax.set_xlabel(f"median ms of a batch of {b} (log)")
        ax.set_ylabel("top-1 (%)")
        ax.set_title(f"batch {b}")
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=c, marker="o", ls="", label=m) for m, c in
               colours.items()]
    handles += [plt.Line2D([], [], color="black", marker=MARKERS.get(e, "x"), ls="", label=e)
                for e in sorted({r["engine"] for r in rows})]
    fig.legend(handles=handles, loc="center right", fontsize=8)
    fig.tight_layout(rect=(0, 0, 0.82, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("result", type=Path)
    p.add_argument("--batches", nargs="+", default=["1", "64"])
    p.add_argument("--engines", nargs="+", default=None, help="default: every engine timed")
    p.add_argument("--out", type=Path, default=Path("docs/figures/pareto-engines.png"))
    args = p.parse_args()
    print(draw(load(args.result), args.batches, args.out, args.engines))


if __name__ == "__main__":
    main()
