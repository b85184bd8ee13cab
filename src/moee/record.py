"""Record every MLP block's input and post-activation hidden vector per token, to disk.

All layers are recorded in one pass over the data; each layer streams into its own .npy
memmap, so memory stays bounded by one batch whatever `n_tokens` is.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from moee.adapters import MLPSite
from moee.config import RecordConfig


class EmptyDataError(ValueError):
    """The calibration data produced no tokens."""


@dataclass
class ActivationStore:
    """Per-layer on-disk arrays: layer_{i}.input.npy (N, d) and layer_{i}.hidden.npy (N, H)."""

    root: Path
    site_names: list[str]
    n_tokens: int

    def hidden(self, layer: int) -> np.ndarray:
        return np.load(self.root / f"layer_{layer}.hidden.npy", mmap_mode="r")[: self.n_tokens]

    def inputs(self, layer: int) -> np.ndarray:
        return np.load(self.root / f"layer_{layer}.input.npy", mmap_mode="r")[: self.n_tokens]

    @classmethod
    def open(cls, root: str | Path) -> ActivationStore:
        meta = json.loads((Path(root) / "store.json").read_text())
        return cls(Path(root), meta["site_names"], meta["n_tokens"])


def _forward(model: nn.Module, batch) -> None:
    if isinstance(batch, dict):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(batch[0])
    else:
        model(batch)


@torch.inference_mode()
def record_activations(
    model: nn.Module,
    sites: list[MLPSite],
    data: Iterable,
    config: RecordConfig,
    store_dir: str | Path,
    progress: bool = True,
) -> ActivationStore:
    """Run `data` (tensors, (x, y) pairs or kwargs dicts) through `model` until
    `config.n_tokens` tokens have been seen; write every site's (input, hidden) rows."""
    root = Path(store_dir)
    root.mkdir(parents=True, exist_ok=True)
    dtype = np.dtype(config.dtype)
    n = config.n_tokens
    arrays: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    filled = [0] * len(sites)

    def make_hook(i: int, site: MLPSite):
        def hook(_module, args, pre_activation):
            x = args[0].reshape(-1, args[0].shape[-1])  # (T, d)
            start = filled[i]
            take = min(n - start, x.shape[0])
            if take <= 0:
                return
            if i not in arrays:
                arrays[i] = (
                    np.lib.format.open_memmap(root / f"layer_{i}.input.npy", "w+", dtype,
                                              (n, x.shape[-1])),
                    np.lib.format.open_memmap(root / f"layer_{i}.hidden.npy", "w+", dtype,
                                              (n, site.fc1.out_features)),
                )
            hidden = site.activation(pre_activation.reshape(-1, pre_activation.shape[-1]))
            arrays[i][0][start : start + take] = x[:take].float().cpu().numpy()
            arrays[i][1][start : start + take] = hidden[:take].float().cpu().numpy()
            filled[i] = start + take

        return hook

    handles = [s.fc1.register_forward_hook(make_hook(i, s)) for i, s in enumerate(sites)]
    was_training = model.training
    model.eval()
    bar = tqdm(total=n, desc="record tokens", unit="tok", disable=not progress, leave=False)
    try:
        for batch in data:
            before = filled[0]
            _forward(model, batch)
            bar.update(filled[0] - before)
            if min(filled) >= n:
                break
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
        bar.close()
    got = min(filled) if filled else 0
    if got == 0:
        raise EmptyDataError("The calibration data yielded no tokens: pass at least one batch.")
    for inp, hid in arrays.values():
        inp.flush()
        hid.flush()
    (root / "store.json").write_text(json.dumps(
        {"site_names": [s.name for s in sites], "n_tokens": got, "dtype": config.dtype}))
    return ActivationStore(root, [s.name for s in sites], got)
