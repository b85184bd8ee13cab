"""Export a MoE model to formats other engines load: `export(moe_model, directory)` writes a
`MixtralForCausalLM` checkpoint (transformers, vLLM, llama.cpp's converter)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from moee.errors import ConfigError
from moee.export.mixtral import MixtralExport, to_mixtral
from moee.moe_model import MoEModel

FORMATS = ("mixtral",)


def export(moe_model, directory: str | Path, to: str = "mixtral", tokenizer=None,
           dtype: torch.dtype | None = None) -> MixtralExport:
    """Write `moe_model` (a `MoEModel` or the model inside it) to `directory` as `to`:
    config.json, model.safetensors, the generation config and `tokenizer`'s files (a
    tokenizer object; engines need them to run the model). `dtype`: the weights' dtype
    (default: the model's). The directory is written beside and renamed into place, so a
    failed export leaves nothing half-written."""
    if to not in FORMATS:
        raise ConfigError(f"export: format must be one of {FORMATS}, got {to!r}")
    model = moe_model.model if isinstance(moe_model, MoEModel) else moe_model
    out = Path(directory)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"export: {out} exists and is not a directory")
    result = to_mixtral(model, dtype)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    result.config.save_pretrained(partial)
    save_file(result.tensors, str(partial / "model.safetensors"), metadata={"format": "pt"})
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(partial)
    if tokenizer is not None:
        tokenizer.save_pretrained(partial)
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    return result


__all__ = ["FORMATS", "MixtralExport", "export", "to_mixtral"]
