"""A `MixtralExport` as a GGUF file llama.cpp runs: architecture `llama` with `expert_count`
experts and `expert_used_count = 1`, which is how llama.cpp runs Mixtral (its stacked-expert
`mul_mat_id` path).

Tensor names, layouts and types follow llama.cpp's `convert_hf_to_gguf.py` for Mixtral: the
experts of a layer stacked into `blk.{i}.ffn_{gate,up,down}_exps`, and the rows of q_proj and
k_proj permuted from transformers' rotate-half RoPE layout to the interleaved pairs llama.cpp's
`llama` RoPE rotates. Norms, the router (`ffn_gate_inp`) and every 1-D tensor stay f32.

The vocabulary is not built here: a transformers model carries no GGUF vocabulary, and building
one (llama.cpp's converter does it from the tokenizer files, with per-model pre-tokenizer hashes)
needs the original tokenizer and the converter's tables. It and the general metadata are copied
from a GGUF of the source model (`metadata_from`, any quantisation) instead.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from moee.errors import ConfigError
from moee.export.gguf_layout import (
    DENSE_TENSORS,
    EXPERT_TENSORS,
    GLOBAL_TENSORS,
    LAYER_TENSORS,
    T,
    llama3_rope_factors,
    permute_qk,
    rope_of,
    storage_type,
    tensor_name,
    unpermute_qk,
)
from moee.export.mixtral import MixtralExport, to_mixtral
from moee.export.verify import DIGEST_KEY, gguf_placeholder, sha256, stamp_gguf
from moee.moe_model import MoEModel
from moee.util.atomic import naming_write_errors
from moee.util.disk_space import ensure_room

try:
    import gguf
except ImportError as error:  # pragma: no cover - gguf is an optional dependency
    raise ImportError("moee.export.gguf needs the `gguf` package (pip install gguf)") from error

Q = gguf.GGMLQuantizationType
ARCH = gguf.MODEL_ARCH.LLAMA
ARCH_NAME = gguf.MODEL_ARCH_NAMES[ARCH]

# file_type -> (type of the large 2-D weights, general.file_type)
FILE_TYPES: dict[str, tuple[gguf.GGMLQuantizationType, gguf.LlamaFileType]] = {
    "f32": (Q.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
# Source keys not copied: the writer sets them, or they describe the source file's own layout
# (alignment) or the dense model's size.
NOT_COPIED = {gguf.Keys.General.ARCHITECTURE, gguf.Keys.General.FILE_TYPE,
              gguf.Keys.General.QUANTIZATION_VERSION, gguf.Keys.General.ALIGNMENT,
              gguf.Keys.General.SIZE_LABEL}
@dataclass
class _Planned:
    """One tensor to write: its name, how to make it (float32, torch order) and its type."""

    name: str
    make: Callable[[], torch.Tensor]
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType


def _encode(data: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    array = data.detach().to(torch.float32).contiguous().numpy()
    return gguf.quants.quantize(array, qtype)


def _nbytes(shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> tuple[tuple[int, ...],
                                                                             np.dtype, int]:
    """The stored shape, dtype and size of a tensor as gguf-py's writer sees it."""
    if qtype == Q.F32:
        stored, dtype = shape, np.dtype(np.float32)
    elif qtype == Q.F16:
        stored, dtype = shape, np.dtype(np.float16)
    else:
        stored, dtype = gguf.quants.quant_shape_to_byte_shape(shape, qtype), np.dtype(np.uint8)
    return stored, dtype, math.prod(stored) * dtype.itemsize


def _copy_metadata(writer: gguf.GGUFWriter, source: gguf.GGUFReader,
                   name: str | None) -> int:
    """Copy the source's general.* and tokenizer.* keys; return its vocabulary size."""
    tokens = None
    for key, field in source.fields.items():
        if key.startswith("GGUF.") or key in NOT_COPIED or (
                name is not None and key == gguf.Keys.General.NAME):
            continue
        if not key.startswith(("general.", "tokenizer.")):
            continue  # the source architecture's hyperparameters: ours come from the config
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        if kind == gguf.GGUFValueType.ARRAY and len(field.types) > 2:
            raise ConfigError(f"export to GGUF: {key} in {source.data.filename} is a nested "
                              "array, which is not copied")
        value = field.contents()
        if key == gguf.Keys.Tokenizer.LIST:
            tokens = len(value)
        writer.add_key_value(key, value, kind, sub_type=sub)
    if name is not None:
        writer.add_name(name)
    if tokens is None:
        raise ConfigError("export to GGUF: the metadata source has no tokenizer.ggml.tokens")
    return tokens


def _same(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _plan(export: MixtralExport, weights: gguf.GGMLQuantizationType) -> list[_Planned]:
    config = export.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    tensors = export.tensors
    count = config.num_local_experts
    used: set[str] = set()
    planned: list[_Planned] = []

    def add(kind: gguf.MODEL_TENSOR, layer: int | None, make: Callable[[], torch.Tensor],
            shape: tuple[int, ...]) -> None:
        planned.append(_Planned(tensor_name(kind, layer), make, shape,
                                storage_type(kind, shape, weights)))

    def take(key: str) -> torch.Tensor:
        used.add(key)
        return tensors[key]

    for key, kind in GLOBAL_TENSORS.items():
        if key in tensors:
            tensor = take(key)
            add(kind, None, partial(_same, tensor), tuple(tensor.shape))
    _, rope_type, params = rope_of(config)
    if rope_type == "llama3":
        factors = llama3_rope_factors(params, config.head_dim, config.max_position_embeddings)
        add(T.ROPE_FREQS, None, partial(_same, factors), tuple(factors.shape))
    for i in range(config.num_hidden_layers):
        prefix = f"model.layers.{i}."
        for key, kind in LAYER_TENSORS.items():
            tensor = take(prefix + key)
            if count == 1 and kind == T.FFN_GATE_INP:
                continue  # one expert: nothing to route
            if kind in (T.ATTN_Q, T.ATTN_K):
                make = partial(permute_qk, tensor, heads if kind == T.ATTN_Q else kv_heads)
            else:
                make = partial(_same, tensor)
            add(kind, i, make, tuple(tensor.shape))
        for w, kind in (DENSE_TENSORS if count == 1 else EXPERT_TENSORS).items():
            parts = [take(f"{prefix}block_sparse_moe.experts.{e}.{w}.weight")
                     for e in range(count)]
            if count == 1:
                add(kind, i, partial(_same, parts[0]), tuple(parts[0].shape))
            else:
                add(kind, i, partial(torch.stack, parts), (count, *parts[0].shape))
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            bias = tensors.get(f"{prefix}self_attn.{proj}.bias")
            if bias is not None:  # Qwen2's, all zero (to_mixtral refuses others): dropped
                if bool(bias.any()):
                    raise ConfigError(f"export to GGUF: layer {i}'s {proj} has a non-zero bias")
                used.add(f"{prefix}self_attn.{proj}.bias")
    left = sorted(set(tensors) - used)
    if left:
        raise ConfigError(f"export to GGUF: no GGUF name for {left[:5]} ({len(left)} tensors)")
    return planned


def _write_hyperparameters(writer: gguf.GGUFWriter, config, theta: float, rope_type: str,
                           params: dict, ftype: gguf.LlamaFileType) -> None:
    """llama.* keys from the Mixtral config (the expert width is `feed_forward_length`); no
    expert keys for one expert a layer, which llama.cpp then runs as a plain llama."""
    head_dim = config.head_dim or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(theta)
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(params["factor"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if config.num_local_experts > 1:  # else a plain dense llama (see DENSE_TENSORS)
        writer.add_expert_count(config.num_local_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(ftype)


def _check_writable(config, file_type: str) -> tuple[float, str, dict]:
    """`config`'s RoPE (theta, type, parameters) when this writer can write it as `file_type`;
    else a ConfigError naming what it cannot."""
    if file_type not in FILE_TYPES:
        raise ConfigError(f"export to GGUF: file_type must be one of {tuple(FILE_TYPES)}, "
                          f"got {file_type!r}")
    if config.num_experts_per_tok != 1:
        raise ConfigError("export to GGUF: moee's experts are top-1 (num_experts_per_tok 1)")
    theta, rope_type, params = rope_of(config)
    if rope_type not in ("default", "linear", "llama3"):
        raise ConfigError(f"export to GGUF: RoPE type {rope_type!r} is not written (default, "
                          "linear and llama3 are)")
    return theta, rope_type, params


def _write_tensors(writer: gguf.GGUFWriter, planned: list[_Planned], path: Path) -> None:
    """The header, then the tensors one at a time (a stacked expert tensor exists only while it
    is written), then their digests over a same-length placeholder key (for `moee verify`)."""
    writer.add_string(DIGEST_KEY, gguf_placeholder([p.name for p in planned]))
    for p in planned:
        stored, dtype, nbytes = _nbytes(p.shape, p.qtype)
        writer.add_tensor_info(p.name, stored, dtype, nbytes, raw_dtype=p.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    digests = {}
    for p in planned:
        data = np.ascontiguousarray(_encode(p.make(), p.qtype))
        digests[p.name] = sha256(data)
        writer.write_tensor_data(data)
    writer.close()
    stamp_gguf(path, digests)


def write_gguf(export: MixtralExport, out_file: str | Path,
               metadata_from: str | Path | gguf.GGUFReader, file_type: str = "f32",
               name: str | None = None, announce: Callable[[str], None] | None = None) -> Path:
    """Write `export` (from `to_mixtral`) to `out_file` as a llama.cpp GGUF: architecture
    `llama`, `expert_count` experts of `feed_forward_length` (the expert width) neurons,
    `expert_used_count` 1.

    The tokenizer (tokenizer.ggml.*, the chat template, bos/eos/pad ids) and general metadata
    are copied from `metadata_from`, a GGUF of the source model (a path, or a `GGUFReader` of
    it: reading a 50k-token vocabulary takes gguf-py seconds): a transformers model has no GGUF
    vocabulary that can be built here offline (see the module docstring). Its vocabulary must
    have `export.config.vocab_size` tokens. The hyperparameters come from `export.config`.
    `file_type`: "f32", "f16" or "q8_0" for the 2-D weights (norms, the router and 1-D tensors
    stay f32; a Q8_0 tensor whose rows are not a multiple of 32 falls back to f16, as in
    llama.cpp's converter); rounding can move a token whose two best router scores nearly tie
    to the other expert, so a quantised MoE can drift further from f32 than its dense model
    does. `name`: general.name (default: the source's). Mistral's sliding window, if any, is not
    written (llama.cpp's `llama` has none), as in the converter. The file is written beside and
    renamed into place, after its tensors' bytes are checked against the free space (and told to
    `announce`, when given, before anything is written). Returns `out_file`."""
    config = export.config
    theta, rope_type, params = _check_writable(config, file_type)
    weights, ftype = FILE_TYPES[file_type]
    out = Path(out_file)
    partial = out.with_name(out.name + ".partial")
    planned = _plan(export, weights)
    nbytes = sum(_nbytes(p.shape, p.qtype)[2] for p in planned)
    if announce is not None:
        announce(f"writing {nbytes / 2**20:,.1f} MiB of tensors to {out}")
    ensure_room(out.parent, nbytes, f"the GGUF file {out}", "free space or export elsewhere")
    source = (metadata_from if isinstance(metadata_from, gguf.GGUFReader)
              else gguf.GGUFReader(str(metadata_from)))
    writer = gguf.GGUFWriter(str(partial), ARCH_NAME)
    with naming_write_errors(out, [partial]):  # gguf-py's or numpy's failed write names `out`
        try:
            vocab = _copy_metadata(writer, source, name)
            if vocab != config.vocab_size:
                raise ConfigError(f"export to GGUF: {source.data.filename} has {vocab} tokens, "
                                  f"the model {config.vocab_size}; copy the metadata from the "
                                  "source model's GGUF")
            _write_hyperparameters(writer, config, theta, rope_type, params, ftype)
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            _write_tensors(writer, planned, partial)
        except BaseException:
            writer.close()  # should its flush fail too, naming_write_errors removes the file
            partial.unlink(missing_ok=True)
            raise
        os.replace(partial, out)
    return out


def export_gguf(moe_model, out_file: str | Path, metadata_from: str | Path | gguf.GGUFReader,
                file_type: str = "f32", name: str | None = None) -> Path:
    """`to_mixtral` then `write_gguf`: `moe_model` (a `MoEModel` or the model inside it, a
    LLaMA-style causal LM) as a llama.cpp GGUF, the vocabulary copied from `metadata_from`."""
    model = moe_model.model if isinstance(moe_model, MoEModel) else moe_model
    return write_gguf(to_mixtral(model, torch.float32), out_file, metadata_from, file_type, name)


__all__ = ["FILE_TYPES", "export_gguf", "llama3_rope_factors", "permute_qk", "tensor_name",
           "unpermute_qk", "write_gguf"]
