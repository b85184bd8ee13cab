"""What the engine may assume about an MLP's activation function."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def inplace_activation(act: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """An in-place function computing `act` exactly, or None when none is known.

    Why: the engine applies the activation to buffers it owns; in place skips allocating a
    second buffer and one pass over memory. Covers torch's ReLU, SiLU and GELU (also
    transformers' GELUActivation, which wraps F.gelu); checked against the module on a probe,
    so a subclass that changes the function falls back to out of place.
    """
    if isinstance(act, nn.ReLU):
        fn = F.relu_
    elif isinstance(act, nn.SiLU):
        fn = functools.partial(F.silu, inplace=True)
    elif isinstance(act, nn.GELU):
        fn = functools.partial(torch._C._nn.gelu_, approximate=act.approximate)
    elif getattr(act, "act", None) is F.gelu:  # transformers.activations.GELUActivation
        fn = torch._C._nn.gelu_
    else:
        return None
    probe = torch.linspace(-4, 4, 32).reshape(4, 8)  # fixed values: no draw from the global RNG
    return fn if torch.equal(fn(probe.clone()), act(probe)) else None


def is_elementwise(act: nn.Module, like: torch.Tensor) -> bool:
    """Whether `act` maps each value on its own (so it may run over a flattened buffer, and
    zero-padded neurons cannot change the real ones)."""
    probe = torch.linspace(-3, 3, 15, dtype=like.dtype, device=like.device).reshape(3, 5)
    return bool(torch.equal(act(probe).reshape(-1), act(probe.reshape(-1))))


# "masked" silences the neurons outside a token's expert by adding this to their fc1 bias: the
# activation of (x·w + b + MASK_OFFSET) is exactly 0 for GELU, ReLU, SiLU and the like
# whenever |x·w + b| < 10^4 (checked per activation by `silenced_by_offset`).
MASK_OFFSET = -3e4


def silenced_by_offset(act: nn.Module, like: torch.Tensor) -> bool:
    """Whether act(v) is exactly 0 for every v near MASK_OFFSET."""
    far = torch.tensor([MASK_OFFSET * 0.5, MASK_OFFSET, MASK_OFFSET * 1.5], dtype=like.dtype,
                       device=like.device)
    return not bool(act(far).any())
