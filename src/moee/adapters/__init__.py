"""Where the MLP blocks are, per model family. The core only sees `MLPSite`s.

An adapter is registered under a name and lists the MLP blocks of a model it understands;
`find_mlp_sites` tries each registered adapter in turn (or the one named).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from moee.errors import ConfigError, NoMLPBlocksError


@dataclass
class MLPSite:
    """One dense MLP `fc2(act(fc1(x)))` inside a model and how to swap it out.

    `name` is the dotted module path that identifies the block (stable across save/load).
    `install(module)` puts a drop-in module (same input/output as the dense MLP) in its place.
    """

    name: str
    fc1: nn.Linear
    fc2: nn.Linear
    activation: nn.Module
    install: Callable[[nn.Module], None]


_ADAPTERS: dict[str, Callable[[nn.Module], list[MLPSite]]] = {}


def register_adapter(name: str):
    """Decorator: register `finder(model) -> list[MLPSite]` under `name`."""

    def wrap(finder: Callable[[nn.Module], list[MLPSite]]):
        _ADAPTERS[name] = finder
        return finder

    return wrap


def list_adapters() -> list[str]:
    return sorted(_ADAPTERS)


def find_mlp_sites(model: nn.Module, adapter: str | None = None) -> list[MLPSite]:
    """MLP blocks of `model` in forward order; raises NoMLPBlocksError when there are none."""
    if adapter is not None:
        if adapter not in _ADAPTERS:
            raise ConfigError(f"adapter: unknown {adapter!r}; registered: {list_adapters()}")
        finders = {adapter: _ADAPTERS[adapter]}
    else:
        finders = _ADAPTERS
    for finder in finders.values():
        sites = finder(model)
        if sites:
            return sites
    raise NoMLPBlocksError(
        f"No MLP blocks found in {type(model).__name__}. moee recognises {list_adapters()} "
        "layouts: a module with fc1/act/fc2 Linear layers (HF ViT/DeiT/CLIP, timm Mlp) or a "
        "layer with intermediate.dense + output.dense (HF BERT). Register an adapter with "
        "moee.adapters.register_adapter for other layouts."
    )


def _setter(parent: nn.Module, attr: str) -> Callable[[nn.Module], None]:
    return lambda module: setattr(parent, attr, module)


_ACT_NAMES = ("act", "activation_fn", "act_fn", "activation")


@register_adapter("fc1-act-fc2")
def _find_fc1_fc2(model: nn.Module) -> list[MLPSite]:
    """HF ViT/DeiT (transformers>=5 `ViTMLP`), CLIP MLP, timm `Mlp`: fc2(act(fc1(x)))."""
    sites = []
    for name, module in model.named_modules():
        fc1, fc2 = getattr(module, "fc1", None), getattr(module, "fc2", None)
        act = next((getattr(module, a) for a in _ACT_NAMES if hasattr(module, a)), None)
        if not (isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear) and act is not None):
            continue
        norm = getattr(module, "norm", None)
        if norm is not None and not isinstance(norm, nn.Identity):
            continue  # timm Mlp with a norm between act and fc2: not fc2(act(fc1)), skip it
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        sites.append(MLPSite(name, fc1, fc2, act, _setter(parent, attr)))
    return sites


@register_adapter("intermediate-output")
def _find_intermediate_output(model: nn.Module) -> list[MLPSite]:
    """HF BERT-style layers: intermediate = act(dense(x)); output = dense + dropout + residual.

    The MoE takes the place of `intermediate` and computes the whole MLP; `output.dense`
    becomes Identity so the residual/LayerNorm in `output` still run unchanged.
    """
    sites = []
    for name, module in model.named_modules():
        inter, out = getattr(module, "intermediate", None), getattr(module, "output", None)
        if not (isinstance(getattr(inter, "dense", None), nn.Linear)
                and isinstance(getattr(out, "dense", None), nn.Linear)):
            continue

        def install(moe: nn.Module, layer=module) -> None:
            layer.intermediate = moe
            layer.output.dense = nn.Identity()

        sites.append(MLPSite(name, inter.dense, out.dense, inter.intermediate_act_fn, install))
    return sites
