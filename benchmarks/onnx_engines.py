"""Dense against moee models where CPU users deploy: ONNX Runtime and OpenVINO, fp32 and int8.

    python benchmarks/onnx_engines.py --model static=runs/static-kd --model routed=runs/demo/moe \
        --out runs/onnx-engines
    python benchmarks/save_result.py onnx-engines runs/onnx-engines/onnx_engines.json \
        --command "python benchmarks/onnx_engines.py ..."

Every model (the embedded default dense ViT and each checkpoint) is exported with
`moee export --to onnx` semantics, fp32 and int8 (routers fp32). Each (engine, file) runs in its
own process, one at a time: top-1 on the 10,000 Fashion-MNIST test images, then the median
latency of a batch at each size; the timing processes are alternated between the files and
repeated `--rounds` times, and a figure is the median over rounds. Engines: ONNX Runtime
(fp32 and int8 files), OpenVINO with inference precision f32 (exact) and with its default
precision on this CPU (bf16 where the CPU has it), and OpenVINO on the int8 file. Speed is
reported against dense in the same engine and against dense PyTorch eager.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ENGINES = {  # name -> (runtime, file precision, OpenVINO inference precision or None)
    "torch": ("torch", "fp32", None),
    "onnxruntime": ("onnxruntime", "fp32", None),
    "onnxruntime-int8": ("onnxruntime", "int8", None),
    "openvino-f32": ("openvino", "fp32", "f32"),
    "openvino-default": ("openvino", "fp32", "default"),
    "openvino-int8": ("openvino", "int8", "default"),
}


def load_runner(engine: str, path: Path, threads: int):
    """A function numpy (B, 1, 28, 28) -> logits, in `engine` with `threads` threads."""
    runtime, _, precision = ENGINES[engine]
    if runtime == "onnxruntime":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        s = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        name = s.get_inputs()[0].name
        return lambda x: s.run(None, {name: x})[0]
    if runtime == "openvino":
        import openvino as ov

        config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
        if precision != "default":
            config["INFERENCE_PRECISION_HINT"] = precision
        compiled = ov.Core().compile_model(str(path), "CPU", config)
        return lambda x: compiled(x)[0]
    import torch

    import moee
    from moee_lab.demo import load_default_model

    torch.set_num_threads(threads)
    model = load_default_model() if path.name == "dense" else moee.load(path).eval()

    def run(x):
        with torch.inference_mode():
            return model(torch.from_numpy(x)).logits.numpy()
    return run


def worker(args: argparse.Namespace) -> None:
    """One process, one engine, one file: top-1 (optional) and latency per batch, as JSON."""
    run = load_runner(args.engine, Path(args.file), args.threads)
    data = np.load(Path(args.out) / "test.npz")
    x, y = data["x"], data["y"]
    result = {}
    if args.accuracy:
        correct = sum(int((run(x[i : i + 500]).argmax(-1) == y[i : i + 500]).sum())
                      for i in range(0, len(x), 500))
        result["top1"] = correct / len(x)
    latency = {}
    for b in args.batches:
        batch = np.ascontiguousarray(x[:b])
        for _ in range(3):
            run(batch)
        times, start = [], time.perf_counter()
        while len(times) < 10 or (time.perf_counter() - start < args.seconds and len(times) < 500):
            t = time.perf_counter()
            run(batch)
            times.append((time.perf_counter() - t) * 1e3)
        latency[str(b)] = statistics.median(times)
    result["ms"] = latency
    print(json.dumps(result))


def export_all(models: dict[str, str], out: Path) -> dict[str, dict[str, Path]]:
    """fp32 and int8 ONNX files of dense and each checkpoint; the test images as npz."""
    import torch

    import moee
    from moee.export.onnx import export_onnx
    from moee.export.onnx_int8 import quantize_int8
    from moee_lab.demo import load_default_model, load_fashion_mnist, normalize_images

    out.mkdir(parents=True, exist_ok=True)
    test_x, test_y = load_fashion_mnist("test")
    np.savez(out / "test.npz", x=normalize_images(test_x).numpy(), y=test_y.numpy())
    files = {}
    for name, source in {"dense": "dense", **models}.items():
        model = load_default_model() if source == "dense" else moee.load(source).eval()
        fp32, int8 = out / f"{name}.onnx", out / f"{name}-int8.onnx"
        report = export_onnx(model, fp32)
        quantize_int8(fp32, int8)
        print(f"{name}: {report.moe_layers} MoE layers, |ORT - moee| {report.max_error:.2g}, "
              f"{fp32.stat().st_size / 2**20:.1f} MiB fp32, {int8.stat().st_size / 2**20:.1f} "
              "MiB int8", flush=True)
        files[name] = {"fp32": fp32, "int8": int8, "torch": Path(source)}
        del model
        torch.set_num_threads(torch.get_num_threads())
    return files


def run_worker(engine: str, path: Path, args: argparse.Namespace, accuracy: bool) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--engine", engine, "--file", str(path),
           "--out", args.out, "--threads", str(args.threads), "--seconds", str(args.seconds),
           "--batches", *map(str, args.batches)] + (["--accuracy"] if accuracy else [])
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(files: dict[str, dict[str, Path]], args: argparse.Namespace) -> list[dict]:
    """Rows (model, engine, top-1, median ms per batch over rounds)."""
    rows = {}
    for r in range(args.rounds):
        for engine in args.engines:
            for name, paths in files.items():
                path = paths["torch" if engine == "torch" else ENGINES[engine][1]]
                got = run_worker(engine, path, args, accuracy=r == 0)
                row = rows.setdefault((name, engine), {"model": name, "engine": engine,
                                                       "rounds": []})
                if "error" in got:
                    row["error"] = got["error"]
                    continue
                row.setdefault("top1", got.get("top1"))
                row["rounds"].append(got["ms"])
                print(f"round {r}: {name:>8} {engine:<17} "
                      + " ".join(f"b{b} {ms:7.2f}" for b, ms in got["ms"].items()), flush=True)
    for row in rows.values():
        if row["rounds"]:
            row["ms"] = {b: statistics.median(r[b] for r in row["rounds"])
                         for b in row["rounds"][0]}
    return list(rows.values())


def table(rows: list[dict]) -> str:
    """Markdown: top-1, ms per batch, speed over dense in the same engine and over torch."""
    by = {(r["model"], r["engine"]): r for r in rows if "ms" in r}
    eager = by.get(("dense", "torch"))
    lines = ["| model | engine | top-1 | " + " | ".join(
        f"batch {b}" for b in (eager or next(iter(by.values())))["ms"]) + " |"]
    lines.append("|---|---|---:|" + "---:|" * (len(lines[0].split("|")) - 5))
    for (model, engine), r in by.items():
        dense = by.get(("dense", engine))
        cells = []
        for b, ms in r["ms"].items():
            same = f"{dense['ms'][b] / ms:.2f}× dense" if dense and model != "dense" else ""
            vs_eager = f"{eager['ms'][b] / ms:.1f}× eager" if eager else ""
            cells.append(f"{ms:.2f} ({', '.join(c for c in (same, vs_eager) if c)})")
        top1 = f"{100 * r['top1']:.2f}%" if r.get("top1") is not None else "–"
        lines.append(f"| {model} | {engine} | {top1} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", default=[], metavar="NAME=CHECKPOINT")
    p.add_argument("--out", default="runs/onnx-engines")
    p.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8, 64, 256])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seconds", type=float, default=1.5, help="timing per batch size")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--engine", help=argparse.SUPPRESS)
    p.add_argument("--file", help=argparse.SUPPRESS)
    p.add_argument("--accuracy", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    models = dict(m.split("=", 1) for m in args.model)
    files = export_all(models, Path(args.out))
    rows = measure(files, args)
    print(table(rows))
    result = {"rows": rows, "threads": args.threads, "batches": args.batches,
              "models": models, "table": table(rows)}
    (Path(args.out) / "onnx_engines.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
