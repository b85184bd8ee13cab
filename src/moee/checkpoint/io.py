"""Checkpoints: `model.safetensors` (all weights) + `moee_config.json` (structure, settings).

Loading rebuilds the base architecture from its config with its parameters on the meta device
(nothing is initialised only to be overwritten), swaps in MoE layers shaped from the JSON,
checks every tensor name and shape, then assigns the file's tensors on `map_location`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from moee._version import __version__
from moee.adapters import find_mlp_sites
from moee.checkpoint.integrity import (
    add_digests,
    check_expert_ids,
    check_loaded_layer,
    non_finite,
    verify_digests,
)
from moee.checkpoint.remote_code import write_remote_code
from moee.engine import ExecutionConfig
from moee.errors import CheckpointError, ConfigError, NonFiniteError
from moee.moe import MoEMLP
from moee.moe_build import LayerPlan, apply_plans
from moee.util.atomic import naming_write_errors
from moee.util.disk_space import ensure_room, tensor_bytes

CONFIG_NAME = "moee_config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 2  # 2: digests of the weights and of the config
_SETTINGS = [f.name for f in dataclasses.fields(ExecutionConfig)]


def _base_spec(model: nn.Module) -> dict:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        # The attention kernel is not in to_dict(); keep it so reloaded outputs are identical.
        return {"library": "transformers", "class": type(model).__name__,
                "config": config.to_dict(),
                "attn_implementation": getattr(config, "_attn_implementation", None)}
    return {"library": None, "class": type(model).__name__}


def write_checkpoint(model: nn.Module, layers: list[MoEMLP], directory: str | Path,
                     adapter: str | None, extract_config: dict[str, Any]) -> Path:
    """Save `model` (with its MoE `layers` installed); the JSON is read off the modules."""
    out = Path(directory)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    bad = non_finite(state)
    if bad is not None:  # a diverged model would load without complaint and compute NaN
        name, count, size = bad
        raise NonFiniteError(f"save_pretrained: the tensor {name} holds NaN or Inf ({count} of "
                             f"{size} values): the model diverged; nothing was written to {out}")
    out.mkdir(parents=True, exist_ok=True)
    # Tied/shared tensors would make safetensors refuse; clone so each name owns its storage.
    seen: dict[int, str] = {}
    for k, v in state.items():
        if v.data_ptr() in seen and v.numel():
            state[k] = v.clone()
        seen[v.data_ptr()] = k
    # Written under temporary names and renamed: an interrupted save never leaves a
    # half-written file under the real name (nor a new config beside old weights).
    ensure_room(out, tensor_bytes(state.values()), f"the checkpoint {out}",
                "free space or save it elsewhere")
    weights = out / (WEIGHTS_NAME + ".partial")
    config_file = out / (CONFIG_NAME + ".partial")
    with naming_write_errors(out / WEIGHTS_NAME, [weights]):
        save_file(state, str(weights))
    config = {
        "format_version": FORMAT_VERSION,
        "moee_version": __version__,
        "adapter": adapter,
        "base_model": _base_spec(model),
        "layers": [{"site": m.site, "metric": m.metric, **m.execution_config.as_dict(),
                    "experts": m.dense_experts()} for m in layers],
        "extract_config": extract_config,
    }
    with naming_write_errors(out / CONFIG_NAME, [weights, config_file]):
        config_file.write_text(json.dumps(add_digests(config, weights), indent=1))
        os.replace(weights, out / WEIGHTS_NAME)
        os.replace(config_file, out / CONFIG_NAME)
    with naming_write_errors(out):
        write_remote_code(model, out)  # transformers alone can then run it (trust_remote_code)
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
    version = config["format_version"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"{path}: format_version must be a positive integer, "
                              f"got {version!r}")
    if not isinstance(config["layers"], list):
        raise CheckpointError(f"{path}: 'layers' must be a list")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path} has format {config['format_version']}; this moee "
                              f"({__version__}) reads up to {FORMAT_VERSION}: upgrade moee")
    return config


_meta = threading.local()  # set in the thread that is rebuilding a base model
_meta_lock = threading.Lock()
_meta_users = 0
_saved_register = nn.Module.register_parameter  # what the hook calls (read at install)


def _register_parameter(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
    """nn.Module.register_parameter while some thread rebuilds a base model: in that thread the
    parameter moves to the meta device; every other thread's modules are left alone."""
    if param is not None and getattr(_meta, "active", False):
        param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
    _saved_register(module, name, param)


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside the block, in this thread, goes to the meta device
    (buffers stay real: non-persistent ones, e.g. position ids, are not in the checkpoint;
    `torch.device("meta")` would take them too). The hook is installed only while a block is
    open and acts only in the threads that opened one."""
    global _meta_users, _saved_register
    with _meta_lock:
        if _meta_users == 0:
            _saved_register = nn.Module.register_parameter
            nn.Module.register_parameter = _register_parameter
        _meta_users += 1
    _meta.active = True
    try:
        yield
    finally:
        _meta.active = False
        with _meta_lock:
            _meta_users -= 1
            if _meta_users == 0:
                nn.Module.register_parameter = _saved_register


def _rebuild_base(spec: dict) -> nn.Module:
    if spec.get("library") != "transformers":
        raise CheckpointError(
            f"the checkpoint's base model {spec.get('class')!r} is not a transformers model; "
            "pass the dense model to rebuild onto: MoEModel.from_pretrained(dir, base_model=m)")
    import transformers
    from transformers.initialization import no_init_weights

    cls = getattr(transformers, spec["class"], None)
    if cls is None:
        raise CheckpointError(f"transformers has no class {spec['class']!r}; "
                              f"installed version {transformers.__version__}")
    config = cls.config_class.from_dict(spec["config"])
    if spec.get("attn_implementation"):
        config._attn_implementation = spec["attn_implementation"]
    with no_init_weights(), _parameters_on_meta():
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


def _layer_plan(layer: Any, sites: dict) -> LayerPlan:
    """One JSON layer entry, validated, as a plan with placeholder centres (the weights file
    holds the real ones)."""
    name = layer.get("site") if isinstance(layer, dict) else None
    if name not in sites:
        raise CheckpointError(f"{CONFIG_NAME}: layer entry {str(layer)[:120]} names no MLP block "
                              f"of the model (blocks: {list(sites)[:4]}...)")
    site = sites[name]
    shape = site.weights()
    experts = check_expert_ids(name, layer.get("experts"), shape.hidden_size)
    experts = [np.asarray(e, dtype=np.int64) for e in experts]
    try:
        settings = ExecutionConfig(**{k: layer[k] for k in _SETTINGS if k in layer})
    except ConfigError as e:
        raise CheckpointError(f"{CONFIG_NAME}: layer {name}: {e}") from e
    centres = np.zeros((len(experts), shape.d_in), dtype=np.float32)
    return LayerPlan(name, experts, centres, layer.get("metric", "cosine"),
                     execution_config=settings)


def read_checkpoint(directory: str | Path, base_model: nn.Module | None = None,
                    map_location: str | torch.device = "cpu",
                    verify: bool = True) -> tuple[nn.Module, dict]:
    """The saved model (in eval mode, on `map_location`) and its `moee_config.json`.

    `verify`: compare the weights file and the config with the digests recorded at save
    (reads the whole file once); the structural checks run either way."""
    root = Path(directory)
    if not root.is_dir():
        raise CheckpointError(f"{root} is not a directory")
    try:
        device = torch.device(map_location)
    except RuntimeError as e:
        raise ConfigError(f"map_location: {map_location!r} is not a device ({e})") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"map_location: {map_location!r}, but this machine has no CUDA device "
                          "(load on 'cpu')")
    config = _read_config(root / CONFIG_NAME)
    weights = root / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{weights} not found")
    if verify:
        verify_digests(config, root / CONFIG_NAME, weights)
    try:
        tensors = load_file(str(weights), device=str(map_location))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{weights} is corrupt or truncated: {e}") from e
    # safetensors hands out views at any byte offset of one buffer; BLAS kernels pick other
    # code paths (other rounding) for unaligned weights, so a reload would differ in the last
    # bits from the saved model. Misaligned tensors get an aligned copy of their own.
    tensors = {k: v if v.data_ptr() % 64 == 0 else v.clone() for k, v in tensors.items()}
    bad = non_finite(tensors)
    if bad is not None:
        raise CheckpointError(f"{weights}: the tensor {bad[0]} holds NaN or Inf ({bad[1]} of "
                              f"{bad[2]} values): this checkpoint was saved from a diverged "
                              "model and cannot be used; save or fine-tune it again")
    skeleton = base_model is None
    model = _rebuild_base(config["base_model"]) if skeleton else base_model
    sites = {s.name: s for s in find_mlp_sites(model, config.get("adapter"), validate=False)}
    apply_plans(list(sites.values()), [_layer_plan(layer, sites) for layer in config["layers"]])
    _check_tensors(model, tensors, weights)
    model.load_state_dict(tensors, strict=True, assign=skeleton)
    if skeleton and hasattr(model, "tie_weights"):
        model.tie_weights()  # assigned tensors replace tied parameters one by one
    loaded = {m.site: m for m in model.modules() if isinstance(m, MoEMLP)}
    for layer in config["layers"]:
        check_loaded_layer(layer["site"], loaded[layer["site"]], layer["experts"])
    model.to(map_location)  # buffers that are not in the file (e.g. position ids)
    return model.eval(), config
