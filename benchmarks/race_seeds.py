"""Where routing pays: routed experts against static pruning at the same MACs, over seeds.

    python benchmarks/race_seeds.py --seeds 0 1 2 --out runs/race
    python benchmarks/race_seeds.py --seeds 0 1 2 --only "MAC budget 50%" "MAC budget 60%"
    python benchmarks/save_result.py race-seeds runs/race/race_seeds.json --command "..."

The study's "race" points (`moee_lab.study.points.race_points`: the demo's routed model and
static pruning at its MACs; routed and static at MAC budgets 0.3-0.8) on the embedded default,
one full study run per seed (the seed draws the calibration images, every random draw of the
extraction and the distillation order), 1 epoch of distillation, top-1 on the 10,000 test
images. A seed's finished points are kept under `--out/seed<N>/points` and reused on a rerun.
Prints and writes the mean, the spread (half the range) and each seed's top-1 per point, and
the routed-minus-static difference per budget with its spread over seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from moee_lab.study.runner import StudyConfig, run_study


def _budget(name: str) -> str:
    """'routed, MAC budget 50%' -> 'MAC budget 50%' (the pairing key)."""
    return name.split(", ", 1)[1].split(" (", 1)[0] if ", " in name else name


def aggregate(by_seed: dict[int, list[dict]]) -> dict:
    """Per point: mean, spread and per-seed top-1 after KD and executed MAC fraction; per budget
    pairing routed with static: the mean difference and its spread."""
    points: dict[str, dict] = {}
    for seed, rows in by_seed.items():
        for row in rows:
            p = points.setdefault(row["name"], {"series": row["series"], "top1": {},
                                                "macs": {}})
            stage = row.get("after_kd") or row["before_kd"]
            p["top1"][seed] = stage["top1"]
            p["macs"][seed] = stage["macs_per_image"]
    for p in points.values():
        values = list(p["top1"].values())
        p["mean"], p["spread"] = statistics.mean(values), (max(values) - min(values)) / 2
    pairs = {}
    for name, p in points.items():
        if p["series"] != "routed":
            continue
        static = next((q for n, q in points.items() if q["series"] == "static"
                       and _budget(n) == _budget(name)), None)
        if static is None and "demo" in name:
            static = next((q for n, q in points.items() if "demo's MACs" in n), None)
        if static is None:
            continue
        seeds = sorted(set(p["top1"]) & set(static["top1"]))
        diffs = [p["top1"][s] - static["top1"][s] for s in seeds]
        if diffs:
            pairs[_budget(name)] = {"mean": statistics.mean(diffs), "seeds": len(diffs),
                                    "spread": (max(diffs) - min(diffs)) / 2,
                                    "wins": sum(d > 0 for d in diffs)}
    return {"points": points, "pairs": pairs}


def table(result: dict, dense_top1: float) -> str:
    lines = [f"dense: {100 * dense_top1:.2f}%", "",
             "| point | top-1 (mean ± spread) | per seed | MACs / dense |",
             "|---|---:|---|---:|"]
    for name, p in result["points"].items():
        seeds = ", ".join(f"{100 * v:.2f}" for v in p["top1"].values())
        macs = statistics.mean(p["macs"].values()) / result["dense_macs"]
        lines.append(f"| {name} | {100 * p['mean']:.2f}% ± {100 * p['spread']:.2f} | {seeds} "
                     f"| {macs:.3f} |")
    lines += ["", "| budget | routed − static (points) | seeds routed ahead |", "|---|---:|---:|"]
    for budget, d in result["pairs"].items():
        lines.append(f"| {budget} | {100 * d['mean']:+.2f} ± {100 * d['spread']:.2f} | "
                     f"{d['wins']} of {d['seeds']} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--only", nargs="+", default=["race"],
                   help="the study points to run (default: every race point)")
    p.add_argument("--kd-epochs", type=float, default=1.0)
    p.add_argument("--out", default="runs/race")
    args = p.parse_args()
    by_seed, dense = {}, None
    for seed in args.seeds:
        results = run_study(StudyConfig(out=f"{args.out}/seed{seed}", seed=seed,
                                        kd_epochs=args.kd_epochs, only=tuple(args.only)),
                            say=lambda *_: None)
        rows = [r for r in results["rows"] if r["group"] == "race"]
        by_seed[seed], dense = rows, results["dense"]
    result = aggregate(by_seed)
    result.update(dense_macs=dense["macs_per_image"], dense_top1=dense["top1"],
                  seeds=args.seeds, kd_epochs=args.kd_epochs, only=args.only)
    result["table"] = table(result, dense["top1"])
    print(result["table"])
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "race_seeds.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
