"""Per-layer execution settings: one frozen value per `MoEMLP`, replaced, never mutated."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from moee.engine.cost_model import COSTS
from moee.errors import ConfigError

# How a MoEMLP runs its tokens in eval mode (docs/engine.md has the measurements):
#   "experts": tokens sorted by expert, two matmuls per expert on its own neurons; at or below
#              `small_batch_tokens` tokens it runs "masked" instead.
#   "masked":  every kept neuron for every token, the neurons outside the token's expert
#              silenced: a handful of kernel calls whatever the number of experts.
#   "grouped": one `grouped_mm` per projection over padded expert weights, no host sync.
#   "union":   the pruned union run densely without routing (the speed fallback; a
#              different function).
EXECUTIONS = ("experts", "masked", "grouped", "union")


@dataclass(frozen=True)
class ExecutionConfig:
    """How one MoE layer runs at inference.

    `small_batch_tokens`: up to this many tokens "experts" runs "masked" (None = the cost
    model's default for the weights' dtype and device). `presliced`: keep contiguous per-expert
    weight copies (fast; more memory) or gather them from the union each call. `width_multiple`:
    expert copies are zero-padded to a multiple of this many neurons (1 = none).
    """

    execution: str = "experts"
    small_batch_tokens: int | None = None
    presliced: bool = True
    width_multiple: int = COSTS.expert_width_multiple

    def __post_init__(self) -> None:
        if self.execution not in EXECUTIONS:
            raise ConfigError(f"execution: must be one of {EXECUTIONS}, got {self.execution!r}")
        t = self.small_batch_tokens
        if t is not None and (isinstance(t, bool) or not isinstance(t, int) or t < 0):
            raise ConfigError(f"small_batch_tokens: must be a non-negative integer or None, "
                              f"got {t!r}")
        if not isinstance(self.presliced, bool):
            raise ConfigError(f"presliced: must be true or false, got {self.presliced!r}")
        w = self.width_multiple
        if isinstance(w, bool) or not isinstance(w, int) or w < 1:
            raise ConfigError(f"width_multiple: must be an integer >= 1, got {w!r}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
