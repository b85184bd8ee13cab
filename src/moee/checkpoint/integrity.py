"""Checkpoint integrity: digests written at save and checked at load, and validation of the
expert index sets a checkpoint declares against the tensors it holds.

A flipped byte in `model.safetensors` still parses (safetensors checks only the header), and a
hand-edited `moee_config.json` can describe another model than the weights; both would load
and silently compute something else, so every save records SHA-256 digests of the weights file
and of the config's content, and loading compares them.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from moee.errors import CheckpointError

DIGESTS = "digests"  # the config field holding them; not itself part of the config digest


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def config_sha256(config: dict[str, Any]) -> str:
    """Digest of the config's canonical JSON (sorted keys), digests field excluded."""
    body = {k: v for k, v in config.items() if k != DIGESTS}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def add_digests(config: dict[str, Any], weights: Path) -> dict[str, Any]:
    return {**config, DIGESTS: {"weights_sha256": file_sha256(weights),
                                "config_sha256": config_sha256(config)}}


def verify_digests(config: dict[str, Any], config_path: Path, weights: Path) -> None:
    """Raise CheckpointError unless both digests match. Format-1 checkpoints predate digests:
    they load with a warning; a later format without them is refused."""
    digests = config.get(DIGESTS)
    if digests is None and config.get("format_version") == 1:
        warnings.warn(f"{config_path} is a format-1 checkpoint without digests: it cannot be "
                      "verified; save it again to add them", stacklevel=3)
        return
    if not isinstance(digests, dict) or not {"weights_sha256", "config_sha256"} <= set(digests):
        raise CheckpointError(
            f"{config_path} has no valid digests field to verify the checkpoint against: "
            "load with verify=False (CLI: --no-verify) at your own risk")
    if config_sha256(config) != digests["config_sha256"]:
        raise CheckpointError(
            f"{config_path} was edited after it was saved (its digest does not match): the "
            "structure it describes may not be the model that was saved. Change settings with "
            "MoEModel.configure() and save_pretrained() instead of editing the file, or load "
            "with verify=False at your own risk")
    if file_sha256(weights) != digests["weights_sha256"]:
        raise CheckpointError(
            f"{weights} does not match the digest recorded when it was saved: the file is "
            "corrupt or was modified; copy it again from its source")


def non_finite(tensors: Mapping[str, torch.Tensor]) -> tuple[str, int, int] | None:
    """The first floating-point tensor holding NaN or Inf: (its name, how many such values,
    its size); None when every value is finite."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() or tensor.is_complex():
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                return name, bad, tensor.numel()
    return None


def check_expert_ids(name: str, experts: Any, hidden_size: int) -> list[list[int]]:
    """A layer's JSON expert lists: at least one expert, each a non-empty list of distinct
    integer neuron ids in 0..hidden_size-1 (their order must match the weights: checked after
    loading by `check_loaded_layer`)."""
    where = f"moee_config.json: layer {name}"
    if not isinstance(experts, list) or not experts:
        raise CheckpointError(f"{where}: 'experts' must be a non-empty list of neuron-id lists")
    for e, ids in enumerate(experts):
        if not isinstance(ids, list) or not ids or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise CheckpointError(f"{where}: expert {e} must be a non-empty list of integer "
                                  f"neuron ids, got {str(ids)[:80]}")
        if min(ids) < 0 or max(ids) >= hidden_size:
            raise CheckpointError(f"{where}: expert {e} has neuron ids outside "
                                  f"0..{hidden_size - 1} (the dense MLP's width)")
        if len(set(ids)) != len(ids):
            raise CheckpointError(f"{where}: expert {e} lists a neuron id more than once")
    return experts


def check_loaded_layer(name: str, layer: torch.nn.Module, experts: list[list[int]]) -> None:
    """The loaded index buffers must describe exactly the experts the JSON declares."""
    where = f"layer {name}"
    idx, kept = layer.expert_indices, layer.kept_neurons
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= kept.numel()):
        raise CheckpointError(f"{where}: expert_indices point outside the {kept.numel()} kept "
                              "neurons: the weights file is corrupt")
    sizes = torch.tensor([0] + [len(e) for e in experts]).cumsum(0)
    if not torch.equal(layer.expert_offsets.cpu(), sizes):
        raise CheckpointError(f"{where}: expert_offsets disagree with the expert sizes in "
                              "moee_config.json")
    if layer.dense_experts() != experts:
        raise CheckpointError(f"{where}: the experts in the weights file differ from those in "
                              "moee_config.json (were the lists edited or swapped?)")
