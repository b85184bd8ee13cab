"""Settings of the carving baselines (CMoE-style experts, MoEfication): experts from neuron
groups instead of clusters, measured beside MoEE."""

from __future__ import annotations

from dataclasses import dataclass

from moee.util.validation import check, check_types


@dataclass(frozen=True)
class CarveConfig:
    """Experts from groups of neurons, the baselines. `style="cmoe"` (`with_method("cmoe")`),
    top-1: shared neurons (the most often activated) in every expert plus `experts` equal
    routed groups, so that a token computes the share `active` of the neurons; a neuron
    counts as activated on a token when among its `top_fraction` largest |values| (CMoE's
    K_a), profiled on `tokens` calibration tokens. `style="moefication"`: `experts` balanced
    groups of the neurons' input weights, the `top_k` most similar per token (a token
    computes top_k / experts of the neurons). `iterations`: rounds of balanced assignment."""

    style: str = "cmoe"
    active: float = 0.4
    top_k: int = 2
    experts: int = 8
    top_fraction: float = 0.1
    tokens: int = 8192
    iterations: int = 5

    def __post_init__(self) -> None:
        check_types(self, "carve")
        check(self.style in ("cmoe", "moefication"), "carve.style",
              f"must be 'cmoe' or 'moefication', got {self.style!r}")
        check(self.experts >= 2, "carve.experts", f"must be >= 2, got {self.experts}")
        check(1 <= self.top_k < self.experts, "carve.top_k",
              f"must be in [1, experts), got {self.top_k}")
        check(self.style != "cmoe" or 1 / self.experts <= self.active <= 1, "carve.active",
               f"must be in [1/experts, 1], got {self.active}")
        check(0 < self.top_fraction <= 1, "carve.top_fraction",
               f"must be in (0, 1], got {self.top_fraction}")
        check(self.tokens >= 2 and self.iterations >= 1, "carve.tokens",
               "tokens must be >= 2 and iterations >= 1")
