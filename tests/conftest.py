"""Tiny models and synthetic data so every test runs in seconds on 2 CPU cores."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel, ViTConfig, ViTForImageClassification


def tiny_vit(seed: int = 0) -> ViTForImageClassification:
    torch.manual_seed(seed)
    config = ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16,
                       num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                       num_labels=3, attn_implementation="eager")
    return ViTForImageClassification(config).eval()


def tiny_moe_model(seed: int = 1):
    """tiny_vit with every MLP split into 2 random experts of 6 of its 48 neurons."""
    import numpy as np

    import moee
    from moee.build import LayerPlan, apply_plans

    model = tiny_vit()
    sites = moee.find_mlp_sites(model)
    rng = np.random.default_rng(seed)
    plans = [LayerPlan(s.name, [rng.choice(48, 6, replace=False) for _ in range(2)],
                       rng.normal(size=(2, 16))) for s in sites]
    apply_plans(sites, plans)
    return moee.MoEModel(model).eval()


def tiny_bert(seed: int = 0) -> BertModel:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=48, max_position_embeddings=32,
                        attn_implementation="eager")
    return BertModel(config).eval()


class TimmStyleMlp(nn.Module):
    """The layout of timm.layers.Mlp (fc1, act, drop1, norm, fc2, drop2), without timm."""

    def __init__(self, d: int = 16, h: int = 48) -> None:
        super().__init__()
        self.fc1, self.act, self.drop1 = nn.Linear(d, h), nn.GELU(), nn.Dropout(0.0)
        self.norm, self.fc2, self.drop2 = nn.Identity(), nn.Linear(h, d), nn.Dropout(0.0)

    def forward(self, x):
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


class TimmStyleNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(nn.ModuleDict({"mlp": TimmStyleMlp()}) for _ in range(2))

    def forward(self, x):
        for b in self.blocks:
            x = x + b["mlp"](x)
        return x


def blob_images(n: int = 240, seed: int = 0) -> torch.Tensor:
    """8x8 grey images from 3 very different templates plus a little noise: clusterable."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.randn(3, 1, 8, 8, generator=g) * 3
    which = torch.arange(n) % 3
    return templates[which] + 0.05 * torch.randn(n, 1, 8, 8, generator=g)


@pytest.fixture
def vit() -> ViTForImageClassification:
    return tiny_vit()


@pytest.fixture
def images() -> torch.Tensor:
    return blob_images()
