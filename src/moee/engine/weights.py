"""What inference reads, derived once from a MoE layer's parameters: the inference-weight cache.

`slice_expert` is the one place expert weights are cut out of the union; the expert loop's
copies, the gather mode, the grouped path's padded stack and the differentiable training path
all go through it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from torch import nn

from moee.engine.activation import (
    MASK_OFFSET,
    inplace_activation,
    is_elementwise,
    silenced_by_offset,
)
from moee.engine.blocked import blocked_copies
from moee.engine.cost_model import COSTS, default_small_batch_tokens
from moee.engine.routing import Router, router_weights, routing_dtype

COMPILE_NEEDS_EAGER_CALL = (
    "MoEMLP under torch.compile reads inference weights built by an eager call: run the model "
    "once (same execution, dtype and device) before compiling it, and compile again after "
    "changing its weights")

Expert = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # W1_e (w, d), b1_e (w,), W2_e (d_out, w)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _pad8(n: int) -> int:
    return round_up(n, 8)  # grouped_mm wants row strides that are multiples of 16 bytes


def first_weights(fc1: nn.Linear, gate: nn.Linear | None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The first projection as one (U, d) matrix and bias, or for a gated MLP the gate's rows
    stacked over the up projection's, (2U, d): one matmul gives both halves."""
    if gate is None:
        return fc1.weight, fc1.bias
    w = torch.cat([gate.weight, fc1.weight])
    if gate.bias is None and fc1.bias is None:
        return w, None
    zeros = fc1.weight.new_zeros(fc1.out_features)
    return w, torch.cat([zeros if gate.bias is None else gate.bias,
                         zeros if fc1.bias is None else fc1.bias])


def gemm_layout(t: torch.Tensor) -> torch.Tensor:
    """`t` with the same shape and values, stored transposed for an fp32 matrix on CPU, so
    that `x @ t.T` reads a contiguous (in, out) matrix. Why: there, a GEMM of 8-64 rows ran
    up to 5x faster against (in, out) storage than against nn.Linear's (out, in), and one row
    no slower; in bf16 (out, in) ran faster on AMX, and GPUs take either (docs/engine.md)."""
    if t.device.type == "cpu" and t.dtype == torch.float32 and t.dim() == 2:
        return t.T.contiguous().T
    return t


def slice_expert(w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
                 index: torch.Tensor, width: int | None = None, gated: bool = False) -> Expert:
    """Expert weights as contiguous copies in nn.Linear's (out, in) layout, zero-padded from
    len(index) to `width` neurons (padded neurons have zero weights in and out, so they add
    nothing). Gated (`w1` = gate rows over up rows): the expert's first matrix is its gate rows
    over its up rows, (2·width, d). Differentiable: gradients reach the union weights."""
    m, halves = len(index), 2 if gated else 1
    width = m if width is None else width
    union = w1.shape[0] // halves
    rows = index if halves == 1 else torch.cat([index, index + union])
    if width == m:
        return w1[rows], (b1[rows] if b1 is not None else w1.new_zeros(len(rows))), w2[:, index]
    w1e, b1e = w1.new_zeros(halves * width, w1.shape[1]), w1.new_zeros(halves * width)
    w2e = w2.new_zeros(w2.shape[0], width)
    w2e[:, :m] = w2[:, index]
    for h in range(halves):
        w1e[h * width : h * width + m] = w1[index + h * union]
        if b1 is not None:
            b1e[h * width : h * width + m] = b1[index + h * union]
    return w1e, b1e, w2e


@dataclass(frozen=True, eq=False)
class InferenceWeights:
    """Everything one layer's inference reads, for one (weights, device, dtype, slicing):
    built once by `build_inference_weights`, never changed (a changed tensor or setting gets a
    new object). Plain references: the hot path avoids `nn.Module.__getattr__`, microseconds
    per lookup. `experts[e]` holds expert e's sliced copies zero-padded to `widths[e]` (None
    in gather mode: sliced each call). The copies only some executions read — `masking`,
    `union`, `padded`, `blocked` — are pure functions of these fields, derived on first use and
    kept (`cached_property`), so a layer pays only for the executions it runs."""

    key: tuple
    w1: torch.Tensor  # (U, d) union weights (gated: (2U, d), gate rows over up rows)
    b1: torch.Tensor | None
    gated: bool
    w2: torch.Tensor  # (d_out, U)
    w2t: torch.Tensor  # (U, d_out) transposed view
    indices: list[torch.Tensor]  # each expert's neurons, positions in the union
    widths: list[int]  # neurons in each expert's (zero-padded) weight copies
    router: Router
    out_bias: torch.Tensor  # (k, d_out): fc2 bias + each expert's left-out-neuron offset
    experts: list[Expert] | None
    activation: nn.Module
    elementwise_activation: bool  # act may run once over all experts' hidden values
    activation_: Callable[[torch.Tensor], torch.Tensor]  # act, in place where it can be
    default_small_batch_tokens: int  # the cost model's threshold for these weights

    @property
    def sizes(self) -> list[int]:
        return [len(i) for i in self.indices]

    def built(self, name: str) -> Any:
        """The derived copy `name` if it has been built, else None (nothing is built)."""
        return self.__dict__.get(name)

    def read(self, name: str) -> Any:
        """The derived copy `name`, built now if needed; under torch.compile only one that an
        eager call built (building it would be traced)."""
        if torch.compiler.is_compiling():
            return compiled_cache(self.built(name))
        return getattr(self, name)

    def expert(self, e: int) -> Expert:
        """Expert e's weights: the pre-sliced copy, or sliced now in gather mode."""
        if self.experts is not None:
            return self.experts[e]
        return slice_expert(self.w1, self.b1, self.w2, self.indices[e], self.widths[e],
                            self.gated)

    def activate(self, h: torch.Tensor, width: int) -> torch.Tensor:
        """(n, width) hidden values from the first matmul's (n, width) — gated: (n, 2·width),
        act(gate) * up — output, in place where the activation allows."""
        if not self.gated:
            return self.activation_(h)
        return self.activation_(h[:, :width]).mul_(h[:, width:])

    @cached_property
    @torch.no_grad()
    def masking(self) -> tuple[str, torch.Tensor]:
        """How "masked" silences the neurons a token's expert lacks: ("bias", (k, U) fc1 bias
        with MASK_OFFSET on those neurons) where the activation maps the offset exactly to 0,
        else ("mul", (k, U) 0/1 masks)."""
        union = self.w2.shape[1]
        masks = self.w1.new_zeros(len(self.indices), union)
        for e, index in enumerate(self.indices):
            masks[e, index] = 1
        if not (self.elementwise_activation and silenced_by_offset(self.activation, self.w1)):
            return "mul", masks
        # gated: the offset goes on the gate, act(gate) = 0 silences act(gate) * up
        bias = self.w1.new_zeros(self.w1.shape[0]) if self.b1 is None else self.b1
        table = bias.expand(len(self.indices), -1).clone()
        table[:, :union] += (masks - 1) * -MASK_OFFSET
        return "bias", table.contiguous()

    @cached_property
    @torch.no_grad()
    def union(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W1 and W2ᵀ of the union in `gemm_layout` (on CPU in fp32 a copy), for "masked"
        within the cost model's (in, out) token band (`union_weights`)."""
        return gemm_layout(self.w1), gemm_layout(self.w2).T

    @cached_property
    @torch.no_grad()
    def padded(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """For "grouped": W1 (k, d_pad, H) and W2 (k, m_pad, d_out_pad) zero-padded stacks
        with the biases folded in, the input's padding row (d_pad - d,) and m_max.

        Input column d is a constant 1 whose W1 row holds each expert's first bias; hidden
        column m_max (after every expert's neurons) is a constant 1 whose W2 row holds the
        expert's output bias (fc2 bias + left-out-neuron offset): the matmuls add the biases,
        no gathered bias tensors. Gated: H = 2·m_pad, gate over up. The weights are transposed
        views of (out, in) storage, the layout grouped_mm runs fast in bf16."""
        d, d_out, k = self.w1.shape[1], self.w2.shape[0], len(self.indices)
        m_max = max(self.sizes)
        m_pad = _pad8(m_max + 1)
        parts = [slice_expert(self.w1, self.b1, self.w2, i, m_pad, self.gated)
                 for i in self.indices]
        pw1 = self.w1.new_zeros(k, parts[0][0].shape[0], _pad8(d + 1))  # (k, H, d_pad)
        pw1[:, :, :d] = torch.stack([p[0] for p in parts])
        pw1[:, :, d] = torch.stack([p[1] for p in parts])
        pw2 = self.w2.new_zeros(k, _pad8(d_out), m_pad)  # (k, d_out_pad, m_pad)
        pw2[:, :d_out] = torch.stack([p[2] for p in parts])
        pw2[:, :d_out, m_max] = self.out_bias
        unit = self.w1.new_zeros(pw1.shape[2] - d)
        unit[0] = 1
        return pw1.transpose(1, 2), pw2.transpose(1, 2), unit, m_max

    @cached_property
    def blocked(self) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Each expert's (W1_e, W2_e) reordered for oneDNN (`moee.engine.blocked`), or None
        where they do not pay."""
        return blocked_copies(self.experts, self.w1)


def build_inference_weights(key: tuple, fc1: nn.Linear, fc2: nn.Linear, gate: nn.Linear | None,
                            activation: nn.Module, indices: list[torch.Tensor],
                            centres: torch.Tensor, expert_bias: torch.Tensor, metric: str,
                            presliced: bool, width_multiple: int) -> InferenceWeights:
    """Derive the cache from a layer's tensors (no autograd kept)."""
    w2, b2, gated = fc2.weight, fc2.bias, gate is not None
    with torch.no_grad():
        w1, b1 = first_weights(fc1, gate)
        out_bias = expert_bias.to(w2.dtype) + (b2 if b2 is not None else 0)
        elementwise = is_elementwise(activation, w1)
        multiple = width_multiple if elementwise else 1  # padding would shift a row function
        widths = [round_up(len(i), multiple) for i in indices]
        experts = ([tuple(map(gemm_layout, slice_expert(w1, b1, w2, i, w, gated)))
                    for i, w in zip(indices, widths, strict=True)] if presliced else None)
        router = router_weights(centres.to(routing_dtype(w1.dtype)), metric)
        w2t = w2.T
    return InferenceWeights(
        key, w1, b1, gated, w2, w2t, indices, widths, router, out_bias.contiguous(), experts,
        activation, elementwise, inplace_activation(activation) or activation,
        default_small_batch_tokens(fc1.out_features, [len(i) for i in indices], w1.dtype,
                                   w1.device.type, w1.shape[1]))


def compiled_cache(value):
    """What compiled code reads instead of (re)building a cache: the eager-built value."""
    if value is None:
        raise RuntimeError(COMPILE_NEEDS_EAGER_CALL)
    return value


def union_weights(w: InferenceWeights, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For "masked" on `tokens` tokens: W1 (2U or U, d) and W2ᵀ (U, d_out). Within the cost
    model's (in, out) token band, `w.union` (on CPU in fp32 a copy of the union, counted by
    `derived_bytes`); otherwise `w.w1` and `w.w2t`, whose (out, in) storage ran faster at 2-6
    rows for DeiT-base-sized matrices."""
    if not COSTS.in_out_min_tokens <= tokens <= COSTS.in_out_max_tokens:
        return w.w1, w.w2t
    return w.read("union")


def derived_bytes(w: InferenceWeights, own: set[int]) -> int:
    """Bytes of the cache's weight copies (expert copies, the gated first matrix, union copies,
    oneDNN-blocked expert copies) whose storage is not in `own` (the layer's own tensors' data
    pointers)."""
    tensors = [w.w1, *(t for e in (w.experts or []) for t in e), *(w.built("union") or ())]
    seen = set(own)
    # blocked copies are opaque tensors (no storage to ask): their elements' bytes
    total = sum(t.numel() * t.element_size() for pair in (w.built("blocked") or [])
                for t in pair)
    for t in tensors:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.untyped_storage().nbytes()
    return total
