"""What lets transformers run a saved MoE model without moee: the base model's config.json with
`auto_map` and `moee_layers`, and `modeling_moee.py` (this folder's, copied verbatim)
beside the weights, for `AutoModel….from_pretrained(dir, trust_remote_code=True)`."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import nn

from moee.moe import MoEMLP
from moee.util.atomic import write_json

TEMPLATE = Path(__file__).with_name("modeling_moee.py")


def _activation_path(modules: dict[str, nn.Module], path: str, kind: type) -> str:
    """Where the freshly built model keeps the activation the MoE layer at `path` uses: inside
    the module it replaced (a whole MLP), else beside it (a layer calling fc1, act, fc2)."""
    parent = path.rpartition(".")[0]
    inside = [p for p, m in modules.items() if p.startswith(path + ".") and type(m) is kind]
    beside = [p for p, m in modules.items() if p.rpartition(".")[0] == parent and type(m) is kind]
    found = inside or beside
    if not found:
        raise ValueError(f"no {kind.__name__} near {path} in the base model")
    return found[0]


def _layer_spec(path: str, moe: MoEMLP, modules: dict[str, nn.Module]) -> dict:
    return {"path": path, "metric": moe.metric, "d_in": moe.fc1.in_features,
            "d_out": moe.fc2.out_features, "union": moe.fc1.out_features,
            "experts": moe.num_experts, "indices": moe.expert_indices.numel(),
            "gated": moe.gate is not None, "up_bias": moe.fc1.bias is not None,
            "gate_bias": moe.gate is not None and moe.gate.bias is not None,
            "down_bias": moe.fc2.bias is not None,
            "activation": _activation_path(modules, path, type(moe.activation))}


def _auto_classes(model: nn.Module) -> list[str]:
    """The transformers Auto classes that load `model`'s class from its config (AutoModel
    when none does, so that one always works)."""
    import transformers

    names = []
    for name in dir(transformers):
        if not name.startswith("AutoModel"):  # before getattr: it imports lazily
            continue
        mapping = getattr(getattr(transformers, name), "_model_mapping", None)
        if mapping is None:
            continue
        try:
            if mapping[type(model.config)] is type(model):
                names.append(name)
        except (KeyError, ValueError, AttributeError):
            continue
    return names or ["AutoModel"]


def remote_config(model: nn.Module) -> dict | None:
    """config.json for `model` (a transformers model with MoE layers installed) run through
    remote code; None for a model that is not a transformers `PreTrainedModel`."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        return None
    with torch.device("meta"):
        skeleton = type(model)(model.config)
    modules = dict(skeleton.named_modules())
    layers, identities = [], []
    for path, m in model.named_modules():
        if isinstance(m, MoEMLP):
            layers.append(_layer_spec(path, m, modules))
        elif isinstance(m, nn.Identity) and not isinstance(modules.get(path, m), nn.Identity):
            identities.append(path)
    name = "MoEE" + type(model).__name__
    config = model.config.to_dict()
    config.update(architectures=[name], moee_layers={"layers": layers, "identities": identities},
                  auto_map={auto: f"modeling_moee.{name}" for auto in _auto_classes(model)})
    return config


def write_remote_code(model: nn.Module, directory: Path) -> bool:
    """Write config.json and modeling_moee.py into `directory` when `model` is a transformers
    model (True), else nothing (False)."""
    config = remote_config(model)
    if config is None:
        return False
    write_json(directory / "config.json", config)
    shutil.copyfile(TEMPLATE, directory / TEMPLATE.name)
    return True
