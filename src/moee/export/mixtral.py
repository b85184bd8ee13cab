"""A gated LLaMA-style MoE model as a `MixtralForCausalLM`: its config and its weights under the
per-expert names released Mixtral checkpoints use (transformers, vLLM and llama.cpp's converter
read them).

Exact, because top-1 routing by cosine to centre c_i picks argmax_i x·(c_i/|c_i|), a bias-free
linear router, and Mixtral renormalises its top-k weights, so a top-1 expert's weight is 1.
What Mixtral cannot express is padded exactly or refused: experts smaller than the largest get
zero neurons (silu(0)·0 = 0; their MACs are real in the engines), a layer with fewer experts
repeats its first expert (same router row, same weights: whichever of the tied pair is picked,
the output is the same), a dense layer becomes one expert of every neuron, and per-expert
offsets or MLP biases are refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from moee.engine import router_weights
from moee.errors import ConfigError
from moee.moe import MoEMLP

SUPPORTED = ("llama", "mistral", "qwen2")
# Settings a Mixtral config takes over from the source model's config unchanged.
SHARED_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings",
               "initializer_range", "rms_norm_eps", "pad_token_id", "bos_token_id",
               "eos_token_id", "tie_word_embeddings", "attention_dropout", "rope_parameters")


@dataclass
class Expert:
    """One Mixtral expert: w1 = gate rows (m, d), w3 = up rows (m, d), w2 = down columns (d, m)."""

    w1: torch.Tensor
    w3: torch.Tensor
    w2: torch.Tensor

    @property
    def width(self) -> int:
        return self.w1.shape[0]

    def padded(self, width: int) -> Expert:
        """Zero neurons up to `width`: exact, since act(0)·0 = 0 contributes nothing."""
        extra = width - self.width
        return Expert(nn.functional.pad(self.w1, (0, 0, 0, extra)),
                      nn.functional.pad(self.w3, (0, 0, 0, extra)),
                      nn.functional.pad(self.w2, (0, extra)))


@dataclass
class LayerExperts:
    """A layer's router rows (k, d) and its experts."""

    router: torch.Tensor
    experts: list[Expert]


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ConfigError("export to Mixtral: the model has no model.layers (a LLaMA-style "
                          "causal LM is needed)")
    return layers


def check_exportable(model: nn.Module) -> None:
    """Refuse, with the reason, what a Mixtral model cannot run exactly."""
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if kind not in SUPPORTED:
        raise ConfigError(f"export to Mixtral: supported for {', '.join(SUPPORTED)} models, "
                          f"not {kind!r} (Mixtral's attention is LLaMA's)")
    if getattr(config, "mlp_bias", False):
        raise ConfigError("export to Mixtral: the model's MLPs have biases; Mixtral's experts "
                          "have none")
    for i, layer in enumerate(_decoder_layers(model)):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            bias = getattr(layer.self_attn, name).bias
            if bias is not None and bool(bias.any()):
                raise ConfigError(f"export to Mixtral: layer {i}'s attention {name} has a "
                                  "non-zero bias (Qwen2-style); Mixtral's attention has none")
    if kind == "qwen2" and getattr(config, "use_sliding_window", False):
        raise ConfigError("export to Mixtral: Qwen2's per-layer sliding window is not exportable")


def layer_experts(mlp: nn.Module, layer: int) -> LayerExperts:
    """A MoE layer's experts as Mixtral's, or a dense gated MLP as one expert of every neuron."""
    if isinstance(mlp, MoEMLP):
        if mlp.gate is None:
            raise ConfigError(f"export to Mixtral: layer {layer}'s MLP is not gated "
                              "(Mixtral's experts are act(x W1) * x W3)")
        if mlp.metric not in ("cosine", "dot"):
            raise ConfigError(f"export to Mixtral: layer {layer} routes by {mlp.metric!r} "
                              "distance, which is not a bias-free linear router")
        if bool(mlp.expert_bias.any()):
            raise ConfigError(
                f"export to Mixtral: layer {layer}'s experts add per-expert offsets (mean "
                "compensation or the refit's offsets), which Mixtral's experts cannot; extract "
                "with --export-ready (SelectConfig(compensate_mean=False, refit_offsets=False))")
        biases = (mlp.fc1.bias, mlp.gate.bias, mlp.fc2.bias)
        if any(b is not None and bool(b.any()) for b in biases):
            raise ConfigError(f"export to Mixtral: layer {layer}'s MLP has biases")
        rows = router_weights(mlp.router_centres.float(), mlp.metric)[0]
        experts = []
        for e in range(mlp.num_experts):
            idx = mlp.expert_index(e)
            experts.append(Expert(mlp.gate.weight[idx], mlp.fc1.weight[idx],
                                  mlp.fc2.weight[:, idx]))
        return LayerExperts(rows, experts)
    parts = [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    if any(p is None for p in parts):
        raise ConfigError(f"export to Mixtral: layer {layer}'s MLP is neither a MoE layer "
                          "nor a gated LLaMA MLP")
    gate, up, down = parts
    if any(p.bias is not None and bool(p.bias.any()) for p in parts):
        raise ConfigError(f"export to Mixtral: layer {layer}'s MLP has biases")
    router = torch.zeros(1, gate.in_features, dtype=torch.float32)
    return LayerExperts(router, [Expert(gate.weight, up.weight, down.weight)])


@dataclass
class MixtralExport:
    """What `to_mixtral` gives: the config, the tensors by checkpoint name, and what padding
    costs: per layer, the experts' own sizes (`sizes`) and the width every expert runs at."""

    config: object
    tensors: dict[str, torch.Tensor]
    sizes: list[list[int]] = field(default_factory=list)

    @property
    def width(self) -> int:
        return self.config.intermediate_size

    def padding_summary(self) -> str:
        """MLP neurons per token: Mixtral's width against the mean size of each layer's own
        experts (unweighted: a checkpoint does not record how tokens split)."""
        own = sum(sum(s) / len(s) for s in self.sizes)
        run = self.width * len(self.sizes)
        return (f"{len(self.sizes)} layers, {self.config.num_local_experts} experts of "
                f"{self.width} neurons each; the experts' own mean width is "
                f"{own / len(self.sizes):.0f}, so padding adds {run / own - 1:.1%} MLP MACs "
                "per token")


def to_mixtral(model: nn.Module, dtype: torch.dtype | None = None,
               multiple: int = 8) -> MixtralExport:
    """The Mixtral config and tensors of `model` (a LLaMA-style causal LM whose MLPs moee
    replaced; see the module docstring for what is exact and what is padded). The expert
    width is rounded up to a `multiple` of neurons: transformers' grouped-matmul experts need
    rows of a multiple of 16 bytes."""
    from transformers import MixtralConfig

    check_exportable(model)
    layers = [layer_experts(layer.mlp, i) for i, layer in enumerate(_decoder_layers(model))]
    width = max(e.width for layer in layers for e in layer.experts)
    width = -(-width // multiple) * multiple
    count = max(len(layer.experts) for layer in layers)
    source = model.config.to_dict()
    settings = {k: source[k] for k in SHARED_KEYS if k in source}
    settings["sliding_window"] = (source.get("sliding_window")
                                  if source.get("model_type") == "mistral" else None)
    dtype = dtype or next(model.parameters()).dtype
    config = MixtralConfig(**settings, intermediate_size=width, num_local_experts=count,
                           num_experts_per_tok=1, output_router_logits=False,
                           architectures=["MixtralForCausalLM"], dtype=dtype)
    mlp_prefixes = tuple(f"model.layers.{i}.mlp." for i in range(len(layers)))
    tensors = {k: v for k, v in model.state_dict().items() if not k.startswith(mlp_prefixes)}
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    for i, layer in enumerate(layers):
        prefix = f"model.layers.{i}.block_sparse_moe."
        experts = layer.experts + [layer.experts[0]] * (count - len(layer.experts))
        router = torch.cat([layer.router, layer.router[:1].expand(count - len(layer.router), -1)])
        tensors[prefix + "gate.weight"] = router
        for e, expert in enumerate(experts):
            padded = expert.padded(width)
            for name in ("w1", "w2", "w3"):
                tensors[f"{prefix}experts.{e}.{name}.weight"] = getattr(padded, name)
    tensors = {k: v.detach().to(dtype).contiguous().clone() for k, v in tensors.items()}
    return MixtralExport(config, tensors, [[e.width for e in layer.experts] for layer in layers])
