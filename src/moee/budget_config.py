"""Settings of the budget modes: a MAC target or a latency target instead of one p."""

from __future__ import annotations

from dataclasses import dataclass

from moee.util.validation import check, check_types

LATENCY_ENGINES = ("torch", "onnxruntime", "openvino")  # where a latency budget is timed


@dataclass(frozen=True)
class BudgetConfig:
    """MAC-budget mode (not in the paper): with `target_macs` set (a fraction of the dense
    model's MACs), each layer gets its own p from `p_grid`, or stays dense, chosen from every
    layer's measured sensitivity so that the model meets the target with the least output
    divergence; `select.p` is then unused. `scope`: "model" counts whole-model MACs, "mlp"
    only the MLP blocks'. Sensitivity is measured on the first `probe_batches` calibration
    batches: the distillation loss (KL on logits, MSE on hidden states) between the dense
    model and the model with that one layer converted.

    Latency-budget mode: with `target_latency` set (a fraction of the dense model's latency in
    `engine` at `batch` rows), each layer stays dense, is pruned statically (one expert) or
    becomes routed experts, at a p of `p_grid`, chosen from the same sensitivity and from
    every candidate's latency measured in that engine on this machine. `methods` narrows the
    candidates to static pruning or to routed experts (the single-method baselines at the same
    measured latency)."""

    target_macs: float | None = None
    scope: str = "model"
    p_grid: tuple[float, ...] = (0.99, 0.97, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6, 0.5, 0.4,
                                 0.3)
    probe_batches: int = 2
    target_latency: float | None = None
    engine: str = "torch"  # where the latency budget is measured: LATENCY_ENGINES
    batch: int = 64  # rows of the batch the latency budget is measured at
    methods: tuple[str, ...] = ("static", "moee")  # what the latency budget may choose, or dense

    def __post_init__(self) -> None:
        check_types(self, "budget")
        check(self.target_macs is None or 0 < self.target_macs < 1, "budget.target_macs",
               f"must be in (0, 1) or None, got {self.target_macs}")
        check(self.scope in ("model", "mlp"), "budget.scope",
               f"must be 'model' or 'mlp', got {self.scope!r}")
        check(len(self.p_grid) > 0 and all(0 < p <= 1 for p in self.p_grid), "budget.p_grid",
               f"must be values in (0, 1], got {self.p_grid}")
        check(self.probe_batches >= 1, "budget.probe_batches",
               f"must be >= 1, got {self.probe_batches}")
        check(self.target_latency is None or 0 < self.target_latency < 1,
              "budget.target_latency", f"must be in (0, 1) or None, got {self.target_latency}")
        check(self.target_latency is None or self.target_macs is None, "budget.target_latency",
              "a MAC budget or a latency budget, not both")
        check(self.engine in LATENCY_ENGINES, "budget.engine",
              f"must be one of {LATENCY_ENGINES}, got {self.engine!r}")
        check(self.batch >= 1, "budget.batch", f"must be >= 1, got {self.batch}")
        check(len(self.methods) > 0 and set(self.methods) <= {"static", "moee"},
              "budget.methods", f"must be 'static' and/or 'moee', got {self.methods}")

    @property
    def active(self) -> bool:
        """Whether a MAC or latency budget chooses each layer's p."""
        return self.target_macs is not None or self.target_latency is not None
