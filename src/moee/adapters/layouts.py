"""The built-in adapters, one per MLP layout, registered most specific first.

Each finder walks `model.named_modules()` and returns an `MLPSite` per block of its layout;
`find_mlp_sites` then checks every site on a probe, so a loose match is refused, not trusted.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from moee.adapters.registry import register_adapter
from moee.adapters.site import MLPSite, MLPWeights, linear_weights

_ACT_NAMES = ("act", "activation_fn", "act_fn", "activation")


def _act_attr(module: nn.Module) -> str | None:
    return next((a for a in _ACT_NAMES if isinstance(getattr(module, a, None), nn.Module)), None)


def _act(module: nn.Module) -> nn.Module | None:
    attr = _act_attr(module)
    return None if attr is None else getattr(module, attr)


def _layer_install(layer: nn.Module, first: str, second: str) -> Callable[[nn.Module], None]:
    """Install into a layer that calls `first`, its activation and `second` in turn: the MoE
    takes `first`'s place, the other two become identities."""
    act_attr = _act_attr(layer)

    def install(moe: nn.Module) -> None:
        setattr(layer, first, moe)
        setattr(layer, second, nn.Identity())
        setattr(layer, act_attr, nn.Identity())

    return install


def _linear(*modules) -> bool:
    return all(isinstance(m, nn.Linear) for m in modules)


def _replace(model: nn.Module, name: str) -> Callable[[nn.Module], None]:
    """Install by putting the new module where `name` is."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    return lambda module: setattr(parent, attr, module)


def _block_site(model: nn.Module, name: str, module: nn.Module, weights, act) -> MLPSite:
    """A site whose module is the whole MLP: replaced as a whole, checked against itself."""
    return MLPSite(name, weights, act, module, _replace(model, name), module)


@register_adapter("gated")
def _find_gated(model: nn.Module) -> list[MLPSite]:
    """LLaMA, Mistral, Qwen2/3, Gemma...: down(act(gate_proj(x)) * up_proj(x))."""
    sites = []
    for name, m in model.named_modules():
        gate, up, down = (getattr(m, a, None) for a in ("gate_proj", "up_proj", "down_proj"))
        act = _act(m)
        if _linear(gate, up, down) and act is not None:
            sites.append(_block_site(model, name, m, linear_weights(up, down, gate), act))
    return sites


@register_adapter("fused-gate-up")
def _find_fused_gate_up(model: nn.Module) -> list[MLPSite]:
    """Phi-3: gate and up in one projection, gate first: down(up * act(gate))."""
    sites = []
    for name, m in model.named_modules():
        fused, down, act = getattr(m, "gate_up_proj", None), getattr(m, "down_proj", None), _act(m)
        if not (_linear(fused, down) and act is not None):
            continue

        def weights(fused=fused, down=down) -> MLPWeights:
            gate, up = fused.weight.chunk(2)
            gate_b, up_b = (None, None) if fused.bias is None else fused.bias.chunk(2)
            return MLPWeights(up, up_b, down.weight, down.bias, gate, gate_b)

        sites.append(_block_site(model, name, m, weights, act))
    return sites


@register_adapter("conv1d")
def _find_conv1d(model: nn.Module) -> list[MLPSite]:
    """GPT-2: c_proj(act(c_fc(x))) with transformers' Conv1D, weights stored (in, out)."""
    sites = []
    for name, m in model.named_modules():
        fc, proj, act = getattr(m, "c_fc", None), getattr(m, "c_proj", None), _act(m)
        if (type(fc).__name__ == "Conv1D" and type(proj).__name__ == "Conv1D"
                and act is not None):
            sites.append(_block_site(model, name, m, linear_weights(fc, proj, transposed=True),
                                     act))
    return sites


@register_adapter("glu")
def _find_glu(model: nn.Module) -> list[MLPSite]:
    """timm GluMlp (fc1 gives both halves; the gate is the second unless `gate_last` is off)
    and timm SwiGLU (fc1_g, fc1_x): fc2(act(gate) * up), with an identity norm."""
    sites = []
    for name, m in model.named_modules():
        act, fc2 = _act(m), getattr(m, "fc2", None)
        norm = getattr(m, "norm", None)
        if act is None or not _linear(fc2) or not (norm is None or isinstance(norm, nn.Identity)):
            continue
        fc1, g, x = getattr(m, "fc1", None), getattr(m, "fc1_g", None), getattr(m, "fc1_x", None)
        if _linear(g, x):
            sites.append(_block_site(model, name, m, linear_weights(x, fc2, g), act))
        elif _linear(fc1) and hasattr(m, "gate_last") and fc1.out_features == 2 * fc2.in_features:

            def weights(fc1=fc1, fc2=fc2, gate_last=bool(m.gate_last)) -> MLPWeights:
                first, second = fc1.weight.chunk(2)
                bias = (None, None) if fc1.bias is None else fc1.bias.chunk(2)
                (up, up_b), (gate, gate_b) = (first, bias[0]), (second, bias[1])
                if not gate_last:
                    (up, up_b), (gate, gate_b) = (gate, gate_b), (up, up_b)
                return MLPWeights(up, up_b, fc2.weight, fc2.bias, gate, gate_b)

            sites.append(_block_site(model, name, m, weights, act))
    return sites


def _has_attention(m: nn.Module) -> bool:
    return any(hasattr(m, a) for a in ("self_attn", "attention", "attn", "encoder_attn"))


@register_adapter("fc1-act-fc2")
def _find_fc1_fc2(model: nn.Module) -> list[MLPSite]:
    """HF ViT/DeiT/CLIP MLPs, timm `Mlp`: a module computing fc2(act(fc1(x)))."""
    sites = []
    for name, m in model.named_modules():
        fc1, fc2, act = getattr(m, "fc1", None), getattr(m, "fc2", None), _act(m)
        norm = getattr(m, "norm", None)
        if (not _linear(fc1, fc2) or act is None or _has_attention(m)
                or fc1.out_features != fc2.in_features
                or not (norm is None or isinstance(norm, nn.Identity))):
            continue  # e.g. timm Mlp with a norm between act and fc2: not fc2(act(fc1))
        sites.append(_block_site(model, name, m, linear_weights(fc1, fc2), act))
    return sites


@register_adapter("layer-fc1-fc2")
def _find_layer_fc1_fc2(model: nn.Module) -> list[MLPSite]:
    """OPT, BART, Whisper...: fc1, activation_fn and fc2 called in turn by the transformer
    layer itself. The MoE takes fc1's place; activation_fn and fc2 become identities."""
    sites = []
    for name, m in model.named_modules():
        fc1, fc2, act = getattr(m, "fc1", None), getattr(m, "fc2", None), _act(m)
        if not (_linear(fc1, fc2) and act is not None and _has_attention(m)):
            continue
        sites.append(MLPSite(name, linear_weights(fc1, fc2), act, fc1,
                             _layer_install(m, "fc1", "fc2"),
                             lambda x, fc1=fc1, fc2=fc2, act=act: fc2(act(fc1(x)))))
    return sites


@register_adapter("intermediate-output")
def _find_intermediate_output(model: nn.Module) -> list[MLPSite]:
    """BERT, RoBERTa, Swin...: intermediate = act(dense(x)); output = dense (+ dropout,
    residual, LayerNorm). The MoE takes `intermediate`'s place and computes the whole MLP;
    `output.dense` becomes an identity so the rest of `output` runs unchanged."""
    sites = []
    for name, m in model.named_modules():
        inter, out = getattr(m, "intermediate", None), getattr(m, "output", None)
        dense_in, dense_out = getattr(inter, "dense", None), getattr(out, "dense", None)
        act = getattr(inter, "intermediate_act_fn", None)
        if not (_linear(dense_in, dense_out) and isinstance(act, nn.Module)):
            continue

        def install(moe: nn.Module, layer=m) -> None:
            layer.intermediate = moe
            layer.output.dense = nn.Identity()

        sites.append(MLPSite(name, linear_weights(dense_in, dense_out), act, inter, install,
                             lambda x, inter=inter, dense=dense_out: dense(inter(x))))
    return sites


@register_adapter("pointwise-conv")
def _find_pointwise(model: nn.Module) -> list[MLPSite]:
    """ConvNeXt: pwconv2(act(pwconv1(x))) over channels-last positions, called by the layer
    itself (ConvNeXt V2's GRN between act and pwconv2 is not this layout)."""
    sites = []
    for name, m in model.named_modules():
        pw1, pw2, act = getattr(m, "pwconv1", None), getattr(m, "pwconv2", None), _act(m)
        if not (_linear(pw1, pw2) and act is not None) or hasattr(m, "grn"):
            continue
        sites.append(MLPSite(name, linear_weights(pw1, pw2), act, pw1,
                             _layer_install(m, "pwconv1", "pwconv2"),
                             lambda x, pw1=pw1, pw2=pw2, act=act: pw2(act(pw1(x)))))
    return sites
