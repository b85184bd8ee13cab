"""One tiny random-config model per MLP layout moee knows: (factory, inputs, adapter, blocks)."""

from __future__ import annotations

import torch
import transformers as tf
from conftest import TimmStyleNet, tiny_bert, tiny_vit
from torch import nn

V, D, H = 50, 16, 48  # vocabulary, width, MLP width
TEXT = dict(vocab_size=V, hidden_size=D, intermediate_size=H, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=32, attn_implementation="eager")


def _seeded(make):
    def build():
        torch.manual_seed(0)
        return make().eval()
    return build


class TimmGluMlp(nn.Module):
    """timm.layers.GluMlp's layout: fc1 gives both halves, the gate is the second
    (`gate_last`), then drop, an identity norm, fc2."""

    def __init__(self, gate_last: bool = True) -> None:
        super().__init__()
        self.chunk_dim, self.gate_last = -1, gate_last
        self.fc1, self.act, self.drop1 = nn.Linear(D, 2 * H), nn.SiLU(), nn.Dropout(0.0)
        self.norm, self.fc2, self.drop2 = nn.Identity(), nn.Linear(H, D), nn.Dropout(0.0)

    def forward(self, x):
        x1, x2 = self.fc1(x).chunk(2, dim=self.chunk_dim)
        x = x1 * self.act(x2) if self.gate_last else self.act(x1) * x2
        return self.drop2(self.fc2(self.norm(self.drop1(x))))


class TimmSwiGLU(nn.Module):
    """timm.layers.SwiGLU's layout: fc1_g, fc1_x, act, drop, an identity norm, fc2."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1_g, self.fc1_x, self.act = nn.Linear(D, H), nn.Linear(D, H), nn.SiLU()
        self.drop1, self.norm, self.fc2 = nn.Dropout(0.0), nn.Identity(), nn.Linear(H, D)
        self.drop2 = nn.Dropout(0.0)

    def forward(self, x):
        x = self.act(self.fc1_g(x)) * self.fc1_x(x)
        return self.drop2(self.fc2(self.norm(self.drop1(x))))


class Blocks(nn.Module):
    """Two residual blocks around a given MLP class."""

    def __init__(self, mlp) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"mlp": mlp()}) for _ in range(2))

    def forward(self, x):
        for b in self.blocks:
            x = x + b["mlp"](x)
        return x


def tokens():
    return torch.randint(1, V, (2, 7), generator=torch.Generator().manual_seed(1))


def images(channels=1, size=8):
    return lambda: torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(1))


FAMILIES = {
    "hf-vit": (tiny_vit, images(), "fc1-act-fc2", 2),
    "hf-deit": (_seeded(lambda: tf.DeiTForImageClassification(tf.DeiTConfig(
        hidden_size=D, num_hidden_layers=2, num_attention_heads=2, intermediate_size=H,
        image_size=8, patch_size=4, num_channels=1, attn_implementation="eager"))),
        images(), "fc1-act-fc2", 2),
    "hf-clip-vision": (_seeded(lambda: tf.CLIPVisionModel(tf.CLIPVisionConfig(
        hidden_size=D, intermediate_size=H, num_hidden_layers=2, num_attention_heads=2,
        image_size=8, patch_size=4, num_channels=1, attn_implementation="eager"))),
        images(), "fc1-act-fc2", 2),
    "timm-mlp": (TimmStyleNet, lambda: torch.randn(2, 5, D), "fc1-act-fc2", 2),
    "hf-bert": (lambda: tiny_bert(dropout=0.0), tokens, "intermediate-output", 2),
    "hf-swin": (_seeded(lambda: tf.SwinModel(tf.SwinConfig(
        image_size=8, patch_size=2, num_channels=1, embed_dim=8, depths=[1, 1],
        num_heads=[1, 2], window_size=2, mlp_ratio=2.0))), images(), "fc1-act-fc2", 2),
    "hf-llama": (_seeded(lambda: tf.LlamaForCausalLM(tf.LlamaConfig(
        num_key_value_heads=1, **TEXT))), tokens, "gated", 2),
    "hf-qwen2": (_seeded(lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(
        num_key_value_heads=1, **TEXT))), tokens, "gated", 2),
    "hf-mistral": (_seeded(lambda: tf.MistralForCausalLM(tf.MistralConfig(
        num_key_value_heads=1, **TEXT))), tokens, "gated", 2),
    "hf-gemma": (_seeded(lambda: tf.GemmaForCausalLM(tf.GemmaConfig(
        num_key_value_heads=1, head_dim=8, **TEXT))), tokens, "gated", 2),
    "hf-phi3": (_seeded(lambda: tf.Phi3ForCausalLM(tf.Phi3Config(
        pad_token_id=0, **TEXT))), tokens, "fused-gate-up", 2),
    "hf-gpt2": (_seeded(lambda: tf.GPT2LMHeadModel(tf.GPT2Config(
        vocab_size=V, n_embd=D, n_layer=2, n_head=2, n_positions=32, n_inner=H,
        attn_implementation="eager"))), tokens, "conv1d", 2),
    "timm-glu": (_seeded(lambda: Blocks(TimmGluMlp)), lambda: torch.randn(2, 5, D), "glu", 2),
    "timm-glu-gate-first": (_seeded(lambda: Blocks(lambda: TimmGluMlp(gate_last=False))),
                            lambda: torch.randn(2, 5, D), "glu", 2),
    "timm-swiglu": (_seeded(lambda: Blocks(TimmSwiGLU)), lambda: torch.randn(2, 5, D), "glu", 2),
    "hf-opt": (_seeded(lambda: tf.OPTForCausalLM(tf.OPTConfig(
        vocab_size=V, hidden_size=D, ffn_dim=H, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=32, word_embed_proj_dim=D, attn_implementation="eager"))),
        tokens, "layer-fc1-fc2", 2),
    "hf-bart": (_seeded(lambda: tf.BartModel(tf.BartConfig(
        vocab_size=V, d_model=D, encoder_ffn_dim=H, decoder_ffn_dim=H, encoder_layers=1,
        decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        max_position_embeddings=32, attn_implementation="eager"))), tokens, "layer-fc1-fc2", 2),
    "hf-convnext": (_seeded(lambda: tf.ConvNextModel(tf.ConvNextConfig(
        num_channels=1, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], image_size=16))),
        images(1, 16), "pointwise-conv", 2),
}


def output(model, x) -> torch.Tensor:
    out = model(x)
    return getattr(out, "logits", getattr(out, "last_hidden_state", out))
