"""Layer-local distillation (not in the paper): after extraction, train each MoE MLP on its own
to reproduce the dense MLP's output on the recorded MLP inputs — no full-model forward, so it
runs in minutes on CPU where end-to-end distillation takes tens of minutes. The router stays
fixed (top-1 routing has no gradient); the experts' weights move. Each layer keeps what it
learned only when its held-out error fell, and is saved under `work_dir` as it finishes, so an
interrupted run resumes at the next layer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from moee.adapters import MLPSite
from moee.extraction.output_error import held_out_rows
from moee.extraction.record import ActivationStore
from moee.moe import MoEMLP
from moee.training_config import LocalDistillConfig
from moee.util.cache_key import stage_key
from moee.util.disk_space import ensure_room, tensor_bytes
from moee.util.fingerprint import model_fingerprint


def _error(layer: MoEMLP, dense: MLPSite, x: torch.Tensor) -> float:
    with torch.no_grad():
        target = dense.weights().forward(x, dense.activation)
        return float(F.mse_loss(layer._forward_train(x), target, reduction="sum")
                     / target.pow(2).sum().clamp_min(1e-30))


def distill_layer(layer: MoEMLP, dense: MLPSite, inputs: np.ndarray, held_out: np.ndarray,
                  config: LocalDistillConfig, seed: int = 0) -> dict:
    """Train `layer` toward `dense`'s output on the recorded `inputs` (N, d); returns the
    held-out relative error before and after (the layer is restored when it did not fall)."""
    rng = np.random.default_rng(seed)
    inputs = np.asarray(inputs)  # one layer's recorded inputs: megabytes
    fit_rows, test_rows = np.flatnonzero(~held_out), np.flatnonzero(held_out)
    dtype = layer.fc1.weight.dtype
    test = torch.as_tensor(inputs[test_rows[: config.batch_tokens * 4]], dtype=dtype)
    start = {k: v.detach().clone() for k, v in layer.state_dict().items()}
    before = _error(layer, dense, test)
    params = [p for p in layer.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=config.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, config.steps)
    for _ in range(config.steps):
        rows = np.sort(rng.choice(fit_rows, min(config.batch_tokens, len(fit_rows)), False))
        x = torch.as_tensor(inputs[rows], dtype=dtype)
        with torch.no_grad():
            target = dense.weights().forward(x, dense.activation)
        loss = F.mse_loss(layer._forward_train(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    after = _error(layer, dense, test)
    if not after < before:
        layer.load_state_dict(start)
    return {"heldout_error_before": before, "heldout_error_after": min(after, before),
            "kept": after < before}


def local_key(origin: dict, layer: int, start: str, config: LocalDistillConfig,
              held_out: float, seed: int) -> str:
    """The key of a layer's layer-local distillation: the activation store's origin, the layer
    and its starting weights' digest `start` (what the earlier stages made), under the
    settings the distillation reads."""
    return stage_key("local", {"store": origin, "layer": layer, "start": start},
                     {"local": config, "held_out": held_out, "seed": seed})


def distill_layers(layers: dict[int, MoEMLP], dense_sites: list[MLPSite], store: ActivationStore,
                   held_out: float, config: LocalDistillConfig, work: Path,
                   progress: bool = True, seed: int = 0) -> dict[str, dict]:
    """`distill_layer` for every MoE layer (by store index), resumable from `work`/local."""
    folder = work / "local"
    folder.mkdir(parents=True, exist_ok=True)
    ensure_room(folder, sum(tensor_bytes(m.state_dict().values()) for m in layers.values()),
                f"layer-local distillation's per-layer results in {folder}",
                "free space or choose another work_dir")
    reports = {}
    for i, layer in tqdm(layers.items(), desc="layer-local distillation", disable=not progress,
                         leave=False):
        key = local_key(store.origin, i, model_fingerprint(layer), config, held_out, seed)
        saved = folder / f"layer_{i}.{key[:16]}.safetensors"
        if saved.is_file():
            layer.load_state_dict(load_file(str(saved)))
            reports[layer.site] = {"reused": True}
            continue
        was_training = layer.training
        layer.train()
        with torch.enable_grad():
            reports[layer.site] = distill_layer(layer, dense_sites[i], store.inputs(i),
                                                held_out_rows(store.n_tokens, held_out), config,
                                                seed)
        layer.train(was_training)
        state = {k: v.detach().cpu().contiguous() for k, v in layer.state_dict().items()}
        save_file(state, str(saved) + ".partial")
        Path(str(saved) + ".partial").replace(saved)
    return reports
