"""Dense embedded default vs several saved MoE checkpoints, timed side by side.

    python benchmarks/compare_checkpoints.py runs/demo/moe runs/demo-k0/moe --batches 1,8,64,256
    python benchmarks/compare_checkpoints.py runs/demo/moe --dtype bfloat16 --calibrate

Every model runs on the same real Fashion-MNIST test images, round-robin in one process
(`moee.engine.timing.time_interleaved`), so a comparison of two extractions is not skewed by the
machine's load drifting between separate runs. Prints each checkpoint's speedup over dense;
`--calibrate` adds a copy of each checkpoint calibrated (`moee.calibrate`, the union fallback
allowed) at each batch.
"""

from __future__ import annotations

import argparse
import copy

import torch

from moee import calibrate, load
from moee.engine.timing import time_interleaved
from moee.util.batches import output_tensor
from moee_lab.demo import load_default_model, load_fashion_mnist, normalize_images


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+", help="saved MoE checkpoints of the default model")
    ap.add_argument("--batches", default="1,8,64,128,256", help="images per forward")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--calibrate", action="store_true",
                    help="also time each checkpoint calibrated at each batch size")
    args = ap.parse_args()
    dtype, device = getattr(torch, args.dtype), torch.device(args.device)
    images, _ = load_fashion_mnist("test")
    models = {"dense": load_default_model().to(device, dtype)}
    models.update({path: load(path).eval().to(device, dtype) for path in args.checkpoints})
    names = [*args.checkpoints, *(f"{p} calibrated" for p in args.checkpoints if args.calibrate)]
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"{torch.get_num_threads()} threads")
    print(f"{where}, {args.dtype}; speedup over dense")
    print(f"{'images':>6} {'dense ms':>9}  " + "  ".join(names))
    with torch.inference_mode():
        for n in map(int, args.batches.split(",")):
            x = normalize_images(images[:n]).to(device, dtype)
            for path in args.checkpoints if args.calibrate else []:
                models[f"{path} calibrated"] = calibrated = copy.deepcopy(models[path])
                calibrate(calibrated, x, allow_approximate=True)
            secs = time_interleaved(
                {name: (lambda m=m, x=x: output_tensor(m(x))) for name, m in models.items()},
                device, args.repeats)
            ratios = [f"{secs['dense'] / secs[p]:>{len(p)}.2f}" for p in names]
            print(f"{n:>6} {secs['dense'] * 1e3:>9.2f}  " + "  ".join(ratios))


if __name__ == "__main__":
    main()
