"""`MoEModel`: the converted model plus what it takes to save, reload and report it."""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moee.checkpoint.io import read_checkpoint, write_checkpoint
from moee.moe import MoEMLP, moe_layers

# What transformers.Trainer passes to save_pretrained: the model's own weights (`state_dict`),
# the format (moee always writes safetensors) and sharding, which one checkpoint file ignores.
_TRAINER_KEYWORDS = frozenset({"state_dict", "safe_serialization", "save_function",
                               "max_shard_size", "variant", "token"})


class _SaveAsMoECheckpoint:
    """Stands in for the inner transformers model's `save_pretrained`: transformers would write
    a checkpoint it reloads with every MoE MLP randomly re-initialised, after only a warning.
    This writes moee's checkpoint instead (a class, not a closure, so the model still pickles;
    a weak reference, so the model, which holds it, is freed by `del` without the cyclic
    collector)."""

    def __init__(self, model: nn.Module, adapter: str | None, extract_config: dict) -> None:
        self.model = weakref.ref(model)
        self.adapter, self.extract_config = adapter, extract_config

    def __getstate__(self) -> dict:
        return {**self.__dict__, "model": self.model()}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, model=weakref.ref(state["model"]))

    def __call__(self, directory: str | Path, is_main_process: bool = True,
                 push_to_hub: bool = False, **options: Any) -> Path:
        unknown = sorted(set(options) - _TRAINER_KEYWORDS)
        if unknown or push_to_hub:
            raise TypeError(f"this model's MLPs are moee MoE layers: save_pretrained writes "
                            f"moee's checkpoint and takes no {unknown or ['push_to_hub']}")
        if not is_main_process:  # under Trainer's distributed runs one process writes
            return Path(directory)
        model = self.model()
        return write_checkpoint(model, list(moe_layers(model).values()), directory,
                                self.adapter, self.extract_config)


class MoEModel(nn.Module):
    """Wraps the base model whose MLPs were swapped for `MoEMLP`s; forward is the base's.

    The expert sets and execution settings live on the MoE layers themselves; `training`
    is always the inner model's flag.
    """

    def __init__(self, model: nn.Module, extract_config: dict[str, Any] | None = None,
                 adapter: str | None = None):
        super().__init__()
        self.model = model
        self.extract_config = extract_config or {}
        self.adapter = adapter
        if callable(getattr(model, "save_pretrained", None)):
            model.save_pretrained = _SaveAsMoECheckpoint(model, adapter, self.extract_config)

    @property
    def training(self) -> bool:  # the inner model's flag: the two can never disagree
        model = self._modules.get("model") if "_modules" in self.__dict__ else None
        return model.training if model is not None else self.__dict__.get("_training", True)

    @training.setter
    def training(self, mode: bool) -> None:  # nn.Module.train() then recurses into the model
        self.__dict__["_training"] = mode

    @property
    def config(self):
        """The base model's config (HF models), so evaluation code can treat both alike."""
        return getattr(self.model, "config", None)

    def __getattr__(self, name: str) -> Any:
        """What the wrapper does not define comes from the wrapped model, as PEFT's wrapper
        does: `generate`, `device`, `can_generate`, `generation_config`, ..."""
        try:
            return super().__getattr__(name)  # parameters, buffers and submodules
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def moe_layers(self) -> dict[str, MoEMLP]:
        """Every MoE layer, by module path."""
        return moe_layers(self.model)

    def configure(self, **settings) -> None:
        """Set execution settings on every MoE layer, e.g. `configure(execution="union")`."""
        for m in self.moe_layers().values():
            m.configure(**settings)

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
        for m in self.moe_layers().values():
            sizes = m.expert_sizes()
            row = {"site": m.site, "experts": m.num_experts, "expert_sizes": sizes,
                   "kept_neurons": m.fc1.out_features}
            if m.load_counts is not None and int(m.load_counts.sum()) > 0:
                share = m.load_counts.double() / m.load_counts.sum()
                row["load_share"] = [round(float(s), 4) for s in share]
                row["active_neurons_per_token"] = float((share * share.new_tensor(sizes)).sum())
            rows.append(row)
        return rows

    def save_pretrained(self, directory: str | Path) -> Path:
        """`model.safetensors` + `moee_config.json` in `directory` (created)."""
        return write_checkpoint(self.model, list(self.moe_layers().values()), directory,
                                self.adapter, self.extract_config)

    @classmethod
    def from_pretrained(cls, directory: str | Path, base_model: nn.Module | None = None,
                        map_location: str | torch.device = "cpu",
                        verify: bool = True) -> MoEModel:
        """Rebuild a saved MoE model in eval mode on `map_location`; outputs equal the saved
        model's exactly. `base_model`: the dense model to rebuild onto when the base is not a
        transformers model (its weights are overwritten). `verify`: check the digests recorded
        at save (CheckpointError on a modified or corrupt file); False skips reading the
        weights file twice."""
        model, config = read_checkpoint(directory, base_model, map_location, verify)
        return cls(model, config.get("extract_config"), config.get("adapter"))


def load(directory: str | Path, base_model: nn.Module | None = None,
         map_location: str | torch.device = "cpu", verify: bool = True) -> MoEModel:
    """`MoEModel.from_pretrained`."""
    return MoEModel.from_pretrained(directory, base_model, map_location, verify)
