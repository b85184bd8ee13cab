"""Copy a demo or bench result JSON into benchmarks/results/ under the results naming scheme.

    python benchmarks/save_result.py demo runs/demo/demo_results.json --command "moee demo"
    python benchmarks/save_result.py bench runs/bench/bench.json --command "moee bench ..."
    python benchmarks/render_results.py        # then regenerate benchmarks/RESULTS.md

The copy is named <YYYY-MM-DD>-<cpu-or-gpu-slug>-torch<version>-<commit7>-<kind>.json and
wraps the original as {"meta": {date, kind, machine, cpu, threads, torch, commit, dirty,
command}, "result": <original>} (see benchmarks/results/README.md). The machine is the GPU
when a bench JSON says it ran on one (its "machine" is then torch.cuda.get_device_name()),
else this CPU's "model name" from /proc/cpuinfo: run it on the machine that produced the
JSON (a GPU result copied elsewhere keeps the GPU's name; its cpu and threads are left empty).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
KINDS = {"demo": ("dense", "moe", "moe_calibrated"), "bench": ("machine", "blocks"),
         "smollm2": ("rows",), "smollm2-kd": ("before", "after", "kd_seconds"),
         "minilm": ("rows",), "smollm2-reproduce": ("dense", "rows"),
         "memory": ("layer_sweep", "token_sweep"),
         "study": ("dense", "rows", "kd_epochs"), "gpu-decode": ("gpu", "generate"),
         "smollm2-export": ("transformers", "greedy_equal_prefix"),
         "table2-seeds": ("dense_top1", "summary", "seeds"),
         "onnx-engines": ("task", "rows", "table"),
         "race-seeds": ("points", "pairs", "table"), "latency-budget": ("rows", "table")}
GPU_KINDS = {"bench": "machine", "gpu-decode": "gpu"}  # kind -> field naming where it ran
CPU_MACHINE = re.compile(r", (\d+) threads$")  # moee bench's "machine" on CPU


def cpu_model() -> str:
    """This CPU's model name (/proc/cpuinfo), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def slug(text: str) -> str:
    """'Intel(R) Xeon(R) Platinum 8480+ CPU @ 2.00GHz' -> 'intel-xeon-platinum-8480-cpu-2-00ghz'."""
    text = re.sub(r"\((r|tm|c)\)", "", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-") or "unknown"


def git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


def meta_for(kind: str, result: dict[str, Any], command: str | None,
             date: str, machine: str | None, commit: str | None = None) -> dict[str, Any]:
    """Where and with what the result was measured (`commit`: measured at that commit,
    elsewhere, from a clean tree; default this checkout's HEAD and its state)."""
    cpu = cpu_model()
    threads = result.get("threads")
    ran_on = str(result.get(GPU_KINDS[kind], "")) if kind in GPU_KINDS else ""
    on_cpu = kind not in GPU_KINDS or ran_on == "cpu" or bool(CPU_MACHINE.search(ran_on))
    if kind in GPU_KINDS and CPU_MACHINE.search(ran_on):
        threads = int(CPU_MACHINE.search(ran_on).group(1))
    if machine is None:
        if on_cpu:
            machine = cpu
        else:  # the GPU's name, as the harness wrote it; this host's GPU if it has one
            machine = torch.cuda.get_device_name() if torch.cuda.is_available() else ran_on
    if not on_cpu and not torch.cuda.is_available():  # copied here from the GPU machine:
        cpu, threads = None, None  # this host's CPU says nothing about where it ran
    elif threads is None:
        threads = torch.get_num_threads()
    return {"date": date, "kind": kind, "machine": machine, "cpu": cpu,
            "threads": threads,
            "torch": str(result.get("torch", torch.__version__)),
            "commit": commit or git("rev-parse", "--short=7", "HEAD") or "nocommit",
            "dirty": False if commit else bool(git("status", "--porcelain",
                                                   "--untracked-files=no")),
            "command": command}


def file_name(meta: dict[str, Any]) -> str:
    version = re.sub(r"[^A-Za-z0-9.]+", "-", meta["torch"]).strip("-")
    return (f"{meta['date']}-{slug(meta['machine'])}-torch{version}-{meta['commit']}-"
            f"{meta['kind']}.json")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kind", choices=sorted(KINDS))
    ap.add_argument("source", type=Path, help="demo_results.json or bench.json")
    ap.add_argument("--command", default=None, help="the command that produced the JSON")
    ap.add_argument("--machine", default=None,
                    help="name of the CPU or GPU it ran on (default: detected)")
    ap.add_argument("--date", default=datetime.date.today().isoformat(), help="YYYY-MM-DD")
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder to copy into")
    ap.add_argument("--force", action="store_true", help="overwrite a file of the same name")
    ap.add_argument("--commit", default=None,
                    help="short commit the JSON was measured at, from a clean tree, when that "
                         "was not this checkout's HEAD (e.g. on a GPU machine)")
    args = ap.parse_args(argv)
    result = json.loads(args.source.read_text())
    missing = [k for k in KINDS[args.kind] if k not in result]
    if missing:
        sys.exit(f"{args.source} is not a {args.kind} result: no {', '.join(missing)}")
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", args.date):
        sys.exit(f"--date must be YYYY-MM-DD, got {args.date!r}")
    meta = meta_for(args.kind, result, args.command, args.date, args.machine,
                    args.commit[:7] if args.commit else None)
    path = args.results / file_name(meta)
    if path.exists() and not args.force:
        sys.exit(f"{path} exists (--force overwrites it)")
    args.results.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "result": result}, indent=1) + "\n")
    print(f"wrote {path}" + ("  (working tree has uncommitted changes)" if meta["dirty"] else ""))
    print("now run: python benchmarks/render_results.py")


if __name__ == "__main__":
    main()
