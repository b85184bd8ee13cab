"""The latency budget against static pruning alone and routed experts alone at the same target.

    python benchmarks/latency_budget.py --engine onnxruntime --batch 64 --target 0.6 \
        --out runs/latency-budget
    python benchmarks/save_result.py latency-budget runs/latency-budget/latency_budget.json \
        --command "python benchmarks/latency_budget.py ..."

For each menu — every candidate (dense, static, routed per layer), static only, routed only —
`moee demo --target-latency T --engine E --batch B --latency-methods ...` extracts on the
embedded default (the demo's settings, its work dir reused), distils 1 epoch and measures
top-1 on the 10,000 test images; a finished menu's folder is reused on a rerun. Then the dense
model and the three distilled models are timed side by side in that engine at that batch
(round-robin, `--rounds` rounds, the best round's medians: noise only ever adds time), each
exported as `moee export --to onnx` writes it for the ONNX engines. Prints and writes per menu:
the layers' choice, top-1, the fraction of dense latency the budget measured while choosing,
and the fraction measured here side by side.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

MENUS = {"mix": ["static", "moee"], "static": ["static"], "routed": ["moee"]}


def run_demo(menu: str, args: argparse.Namespace) -> dict:
    out = Path(args.out) / menu
    results = out / "demo_results.json"
    if not results.is_file():
        cmd = [sys.executable, "-m", "moee.cli", "demo", "--work-dir", args.work_dir,
               "--target-latency", str(args.target), "--engine", args.engine,
               "--batch", str(args.batch), "--latency-methods", *MENUS[menu],
               "--out", str(out)]
        print("$", " ".join(cmd[2:]), flush=True)
        subprocess.run(cmd, check=True)
    return json.loads(results.read_text())


def side_by_side(folders: dict[str, Path], args: argparse.Namespace) -> dict[str, float]:
    """Best-of-rounds median seconds of dense and each model in the engine at the batch."""
    import moee
    from moee.export.runtimes import Runtime
    from moee_lab.demo import image_batches, load_default_model, load_fashion_mnist

    test_x, _ = load_fashion_mnist("test")
    batch = next(image_batches(test_x, None, args.batch))[0]
    models = {"dense": load_default_model()}
    models.update({k: moee.load(v).model.eval() for k, v in folders.items()})
    timer = Runtime(args.engine, repeats=args.repeats)
    best: dict[str, float] = {}
    for _ in range(args.rounds):
        for k, v in timer.time_models(models, batch).items():
            best[k] = min(best.get(k, float("inf")), v)
    return best


def table(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [f"Embedded default, latency budget {args.target:g} of dense in {args.engine} at "
             f"batch {args.batch}; top-1 after 1 epoch of KD on the 10,000 test images.", "",
             "| menu | layers (dense / static / routed) | top-1 | measured while choosing | "
             "side by side | ms (dense ms) |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['menu']} | {r['mix']} | {100 * r['top1']:.2f}% | "
                     f"{r['budget_fraction']:.3f} | {r['fraction']:.3f} | "
                     f"{1e3 * r['seconds']:.2f} ({1e3 * r['dense_seconds']:.2f}) |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engine", default="onnxruntime", choices=["torch", "onnxruntime",
                                                                "openvino"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--target", type=float, default=0.6)
    p.add_argument("--menus", nargs="+", default=list(MENUS), choices=list(MENUS))
    p.add_argument("--work-dir", default="runs/demo/work")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--out", default="runs/latency-budget")
    args = p.parse_args()
    demos = {menu: run_demo(menu, args) for menu in args.menus}
    times = side_by_side({m: Path(args.out) / m / "moe" for m in demos}, args)
    rows = []
    for menu, d in demos.items():
        budget = d["extraction"]["budget"]
        methods = [c["method"] for c in budget["choice"]]
        rows.append({"menu": menu, "top1": d["moe"]["top1"], "choice": budget["choice"],
                     "mix": " / ".join(str(methods.count(m)) for m in ("dense", "static", "moee")),
                     "budget_fraction": budget["measured_fraction"], "rounds": budget["rounds"],
                     "seconds": times[menu], "dense_seconds": times["dense"],
                     "fraction": times[menu] / times["dense"]})
    result = {"engine": args.engine, "batch": args.batch, "target": args.target, "rows": rows,
              "dense_top1": next(iter(demos.values()))["dense"]["top1"],
              "threads": next(iter(demos.values()))["threads"]}
    result["table"] = table(rows, args)
    print(result["table"])
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "latency_budget.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
