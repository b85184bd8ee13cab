"""The distillation losses between a student's and its teacher's outputs: the fine-tune's
(`moee.training.distill`) and the MAC budget's layer sensitivity (`moee.extraction.budget`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moee.training_config import DistillConfig
from moee.util.batches import Batch, mean_pooled, token_mask


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, t: float) -> torch.Tensor:
    """KL(teacher || student) on temperature-softened distributions, scaled by t^2, averaged
    over rows (examples, or tokens for sequence outputs)."""
    s, te = student_logits.flatten(0, -2), teacher_logits.flatten(0, -2)  # (rows, classes)
    return F.kl_div(F.log_softmax(s / t, -1), F.log_softmax(te / t, -1),
                    log_target=True, reduction="batchmean") * t * t


def loss_kind(teacher_out, config: DistillConfig) -> str:
    """"kl" on logits, "mse" on hidden states (encoders without logits), or what `config`
    names."""
    if config.loss != "auto":
        return config.loss
    hidden_only = getattr(teacher_out, "logits", None) is None and \
        getattr(teacher_out, "last_hidden_state", None) is not None
    return "mse" if hidden_only else "kl"


def output_loss(s: torch.Tensor, t: torch.Tensor, batch: Batch, kind: str,
                temperature: float = 1.0) -> torch.Tensor:
    """The distillation loss between output tensors, over the batch's real tokens only."""
    mask = token_mask(batch)
    per_token = mask is not None and s.dim() == 3 and tuple(s.shape[:2]) == tuple(mask.shape)
    if kind == "pooled_cosine":
        if s.dim() == 3:
            s, t = (mean_pooled(x, mask if per_token else None) for x in (s, t))
        return (1 - F.cosine_similarity(s.flatten(1), t.flatten(1), dim=-1)).mean()
    if per_token:
        s, t = s[mask], t[mask]  # per-token outputs: padding tokens carry no signal
    if kind == "mse":
        return F.mse_loss(s, t)
    return kd_loss(s, t, temperature)
