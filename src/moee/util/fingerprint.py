"""Content digests of model weights and calibration batches: what a stored result came from."""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from moee.util.batches import Batch, model_inputs


def _update(h, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def model_fingerprint(model: nn.Module) -> str:
    """Digest of every tensor in the model's state dict (names, dtypes, shapes, values)."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in model.state_dict().items():
        h.update(name.encode())
        _update(h, t)
    return h.hexdigest()


def update_batch_digest(h, batch: Batch) -> None:
    """Add what the model sees of `batch` (labels are not part of it) to digest `h`."""
    inputs = model_inputs(batch)
    items = sorted(inputs.items()) if isinstance(inputs, dict) else [("", inputs)]
    for key, value in items:
        h.update(key.encode())
        if isinstance(value, torch.Tensor):
            _update(h, value)
        else:
            h.update(repr(value).encode())


def new_digest():
    return hashlib.blake2b(digest_size=16)
