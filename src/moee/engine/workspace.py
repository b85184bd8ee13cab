"""Scratch buffers the expert loop reuses across calls, per thread."""

from __future__ import annotations

import threading

import torch

_workspace = threading.local()


def scratch(name: str, numel: int, like: torch.Tensor) -> torch.Tensor:
    """A 1-D buffer of `numel` elements of `like`'s dtype and device, reused across calls.

    Why: PyTorch's CPU allocator returns large blocks to the OS, so a fresh buffer of tens of
    MB page-faults on every forward. Kept per thread (two threads never share one) and per
    inference mode (an inference-mode tensor cannot be written outside it); grows to the
    largest call. CUDA's caching allocator already reuses memory, so other devices get a fresh
    tensor. `clear_workspace()` frees the buffers.
    """
    if like.device.type != "cpu":
        return like.new_empty(numel)
    buffers = _workspace.__dict__.setdefault("buffers", {})
    key = (name, like.dtype, torch.is_inference_mode_enabled())
    buf = buffers.get(key)
    if buf is None or buf.numel() < numel:
        buffers.pop(key, None)  # free the smaller one first: peak memory stays one buffer
        buf = buffers[key] = like.new_empty(numel)
    return buf[:numel]


def workspace_bytes() -> int:
    """Bytes of scratch buffers this thread keeps between calls."""
    return sum(b.numel() * b.element_size()
               for b in _workspace.__dict__.get("buffers", {}).values())


def clear_workspace() -> None:
    """Free this thread's scratch buffers (they are rebuilt on the next call)."""
    _workspace.__dict__.pop("buffers", None)
