"""What the core knows of a dense MLP block: its weights, its activation, where its input
arrives and how to swap it out; and the check that an adapter describes the block correctly."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moee.errors import AdapterMismatchError


@dataclass
class MLPWeights:
    """A dense MLP's tensors in nn.Linear's (out, in) layout: hidden = act(x·upᵀ + b), or for a
    gated MLP act(x·gateᵀ + b_g) * (x·upᵀ + b); output = hidden·downᵀ + b_down."""

    up: torch.Tensor  # (H, d)
    up_bias: torch.Tensor | None
    down: torch.Tensor  # (d_out, H)
    down_bias: torch.Tensor | None
    gate: torch.Tensor | None = None  # (H, d)
    gate_bias: torch.Tensor | None = None

    @property
    def hidden_size(self) -> int:
        return self.up.shape[0]

    @property
    def d_in(self) -> int:
        return self.up.shape[1]

    @property
    def d_out(self) -> int:
        return self.down.shape[0]

    @property
    def params_per_neuron(self) -> int:
        """Weights one hidden neuron owns: its up (and gate) row and its down column."""
        return self.d_in * (2 if self.gate is not None else 1) + self.d_out

    def hidden(self, x: torch.Tensor, act: nn.Module) -> torch.Tensor:
        """(..., d) -> (..., H): the hidden values experts are cut from."""
        up = F.linear(x, self.up, self.up_bias)
        if self.gate is None:
            return act(up)
        return act(F.linear(x, self.gate, self.gate_bias)) * up

    def forward(self, x: torch.Tensor, act: nn.Module) -> torch.Tensor:
        return F.linear(self.hidden(x, act), self.down, self.down_bias)


def linear_weights(up: nn.Module, down: nn.Module, gate: nn.Module | None = None,
                   transposed: bool = False) -> Callable[[], MLPWeights]:
    """Read `MLPWeights` off Linear-like modules; `transposed` for weights stored (in, out), as
    GPT-2's Conv1D stores them."""
    def w(m: nn.Module) -> torch.Tensor:
        return m.weight.T if transposed else m.weight

    return lambda: MLPWeights(w(up), up.bias, w(down), down.bias,
                              None if gate is None else w(gate),
                              None if gate is None else gate.bias)


@dataclass
class MLPSite:
    """One dense MLP inside a model.

    `name` is the dotted module path that identifies the block (stable across save/load).
    `weights()` gives its current tensors; `entry` is the module whose forward input is the
    MLP's input (recording hooks it); `install(module)` puts a drop-in module computing the
    whole MLP in its place; `reference(x)` is what the model's own modules compute for an MLP
    input x (used to check the adapter on a probe).
    """

    name: str
    weights: Callable[[], MLPWeights]
    activation: nn.Module
    entry: nn.Module
    install: Callable[[nn.Module], None]
    reference: Callable[[torch.Tensor], torch.Tensor]


def entry_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The MLP input as a forward pre-hook on `MLPSite.entry` (with_kwargs=True) sees it: the
    first positional argument, else the first tensor passed by keyword."""
    return args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2


def validate_site(site: MLPSite, adapter: str) -> None:
    """Raise AdapterMismatchError unless the weights the adapter reads reproduce the block's
    own output on a fixed probe (the model should be in eval mode)."""
    w = site.weights()
    if w.up.is_meta:  # a skeleton being loaded: nothing to compute yet
        return
    probe = torch.randn(2, 3, w.d_in, generator=torch.Generator().manual_seed(0))
    x = probe.to(w.up.device, w.up.dtype)
    where = f"adapter {adapter!r} matched {site.name} ({type(site.entry).__name__})"
    try:
        with torch.no_grad():
            expected, got = site.reference(x), w.forward(x, site.activation)
    except Exception as e:  # noqa: BLE001 - any failure of the probe means the match is wrong
        raise AdapterMismatchError(
            f"{where}, but running it on a probe failed ({type(e).__name__}: {e}); this layout "
            "needs its own adapter (moee.register_adapter)") from e
    if expected.shape != got.shape:
        raise AdapterMismatchError(f"{where}, but the block gives {tuple(expected.shape)} where "
                                   f"the adapter's MLP gives {tuple(got.shape)}")
    diff = float((expected.float() - got.float()).abs().max())
    scale = float(expected.float().abs().max()) + 1e-6
    if diff > _tolerance(w.up.dtype) * scale:
        raise AdapterMismatchError(
            f"{where}, but the block's output differs from the MLP the adapter describes by "
            f"{diff:.3g} (of {scale:.3g}) on a probe: it is not this layout; register an "
            "adapter for it (moee.register_adapter)")
