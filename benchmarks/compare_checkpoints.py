"""Dense embedded default vs several saved MoE checkpoints, timed side by side.

    python benchmarks/compare_checkpoints.py runs/demo/moe runs/demo-k0/moe --batches 1,8,64,256

Every model runs on the same real Fashion-MNIST test images, round-robin in one process
(`moee.timing.time_interleaved`), so a comparison of two extractions is not skewed by the
machine's load drifting between separate runs. Prints each checkpoint's speedup over dense.
"""

from __future__ import annotations

import argparse

import torch

from moee.data import load_fashion_mnist
from moee.data.tensors import normalize_images
from moee.default_model import load_default_model
from moee.evaluate import model_logits
from moee.io import load
from moee.timing import time_interleaved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+", help="saved MoE checkpoints of the default model")
    ap.add_argument("--batches", default="1,8,64,128,256", help="images per forward")
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    images, _ = load_fashion_mnist("test")
    models = {"dense": load_default_model()}
    models.update({path: load(path).eval() for path in args.checkpoints})
    print(f"{torch.get_num_threads()} threads; speedup over dense per checkpoint")
    print(f"{'images':>6} {'dense ms':>9}  " + "  ".join(args.checkpoints))
    with torch.inference_mode():
        for n in map(int, args.batches.split(",")):
            x = normalize_images(images[:n])
            secs = time_interleaved(
                {name: (lambda m=m, x=x: model_logits(m, x)) for name, m in models.items()},
                torch.device("cpu"), args.repeats)
            ratios = [f"{secs['dense'] / secs[p]:>{len(p)}.2f}" for p in args.checkpoints]
            print(f"{n:>6} {secs['dense'] * 1e3:>9.2f}  " + "  ".join(ratios))


if __name__ == "__main__":
    main()
