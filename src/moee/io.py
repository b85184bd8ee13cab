"""Checkpoints: `model.safetensors` (all weights) + `moee_config.json` (structure, settings).

Loading rebuilds the base architecture from its config, swaps in MoE layers shaped from the
JSON, then checks every tensor name and shape before loading, naming what disagrees.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

import moee
from moee.adapters import find_mlp_sites
from moee.build import LayerPlan, apply_plans
from moee.moe import EXECUTIONS
from moee.moe_model import MoEModel

CONFIG_NAME = "moee_config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, truncated or does not match the model it describes."""


def _base_spec(model: nn.Module) -> dict:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        # The attention kernel is not in to_dict(); keep it so reloaded outputs are identical.
        return {"library": "transformers", "class": type(model).__name__,
                "config": config.to_dict(),
                "attn_implementation": getattr(config, "_attn_implementation", None)}
    return {"library": None, "class": type(model).__name__}


def save_pretrained(moe_model: MoEModel, directory: str | Path) -> Path:
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in moe_model.model.state_dict().items()}
    # Tied/shared tensors would make safetensors refuse; clone so each name owns its storage.
    seen: dict[int, str] = {}
    for k, v in state.items():
        if v.data_ptr() in seen and v.numel():
            state[k] = v.clone()
        seen[v.data_ptr()] = k
    save_file(state, str(out / WEIGHTS_NAME))
    layers = moe_model.plan_layers()  # the modules' live execution settings are what is saved
    for plan in moe_model.plans:
        plan.execution = layers[plan.site].execution
        plan.small_batch_tokens = layers[plan.site].small_batch_tokens
    config = {
        "format_version": FORMAT_VERSION,
        "moee_version": moee.__version__,
        "adapter": moe_model.adapter,
        "base_model": _base_spec(moe_model.model),
        "layers": [p.to_json() for p in moe_model.plans],
        "extract_config": moe_model.extract_config,
    }
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=1))
    return out


def _read_config(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path} not found: is this a directory written by save_pretrained?")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); the file is corrupt") from e
    for key in ("format_version", "base_model", "layers"):
        if key not in config:
            raise CheckpointError(f"{path} lacks the field {key!r}")
    if config["format_version"] > FORMAT_VERSION:
        raise CheckpointError(f"{path} has format {config['format_version']}; this moee "
                              f"({moee.__version__}) reads up to {FORMAT_VERSION}: upgrade moee")
    return config


def _rebuild_base(spec: dict) -> nn.Module:
    if spec.get("library") != "transformers":
        raise CheckpointError(
            f"the checkpoint's base model {spec.get('class')!r} is not a transformers model; "
            "pass the dense model to rebuild onto: moee.load(directory, base_model=model)")
    import transformers

    cls = getattr(transformers, spec["class"], None)
    if cls is None:
        raise CheckpointError(f"transformers has no class {spec['class']!r}; "
                              f"installed version {transformers.__version__}")
    config = cls.config_class.from_dict(spec["config"])
    if spec.get("attn_implementation"):
        config._attn_implementation = spec["attn_implementation"]
    return cls(config)


def _check_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], where: Path) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(expected[k].shape)}"
             for k in expected if k in tensors and tensors[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensors, e.g. {missing[:3]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors, e.g. {unexpected[:3]}")
    if wrong:
        problems.append(f"{len(wrong)} shape mismatches: " + "; ".join(wrong[:3]))
    if problems:
        raise CheckpointError(f"{where} does not match the model in {CONFIG_NAME}: "
                              + " | ".join(problems))


def load(directory: str | Path, base_model: nn.Module | None = None,
         map_location: str | torch.device = "cpu") -> MoEModel:
    """Rebuild a saved MoE model; outputs equal the saved model's exactly."""
    root = Path(directory)
    if not root.is_dir():
        raise CheckpointError(f"{root} is not a directory")
    config = _read_config(root / CONFIG_NAME)
    weights = root / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{weights} not found")
    try:
        tensors = load_file(str(weights), device=str(map_location))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{weights} is corrupt or truncated: {e}") from e
    model = base_model if base_model is not None else _rebuild_base(config["base_model"])
    sites = find_mlp_sites(model, config.get("adapter"))
    plans = []
    for layer in config["layers"]:
        try:
            experts = [np.asarray(e, dtype=np.int64) for e in layer["experts"]]
            site = next(s for s in sites if s.name == layer["site"])
        except (KeyError, TypeError, StopIteration) as e:
            raise CheckpointError(f"{CONFIG_NAME}: bad layer entry {str(layer)[:120]} "
                                  f"({type(e).__name__}: {e})") from e
        if any(e.size == 0 or e.min() < 0 or e.max() >= site.fc1.out_features for e in experts):
            raise CheckpointError(f"{CONFIG_NAME}: layer {layer['site']} has an expert with "
                                  f"neuron ids outside 0..{site.fc1.out_features - 1}")
        if layer.get("execution", "experts") not in EXECUTIONS:
            raise CheckpointError(f"{CONFIG_NAME}: layer {layer['site']} has execution "
                                  f"{layer.get('execution')!r}; expected one of {EXECUTIONS}")
        threshold = layer.get("small_batch_tokens")
        if threshold is not None and (not isinstance(threshold, int) or threshold < 0):
            raise CheckpointError(f"{CONFIG_NAME}: layer {layer['site']} small_batch_tokens "
                                  f"must be a non-negative integer, got {threshold!r}")
        centres = np.zeros((len(experts), site.fc1.in_features), dtype=np.float32)
        plans.append(LayerPlan(layer["site"], experts, centres, layer.get("metric", "cosine"),
                               execution=layer.get("execution", "experts"),
                               small_batch_tokens=threshold))
    installed = apply_plans(sites, plans)
    _check_tensors(model, tensors, weights)
    model.load_state_dict(tensors, strict=True)
    for plan in plans:  # the plans' centres/offsets were placeholders until the weights loaded
        plan.centres = installed[plan.site].router_centres.cpu().numpy().copy()
        plan.expert_bias = installed[plan.site].expert_bias.cpu().numpy().copy()
    return MoEModel(model.eval(), plans, config.get("extract_config"), config.get("adapter"))
