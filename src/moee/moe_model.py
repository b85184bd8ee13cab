"""`MoEModel`: the converted model plus what it takes to save, reload and report it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import nn

from moee.build import LayerPlan
from moee.moe import MoEMLP


class MoEModel(nn.Module):
    """Wraps the base model whose MLPs were swapped for `MoEMLP`s; forward is the base's."""

    def __init__(self, model: nn.Module, plans: list[LayerPlan],
                 extract_config: dict[str, Any] | None = None, adapter: str | None = None):
        super().__init__()
        self.model = model
        self.plans = plans
        self.extract_config = extract_config or {}
        self.adapter = adapter

    @property
    def config(self):
        """The base model's config (HF models), so evaluation code can treat both alike."""
        return getattr(self.model, "config", None)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def moe_layers(self) -> dict[str, MoEMLP]:
        return {n: m for n, m in self.model.named_modules() if isinstance(m, MoEMLP)}

    def plan_layers(self) -> dict[str, MoEMLP]:
        """Each plan's installed MoEMLP, by plan site. The site names the MLP block; the MoEMLP
        is that module (ViT-style) or inside it (BERT-style: `<site>.intermediate`)."""
        out = {}
        for plan in self.plans:
            block = self.model.get_submodule(plan.site)
            out[plan.site] = next(m for m in block.modules() if isinstance(m, MoEMLP))
        return out

    @contextmanager
    def track_routing(self) -> Iterator[None]:
        """Count tokens per expert in every MoE layer while the block runs."""
        layers = self.moe_layers().values()
        for m in layers:
            m.track_load, m.load_counts = True, None
        try:
            yield
        finally:
            for m in layers:
                m.track_load = False

    def routing_report(self) -> list[dict[str, Any]]:
        """Per MoE layer: expert sizes, share of tokens per expert, active neurons per token
        (from the last `track_routing` block)."""
        rows = []
        for name, m in self.moe_layers().items():
            sizes = m.expert_sizes()
            row = {"site": name, "experts": m.num_experts, "expert_sizes": sizes,
                   "kept_neurons": m.fc1.out_features}
            if m.load_counts is not None and int(m.load_counts.sum()) > 0:
                counts = m.load_counts.double()
                share = counts / counts.sum()
                row["load_share"] = [round(float(s), 4) for s in share]
                row["active_neurons_per_token"] = float((share * counts.new_tensor(sizes)).sum())
            rows.append(row)
        return rows

    def save_pretrained(self, directory: str | Path) -> Path:
        from moee.io import save_pretrained

        return save_pretrained(self, directory)
