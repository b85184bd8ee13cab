"""When the per-expert loop beats the masked path, before any calibration.

The constants are machine-fitted; they live in `cost_model.json` beside this file (refit them
with `benchmarks/fit_cost_model.py`) and are read here, once, into `COSTS`.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, fields
from importlib import resources

import torch


@dataclass(frozen=True)
class CostModel:
    """Tokens per expert at which a small GEMM runs at about half its large-batch speed
    (`half_speed_tokens_*`), the AMX rules (a fixed cost per call, weighing more against
    narrow GEMMs), two layout constants of the expert loop, the token counts at which
    "masked" reads (in, out) weight copies and at which the loop reads oneDNN-blocked ones."""

    half_speed_tokens_fp32: int
    half_speed_tokens_amx: int
    amx_reference_width: int
    amx_width_exponent: float
    amx_min_tokens_per_expert: int
    half_speed_tokens_low_precision: int
    flat_activation_max_elements: int  # above this the activation runs per expert
    expert_width_multiple: int  # default ExecutionConfig.width_multiple
    in_out_min_tokens: int  # "masked" reads (in, out) union copies from this many tokens
    in_out_max_tokens: int  # ... to this many (fp32, CPU; benchmarks/experiments/gemm_layout.py)
    blocked_min_tokens: int  # the expert loop reads oneDNN-blocked copies for groups of this
    blocked_max_tokens: int  # ... to this many tokens (fp32, CPU; engine/blocked.py)
    blocked_min_elements: int  # ... in layers whose experts' W1 average this many elements

    @classmethod
    def from_json(cls, text: str) -> CostModel:
        values = json.loads(text)
        return cls(**{f.name: values[f.name] for f in fields(cls)})


COSTS = CostModel.from_json((resources.files("moee.engine") / "cost_model.json").read_text())


@functools.cache
def cpu_has_amx(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies `dtype` (bf16 / fp16) on AMX tiles."""
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return bool(caps.get({torch.bfloat16: "amx_bf16", torch.float16: "amx_fp16"}.get(dtype, "")))


def on_amx(dtype: torch.dtype, device_type: str) -> bool:
    """Whether GEMMs of `dtype` on this device run on AMX tiles (CPU bf16 / fp16 only)."""
    return device_type == "cpu" and dtype != torch.float32 and cpu_has_amx(dtype)


def half_speed_tokens(dtype: torch.dtype, device_type: str = "cpu", width: int | None = None,
                      costs: CostModel = COSTS) -> int:
    """Tokens per expert at which a small GEMM of input width `width` runs at about half its
    large-batch speed."""
    if dtype == torch.float32:
        return costs.half_speed_tokens_fp32
    if on_amx(dtype, device_type):
        width = width or costs.amx_reference_width
        scale = (costs.amx_reference_width / width) ** costs.amx_width_exponent
        return max(costs.half_speed_tokens_fp32, round(costs.half_speed_tokens_amx * scale))
    return costs.half_speed_tokens_low_precision


def default_small_batch_tokens(union: int, sizes: list[int], dtype: torch.dtype = torch.float32,
                               device_type: str = "cpu", width: int | None = None,
                               costs: CostModel = COSTS) -> int:
    """Token count up to which "masked" is expected to beat the expert loop. With n tokens per
    expert a GEMM runs at n / (n + n_half) of full speed, so the loop costs N·m·(1 + n_half·k/N)
    against N·U for masked (m mean expert size, U union, k experts): masked wins while
    N < n_half·k / (U/m - 1). On AMX also while experts would get fewer than
    `amx_min_tokens_per_expert` tokens on average. One expert: the loop is a plain MLP."""
    k = len(sizes)
    if k == 1:
        return 0
    spread = union / (sum(sizes) / k) - 1  # how many more neurons masked computes per token
    n_half = half_speed_tokens(dtype, device_type, width, costs)
    threshold = int(n_half * k / max(spread, 0.125))
    if on_amx(dtype, device_type):
        threshold = max(threshold, costs.amx_min_tokens_per_expert * k - 1)
    return threshold
