"""How a transformers LLaMA maps onto llama.cpp's `llama` GGUF: tensor names (from gguf-py's
tables), the q/k row permutation between the two RoPE layouts, and RoPE parameters."""

from __future__ import annotations

import math

import torch

from moee.errors import ConfigError

try:
    import gguf
except ImportError as error:  # pragma: no cover - gguf is an optional dependency
    raise ImportError("moee export --to gguf needs the `gguf` package (pip install gguf)") \
        from error

T = gguf.MODEL_TENSOR

# Per-layer checkpoint names (after "model.layers.{i}.") -> GGUF tensor.
LAYER_TENSORS = {
    "input_layernorm.weight": T.ATTN_NORM,
    "self_attn.q_proj.weight": T.ATTN_Q,
    "self_attn.k_proj.weight": T.ATTN_K,
    "self_attn.v_proj.weight": T.ATTN_V,
    "self_attn.o_proj.weight": T.ATTN_OUT,
    "post_attention_layernorm.weight": T.FFN_NORM,
    "block_sparse_moe.gate.weight": T.FFN_GATE_INP,
}
EXPERT_TENSORS = {"w1": T.FFN_GATE_EXP, "w3": T.FFN_UP_EXP, "w2": T.FFN_DOWN_EXP}
# One expert a layer (a dense model, or structured pruning): llama.cpp's plain FFN tensors.
DENSE_TENSORS = {"w1": T.FFN_GATE, "w3": T.FFN_UP, "w2": T.FFN_DOWN}
GLOBAL_TENSORS = {"model.embed_tokens.weight": T.TOKEN_EMBD, "model.norm.weight": T.OUTPUT_NORM,
                  "lm_head.weight": T.OUTPUT}
ALWAYS_F32 = (T.FFN_GATE_INP,)  # as the converter: the router is never quantised


def storage_type(kind: gguf.MODEL_TENSOR, shape: tuple[int, ...],
                 weights: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    """The converter's rule: 1-D tensors and the router f32, the rest `weights`; a row that
    Q8_0's 32-wide blocks do not divide falls back to F16 (the converter's fallback too)."""
    Q = gguf.GGMLQuantizationType
    if len(shape) <= 1 or kind in ALWAYS_F32:
        return Q.F32
    if weights in (Q.F32, Q.F16):
        return weights
    block = gguf.GGML_QUANT_SIZES[weights][0]
    return weights if shape[-1] % block == 0 else Q.F16


def tensor_name(kind: gguf.MODEL_TENSOR, layer: int | None = None) -> str:
    """The GGUF name of a weight, from gguf-py's table (`blk.{i}.attn_q.weight`, ...)."""
    base = gguf.TENSOR_NAMES[kind]
    return (base.format(bid=layer) if layer is not None else base) + ".weight"


def permute_qk(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a q_proj / k_proj weight (heads·head_dim, d) reordered from transformers'
    rotate-half RoPE layout (dimension j pairs with j + head_dim/2) to the interleaved pairs
    (2j, 2j+1) that llama.cpp's `llama` RoPE rotates: within each head, new row 2j + k is old
    row j + k·head_dim/2. `heads`: the query heads for q_proj, the key/value heads for k_proj."""
    rows = weight.shape[0]
    if rows % (2 * heads):
        raise ConfigError(f"export to GGUF: {rows} q/k rows do not split into {heads} heads "
                          "of an even width")
    half = rows // heads // 2
    return (weight.reshape(heads, 2, half, *weight.shape[1:]).transpose(1, 2)
            .reshape(weight.shape))


def unpermute_qk(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of `permute_qk` (a GGUF `attn_q` / `attn_k` back to transformers' rows)."""
    half = weight.shape[0] // heads // 2
    return (weight.reshape(heads, half, 2, *weight.shape[1:]).transpose(1, 2)
            .reshape(weight.shape))


def rope_of(config) -> tuple[float, str, dict]:
    """(rope theta, rope type, all parameters) of a transformers 5 config."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None or "rope_type" not in params and any(
            isinstance(v, dict) for v in params.values()):
        raise ConfigError("export to GGUF: the config has no single rope_theta (per-layer-type "
                          "RoPE is not llama's)")
    return float(theta), params.get("rope_type", "default"), params


def llama3_rope_factors(params: dict, head_dim: int, context: int) -> torch.Tensor:
    """Llama 3.1's per-frequency RoPE divisors, as the `rope_freqs` tensor llama.cpp reads:
    1 for high frequencies, `factor` for low ones, smoothly in between."""
    base = float(params["rope_theta"])
    factor = float(params.get("factor", 8.0))
    low, high = float(params.get("low_freq_factor", 1.0)), float(params.get("high_freq_factor",
                                                                             4.0))
    old = float(params.get("original_max_position_embeddings", context))
    freqs = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    wavelen = 2 * math.pi / freqs
    smooth = (old / wavelen - low) / (high - low)
    mid = 1 / ((1 - smooth) / factor + smooth)
    out = torch.where(wavelen < old / high, torch.ones_like(mid),
                      torch.where(wavelen > old / low, torch.full_like(mid, factor), mid))
    return out.to(torch.float32)
