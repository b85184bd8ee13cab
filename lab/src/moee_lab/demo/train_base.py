"""Train the embedded-default ViT on Fashion-MNIST (`moee train-base`)."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm.auto import tqdm

from moee.evaluate import evaluate
from moee.training.distill import cosine_with_warmup
from moee_lab.demo.default_model import (
    ASSET_META,
    ASSET_WEIGHTS,
    build_default_vit,
    load_default_model,
)
from moee_lab.demo.fashion_mnist import load_fashion_mnist
from moee_lab.demo.images import augment, image_batches, normalize_images


@dataclass
class TrainBaseConfig:
    """The recipe of the shipped embedded default (61 epochs; about 9 minutes on one GPU)."""

    epochs: int = 61
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 500
    label_smoothing: float = 0.1
    pad: int = 2
    seed: int = 0
    device: str = "cpu"


def train_base(
    config: TrainBaseConfig, out_dir: str | Path, data_dir: str | None = None,
    download: bool = False,
) -> dict:
    """Train from `config.seed`, save fp16 safetensors + a JSON model card to `out_dir`."""
    device = torch.device(config.device)
    gen = torch.Generator().manual_seed(config.seed)
    model = build_default_vit(seed=config.seed).to(device)
    train_x, train_y = load_fashion_mnist("train", data_dir, download)
    test_x, test_y = load_fashion_mnist("test", data_dir, download)
    xs, ys = normalize_images(train_x).to(device), train_y.to(device)
    steps_per_epoch = math.ceil(len(xs) / config.batch_size)
    total = steps_per_epoch * config.epochs
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: cosine_with_warmup(s, total, config.warmup_steps)
    )
    start = time.time()
    history = []
    for epoch in range(config.epochs):
        model.train()
        perm = torch.randperm(len(xs), generator=gen).to(device)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{config.epochs}",
                   leave=False, mininterval=2.0)
        running = 0.0
        for i in bar:
            idx = perm[i * config.batch_size : (i + 1) * config.batch_size]
            x = augment(xs[idx], config.pad, gen)
            logits = model(pixel_values=x).logits
            loss = F.cross_entropy(logits, ys[idx], label_smoothing=config.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += loss.item() if i % 50 == 0 else 0.0
        test_acc = evaluate(model, image_batches(test_x, test_y, 500), device=device)
        history.append({"epoch": epoch + 1, "test_top1": test_acc,
                        "minutes": round((time.time() - start) / 60, 2)})
        print(f"epoch {epoch + 1}: test top-1 {test_acc:.2%} "
              f"({(time.time() - start) / 60:.1f} min)", flush=True)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float16).contiguous()
             for k, v in model.state_dict().items()}
    save_file(state, str(out / ASSET_WEIGHTS))
    # Accuracy of the weights as shipped (fp16-rounded, reloaded in fp32 on CPU).
    shipped = load_default_model(out / ASSET_WEIGHTS)
    card = {
        "train_config": asdict(config),
        "test_top1_fp16_weights": evaluate(shipped, image_batches(test_x, test_y, 500)),
        "history": history,
        "train_minutes": round((time.time() - start) / 60, 2),
        "trained_on": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "torch": torch.__version__,
    }
    (out / ASSET_META).write_text(json.dumps(card, indent=2))
    return card
