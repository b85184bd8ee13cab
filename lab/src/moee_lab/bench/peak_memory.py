"""Peak memory of one inference forward, dense vs MoE, each in a fresh process.

On CPU torch has no allocator statistics, so each model runs in its own child process: load,
warm up on one image, reset the kernel's peak-RSS mark (Linux `/proc/self/clear_refs`), run
the batch, read the peak (`VmHWM`). A fresh process per model keeps one model's freed pages
from hiding the other's. On CUDA the allocator's own peak is used, in process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from moee.moe import MoEMLP
from moee.moe_model import load
from moee_lab.bench.models import param_bytes
from moee_lab.demo.default_model import load_default_model
from moee_lab.demo.fashion_mnist import FashionMNISTNotFound, load_fashion_mnist
from moee_lab.demo.images import normalize_images

_PROC = Path("/proc/self")


def _status_kib(field: str) -> int:
    for line in (_PROC / "status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _load(which: str, checkpoint: str):
    """'dense': the embedded default; 'moe': a saved MoE checkpoint of an HF image model."""
    if which == "dense":
        return load_default_model().eval()
    return load(checkpoint).eval()


def cpu_peak_bytes(which: str, checkpoint: str, batch: int) -> dict | None:
    """{'resident': RSS before the forward, 'peak': peak RSS during it, 'forward': their
    difference} in bytes, from a child process; None where /proc/self/clear_refs is missing.
    The child's glibc serves every block over 64 KiB by mmap and returns it on free, so the
    peak tracks live tensors rather than allocator fragmentation."""
    if not (_PROC / "clear_refs").exists():
        return None
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-m", "moee_lab.bench.peak_memory", which, checkpoint,
                          str(batch)], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def cuda_peak_bytes(model: torch.nn.Module, x: torch.Tensor) -> dict:
    """{'resident': the model's own tensors (parameters, buffers, the inference caches' weight
    copies), 'forward': what one forward adds on top of everything allocated before it, 'peak'}.
    A warm-up on one image first builds the inference caches, so they count as resident."""
    with torch.inference_mode():
        model(x[:1])
    torch.cuda.synchronize(x.device)
    before = torch.cuda.memory_allocated(x.device)
    torch.cuda.reset_peak_memory_stats(x.device)
    with torch.inference_mode():
        model(x)
    torch.cuda.synchronize(x.device)
    peak = torch.cuda.max_memory_allocated(x.device)
    resident = param_bytes(model) + sum(m.cache_bytes() for m in model.modules()
                                        if isinstance(m, MoEMLP))
    return {"resident": resident, "peak": peak, "forward": peak - before}


def test_images() -> torch.Tensor | None:
    """512 normalised Fashion-MNIST test images, or None where the dataset is missing."""
    try:
        return normalize_images(load_fashion_mnist("test")[0][:512])
    except FashionMNISTNotFound:
        return None


def _child(which: str, checkpoint: str, batch: int) -> None:
    model = _load(which, checkpoint)
    config = model.config  # HF ViT: the input size and channels
    shape = (config.num_channels, config.image_size, config.image_size)
    images = test_images() if shape == (1, 28, 28) else None  # real images for the default
    x = torch.randn(batch, *shape) if images is None else images[:batch].clone()
    with torch.inference_mode():
        model(x[:1])  # libraries and caches initialised before the mark is reset
        (_PROC / "clear_refs").write_text("5")  # reset VmHWM to the current RSS
        resident = _status_kib("VmRSS") * 1024
        model(x)
    peak = _status_kib("VmHWM") * 1024
    print(json.dumps({"resident": resident, "peak": peak, "forward": peak - resident}))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="(internal) peak RSS of one forward")
    ap.add_argument("which", choices=["dense", "moe"])
    ap.add_argument("checkpoint")
    ap.add_argument("batch", type=int)
    args = ap.parse_args()
    _child(args.which, args.checkpoint, args.batch)
