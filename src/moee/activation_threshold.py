"""Per-token activation sparsity, the training-free alternative to experts that a user would
pick instead (TEAL / CATS style): each MLP computes its gate projection (its first projection
when not gated) in full, then only the neurons whose |act(gate)| clears a per-layer threshold,
calibrated on recorded inputs to meet a MAC target. A baseline to measure against, not an
engine: `ThresholdMLP` masks a dense computation, and the MACs it reports are the ones a
sparse kernel would execute (the full first projection plus the active neurons' rest)."""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from moee.adapters import MLPSite, MLPWeights, find_mlp_sites
from moee.config import RecordConfig
from moee.errors import ConfigError
from moee.extraction.record import ActivationStore, record_activations


def first_projection(w: MLPWeights) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) the threshold reads: the gate of a gated MLP, else the up projection."""
    return (w.gate, w.gate_bias) if w.gate is not None else (w.up, w.up_bias)


class ThresholdMLP(nn.Module):
    """A dense MLP that zeroes every neuron whose |act(first projection)| is below `threshold`
    (for a gated MLP the first projection is the gate, and the up projection and down
    projection then need only the active neurons)."""

    def __init__(self, site: MLPSite, threshold: float) -> None:
        super().__init__()
        w = site.weights()
        gated = w.gate is not None
        first, first_bias = first_projection(w)
        self.first = nn.Linear(w.d_in, w.hidden_size, bias=first_bias is not None)
        self.up = nn.Linear(w.d_in, w.hidden_size, bias=w.up_bias is not None) if gated else None
        self.down = nn.Linear(w.hidden_size, w.d_out, bias=w.down_bias is not None)
        with torch.no_grad():
            for lin, weight, bias in ((self.first, first, first_bias), (self.up, w.up, w.up_bias),
                                      (self.down, w.down, w.down_bias)):
                if lin is not None:
                    lin.weight.copy_(weight)
                    if bias is not None:
                        lin.bias.copy_(bias)
        self.activation, self.threshold, self.site = site.activation, threshold, site.name
        self.active, self.tokens = 0, 0  # neurons kept and tokens seen, for the MAC count

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.activation(self.first(x))
        keep = a.abs() >= self.threshold
        self.active += int(keep.sum())
        self.tokens += keep.numel() // keep.shape[-1]
        h = a * keep
        if self.up is not None:
            h = h * self.up(x)
        return self.down(h)

    def macs_per_token(self) -> float:
        """MACs a sparse kernel would execute per token, on the tokens seen so far."""
        d_in, width = self.first.in_features, self.first.out_features
        rest = (d_in if self.up is not None else 0) + self.down.out_features
        return d_in * width + rest * self.active / max(self.tokens, 1)


def threshold_for(site: MLPSite, inputs: np.ndarray, keep: float) -> float:
    """The |act(first projection)| quantile that keeps a share `keep` of the neurons."""
    first, bias = first_projection(site.weights())
    with torch.no_grad():
        x = torch.as_tensor(np.asarray(inputs), dtype=first.dtype)
        a = site.activation(F.linear(x, first, bias)).abs().flatten().float()
    return float(torch.quantile(a[torch.randperm(len(a))[: 2**24 - 1]], 1 - keep))


def keep_share(site: MLPSite, target_mlp_macs: float) -> float:
    """Share of neurons to keep so that the MLP runs `target_mlp_macs` of its dense MACs."""
    w = site.weights()
    per_neuron = w.params_per_neuron  # all of a neuron's MACs; the first projection's always run
    keep = (target_mlp_macs * per_neuron - w.d_in) / (per_neuron - w.d_in)
    if not 0 < keep <= 1:
        raise ConfigError(f"target_mlp_macs={target_mlp_macs}: the full first projection alone "
                          f"costs {w.d_in / per_neuron:.2f} of {site.name}'s MACs")
    return keep


def sparsify_activations(model: nn.Module, data: Iterable, target_mlp_macs: float,
                         n_tokens: int = 20_000, adapter: str | None = None,
                         store: ActivationStore | None = None) -> nn.Module:
    """A copy of `model` whose every MLP is a `ThresholdMLP` calibrated on `n_tokens` tokens of
    `data` (or on a recorded `store` of the same model) to run `target_mlp_macs` of its dense
    MACs per token on calibration-like text."""
    sites = find_mlp_sites(model, adapter)
    with tempfile.TemporaryDirectory(prefix="moee-threshold-") as tmp:
        if store is None:
            store = record_activations(model, sites, data, RecordConfig(n_tokens=n_tokens), tmp,
                                       progress=False)
        thresholds = [threshold_for(s, store.inputs(i), keep_share(s, target_mlp_macs))
                      for i, s in enumerate(sites)]
    sparse = copy.deepcopy(model)
    for site, t in zip(find_mlp_sites(sparse, adapter, validate=False), thresholds, strict=True):
        site.install(ThresholdMLP(site, t))
    return sparse.eval()
