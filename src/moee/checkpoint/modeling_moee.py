"""moee's MoE layers for transformers' `trust_remote_code`: copied verbatim next to a moee
checkpoint's weights, so that `AutoModel….from_pretrained(dir, trust_remote_code=True)` runs
the MoE model with torch and transformers alone (moee need not be installed).

Kept free of any moee import on purpose. The checkpoint's config.json is the base model's with
two additions: `moee_layers` (where each MoE layer sits, its shapes, where its activation
lives, which modules became identities) and `auto_map`, naming `MoEE<BaseClass>`, a
subclass of the transformers class that installs the layers before the weights load.

Its `from_pretrained` first checks what `moee.load` checks: model.safetensors and
moee_config.json against the SHA-256 digests moee_config.json records (computed exactly as
moee.checkpoint.integrity computes them), and config.json's MoE layers against
moee_config.json's (pass `moee_verify=False` to skip, at your own risk).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from torch import nn


class MoEMLP(nn.Module):
    """Top-1 routed experts over a union of kept neurons, each expert an index set into it:
    the same tensors, names and arithmetic as moee's `MoEMLP` (one reference path)."""

    def __init__(self, spec: dict, activation: nn.Module) -> None:
        super().__init__()
        d_in, d_out, union, k = spec["d_in"], spec["d_out"], spec["union"], spec["experts"]
        self.fc1 = nn.Linear(d_in, union, bias=spec["up_bias"])
        self.gate = nn.Linear(d_in, union, bias=spec["gate_bias"]) if spec["gated"] else None
        self.fc2 = nn.Linear(union, d_out, bias=spec["down_bias"])
        self.activation, self.metric = activation, spec["metric"]
        self.register_buffer("expert_indices", torch.zeros(spec["indices"], dtype=torch.long))
        self.register_buffer("expert_offsets", torch.zeros(k + 1, dtype=torch.long))
        self.register_buffer("router_centres", torch.zeros(k, d_in))
        self.register_buffer("kept_neurons", torch.zeros(union, dtype=torch.long))
        self.register_buffer("expert_bias", torch.zeros(k, d_out))

    def route(self, x: torch.Tensor) -> torch.Tensor:
        c = self.router_centres.float()
        if self.metric == "cosine":
            return F.linear(x.float(), F.normalize(c, dim=-1)).argmax(-1)
        if self.metric == "dot":
            return F.linear(x.float(), c).argmax(-1)
        return (F.linear(x.float(), c) - 0.5 * (c * c).sum(-1)).argmax(-1)  # euclidean

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        tokens = x.reshape(-1, x.shape[-1])
        expert = self.route(tokens)
        y = tokens.new_zeros(tokens.shape[0], self.fc2.out_features)
        for e in range(self.router_centres.shape[0]):
            rows = (expert == e).nonzero().squeeze(-1)
            if rows.numel() == 0:
                continue
            idx = self.expert_indices[self.expert_offsets[e] : self.expert_offsets[e + 1]]
            xe = tokens[rows]
            b1 = None if self.fc1.bias is None else self.fc1.bias[idx]
            up = F.linear(xe, self.fc1.weight[idx], b1)
            if self.gate is None:
                h = self.activation(up)
            else:
                gb = None if self.gate.bias is None else self.gate.bias[idx]
                h = self.activation(F.linear(xe, self.gate.weight[idx], gb)) * up
            y[rows] = F.linear(h, self.fc2.weight[:, idx]) + self.expert_bias[e].to(y.dtype)
        if self.fc2.bias is not None:
            y = y + self.fc2.bias
        return y.reshape(*lead, -1)


def install_moe_layers(model: nn.Module, spec: dict) -> None:
    """Put each MoE layer where moee put it and make identities of the modules whose work it
    took over; activations are taken from the freshly built model before anything changes."""
    layers = spec["layers"]
    activations = [model.get_submodule(layer["activation"]) for layer in layers]
    for path in spec["identities"]:
        _set(model, path, nn.Identity())
    for layer, activation in zip(layers, activations, strict=True):
        _set(model, layer["path"], MoEMLP(layer, activation))


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def _moe_class(base: type) -> type:
    class MoEE(base):
        def __init__(self, config, *args, **kwargs) -> None:
            super().__init__(config, *args, **kwargs)
            install_moe_layers(self, config.moee_layers)

        @classmethod
        def from_pretrained(cls, path, *args, moee_verify: bool = True, **kwargs):
            if moee_verify:
                verify_checkpoint(path, kwargs)
            return super().from_pretrained(path, *args, **kwargs)

    MoEE.__name__ = MoEE.__qualname__ = "MoEE" + base.__name__
    return MoEE


class IntegrityError(ValueError):
    """The checkpoint's files are not those moee saved (their recorded digests differ)."""


HUB_KWARGS = ("cache_dir", "force_download", "proxies", "token", "revision",
              "local_files_only", "subfolder")


def _file(path, name: str, kwargs: dict) -> Path | None:
    """The local copy of `name` in the checkpoint at `path` (a folder or a hub id), or None."""
    from transformers.utils import cached_file

    found = cached_file(path, name, _raise_exceptions_for_missing_entries=False,
                        **{k: kwargs[k] for k in HUB_KWARGS if k in kwargs})
    return None if found is None else Path(found)


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def config_sha256(config: dict) -> str:
    """moee's digest of moee_config.json: its canonical JSON (sorted keys), digests excluded."""
    body = {k: v for k, v in config.items() if k != "digests"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def check_digests(config: dict, config_file: Path, weights: Path) -> None:
    """Raise IntegrityError unless both recorded digests match (format 1 predates them)."""
    digests = config.get("digests")
    if digests is None and config.get("format_version") == 1:
        warnings.warn(f"{config_file} is a format-1 checkpoint without digests: it cannot be "
                      "verified", stacklevel=4)
        return
    if not isinstance(digests, dict) or not {"weights_sha256", "config_sha256"} <= set(digests):
        raise IntegrityError(f"{config_file} has no valid digests field to verify the "
                             "checkpoint against; pass moee_verify=False at your own risk")
    if config_sha256(config) != digests["config_sha256"]:
        raise IntegrityError(f"{config_file} was edited after it was saved (its digest does not "
                             "match): the model it describes may not be the one saved")
    if file_sha256(weights) != digests["weights_sha256"]:
        raise IntegrityError(f"{weights} does not match the digest recorded when it was saved: "
                             "the file is corrupt or was modified; copy it again from its source")


def check_layers(spec: dict, layers: list, where: Path) -> None:
    """config.json's MoE layers (what runs here) must route as moee_config.json's (digested)."""
    if len(spec["layers"]) != len(layers):
        raise IntegrityError(f"config.json has {len(spec['layers'])} MoE layers, {where} "
                             f"{len(layers)}: config.json was edited")
    for layer in spec["layers"]:
        path = layer["path"]
        owners = [s for s in layers if path == s["site"] or path.startswith(s["site"] + ".")]
        if not owners:
            raise IntegrityError(f"config.json puts a MoE layer at {path}, which {where} does "
                                 "not have: config.json was edited")
        saved = max(owners, key=lambda s: len(s["site"]))
        if layer["metric"] != saved.get("metric", "cosine"):
            raise IntegrityError(f"config.json routes {path} by {layer['metric']!r}, {where} by "
                                 f"{saved.get('metric', 'cosine')!r}: config.json was edited")
        if layer["experts"] != len(saved["experts"]):
            raise IntegrityError(f"config.json gives {path} {layer['experts']} experts, {where} "
                                 f"{len(saved['experts'])}: config.json was edited")


def verify_checkpoint(path, kwargs: dict) -> None:
    """What `moee.load` verifies, with json and hashlib alone; IntegrityError when it fails."""
    config_file = _file(path, "moee_config.json", kwargs)
    weights = _file(path, "model.safetensors", kwargs)
    if config_file is None or weights is None:
        raise IntegrityError(f"{path}: no moee_config.json and model.safetensors to verify the "
                             "checkpoint against; pass moee_verify=False at your own risk")
    try:
        config = json.loads(config_file.read_text())
        layers = config["layers"]
    except (ValueError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise IntegrityError(f"{config_file} is corrupt ({e!r})") from e
    check_digests(config, config_file, weights)
    spec = getattr(kwargs.get("config"), "moee_layers", None)
    if spec is None:
        spec = json.loads(Path(_file(path, "config.json", kwargs)).read_text())["moee_layers"]
    check_layers(spec, layers, config_file)


def __getattr__(name: str) -> type:
    """`MoEE<BaseClass>` for any transformers model class (what `auto_map` names)."""
    base = getattr(transformers, name[4:], None) if name.startswith("MoEE") else None
    if base is None:
        raise AttributeError(name)
    return _moe_class(base)
