"""Tiny models and synthetic data so every test runs in seconds on 2 CPU cores."""

from __future__ import annotations

import collections
import gzip
import struct

import numpy as np
import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel, ViTConfig, ViTForImageClassification


def tiny_vit(seed: int = 0, attn: str = "eager") -> ViTForImageClassification:
    torch.manual_seed(seed)
    config = ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16,
                       num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                       num_labels=3, attn_implementation=attn)
    return ViTForImageClassification(config).eval()


def tiny_moe_model(seed: int = 1, attn: str = "eager"):
    """tiny_vit with every MLP split into 2 random experts of 6 of its 48 neurons."""
    import moee
    from moee.moe_build import LayerPlan, apply_plans

    model = tiny_vit(attn=attn)
    sites = moee.find_mlp_sites(model)
    rng = np.random.default_rng(seed)
    plans = [LayerPlan(s.name, [rng.choice(48, 6, replace=False) for _ in range(2)],
                       rng.normal(size=(2, 16))) for s in sites]
    apply_plans(sites, plans)
    return moee.MoEModel(model).eval()


def tiny_bert(seed: int = 0, dropout: float = 0.1) -> BertModel:
    """A 2-layer BERT encoder; `dropout` for the hidden states and attention (BERT's 0.1)."""
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=48, max_position_embeddings=32,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                        attn_implementation="eager")
    return BertModel(config).eval()


def text_batches(n: int = 8, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Keyword batches of 8 rows of 16 token ids, every row padded at the end (12 or 8 real
    tokens): what a tokenizer gives a BERT or LLaMA model."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 50, (8, 16), generator=g)
        mask = torch.ones(8, 16, dtype=torch.long)
        mask[:, 12:] = 0
        mask[::2, 8:] = 0
        out.append({"input_ids": ids * mask, "attention_mask": mask})
    return out


def write_idx(path, array, gz=False):
    """An IDX file (the Fashion-MNIST format) of unsigned bytes."""
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I",
                                                                     *array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(raw)


def fake_dataset(folder, n=5):
    """A Fashion-MNIST folder of n random train and test images (train gzipped)."""
    rng = np.random.default_rng(0)
    for prefix, gz in (("train", True), ("t10k", False)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte{'.gz' if gz else ''}",
                  rng.integers(0, 255, (n, 28, 28)), gz)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{'.gz' if gz else ''}",
                  rng.integers(0, 10, n), gz)


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


def zen_of_python() -> str:
    """Real English text that ships with Python itself (`import this`, stored rot13)."""
    import codecs
    import this

    return codecs.decode(this.s, "rot13")


@pytest.fixture
def tiny_llm(tmp_path):
    """A tiny LLaMA and a word-level tokenizer over the Zen of Python, saved together."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    text = zen_of_python()
    words = sorted(set(pre_tokenizers.Whitespace().pre_tokenize_str(text)[i][0]
                       for i in range(len(pre_tokenizers.Whitespace().pre_tokenize_str(text)))))
    vocab = {w: i for i, w in enumerate(["[UNK]", *words])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    folder = tmp_path / "llm"
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(folder)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=48,
                                 num_hidden_layers=2, num_attention_heads=2,
                                 num_key_value_heads=1, max_position_embeddings=64)
                     ).save_pretrained(folder)
    (tmp_path / "zen.txt").write_text(text)
    return folder, tmp_path / "zen.txt"


def llm_moe_checkpoint(folder, out):
    """The tiny LLaMA saved in `folder` (tiny_llm) with every MLP split into 2 random experts of
    12 of its 48 neurons, saved as a moee checkpoint in `out`, without extracting."""
    from transformers import LlamaForCausalLM

    import moee
    from moee.moe_build import LayerPlan, apply_plans

    dense = LlamaForCausalLM.from_pretrained(folder).eval()
    sites = moee.find_mlp_sites(dense)
    rng = np.random.default_rng(0)
    apply_plans(sites, [LayerPlan(s.name, [rng.choice(48, 12, replace=False) for _ in range(2)],
                                  rng.normal(size=(2, 16))) for s in sites])
    return moee.MoEModel(dense).save_pretrained(out)


def pretend_free_disk(monkeypatch, free: int) -> None:
    """Make moee's free-space checks see `free` bytes free on every disk."""
    import moee.util.disk_space

    usage = collections.namedtuple("Usage", "total used free")
    monkeypatch.setattr(moee.util.disk_space.shutil, "disk_usage",
                        lambda _: usage(10**12, 0, free))
