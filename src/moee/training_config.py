"""Validated settings of the training stages: end-to-end distillation and the layer-local
distillation that may follow extraction. Each dataclass checks itself and names the bad
field."""

from __future__ import annotations

from dataclasses import dataclass

from moee.util.validation import check, check_types

DISTILL_LOSSES = ("auto", "kl", "mse", "pooled_cosine")


@dataclass(frozen=True)
class LocalDistillConfig:
    """Layer-local distillation after extraction (not in the paper): each MoE MLP trained
    alone toward the dense MLP's output on the recorded inputs, `steps` Adam steps of
    `batch_tokens` tokens at `lr` (cosine decay), router fixed; kept only where the held-out
    error falls."""

    steps: int = 100
    lr: float = 1e-4
    batch_tokens: int = 512

    def __post_init__(self) -> None:
        check_types(self, "local")
        check(self.steps >= 1, "local.steps", f"must be >= 1, got {self.steps}")
        check(self.lr > 0, "local.lr", f"must be > 0, got {self.lr}")
        check(self.batch_tokens >= 1, "local.batch_tokens",
              f"must be >= 1, got {self.batch_tokens}")


@dataclass(frozen=True)
class DistillConfig:
    """Knowledge-distillation fine-tune of the MoE student from the dense teacher.

    `epochs`: passes over the batches given to `moee.distill` (fractions allowed when the data
    has a length). `lr`: AdamW's peak rate under a cosine schedule after `warmup_steps`;
    3e-4 is what the embedded default measured best at (docs/method.md). `loss`: "kl" on
    temperature-softened logits, "mse" on hidden states (encoders), "pooled_cosine" = 1 − cosine
    of the hidden states mean-pooled over real tokens (the sentence embedding a
    sentence-transformers encoder returns), "auto" = "kl" when the output has logits, else "mse".
    `seed` seeds the run's random draws (e.g. dropout). `dropout=False` trains the student
    without dropout: every module but the MoE layers stays in eval mode, so the loss is the
    deterministic divergence that evaluation measures.
    """

    epochs: float = 1.0
    lr: float = 3e-4
    weight_decay: float = 0.01
    temperature: float = 1.0
    warmup_steps: int = 0
    loss: str = "auto"
    seed: int = 0
    device: str = "cpu"
    dropout: bool = True

    def __post_init__(self) -> None:
        check_types(self, "distill")
        check(self.epochs > 0, "distill.epochs", f"must be > 0, got {self.epochs}")
        check(self.lr > 0, "distill.lr", f"must be > 0, got {self.lr}")
        check(self.weight_decay >= 0, "distill.weight_decay", "must be >= 0")
        check(self.temperature > 0, "distill.temperature", "must be > 0")
        check(self.warmup_steps >= 0, "distill.warmup_steps", "must be >= 0")
        check(self.loss in DISTILL_LOSSES, "distill.loss",
               f"must be one of {DISTILL_LOSSES}, got {self.loss!r}")
